"""demo.py on folders: streamed in batches to JSON, JSON lines or CSV, unreadable files skipped and named, a user's
file never overwritten unasked, a killed run continued by a rerun, greedy / beam / sampling (seeded)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image
from processes import run_watched, wait_while_progressing

import demo


def _folder(root: Path, count: int = 5) -> tuple[Path, list[str]]:
    """Images in a folder and its subfolders (PNG and JPEG, some upper-case suffixes), a broken JPEG, a text file
    and a hidden folder; returns the folder and the readable images' paths in demo.py's order."""
    folder = root / "photos"
    names = [f"{'sub/' * (i % 3)}img{i}.{'png' if i % 2 else 'JPG'}" for i in range(count)]
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 3 * i, 30 + i), (37 * i % 256, 90, 200 - 11 * i)).save(
            path, format="PNG" if name.endswith("png") else "JPEG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".thumbnails" / "hidden.png")
    return folder, [str(p) for p in demo.list_image_files((str(folder),)) if p.name != "broken.jpg"]


def _run(ckpt: Path, folder: Path, *flags: str) -> int:
    return demo.main(demo.parse_config(["--checkpoint", str(ckpt), "--image_paths", str(folder), "--max_len", "5",
                                        "--beam_size", "2", "--batch_size", "2", *flags]))


def _rows(path: Path) -> list[tuple[str, list[tuple[str, float]]]]:
    """(image, [(caption, score)]) per image, read back from any of the three formats."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        out: dict[str, list[tuple[str, float]]] = {}
        for r in rows:
            assert int(r["rank"]) == len(out.setdefault(r["image"], [])) + 1
            out[r["image"]].append((r["caption"], float(r["score"])))
        return list(out.items())
    entries = json.loads(path.read_text()) if path.suffix == ".json" else \
        [json.loads(line) for line in path.read_text().splitlines()]
    return [(e["image"], [(c["caption"], c["score"]) for c in e["captions"]]) for e in entries]


def test_listing_takes_subfolders_in_order_and_leaves_out_hidden_and_other_files(tmp_path):
    assert demo.list_image_files(()) == []
    folder, images = _folder(tmp_path)
    listed = demo.list_image_files((str(folder), str(folder / "img0.JPG"), str(tmp_path / "missing.png")))
    rel = [p.relative_to(folder).as_posix() if p.is_relative_to(folder) else p.name for p in listed]
    assert rel == ["broken.jpg", "img0.JPG", "img3.png", "sub/img1.png", "sub/img4.JPG", "sub/sub/img2.JPG",
                   "missing.png"]  # each path once; a missing path kept, to be reported
    assert len(images) == 5


def test_every_output_format_holds_the_same_captions_and_names_the_unreadable_file(tiny_checkpoint, tmp_path, capsys):
    folder, images = _folder(tmp_path)
    got = {}
    for suffix in (".json", ".jsonl", ".csv"):
        out = tmp_path / f"captions{suffix}"
        assert _run(tiny_checkpoint, folder, "--output_path", str(out), "--num_captions", "2") == 1  # one file skipped
        err = capsys.readouterr().err
        assert f"skipped {folder / 'broken.jpg'}" in err and "captioned 5 images" in err and "images/s" in err
        got[suffix] = _rows(out)
    assert [name for name, _ in got[".json"]] == images
    assert all(len(caps) == 2 and caps[0][1] >= caps[1][1] for _, caps in got[".json"])  # best first
    assert [r[0] for r in got[".csv"]] == images and [r[0] for r in got[".jsonl"]] == images
    texts = {s: [[c for c, _ in caps] for _, caps in rows] for s, rows in got.items()}
    assert texts[".json"] == texts[".jsonl"] == texts[".csv"]
    # CSV keeps scores to 6 decimals; the JSON formats keep the float as computed
    assert [caps for _, caps in got[".json"]] == [caps for _, caps in got[".jsonl"]]
    assert all(abs(a[1] - b[1]) <= 5e-7 for (_, x), (_, y) in zip(got[".json"], got[".csv"]) for a, b in zip(x, y))


def test_a_users_file_is_never_overwritten_without_overwrite(tiny_checkpoint, tmp_path, capsys):
    folder, images = _folder(tmp_path, count=2)
    out = tmp_path / "mine.csv"
    out.write_text("my own notes\n")
    refused = r"--output_path .*mine.csv exists and is not a run of demo.py .*--overwrite True"
    with pytest.raises(FileExistsError, match=refused):
        _run(tiny_checkpoint, folder, "--output_path", str(out))
    assert out.read_text() == "my own notes\n"
    _run(tiny_checkpoint, folder, "--output_path", str(out), "--overwrite", "True")
    assert [name for name, _ in _rows(out)] == images


def test_a_rerun_with_other_settings_is_refused_naming_what_changed(tiny_checkpoint, tmp_path):
    folder, _ = _folder(tmp_path, count=2)
    out = tmp_path / "captions.jsonl"
    _run(tiny_checkpoint, folder, "--output_path", str(out))
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(beam_size: 2 then, 3 now\).*--overwrite True"):
        _run(tiny_checkpoint, folder, "--output_path", str(out), "--beam_size", "3")
    assert out.read_bytes() == before


def test_a_rerun_captions_only_the_images_added_since(tiny_checkpoint, tmp_path, capsys):
    folder, images = _folder(tmp_path, count=3)
    out = tmp_path / "captions.json"
    _run(tiny_checkpoint, folder, "--output_path", str(out))
    first = _rows(out)
    assert _run(tiny_checkpoint, folder, "--output_path", str(out)) == 1  # the broken file is tried again
    assert "captioned 0 images" in capsys.readouterr().err and _rows(out) == first
    Image.new("RGB", (50, 50), "red").save(folder / "sub" / "new.png")
    (folder / "broken.jpg").unlink()
    assert _run(tiny_checkpoint, folder, "--output_path", str(out)) == 0
    assert "captioned 1 images" in capsys.readouterr().err
    assert [name for name, _ in _rows(out)] == [*images, str(folder / "sub" / "new.png")]  # a valid JSON array
    assert _rows(out)[:3] == first
    assert _run(tiny_checkpoint, folder, "--output_path", str(out)) == 0
    assert "all 4 images are already in" in capsys.readouterr().err


def test_the_output_flag_is_output_path_with_output_kept_as_an_alias(tmp_path):
    """demo.py names the file it writes like every other script (--output_path); the older --output still reads."""
    field = {f.name: f for f in dataclasses.fields(demo.DemoConfig)}["output_path"]
    assert field.metadata["aliases"] == ("--output",)
    args = ["--checkpoint", "x.pth", "--image_paths", str(tmp_path)]
    for flag in ("--output_path", "--output"):
        assert demo.parse_config([*args, flag, str(tmp_path / "c.csv")]).output_path == str(tmp_path / "c.csv")


def test_batch_seeds_differ_between_seeds_and_between_batches_and_reach_different_draws():
    """Regression: seed * 2**32 + start collided (the CPU generator keeps a seed's low 32 bits), so every --seed drew
    the same samples. Each (seed, batch) pair now gets its own 32-bit seed, and so its own draws."""
    seeds = {(seed, start): demo.batch_seed(seed, start) for seed in range(6) for start in range(0, 64, 8)}
    assert len(set(seeds.values())) == len(seeds) and all(0 <= v < 2**32 for v in seeds.values())
    assert demo.batch_seed(3, 8) == demo.batch_seed(3, 8)  # a rerun's batch draws what the first run's did

    def draws(seed: int) -> torch.Tensor:
        return torch.rand(8, generator=torch.Generator().manual_seed(demo.batch_seed(seed, 0)))

    assert torch.equal(draws(3), draws(3)) and not torch.equal(draws(3), draws(4))


def _sampled(ckpt: Path, folder: Path, out: Path, seed: str) -> list[tuple[str, list[tuple[str, float]]]]:
    _run(ckpt, folder, "--output_path", str(out), "--method", "sample", "--num_captions", "3", "--seed", seed)
    return _rows(out)


def test_sampling_with_the_same_seed_gives_the_same_samples(tiny_checkpoint, tmp_path):
    folder, images = _folder(tmp_path, count=4)
    a = _sampled(tiny_checkpoint, folder, tmp_path / "a.jsonl", "3")
    assert a == _sampled(tiny_checkpoint, folder, tmp_path / "b.jsonl", "3")
    assert [name for name, _ in a] == images and all(len(caps) == 3 for _, caps in a)
    assert all(caps[0][1] >= caps[1][1] >= caps[2][1] for _, caps in a)  # ranked by score, best first


def test_sampling_with_another_seed_gives_other_samples(tiny_checkpoint, tmp_path):
    folder, _ = _folder(tmp_path, count=4)
    a = _sampled(tiny_checkpoint, folder, tmp_path / "a.jsonl", "3")
    c = _sampled(tiny_checkpoint, folder, tmp_path / "c.jsonl", "4")
    assert [caps for _, caps in a] != [caps for _, caps in c]


def test_greedy_gives_one_caption_per_image_and_beam_the_captions_asked_for(tiny_checkpoint, tmp_path):
    folder, images = _folder(tmp_path, count=4)
    greedy, beam = tmp_path / "greedy.jsonl", tmp_path / "beam.jsonl"
    _run(tiny_checkpoint, folder, "--output_path", str(greedy), "--method", "greedy")
    _run(tiny_checkpoint, folder, "--output_path", str(beam), "--method", "beam", "--num_captions", "2")
    assert [len(caps) for _, caps in _rows(greedy)] == [1] * len(images)
    assert [len(caps) for _, caps in _rows(beam)] == [2] * len(images)


@pytest.mark.parametrize("flags, message", [
    (("--output_path", "captions.txt"), "--output_path captions.txt: give a file ending in .json, .jsonl, .csv"),
    (("--output", "captions.txt"), "--output_path captions.txt: give a file ending in .json, .jsonl, .csv"),
    (("--method", "greedy", "--num_captions", "2"), "greedy search gives one caption per image"),
    (("--num_captions", "6"), "at most --beam_size"),
    (("--batch_size", "0"), "at least 1"),
    (("--method", "nucleus"), "invalid choice"),
])
def test_bad_flags_are_refused_in_one_line_naming_the_flag(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.parse_config(["--checkpoint", "x.pth", "--image_paths", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_images_are_read_one_batch_ahead_not_all_first():
    batches = [[Path(f"{b}-{i}") for i in range(3)] for b in range(5)]
    read: list[Path] = []
    stream = demo.read_ahead(batches, lambda p: read.append(p) or p.name, workers=2)
    first, items = next(stream)
    assert first == batches[0] and items == [p.name for p in batches[0]]
    assert set(read) <= {*batches[0], *batches[1]}  # this batch and the next, nothing further
    assert [b for b, _ in stream] == batches[1:]


def _batches_recorded(progress: Path) -> int:
    return max(0, progress.read_text().count("\n") - 1) if progress.exists() else 0


def test_a_killed_run_is_continued_by_a_rerun_into_the_file_an_uninterrupted_run_writes(tiny_checkpoint, tmp_path):
    folder, images = _folder(tmp_path, count=24)
    out = tmp_path / "killed.json"
    flags = ["--checkpoint", str(tiny_checkpoint), "--image_paths", str(folder), "--max_len", "6", "--batch_size",
             "2", "--method", "sample", "--num_captions", "2", "--seed", "11", "--num_workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "demo.py", *flags, "--output_path", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out.with_name(out.name + ".progress")
    try:
        assert wait_while_progressing(lambda: _batches_recorded(progress) >= 3, proc, [tmp_path])
    finally:
        proc.kill()
        proc.wait()
    assert _batches_recorded(progress) < 13  # stopped part-way (13 batches of 2: 24 images and the broken file)
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.read_text())  # the array is closed only when a run ends
    rerun = run_watched([sys.executable, "demo.py", *flags, "--output_path", str(out)], cwd=ROOT, env=env,
                        watch=[tmp_path])
    assert rerun.returncode == 1 and "broken.jpg" in rerun.stderr, rerun.stderr[-2000:]
    whole = tmp_path / "whole.json"
    demo.main(demo.parse_config([*flags, "--output", str(whole)]))
    assert [name for name, _ in _rows(out)] == images
    assert out.read_text() == whole.read_text()  # the same samples, row for row: each batch seeds its own draws
