"""Your own photos end to end: `pipeline.py --preset small` on a folder of photos and a captions CSV holding the usual
mistakes, then demo.py and the API caption with the checkpoint it names; and the small preset's data preparation."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import api
import demo
import pipeline
from data.formats import load_records
from data.records import DatasetError
from data.splits import split_records
from engine.presets import QUICKSTART_MODEL, SMALL_MANIFEST, small_recipe


def _photos(folder: Path, count: int) -> list[str]:
    """count small JPEGs: a coloured square or circle on a plain background, red or blue alternating."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        image = Image.new("RGB", (48, 48), (200, 200, 180))
        colour = (220, 30, 30) if i % 2 == 0 else (30, 30, 220)
        pixels = image.load()
        for y in range(12, 36):
            for x in range(12, 36):
                if i % 4 < 2 or (x - 24) ** 2 + (y - 24) ** 2 < 144:
                    pixels[x, y] = colour
        name = f"img{i:03d}.jpg"
        image.save(folder / name, quality=90)
        names.append(name)
    return names


def _caption(i: int) -> str:
    return f"a {'red' if i % 2 == 0 else 'blue'} {'square' if i % 4 < 2 else 'circle'} on a grey background"


def _parse(argv: list[str]) -> pipeline.PipelineConfig:
    return pipeline.parse_config(argv)


# ---------------------------------------------------------------------------------------------- fast: preparation
def test_a_captions_csv_becomes_a_manifest_in_the_run_with_a_split_and_the_summary(tmp_path, capsys):
    names = _photos(tmp_path / "photos", 20)
    rows = [f"{name},{_caption(i)}" for i, name in enumerate(names)]  # no header
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    recipe = small_recipe(tmp_path / "photos", tmp_path / "captions.csv", tmp_path / "run")
    out = capsys.readouterr().out
    assert "captions.csv assigns no splits, so the images are drawn at random into train, val and test 0.9,0.05,0.05" \
        in out
    assert "CSV without a header" in out and "splits: drawn at random 0.9,0.05,0.05 with seed 0: train 18, val 1, " \
        "test 1" in out
    assert recipe.captions_path == tmp_path / "run" / "data" / SMALL_MANIFEST
    assert recipe.images_path == tmp_path / "run" / "data" and recipe.backbone is None
    records = load_records(recipe.captions_path, recipe.images_path)
    assert len(records) == 20 and all(r.path.is_file() for r in records)
    assert {r.path.name for r in records} == set(names)
    assert [len(v) for v in split_records(records).values()] == [18, 1, 1]
    assert recipe.settings[0] == {"init": "quickstart", "labels": "words", "epochs": 20, "batch_size": 16, "lr": 5e-3}
    assert all(recipe.settings[n][k] == v for n in (2, 3, 5, 6) for k, v in QUICKSTART_MODEL.items())
    assert all(recipe.settings[n].get("max_steps", 0) == 0 for n in (2, 3, 5, 6))  # whole epochs, not the quickstart's
    assert sorted(recipe.settings) == list(range(7))
    # the same data again: the manifest is kept; other data: replaced while no phase has run, then refused
    small_recipe(tmp_path / "photos", tmp_path / "captions.csv", tmp_path / "run")
    (tmp_path / "captions.csv").write_text("\n".join(rows[:-1]) + "\n")
    small_recipe(tmp_path / "photos", tmp_path / "captions.csv", tmp_path / "run")
    assert "replacing" in capsys.readouterr().out and len(load_records(recipe.captions_path)) == 19
    (tmp_path / "run" / "phase0-backbone").mkdir()
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match="differs from what the images and captions give now, and phase0-backbone"):
        small_recipe(tmp_path / "photos", tmp_path / "captions.csv", tmp_path / "run")
    assert len(load_records(recipe.captions_path)) == 19


def test_a_manifest_is_used_as_it_is_and_split_ratio_is_refused_for_it(tmp_path, capsys):
    names = _photos(tmp_path / "photos", 20)
    lines = [json.dumps({"image": f"photos/{n}", "captions": [_caption(i)], "split": "test" if i == 0 else "train"})
             for i, n in enumerate(names)]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    recipe = small_recipe(tmp_path, tmp_path / "manifest.jsonl", tmp_path / "run")
    assert recipe.captions_path == tmp_path / "manifest.jsonl" and recipe.images_path == tmp_path
    assert "no val images" in capsys.readouterr().out  # said, not refused: later phases use the last checkpoint
    assert not (tmp_path / "run" / "data").exists()
    with pytest.raises(DatasetError, match="with its own splits"):
        small_recipe(tmp_path, tmp_path / "manifest.jsonl", tmp_path / "run2", split_ratio="0.8,0.1,0.1")


def test_fatal_data_problems_are_refused_before_anything_runs(tmp_path, capsys):
    names = _photos(tmp_path / "photos", 20)
    rows = [f"{name},{_caption(i)}" for i, name in enumerate(names)]
    (tmp_path / "missing.csv").write_text("\n".join([*rows, "gone.jpg,a photo that is not there"]) + "\n")
    with pytest.raises(DatasetError, match=r"nothing run: 1 caption row names an image not in .*--skip_missing"):
        small_recipe(tmp_path / "photos", tmp_path / "missing.csv", tmp_path / "run")
    assert "'gone.jpg'" in capsys.readouterr().out and not (tmp_path / "run" / "data" / SMALL_MANIFEST).exists()
    recipe = small_recipe(tmp_path / "photos", tmp_path / "missing.csv", tmp_path / "run", skip_missing=True)
    assert len(load_records(recipe.captions_path)) == 20
    (tmp_path / "few.csv").write_text("\n".join(f"{n},photo number {i}" for i, n in enumerate(names)) + "\n")
    with pytest.raises(DatasetError, match="phase 0 has nothing to learn"):
        small_recipe(tmp_path / "photos", tmp_path / "few.csv", tmp_path / "run3")
    assert not (tmp_path / "run3").exists()
    with pytest.raises(DatasetError, match="this is a PNG image"):
        Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
        small_recipe(tmp_path / "photos", tmp_path / "x.png", tmp_path / "run4")


def test_the_small_preset_needs_its_paths_and_refuses_those_it_would_ignore(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("a.jpg,a caption\n")
    given = ["--images_path", str(tmp_path), "--captions_path", str(tmp_path / "c.csv")]
    cfg = _parse(["--preset", "small", *given, "--set", "phase2.num_epochs=5", "--skip_missing"])
    assert cfg.skip_missing and cfg.overrides == ("phase2.num_epochs=5",)
    assert _parse(["--preset", "small", *given, "--backbone", str(tmp_path / "c.csv")]).backbone  # a start of its own
    cases = [
        (["--preset", "small", "--images_path", str(tmp_path)], "--preset small needs --captions_path"),
        (["--preset", "small", "--captions_path", str(tmp_path / "c.csv")], "--preset small needs --images_path"),
        (["--preset", "small", "--images_path", str(tmp_path / "nope"), "--captions_path", str(tmp_path / "c.csv")],
         "no such file or folder"),
        (["--preset", "small", *given, "--init_from", str(tmp_path / "c.csv"), "--backbone", str(tmp_path / "c.csv")],
         "--init_from fine-tunes a captioner with its own backbone, so --backbone would be ignored"),
        (["--preset", "small", *given, "--init_from", str(tmp_path / "nope.pth")], "--init_from"),
        (["--preset", "small", *given, "--vocab", str(tmp_path / "c.csv")], "--vocab belongs to a fine-tuning run"),
        (["--preset", "small", *given, "--init_from", str(tmp_path / "c.csv"), "--old_images_path", str(tmp_path)],
         "--old_images_path needs --old_captions_path"),
        (["--preset", "quickstart", "--init_from", str(tmp_path / "c.csv")], "--init_from is for --preset small"),
        (["--preset", "quickstart", *given], "would ignore --images_path"),
        (["--preset", "quickstart", "--skip_missing"], "--skip_missing is for --preset small"),
        (["--preset", "small", *given, "--skip-mising"], "did you mean"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            _parse(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err, argv


# ---------------------------------------------------------------------------------------------- slow: end to end
MISTAKES_CSV_HEAD = "image,caption"


def _photos_with_mistakes(root: Path) -> tuple[Path, Path, str]:
    """~40 photos and a CSV with a header holding the issue's mistakes: a row naming a missing image, an image
    without captions, a duplicate caption row and an empty caption. Returns (photos, csv, the uncaptioned image)."""
    photos = root / "photos"
    names = _photos(photos, 41)
    uncaptioned = names[-1]
    rows = [MISTAKES_CSV_HEAD]
    for i, name in enumerate(names[:-1]):
        rows += [f"{name},{_caption(i)}", f"{name},\"the {'red' if i % 2 == 0 else 'blue'} shape, in the middle\""]
    rows += [f"{names[3]},{_caption(3)}",  # duplicate row
             f"{names[5]},",  # empty caption (the image keeps its others)
             "holiday/missing.jpg,a photo that is not in the folder"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return photos, root / "captions.csv", uncaptioned


@pytest.mark.slow
def test_own_photos_end_to_end_from_a_csv_with_mistakes_to_demo_and_api(tmp_path, capfd):
    photos, captions, uncaptioned = _photos_with_mistakes(tmp_path)
    run_dir = tmp_path / "runs" / "mine"
    # tiny schedules: a few iterations per phase, short SCST samples and validation captions
    tiny = ["phase0.epochs=2", "phase2.num_epochs=4", "phase2.warmup=2", "phase3.num_epochs=1", "phase5.num_epochs=1",
            "phase6.num_epochs=1", "eval_beam_sizes=[2]", "scst_samples=2", "scst_max_len=10", "eval_max_len=10"]
    argv = ["--preset", "small", "--images_path", str(photos), "--captions_path", str(captions), "--run_dir",
            str(run_dir), "--skip_missing", "--set", *tiny]
    t0 = time.perf_counter()
    assert pipeline.main(pipeline.parse_config(argv)) == 0
    took = time.perf_counter() - t0
    out = capfd.readouterr().out
    summary = out[:out.index("== phase 0")]
    assert "CSV with a header" in summary
    assert "assigns no splits, so the images are drawn at random" in summary
    assert re.search(r"1 caption row names an image not in .*: line \d+ 'holiday/missing\.jpg'", summary)
    assert "left out of the manifest (--skip_missing)" in summary
    assert f"1 image in {photos} has no caption row: {uncaptioned}" in summary
    assert "1 duplicate caption (same image, same text)" in summary and "img003.jpg" in summary
    assert "1 empty caption" in summary and "img005.jpg" in summary
    manifest = json.loads((run_dir / "pipeline.json").read_text())
    assert all(manifest["phases"][str(n)]["status"] == "done" for n in range(7))
    assert all(manifest["phases"][str(n)]["overrides"] == tiny for n in range(7)) and "overrides" not in manifest
    assert "--epochs 2" in manifest["phases"]["0"]["command"]
    assert "--labels words" in manifest["phases"]["0"]["command"]
    final = run_dir / "phase6-scst-e2e" / "best.pth"
    assert final.is_file()
    last = out.strip().splitlines()[-1]
    assert "phase 6's end-to-end checkpoint" in last and str(final) in last
    # the report: test metrics after XE and SCST, the best constant caption, a grid, no grounded accuracies
    report = (run_dir / "report.md").read_text()
    assert "after XE (phase 3)" in report and "after SCST (phase 6)" in report and "Best constant caption" in report
    assert "Grounded" not in report and (run_dir / "test_captions.png").is_file()
    assert set(manifest["results"]) == {"test_cider_xe", "test_cider_final", "best_constant_cider", "test_images"}
    test_split = [r for r in load_records(run_dir / "data" / SMALL_MANIFEST) if r.split == "test"]
    assert manifest["results"]["test_images"] == len(test_split) > 0  # the verdict weighs its scores by it

    # demo.py with that checkpoint
    test_image = photos / "img000.jpg"
    assert demo.main(demo.parse_config(["--load_path", str(final), "--image_paths", str(test_image), "--json"])) == 0
    line = capfd.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["captions"][0]["caption"].strip(), line
    # and the API
    app = api.build_app(environ={"CAPTION_CHECKPOINT": str(final), "CAPTION_MAX_WAIT_MS": "1"})
    buffer = io.BytesIO()
    Image.open(test_image).save(buffer, format="PNG")
    with TestClient(app) as client:
        answer = client.post("/predict", files={"file": ("photo.png", buffer.getvalue(), "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["caption"].strip(), answer.json()
    print(f"own photos: pipeline {took:.0f} s")
