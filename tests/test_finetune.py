"""Fine-tuning a trained captioner on new captions: vocabulary extension (models.vocab_extension, the policy in
engine.setup) keeps every old row and id, and the model's captions stay the same until training moves the rows."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import ROOT, make_tiny_dataset, save_tiny_checkpoint, tiny_config, tiny_vocab
from processes import run_watched

from data.formats import load_records
from data.loaders import ImageSource
from data.records import DatasetError, ImageRecord
from data.synthetic import SyntheticConfig, generate_synthetic_dataset
from data.vocab import Vocabulary
from deploy.checkpoints import restore_model
from engine import presets
from engine.evaluate import caption_records
from engine.setup import TrainConfig, config_differences, new_words, resolve_setup
from models import build_model
from models.vocab_extension import EMBEDDING, OUTPUT_BIAS, OUTPUT_WEIGHT, extend_word_rows, new_word_margin

NEW_CAPTION = "a violet hexagon beside a teal ring"  # violet, hexagon, beside, teal, ring: not in the tiny vocabulary


def _records(images: list[ImageRecord], captions: dict[str, tuple[str, ...]]) -> list[ImageRecord]:
    return [ImageRecord(r.image_id, r.path, captions.get(r.split, r.captions), r.split) for r in images]


def test_extended_rows_keep_every_old_row_and_append_the_new_ones():
    torch.manual_seed(0)
    state = build_model(tiny_config(end_to_end=False)).state_dict()
    grown = extend_word_rows(state, 3, seed=1)
    old = state[OUTPUT_WEIGHT].shape[0]
    for key in (EMBEDDING, OUTPUT_WEIGHT, OUTPUT_BIAS):
        assert grown[key].shape[0] == old + 3
        assert torch.equal(grown[key][:old], state[key])  # old ids keep their exact weights
    assert torch.equal(grown[OUTPUT_WEIGHT][old:], state[OUTPUT_WEIGHT].mean(0).expand(3, -1))
    assert torch.allclose(grown[OUTPUT_BIAS][old:], state[OUTPUT_BIAS].mean() - new_word_margin(old, 3))
    assert len({tuple(row.tolist()) for row in grown[EMBEDDING][old:]}) == 3  # the decoder tells them apart
    assert all(torch.equal(grown[k], v) for k, v in state.items() if k not in (EMBEDDING, OUTPUT_WEIGHT, OUTPUT_BIAS))
    assert torch.equal(extend_word_rows(state, 3, seed=1)[EMBEDDING], grown[EMBEDDING])  # seeded
    with pytest.raises(KeyError, match="vocab_linear.weight"):
        extend_word_rows({EMBEDDING: state[EMBEDDING]}, 1)


def test_new_words_hold_a_negligible_share_of_the_probability_for_any_decoder_state():
    """The bound of the module docstring: K new words hold at most 2^-10 of the old words' mass, and each is below
    the best old word, whatever h is."""
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 16) * 3, torch.randn(40) * 4
    grown = extend_word_rows({EMBEDDING: torch.randn(40, 16), OUTPUT_WEIGHT: weight, OUTPUT_BIAS: bias}, 5)
    h = torch.randn(1000, 16) * 5  # decoder states of every scale
    logits = (h @ grown[OUTPUT_WEIGHT].T + grown[OUTPUT_BIAS]).double()
    share = logits[:, 40:].exp().sum(1) / logits[:, :40].exp().sum(1)
    assert share.max().item() <= 2.0 ** -10
    assert (logits[:, 40:].max(1).values < logits[:, :40].max(1).values).all()  # greedy decoding unchanged
    assert new_word_margin(40, 5) == pytest.approx(math.log(5 / 40) + 10 * math.log(2))


def test_init_from_extends_the_vocabulary_keeps_old_ids_and_the_captions_before_training(tmp_path, monkeypatch):
    captions_path, _ = make_tiny_dataset(tmp_path, num_train=16)
    ckpt = save_tiny_checkpoint(tmp_path / "start.pth")
    images = load_records(captions_path, captions_path.parent)
    records = _records(images, {"train": (NEW_CAPTION,) * 5})
    cfg = TrainConfig(init_from=str(ckpt), is_end_to_end=True, images_path=str(captions_path.parent),
                      captions_path=str(captions_path), min_word_count=5)
    assert new_words(tiny_vocab(), records, 5) == ["beside", "hexagon", "ring", "teal", "violet"]
    assert new_words(tiny_vocab(), records, 81) == []  # 16 images x 5 captions: each new word 80 times
    monkeypatch.setattr("engine.setup.load_records", lambda *a, **k: records)  # the new captions for the images
    setup = resolve_setup(cfg, None, tmp_path / "run")
    old = tiny_vocab()
    assert setup.vocab.tokens[:len(old)] == old.tokens  # every old token keeps its id
    assert setup.vocab.tokens[len(old):] == ("beside", "hexagon", "ring", "teal", "violet")
    assert setup.model_cfg.vocab_size == len(setup.vocab) == len(old) + 5
    assert Vocabulary.load(tmp_path / "run" / "vocab.json") == setup.vocab

    grown = build_model(setup.model_cfg).eval()
    grown.load_state_dict(setup.model_state)
    torch.manual_seed(0)
    start = build_model(tiny_config()).eval()  # save_tiny_checkpoint's weights
    source = ImageSource(backbone=setup.model_cfg.backbone)
    test = [r for r in images if r.split in ("val", "test")]
    for beam in (1, 3):
        before, _ = caption_records(start, test, old, source, beam_size=beam, max_len=12, batch_size=8,
                                    device=torch.device("cpu"), progress=False)
        after, _ = caption_records(grown, test, setup.vocab, source, beam_size=beam, max_len=12, batch_size=8,
                                   device=torch.device("cpu"), progress=False)
        assert after == before


def test_captions_longer_than_the_starting_model_takes_are_refused(tmp_path, monkeypatch):
    captions_path, _ = make_tiny_dataset(tmp_path, num_train=8)
    ckpt = save_tiny_checkpoint(tmp_path / "start.pth")  # max_seq_len 24
    images = load_records(captions_path, captions_path.parent)
    monkeypatch.setattr("engine.setup.load_records", lambda *a, **k: _records(images, {"train": ("a " * 30,)}))
    cfg = TrainConfig(init_from=str(ckpt), is_end_to_end=True, images_path=str(captions_path.parent),
                      captions_path=str(captions_path))
    with pytest.raises(DatasetError, match="longest training caption has 30 words, more than the model of .* has "
                                           "positions for \\(23\\)"):
        resolve_setup(cfg, None, tmp_path / "run")


def test_a_setting_a_checkpoint_predates_counts_as_its_default_on_resume():
    new = TrainConfig(model_overrides={}).as_dict()
    old = {k: v for k, v in new.items() if k != "min_word_count"}
    assert config_differences(old, new) == []
    assert config_differences(old, {**new, "min_word_count": 3}) == ["--min_word_count: 5 -> 3"]


@pytest.mark.slow
def test_pipeline_fine_tunes_a_captioner_keeping_old_ids_and_scores_the_start_beside_it(tmp_path):
    """`pipeline.py --preset small --init_from` with tiny schedules: a captioner (tiny, 16 tokens) fine-tuned on the
    shifted synthetic domain; the final checkpoint's vocabulary is the start's, id for id, then the new words; the
    report scores the start beside it, on the new test split and on the old data's, each evaluation with its record.
    (A random tiny start does not learn to caption in these few steps, so whether the new words reach the captions is
    measured on the quickstart's captioner instead: docs/benchmarks.md, "Fine-tuning on your photos".)"""
    start = save_tiny_checkpoint(tmp_path / "start.pth")
    shifted = generate_synthetic_dataset(tmp_path / "shifted", SyntheticConfig(48, 8, 8, image_size=32,
                                                                               domain="shifted"), progress=False)
    old = generate_synthetic_dataset(tmp_path / "old", SyntheticConfig(8, 2, 8, image_size=32), progress=False)
    tiny = ["phase2.num_epochs=6", "phase2.lr=3e-3", "phase3.num_epochs=1", "phase5.num_epochs=1",
            "phase6.num_epochs=1", "eval_beam_sizes=[2]", "scst_samples=2", "scst_max_len=10", "eval_max_len=10"]
    run_dir = tmp_path / "run"
    proc = run_watched([sys.executable, "pipeline.py", "--preset", "small", "--init_from", str(start),
                        "--images_path", str(shifted.parent), "--captions_path", str(shifted),
                        "--old_captions_path", str(old), "--run_dir", str(run_dir), "--set", *tiny], cwd=ROOT,
                       watch=[tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== start: fine-tuning the trained captioner" in proc.stdout and "phase 0" not in proc.stdout
    final = restore_model(run_dir / "phase6-scst-e2e" / "best.pth")
    old_vocab = tiny_vocab()
    added = final.vocab.tokens[len(old_vocab):]
    assert final.vocab.tokens[:len(old_vocab)] == old_vocab.tokens  # old ids kept
    assert {"pink", "brown", "cyan", "heart", "ring", "arrow", "checkered", "dotted"} <= set(added)
    rows = json.loads((run_dir / "predictions_test.json").read_text())
    # the report's evaluations record what they measured, as test.py's files do
    results = json.loads((run_dir / "results.json").read_text())
    record = results["test_final"]["record"]
    assert record["split"] == "test" and record["split_size"] == len(rows) == 8 and record["beam_size"] == 3
    assert record["max_len"] == 20 and record["precision"] == "fp32" and record["backend"] == "torch"
    assert all({k: row[k] for k in record} == record for row in rows)
    assert results["test_start"]["record"]["weights_sha256"] != record["weights_sha256"]
    assert results["old_data"]["final"]["record"]["weights_sha256"] == record["weights_sha256"]
    r = json.loads((run_dir / "pipeline.json").read_text())["results"]
    assert {"test_cider_start", "test_cider_final", "old_test_cider_start", "old_test_cider_final",
            "colour_shape_start", "old_colour_shape_final"} <= set(r)
    report = (run_dir / "report.md").read_text()
    assert "starting captioner" in report and "## Forgetting: the starting model's own data" in report
    assert "## Verdict" in report


@pytest.mark.parametrize(("test_images", "measured_s"), [(40, 282), (400, 334)])
def test_the_fine_tuning_time_estimate_is_within_1_5x_of_the_measured_runs_whatever_the_test_split(
        monkeypatch, test_images, measured_s):
    """The printed estimate for the two measured runs (240 train / 20 val images, 40 or 400 test images; docs/
    benchmarks.md, "Fine-tuning on your photos"): the report's cost is mostly fixed (one METEOR JVM, the old data), so
    ten times the test images do not make ten times the wait (it once said 11 minutes for a 5.6-minute run)."""
    sizes = {"train": 240, "val": 20, "test": test_images}
    monkeypatch.setattr(presets, "load_records", lambda *_: [])
    monkeypatch.setattr(presets, "split_records", lambda _: {k: [None] * n for k, n in sizes.items()})
    recipe = presets.Recipe(ROOT, ROOT, None, presets.phase_settings({}, presets.SMALL_COMMON,
                                                                     presets.FINETUNE_RECIPE))
    said = presets.time_estimate(recipe, [1, 2, 3, 4, 5, 6])
    minutes = int(said.split("about ")[1].split(" minutes")[0])
    assert measured_s / 60 / 1.5 <= minutes <= 1.5 * measured_s / 60, said
