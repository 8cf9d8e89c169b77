"""After the phases: test-split metrics of the XE and SCST checkpoints (and of the starting captioner of a
fine-tuning run, also on its own data's test split: what it forgot), baselines, grounded accuracies (the synthetic
data) or your own data's captioned images, a verdict a newcomer can act on, report.md."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.formats import load_records
from data.images import open_image
from data.loaders import ImageSource
from data.records import ImageRecord
from data.splits import split_records
from data.synthetic import GROUND_TRUTH_NAME, caption_from_ground_truth, load_ground_truth, shape_vocabulary
from deploy.checkpoints import restore_model
from engine.evaluate import (
    EVAL_PRECISION,
    as_runtime,
    caption_records,
    decoding_record,
    evaluation_report,
    prediction_rows,
)
from eval.cider import CiderD, best_constant_caption
from eval.grounded import GroundingWords, grounded_accuracy
from eval.metrics import MeteorSession, python_tokenize, shared_meteor
from utils.plots import save_caption_grid


def evaluate_checkpoint(path: Path, records: list[ImageRecord], beam_size: int, max_len: int = 20,
                        batch_size: int = 100, device: str = "cpu", meteor: MeteorSession | None = None,
                        split: str = "test") -> tuple[dict[int, str], dict[str, Any]]:
    """Caption a split end-to-end with a checkpoint (fp32, evaluation's precision) and score it with the COCO
    metrics (x100); meteor: a METEOR session shared with other evaluations. The report carries the record of what
    was measured, as test.py's metrics do (engine.evaluate.decoding_record: weights digest, backend, precision, beam
    size, length cap, split and its size) under "record"."""
    print(f"   captioning {len(records)} images with {path}", flush=True)
    restored = restore_model(path)
    bb = restored.config.backbone
    source = ImageSource(backbone=bb)
    dev = torch.device(device)
    model = restored.model.to(dev)
    preds, _ = caption_records(model, records, restored.vocab, source, beam_size=beam_size, max_len=max_len,
                               batch_size=batch_size, device=dev, precision=EVAL_PRECISION, progress=False)
    record = decoding_record(as_runtime(model, dev, EVAL_PRECISION), beam_size=beam_size, max_len=max_len,
                             split=split, split_size=len(records))
    report = evaluation_report(preds, records, ("BLEU", "METEOR", "ROUGE_L", "CIDEr"), meteor=meteor)
    return preds, {**report, "checkpoint": str(path), "record": record}


def constant_caption_baseline(train: list[ImageRecord], test: list[ImageRecord]) -> tuple[str, float]:
    """The training caption that, given to every test image, scores the highest CIDEr-D (x100) on the test
    references: how far the language prior alone gets (every distinct training caption is tried)."""
    candidates = sorted({python_tokenize(c) for r in train for c in r.captions})
    caption, score = best_constant_caption(candidates, [[python_tokenize(c) for c in r.captions] for r in test])
    return caption, 100.0 * score


def test_results(splits: dict[str, list[ImageRecord]], xe_checkpoint: Path, final_checkpoint: Path,
                 beam_size: int, meteor: MeteorSession | None) -> tuple[dict[int, str], dict[int, str], dict[str, Any]]:
    """The XE and final checkpoints' test-split captions and metrics, and the best constant caption: (XE captions,
    final captions, results). meteor: the report's one METEOR session (its start is most of its time)."""
    test = splits["test"]
    xe_preds, xe_report = evaluate_checkpoint(xe_checkpoint, test, beam_size, meteor=meteor)
    preds, report = evaluate_checkpoint(final_checkpoint, test, beam_size, meteor=meteor)
    constant, constant_cider = constant_caption_baseline(splits["train"], test)
    return xe_preds, preds, {"test_xe": xe_report, "test_final": report, "best_constant_caption": constant,
                             "best_constant_cider": constant_cider}


def write_report(run_dir: Path, results: dict[str, Any], preds: dict[int, str], text: str) -> None:
    """results.json, predictions_test.json (the final checkpoint's test captions, each row with the record of how
    they were decoded, as test.py writes them), the phases' curves and report.md in run_dir."""
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    record = results.get("test_final", {}).get("record", {})
    (run_dir / "predictions_test.json").write_text(json.dumps(prediction_rows(preds, record), indent=1))
    _copy_curves(run_dir)
    (run_dir / "report.md").write_text(text)


def quickstart_report(run_dir: Path, captions_path: Path, images_path: Path, xe_checkpoint: Path,
                      final_checkpoint: Path, manifest: dict[str, Any], beam_size: int = 3) -> dict[str, Any]:
    """Evaluate, compare with the baselines, and write report.md, results.json and a captioned test grid PNG."""
    splits = split_records(load_records(captions_path, images_path))
    test = splits["test"]
    with shared_meteor() as meteor:
        xe_preds, preds, scores = test_results(splits, xe_checkpoint, final_checkpoint, beam_size, meteor)
    truth = load_ground_truth(Path(captions_path).parent / GROUND_TRUTH_NAME)
    words = GroundingWords.from_vocabulary(shape_vocabulary())
    grounded, xe_grounded = grounded_accuracy(preds, truth, words), grounded_accuracy(xe_preds, truth, words)
    examples = caption_examples(test, preds, truth, words)
    grid = save_caption_grid([open_image(r.path) for r in test[:len(examples)]],
                             [f"{e['mark']} {e['caption']} | truth: {e['truth']}" for e in examples],
                             run_dir / "test_captions.png", thumb=128, columns=4, line_chars=26)
    results = {**scores, "grounded_final": grounded, "grounded_xe": xe_grounded,
               "phase0_probe": manifest.get("phases", {}).get("0", {}).get("metrics", {}).get("probe"),
               "examples": examples, "beam_size": beam_size, "xe_checkpoint": str(xe_checkpoint),
               "final_checkpoint": str(final_checkpoint)}
    write_report(run_dir, results, preds, render_report(results, manifest, grid.name))
    return results


def own_data_report(run_dir: Path, captions_path: Path, images_path: Path, xe_checkpoint: Path,
                    final_checkpoint: Path, manifest: dict[str, Any], beam_size: int = 3, count: int = 16,
                    start_checkpoint: Path | None = None, old_data: tuple[Path, Path] | None = None
                    ) -> dict[str, Any]:
    """The quickstart's report for your own data: test metrics after XE and SCST and the best constant caption when
    there is a test split (with the starting captioner's beside them when the run fine-tuned one), grounded
    accuracies when the synthetic generator's ground truth lies beside the captions, the starting and the final
    model on the test split of old_data (captions path, images path: the starting model's own data, to measure what
    fine-tuning forgot), a grid of test images (val images when there is no test split) with the final checkpoint's
    captions, phase durations, and a verdict."""
    splits = split_records(load_records(captions_path, images_path))
    shown_split = "test" if splits["test"] else "val"
    results: dict[str, Any] = {"beam_size": beam_size, "xe_checkpoint": str(xe_checkpoint),
                               "final_checkpoint": str(final_checkpoint), "shown_split": shown_split,
                               "start_checkpoint": str(start_checkpoint) if start_checkpoint else None,
                               "phase0_probe": manifest.get("phases", {}).get("0", {}).get("metrics", {}).get("probe")}
    preds: dict[int, str] = {}
    with shared_meteor() as meteor:  # one METEOR JVM for every evaluation of the report
        if splits["test"]:
            xe_preds, preds, scores = test_results(splits, xe_checkpoint, final_checkpoint, beam_size, meteor)
            results.update(scores)
            results["test_cider_error"] = cider_standard_error(preds, splits["test"])
            captions = {"xe": xe_preds, "final": preds}
            if start_checkpoint is not None:
                captions["start"], results["test_start"] = evaluate_checkpoint(start_checkpoint, splits["test"],
                                                                               beam_size, meteor=meteor)
            grounded = grounded_by_model(captions_path, captions)
            if grounded:
                results["grounded"] = grounded
        elif splits["val"]:
            preds, _ = evaluate_checkpoint(final_checkpoint, splits["val"][:count], beam_size, split="val",
                                           meteor=meteor)
        if old_data is not None and start_checkpoint is not None:
            results["old_data"] = old_data_results(old_data, start_checkpoint, final_checkpoint, beam_size, meteor)
    shown = [r for r in splits[shown_split][:count] if r.image_id in preds]
    results["examples"] = [{"image_id": r.image_id, "image": r.path.name, "caption": preds[r.image_id],
                            "reference": r.captions[0]} for r in shown]
    results["verdict"] = verdict(results, manifest)
    grid_name = ""
    if shown:
        grid_name = save_caption_grid([open_image(r.path) for r in shown], [preds[r.image_id] for r in shown],
                                      run_dir / f"{shown_split}_captions.png", thumb=128, columns=4,
                                      line_chars=26).name
    write_report(run_dir, results, preds if splits["test"] else {},
                 render_own_data_report(results, manifest, grid_name, captions_path))
    return results


def grounded_by_model(captions_path: Path, captions: dict[str, dict[int, str]]) -> dict[str, dict[str, float]]:
    """Grounded accuracies of each model's captions when the synthetic ground truth lies beside the captions file
    ({} otherwise: own photos have none)."""
    truth_file = Path(captions_path).parent / GROUND_TRUTH_NAME
    if not truth_file.is_file():
        return {}
    truth, words = load_ground_truth(truth_file), GroundingWords.from_vocabulary(shape_vocabulary())
    return {name: grounded_accuracy(preds, truth, words) for name, preds in captions.items()}


def old_data_results(old_data: tuple[Path, Path], start_checkpoint: Path, final_checkpoint: Path, beam_size: int,
                     meteor: MeteorSession | None) -> dict[str, Any]:
    """The starting and the fine-tuned captioner on the test split of the starting model's own data (meteor: the
    report's METEOR session)."""
    captions_path, images_path = old_data
    test = split_records(load_records(captions_path, images_path))["test"]
    if not test:
        raise ValueError(f"--old_captions_path {captions_path} has no test split to measure forgetting on")
    print(f"== forgetting: the starting and the fine-tuned captioner on the {len(test)} test images of "
          f"{captions_path}", flush=True)
    start_preds, start = evaluate_checkpoint(start_checkpoint, test, beam_size, meteor=meteor)
    final_preds, final = evaluate_checkpoint(final_checkpoint, test, beam_size, meteor=meteor)
    out = {"captions_path": str(captions_path), "num_images": len(test), "start": start, "final": final}
    grounded = grounded_by_model(captions_path, {"start": start_preds, "final": final_preds})
    if grounded:
        out["grounded"] = grounded
    return out


def cider_standard_error(preds: dict[int, str], test: list[ImageRecord]) -> float:
    """The standard error (x100) of a split's CIDEr-D from its per-image scores: how far the figure of this many
    images may move between similar models (python tokenizer, as the constant-caption baseline)."""
    scored = [r for r in test if r.image_id in preds]
    if len(scored) < 2:
        return math.inf
    _, per_image = CiderD().score([python_tokenize(preds[r.image_id]) for r in scored],
                                  [[python_tokenize(c) for c in r.captions] for r in scored])
    return 100.0 * float(np.std(per_image, ddof=1)) / math.sqrt(len(scored))


SMALL_TEST_SPLIT = 50  # fewer test images than this, and the verdict warns that the scores mean little


def verdict(results: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """What a newcomer should take from the run, one sentence a line: the final model against the best constant
    caption (and the starting captioner), phases that never beat their starting point, what fine-tuning forgot, a
    warning when the test split is too small to mean much, and what to try next."""
    lines, tips = [], []
    final = results.get("test_final", {}).get("metrics", {}).get("CIDEr-D")
    if final is None:
        lines.append("No test split, so nothing was scored: give the data a test split (a captions file: "
                     "--split_ratio 0.8,0.1,0.1) to know whether the model is worth using.")
    else:
        constant, n = results["best_constant_cider"], results["test_final"]["num_images"]
        ratio = final / constant if constant > 0 else math.inf
        if final > constant:
            lines.append(f"Better than the best constant caption: test CIDEr-D {final:.1f} against {constant:.1f} "
                         f"({ratio:.1f}x, +{final - constant:.1f}) on {n} test images.")
        else:
            lines.append(f"Worse than the best constant caption: test CIDEr-D {final:.1f} against {constant:.1f} "
                         f"({final - constant:+.1f}): the model says less about the images than one fixed sentence "
                         "does.")
            tips.append("more images help most" + ("" if results.get("start_checkpoint") else
                                                    "; start from a trained captioner (--init_from) or a pretrained "
                                                    "backbone (--backbone) instead of from scratch"))
        start = results.get("test_start", {}).get("metrics", {}).get("CIDEr-D")
        if start is not None:
            lines.append(f"Fine-tuning moved test CIDEr-D from {start:.1f} (the starting captioner) to {final:.1f}.")
        error = results.get("test_cider_error", math.inf)
        if n < SMALL_TEST_SPLIT:
            lines.append(f"Warning: only {n} test images; their CIDEr-D has a standard error of about {error:.1f}, "
                         "so differences smaller than twice that mean little.")
            tips.append("a larger test split (--split_ratio 0.8,0.1,0.1 for a captions file) or more images")
    stuck = never_improved(manifest)
    if stuck:
        lines.append("Phases that never beat their starting point on val (best.pth kept the weights they started "
                     f"from): {', '.join(f'phase {n}' for n in stuck)}.")
        tips.append(f"a lower learning rate or fewer epochs for those phases (--set phase{stuck[0]}.lr=...), or "
                    "skip them")
    grounded = results.get("grounded", {})
    if "final" in grounded:
        g = grounded["final"]
        lines.append(f"Of the test images' shape groups, {100 * g['colour_accuracy']:.0f}% are named with the right "
                     f"colour and shape" + (f" ({100 * grounded['start']['colour_accuracy']:.0f}% by the starting "
                                            "captioner)" if "start" in grounded else "") + ".")
    old = results.get("old_data")
    if old:
        a, b = old["start"]["metrics"]["CIDEr-D"], old["final"]["metrics"]["CIDEr-D"]
        kept = f"On the starting model's own test split ({old['num_images']} images) CIDEr-D went {a:.1f} -> {b:.1f}"
        if "grounded" in old:
            ga, gb = (old["grounded"][k]["colour_accuracy"] for k in ("start", "final"))
            kept += (f", colour + shape right {100 * ga:.1f}% -> {100 * gb:.1f}% ({100 * gb / ga:.0f}% kept)"
                     if ga > 0 else "")
        lines.append(kept + ".")
        if b < 0.9 * a:
            tips.append("to forget less: a lower phase-2 learning rate (--set phase2.lr=3e-4) or some of the old "
                        "data's images among the new")
    if final is not None and final > constant and not stuck:
        tips.append("caption new photos with the final checkpoint (the last line says how)")
    if tips:
        lines.append("To try next: " + "; ".join(tips) + ".")
    return lines


def never_improved(manifest: dict[str, Any]) -> list[int]:
    """Training phases that validated their starting weights (it 0) and never scored above them."""
    stuck = []
    for number, record in sorted(manifest.get("phases", {}).items(), key=lambda kv: int(kv[0])):
        curve = record.get("metrics", {}).get("val_curve") or []
        if len(curve) > 1 and curve[0][0] == 0 and max(c for _, c in curve[1:]) <= curve[0][1]:
            stuck.append(int(number))
    return stuck


def caption_examples(test: list[ImageRecord], preds: dict[int, str], truth: dict[int, dict[str, Any]],
                     words: GroundingWords, count: int = 16) -> list[dict[str, Any]]:
    """The first test images with their caption, the ground truth (canonical caption) and whether the caption names
    every group with its colour, shape and number and nothing else (mark "ok", else "wrong")."""
    out = []
    for r in test[:count]:
        one = grounded_accuracy({r.image_id: preds[r.image_id]}, truth, words)
        out.append({"image_id": r.image_id, "caption": preds[r.image_id],
                    "truth": caption_from_ground_truth(truth[r.image_id]),
                    "mark": "ok" if one["scene_accuracy"] == 1.0 else "wrong"})
    return out


def _copy_curves(run_dir: Path) -> None:
    for folder in sorted(run_dir.glob("phase*")):
        curves = folder / "curves.png"
        if curves.exists():
            shutil.copyfile(curves, run_dir / f"curves-{folder.name}.png")


def render_report(results: dict[str, Any], manifest: dict[str, Any], grid_name: str) -> str:
    """Markdown: phases with durations, test metrics against the baseline, grounded accuracies, pictures."""
    lines = ["# Quickstart report", "", *_phase_lines(manifest), "", *_test_lines(results), "",
             "## Grounded accuracies (test split)", "",
             "Over the test images' shape groups: colour named (the caption names the group's colour), colour + "
             "shape (names it together with the right shape word), shape (the right shape word), count (when the "
             "shape is named, the number said is right), all three (colour, shape and number right together).",
             "", *_probe_lines(results.get("phase0_probe")),
             "| model | colour named | colour + shape | shape | count | all three | object recall | hallucination |",
             "|---|---|---|---|---|---|---|---|"]
    for label, key in (("after XE (phase 3)", "grounded_xe"), ("after SCST (phase 6)", "grounded_final")):
        g = results[key]
        lines.append(f"| {label} | {100 * g['colour_named']:.1f}% | {100 * g['colour_accuracy']:.1f}% | "
                     f"{100 * g['shape_accuracy']:.1f}% | {100 * g['count_when_named']:.1f}% | "
                     f"{100 * g['count_accuracy']:.1f}% | {100 * g['object_recall']:.1f}% | "
                     f"{100 * g['hallucination_rate']:.1f}% |")
    lines += ["", "## Test images, captions and the ground truth", "", "| image | caption (phase 6) | ground truth | |",
              "|---|---|---|---|"]
    lines += [f"| {e['image_id']} | {e['caption']} | {e['truth']} | {e['mark']} |" for e in results["examples"]]
    lines += _unavailable_lines(results)
    return "\n".join(lines + _picture_lines(manifest, grid_name)) + "\n"


def render_own_data_report(results: dict[str, Any], manifest: dict[str, Any], grid_name: str,
                           captions_path: Path) -> str:
    """Markdown: the verdict, phases with durations, test metrics against the baseline (when there is a test split,
    the starting captioner's too), grounded accuracies (synthetic data), forgetting, the shown images' captions
    beside a reference, pictures."""
    lines = [f"# Report: {Path(captions_path).name}", "", "## Verdict", "", *results["verdict"], "",
             *_phase_lines(manifest), ""]
    if "test_final" in results:
        lines += [*_test_lines(results), ""]
    else:
        lines += ["## Test split", "", "The data has no test split, so nothing is scored here; the captions below are "
                  "of val images (which chose best.pth). Assign a test split to score the model.", ""]
    if results.get("grounded"):
        lines += ["## Grounded accuracies (test split)", "", *_grounded_lines(results["grounded"]), ""]
    old = results.get("old_data")
    if old:
        names = list(old["final"]["metrics"])
        lines += [f"## Forgetting: the starting model's own data ({old['num_images']} test images of "
                  f"{Path(old['captions_path']).name})", "", "| model | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for label, key in (("starting captioner", "start"), ("fine-tuned (phase 6)", "final")):
            lines.append(f"| {label} | " + " | ".join(f"{old[key]['metrics'][n]:.1f}" for n in names) + " |")
        if old.get("grounded"):
            lines += ["", *_grounded_lines(old["grounded"])]
        lines.append("")
    lines += _probe_lines(results.get("phase0_probe"))
    split = results["shown_split"]
    if results["examples"]:
        lines += [f"## {split.capitalize()} images, their captions and a reference", "",
                  "| image | file | caption (phase 6) | a reference caption |", "|---|---|---|---|"]
        lines += [f"| {e['image_id']} | {e['image']} | {e['caption']} | {e['reference']} |"
                  for e in results["examples"]]
    if "test_final" in results:
        lines += _unavailable_lines(results)
    return "\n".join(lines + _picture_lines(manifest, grid_name, split)) + "\n"


MODEL_LABELS = {"start": "starting captioner", "xe": "after XE (phase 3)", "final": "after SCST (phase 6)"}


def _grounded_lines(grounded: dict[str, dict[str, float]]) -> list[str]:
    """One row per model: colour named, colour + shape, shape, count when named, hallucinated mentions."""
    lines = ["| model | colour named | colour + shape | shape | count (shape named) | hallucination |",
             "|---|---|---|---|---|---|"]
    for key in ("start", "xe", "final"):
        if key in grounded:
            g = grounded[key]
            lines.append(f"| {MODEL_LABELS[key]} | {100 * g['colour_named']:.1f}% | {100 * g['colour_accuracy']:.1f}% "
                         f"| {100 * g['shape_accuracy']:.1f}% | {100 * g['count_when_named']:.1f}% | "
                         f"{100 * g['hallucination_rate']:.1f}% |")
    return lines


def _phase_lines(manifest: dict[str, Any]) -> list[str]:
    """The phases table: what each did, its duration and best validation CIDEr-D, and the total."""
    lines = ["## Phases", "", "| phase | what | duration (s) | best val CIDEr-D |", "|---|---|---|---|"]
    total = 0.0
    for number, rec in sorted(manifest.get("phases", {}).items(), key=lambda kv: int(kv[0])):
        total += rec.get("duration_s", 0.0)
        best = rec.get("metrics", {}).get("best_val_cider")
        lines.append(f"| {number} | {rec.get('title', '')} | {rec.get('duration_s', 0):.0f} | "
                     f"{'' if best is None else f'{best:.1f}'} |")
    return [*lines, f"| | total | {total:.0f} | |"]


def _test_lines(results: dict[str, Any]) -> list[str]:
    """The test metrics (of the starting captioner when there is one,) after XE and after SCST, and the best constant
    caption."""
    lines = [f"## Test split (beam {results['beam_size']})", ""]
    names = list(results["test_final"]["metrics"])
    lines += ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ("start", "xe", "final"):
        if f"test_{key}" not in results:
            continue
        label, m = MODEL_LABELS[key], results[f"test_{key}"]["metrics"]
        lines.append(f"| {label} | " + " | ".join(f"{m[n]:.1f}" for n in names) + " |")
    return [*lines, "", f"Best constant caption (the training caption scoring highest on every test image): "
                        f"\"{results['best_constant_caption']}\", CIDEr-D {results['best_constant_cider']:.1f}."]


def _unavailable_lines(results: dict[str, Any]) -> list[str]:
    unavailable = results["test_final"].get("unavailable") or {}
    return ["", "Unavailable metrics: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())] if unavailable else []


def _picture_lines(manifest: dict[str, Any], grid_name: str, split: str = "test") -> list[str]:
    lines = ["", "## Pictures", ""]
    if grid_name:
        lines += [f"![{split} images with their captions]({grid_name})", ""]
    return lines + [f"![{p}]({p})" for p in sorted(f"curves-{n}.png" for n in _phase_folders(manifest))]


def _probe_lines(probe: dict[str, float] | None) -> list[str]:
    """The phase-0 probe: what the pretrained backbone's tokens tell apart before any captioning."""
    if not probe:
        return []
    shown = ", ".join(f"{k.replace('_', ' ')} {100 * v:.1f}%" for k, v in probe.items())
    return [f"After phase 0 (the pretrained backbone, linear heads on its tokens, val split): {shown}.", ""]


def _phase_folders(manifest: dict[str, Any]) -> list[str]:
    return [Path(rec["output"]).parent.name for rec in manifest.get("phases", {}).values()
            if rec.get("output") and "features" not in Path(rec["output"]).parent.name]
