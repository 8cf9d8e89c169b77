"""The validation pass of `python -m data.captions to-manifest|check`: one summary naming every problem with what it
means for training, CSV/TSV with or without a header, the default split, wrong file kinds and one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from processes import run_watched

from data.captions import main
from data.check import check_dataset
from data.formats import captions_kind, load_records, read_caption_rows
from data.formats.manifest import load_manifest
from data.records import DatasetError
from data.to_manifest import plan_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """main() in-process: (exit status, stdout, stderr), argparse's exits included."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"img{i:02d}.jpg").write_bytes(b"\xff\xd8\xff not decoded here")
    return folder


def _assert_no_python_noise(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "Warning:" not in text and "warnings.warn" not in text


MISTAKES_CSV = (
    "image,caption\n"  # line 1
    + "".join(f"img{i:02d}.jpg,a photo number {i}\n" for i in range(10))  # lines 2-11
    + "img03.jpg,A photo  number 3\n"  # line 12: the same text as line 5 (case and spacing aside)
    + "img04.jpg,\n"  # line 13: empty caption, img04 keeps its other one
    + "ghost.jpg,a ghost\n"  # line 14: no such image
    + "img11.jpg,   \n"  # line 15: img11's only caption is empty
    + "img05.jpg,a dog, running\n"  # line 16: an unquoted comma stays in the caption
)  # img10.jpg has no row at all


@pytest.fixture()
def mistakes(tmp_path: Path) -> tuple[Path, Path]:
    photos = _photos(tmp_path / "photos", 12)
    captions = tmp_path / "captions.csv"
    captions.write_text(MISTAKES_CSV, encoding="utf-8")
    return photos, captions


def test_to_manifest_summary_names_every_problem_and_writes_nothing_while_images_are_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mistakes: tuple[Path, Path]
) -> None:
    photos, captions = mistakes
    output = tmp_path / "manifest.jsonl"
    args = ("to-manifest", "--images_path", str(photos), "--captions_path", str(captions), "--output", str(output))
    code, out, err = _run(capsys, *args)
    assert code == 2 and not output.exists()
    assert err == (f"error: nothing written: 1 caption row names an image not in {photos} (pass --skip_missing to "
                   "leave such rows out)\n")
    assert out.startswith(f"{captions}: CSV with a header, 15 caption rows; images in {photos} -> 10 images")
    assert f"1 caption row names an image not in {photos}: line 14 'ghost.jpg'" in out
    assert "nothing is written: correct the names, or pass --skip_missing" in out
    assert f"1 image in {photos} has no caption row: img10.jpg" in out
    assert "not in the manifest, so training never sees them" in out
    assert "1 image has only empty captions: img11.jpg (line 15)" in out and "needs at least one caption" in out
    assert "1 duplicate caption (same image, same text): line 12 (img03.jpg) 'A photo  number 3'" in out
    assert "count twice in training" in out
    assert "1 empty caption: line 13 (img04.jpg)\n      dropped when read" in out
    assert "neither --split nor --split_ratio given, so drawn at random 0.9,0.05,0.05 with seed 0" in out
    _assert_no_python_noise(out, err)

    code, out, err = _run(capsys, *args, "--skip_missing", "True")
    assert code == 0 and err == ""
    assert "left out of the manifest (--skip_missing)" in out and out.endswith(f"wrote 10 images to {output}\n")
    records = load_manifest(output)
    assert [r.path.name for r in records] == [f"img{i:02d}.jpg" for i in range(10)]
    assert records[3].captions == ("a photo number 3",) and records[4].captions == ("a photo number 4",)
    assert records[5].captions == ("a photo number 5", "a dog, running")
    counts = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 1, "test": 1}  # nobody forgets --split_ratio into an all-train manifest
    assert "splits: neither --split nor --split_ratio given, so drawn at random 0.9,0.05,0.05 with seed 0 (" in out
    assert "train 8, val 1, test 1" in out

    code, out, err = _run(capsys, "check", "--captions_path", str(output))
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"{output}: a JSON-lines manifest (one image per line); 10 images, 11 captions (1 to 2 per image)",
        "splits: train 8, val 1, test 1",
        "no problems found",
    ]


def test_default_split_is_deterministic_by_seed_and_keeps_val_and_test(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 20)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({f"img{i:02d}.jpg": [f"photo {i}"] for i in range(20)}), "utf-8")
    first, again, other = (plan_manifest(photos, captions, seed=seed) for seed in (0, 0, 1))
    assert first.entries == again.entries and first.entries != other.entries
    assert [split for _, _, split in first.entries].count("val") == 1
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"img00.jpg": ["a"], "img01.jpg": ["b"], "img02.jpg": ["c"]}), "utf-8")
    assert sorted(split for _, _, split in plan_manifest(photos, tiny).entries) == ["test", "train", "val"]
    assert "img19.jpg" in plan_manifest(photos, tiny).report.found["unlisted_image"]


def test_empty_splits_say_what_they_mean_for_training(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 3)
    captions = tmp_path / "captions.csv"
    captions.write_text("".join(f"img{i:02d}.jpg,photo {i}\n" for i in range(3)), "utf-8")
    output = tmp_path / "m.jsonl"
    code, out, _ = _run(capsys, "to-manifest", "--images_path", str(photos), "--captions_path", str(captions),
                        "--output", str(output), "--split", "train")
    assert code == 0
    assert "splits: every image in train (--split train): train 3, val 0, test 0" in out
    for summary in (out, _run(capsys, "check", "--captions_path", str(output))[1]):
        assert "  - no val images\n      training keeps no best.pth: later phases use the last checkpoint; " \
               "assign a val split with to-manifest --split_ratio 0.9,0.05,0.05" in summary
        assert "  - no test images\n      test.py has nothing to score" in summary


def test_check_reports_every_problem_of_a_manifest_and_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _photos(tmp_path / "photos", 4)
    lines = [
        {"image": "photos/img00.jpg", "captions": ["a dog", "A  dog"], "split": "train"},  # duplicate caption
        {"image": "photos/img01.jpg", "captions": ["", "a cat"], "split": "train"},  # empty caption
        {"image": "photos/gone.jpg", "captions": ["a ghost"], "split": "val"},  # missing file
        {"image": "photos/img02.jpg", "captions": ["  "], "split": "train"},  # no caption left
        {"image": "photos/img00.jpg", "captions": ["again"], "split": "val"},  # listed twice, in two splits
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), "utf-8")
    code, out, err = _run(capsys, "check", "--captions_path", str(manifest))
    assert code == 1 and err == ""
    assert out.startswith(f"{manifest}: a JSON-lines manifest (one image per line); 4 images, 5 captions (1 to 2 ")
    assert "splits: train 2, val 2, test 0" in out
    assert "1 image has no caption: line 4 (photos/img02.jpg)" in out and "refuse this file" in out
    assert "1 duplicate caption (same image, same text): line 1 (photos/img00.jpg) 'A  dog'" in out
    assert "1 image is listed more than once: line 5 (photos/img00.jpg), also at line 1" in out
    assert "copies in two splits leak into the evaluation" in out
    assert f"1 image file is missing: {tmp_path / 'photos' / 'gone.jpg'}" in out
    assert "data_generator.py stops when more than --max_unreadable" in out
    assert "1 empty caption: line 2 (photos/img01.jpg)" in out and "no test images" in out
    _assert_no_python_noise(out, err)
    with pytest.raises(DatasetError, match=r"line 4: field 'captions' holds only empty"):
        load_manifest(manifest)  # what train.py sees: the strict reader still refuses it


def test_check_karpathy_json_reports_duplicates_by_item(tmp_path: Path) -> None:
    items = [{"filename": f"{i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": "a dog"}, {"raw": "A dog"}]}
             for i, split in enumerate(("train", "val", "test"))]
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": items}), "utf-8")
    report = check_dataset(path)
    assert report.found["duplicate_kept"][0] == "item 0 (0.jpg) 'A dog'"
    assert len(report.found["missing_file"]) == 3 and report.severe == ["missing_file"]


@pytest.mark.parametrize(
    ("name", "text", "form"),
    [
        ("c.csv", "img00.jpg,A dog.\nimg01.jpg,A cat, sitting\n", "CSV without a header (columns image,caption)"),
        ("c.csv", 'image,caption\nimg00.jpg,A dog.\nimg01.jpg,"A cat, sitting"\n', "CSV with a header"),
        ("c.csv", 'Caption,id,Image\nA dog.,1,img00.jpg\n"A cat, sitting",2,img01.jpg\n', "CSV with a header"),
        ("c.txt", "img00.jpg\tA dog.\nimg01.jpg\tA cat, sitting\n", "TSV without a header"),
        ("c.tsv", "image\tcaption\nimg00.jpg\tA dog.\r\nimg01.jpg\tA cat, sitting\n", "TSV with a header"),
        ("c.json", '{"img00.jpg": "A dog.", "img01.jpg": ["A cat, sitting"]}', "JSON {image: [captions]}"),
    ],
)
def test_captions_files_with_or_without_a_header(tmp_path: Path, name: str, text: str, form: str) -> None:
    photos = _photos(tmp_path / "photos", 2)
    (tmp_path / name).write_text(text, "utf-8")
    plan = plan_manifest(photos, tmp_path / name, split="train")
    assert [(n, c) for n, c, _ in plan.entries] == [("img00.jpg", ("A dog.",)), ("img01.jpg", ("A cat, sitting",))]
    assert plan.report.header.startswith(f"{tmp_path / name}: {form}")
    assert not plan.report.found.get("empty_caption") and not plan.report.found.get("unlisted_image")


def test_first_row_is_data_when_it_names_an_existing_file_without_an_image_suffix(tmp_path: Path) -> None:
    (tmp_path / "scan_001").write_bytes(b"x")
    rows, form = read_caption_rows(_write(tmp_path / "c.csv", "scan_001,a scan\n"),
                                   lambda n: (tmp_path / n).is_file())
    assert form.startswith("CSV without a header") and rows[0].name == "scan_001" and rows[0].caption == "a scan"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, "utf-8")
    return path


def test_a_header_that_does_not_name_image_and_caption_is_explained(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 1)
    bad = _write(tmp_path / "bad.csv", "file,text\nimg00.jpg,a photo\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: line 1: the first row's first cell 'file' is not an image "
                       r"file name, so the row is read as a header, and a header must name the columns 'image' and "
                       r"'caption' \(got 'file,text'\)"):
        plan_manifest(photos, bad)


def test_wrong_file_kinds_say_what_the_file_is_and_what_to_give(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    photos = _photos(tmp_path / "photos", 2)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"photos/img0{i}.jpg", "captions": ["x"], "split": "train"})
                                + "\n" for i in range(2)), "utf-8")
    captions = _write(tmp_path / "captions.csv", "img00.jpg,a photo\nimg01.jpg,another\n")
    karpathy = _write(tmp_path / "dataset_coco.json", json.dumps({"images": []}))
    coco = _write(tmp_path / "captions_train2014.json", json.dumps({"info": {}, "annotations": []}))
    empty = _write(tmp_path / "empty.jsonl", "")
    lines_json = _write(tmp_path / "lines.json", manifest.read_text("utf-8"))
    output = tmp_path / "o.jsonl"
    expectations = [
        (("check", "--captions_path", str(tmp_path / "manifest.json")),
         f"{tmp_path / 'manifest.json'}: captions file not found (did you mean {manifest}?)"),
        (("check", "--captions_path", str(captions)),
         f"{captions}: this is a captions CSV (image,caption); check it against its images with --images_path "
         f"FOLDER, or make a manifest from it: python -m data.captions to-manifest --images_path IMAGES_FOLDER "
         f"--captions_path {captions} --output manifest.jsonl"),
        (("to-manifest", "--images_path", str(photos), "--captions_path", str(manifest), "--output", str(output)),
         f"{manifest}: this is a JSON-lines manifest (one image per line), already what to-manifest writes"),
        (("to-manifest", "--images_path", str(photos), "--captions_path", str(karpathy), "--output", str(output)),
         "the scripts read it as it is (--captions_path"),
        (("check", "--captions_path", str(photos / "img00.jpg")),
         "img00.jpg: this is a JPEG image, not a captions file"),
        (("check", "--captions_path", str(coco)), "COCO's caption annotations"),
        (("check", "--captions_path", str(empty)), "empty.jsonl: this is an empty file"),
        (("check", "--captions_path", str(photos)), "this is a folder of images, not a captions file"),
    ]
    for args, expected in expectations:
        code, out, err = _run(capsys, *args)
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (args, out, err)
        assert expected in err and "Karpathy captions json not found" not in err, (expected, err)
    code, out, _ = _run(capsys, "check", "--captions_path", str(lines_json))  # JSON lines named .json: a manifest
    assert code == 0 and out.startswith(f"{lines_json}: a JSON-lines manifest (one image per line); 2 images")
    code, out, _ = _run(capsys, "check", "--captions_path", str(captions), "--images_path", str(photos))
    assert code == 0 and "(what to-manifest would write; nothing is written by check)" in out
    with pytest.raises(DatasetError, match=r"this is a captions JSON .*not a dataset; make a manifest from it"):
        load_records(_write(tmp_path / "caps.json", json.dumps({"img00.jpg": ["a photo"]})))


def test_a_large_karpathy_json_on_one_line_is_recognised(tmp_path: Path) -> None:
    items = [{"filename": f"{i}.jpg", "imgid": i, "split": "train", "sentences": [{"raw": "a photo"}]}
             for i in range(2000)]
    path = _write(tmp_path / "dataset.jsonl", json.dumps({"images": items}))
    assert path.stat().st_size > 1 << 16
    assert captions_kind(path) == "karpathy" and len(load_records(path)) == 2000


def test_command_line_errors_are_one_line_with_exit_2_and_suggest_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = [
        (("to-manifest", "--images_path", "p", "--captions_path", "c.csv", "--output", "m.jsonl", "--skip-mising"),
         "error: unrecognized arguments: --skip-mising; --skip-mising: did you mean --skip-missing? "
         "(python -m data.captions to-manifest --help)\n"),
        (("check", "--captions_path", "m.jsonl", "--image", "photos"),
         "error: unrecognized arguments: --image photos; --image: did you mean --images? "
         "(python -m data.captions check --help)\n"),
        (("to-manifest", "--images_path", "p", "--captions_path", "c.csv", "--output", "m.jsonl", "--split", "train",
          "--split_ratio", "0.5,0.5,0"), "not allowed with argument --split"),
        (("to-manifest", "--images_path", str(tmp_path / "nope"), "--captions_path", "c.csv", "--output", "m.jsonl"),
         f"error: {tmp_path / 'nope'}: images folder not found\n"),
    ]
    for args, expected in cases:
        code, out, err = _run(capsys, *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and expected in err, (args, err)
    done = run_watched([sys.executable, "-m", "data.captions", "check", "--captions_path", str(tmp_path / "x.json")],
                          cwd=REPO_ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'x.json'}: captions file not found\n"


@pytest.mark.parametrize(("text", "kind"), [
    ('{"images": [], "image": "a.jpg"}', "karpathy"),  # an 'images' list is Karpathy's before anything else
    ('{"annotations": [], "images_note": ["x"]}', "coco-annotations"),
    ('{"image": "a.jpg", "captions": ["x"], "split": "train"}', "manifest"),  # a manifest of one line
    ('{"images": ["x"]}\n{"image": "b.jpg"}\n', "manifest"),  # JSON lines, whatever the first line holds
    ('{"a.jpg": ["a dog"], "b.jpg": "a cat"}', "captions-json"),
    ('["a.jpg", "b.jpg"]', "json"),
    ("a.jpg\ta dog, running\n", "tsv"),  # a tab on the first line wins over its comma
    ("a.jpg,a dog\n", "csv"),
    ("a.jpg a dog\n", "text"),
    ("  \n", "empty"),
])
def test_the_format_table_settles_which_kind_a_file_is(tmp_path: Path, text: str, kind: str) -> None:
    assert captions_kind(_write(tmp_path / "captions.data", text)) == kind


def test_to_manifest_takes_the_scripts_flag_names_true_false_booleans_and_the_old_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    photos = _photos(tmp_path / "photos", 2)
    captions = _write(tmp_path / "captions.csv", "img00.jpg,a photo\nimg01.jpg,another\n")
    output = tmp_path / "manifest.jsonl"
    new = ("to-manifest", "--images_path", str(photos), "--captions_path", str(captions), "--output", str(output))
    assert _run(capsys, *new, "--split", "train")[0] == 0
    code, _, err = _run(capsys, *new, "--split", "val", "--overwrite", "False")
    assert code == 2 and "already exists" in err and {r.split for r in load_manifest(output)} == {"train"}
    old = ("to-manifest", "--images", str(photos), "--captions", str(captions), "--output_path", str(output))
    assert _run(capsys, *old, "--split-ratio", "0,1,0", "--overwrite", "--skip-missing", "True")[0] == 0
    assert {r.split for r in load_manifest(output)} == {"val"}
