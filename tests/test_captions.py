"""Tests for the Karpathy/manifest readers, their error messages and folder-to-manifest conversion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from processes import run_watched

from data.formats import load_records
from data.formats.karpathy import load_karpathy_json
from data.formats.manifest import load_manifest
from data.records import DatasetError, ImageRecord, check_images_exist
from data.splits import split_records
from data.to_manifest import plan_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _coco_item(cocoid: int, split: str, filepath: str = "train2014", captions: list[str] | None = None) -> dict:
    return {
        "filepath": filepath,
        "filename": f"COCO_{filepath}_{cocoid:012d}.jpg",
        "cocoid": cocoid,
        "imgid": cocoid + 1000,
        "split": split,
        "sentences": [{"raw": c, "tokens": []} for c in (captions or [f"caption of {cocoid}"])],
    }


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_lines(path: Path, items: list[Any]) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items), "utf-8")
    return path


def test_load_karpathy_json_with_filepath_folds_restval(tmp_path: Path) -> None:
    items = [
        _coco_item(9, "restval", "val2014", ["A dog.", "Two dogs."]),
        _coco_item(3, "test", "val2014"),
        _coco_item(5, "train"),
        _coco_item(7, "val", "val2014"),
    ]
    path = _write_json(tmp_path / "dataset_coco.json", {"images": items, "dataset": "coco"})
    records = load_karpathy_json(path, tmp_path / "images")
    assert [r.image_id for r in records] == [9, 3, 5, 7]
    assert [r.split for r in records] == ["train", "test", "train", "val"]
    assert records[0].path == tmp_path / "images" / "val2014" / "COCO_val2014_000000000009.jpg"
    assert records[0].captions == ("A dog.", "Two dogs.")
    assert records[2].path == tmp_path / "images" / "train2014" / "COCO_train2014_000000000005.jpg"


def test_load_karpathy_json_without_filepath_uses_imgid_and_folder_argument(tmp_path: Path) -> None:
    items = [
        {"filename": "1000268201_693b08cb0e.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "A child."}]},
        {"filename": "1001773457_577c3a7d70.jpg", "imgid": 1, "split": "val", "sentences": [{"raw": "Two dogs."}]},
    ]
    _write_json(tmp_path / "dataset_flickr8k.json", {"images": items})
    records = load_karpathy_json(tmp_path, tmp_path / "Flicker8k_Dataset")
    assert records[0] == ImageRecord(
        0, tmp_path / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg", ("A child.",), "train"
    )
    assert records[1].split == "val"
    # default image root: the json's folder; load_records dispatches folders and .json to the Karpathy reader
    assert load_records(tmp_path)[0].path == tmp_path / "1000268201_693b08cb0e.jpg"
    assert load_records(tmp_path / "dataset_flickr8k.json", tmp_path) == load_karpathy_json(tmp_path, tmp_path)


def test_load_karpathy_json_folder_needs_exactly_one_dataset_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected exactly one of dataset_coco.json"):
        load_karpathy_json(tmp_path)
    _write_json(tmp_path / "dataset_coco.json", {"images": []})
    _write_json(tmp_path / "dataset_flickr30k.json", {"images": []})
    with pytest.raises(DatasetError, match="found dataset_coco.json, dataset_flickr30k.json"):
        load_karpathy_json(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda item: item.pop("sentences"), r"item 1: field 'sentences' is missing"),
        (lambda item: item.update(split="training"), r"item 1: field 'split' has unknown value 'training'"),
        (lambda item: item.pop("split"), r"item 1: field 'split' is missing"),
        (lambda item: item.pop("filename"), r"item 1: field 'filename'"),
        (lambda item: [item.pop("cocoid"), item.pop("imgid")], r"item 1: field 'cocoid' \(or 'imgid'\) is missing"),
        (lambda item: item.update(cocoid="12"), r"item 1: field 'cocoid' must be an integer"),
        (lambda item: item.update(cocoid=1), r"item 1: image id 1 duplicates item 0"),
        (lambda item: item.update(sentences=[]), r"item 1: field 'sentences\[\*\]\.raw' is empty"),
        (lambda item: item.update(sentences=[{"raw": "  "}]), r"item 1: .*only empty or whitespace"),
        (lambda item: item.update(sentences=[{"tokens": []}]), r"item 1: field 'sentences\[0\]\.raw' is missing"),
    ],
)
def test_load_karpathy_json_bad_items_name_file_item_and_field(tmp_path: Path, mutate: Any, pattern: str) -> None:
    items = [_coco_item(1, "train"), _coco_item(2, "train")]
    mutate(items[1])
    path = _write_json(tmp_path / "dataset_coco.json", {"images": items})
    with pytest.raises(DatasetError, match=r"dataset_coco\.json: " + pattern):
        load_karpathy_json(path, tmp_path)


def test_load_karpathy_json_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nothere\.json: Karpathy captions json not found"):
        load_karpathy_json(tmp_path / "nothere.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n{"filename": }]}', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.json: invalid JSON at line 2"):
        load_karpathy_json(broken)
    wrong = _write_json(tmp_path / "wrong.json", {"annotations": []})
    with pytest.raises(DatasetError, match=r"wrong\.json: field 'images'"):
        load_karpathy_json(wrong)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"images": [{"filename": "caf\xe9.jpg"}]}')
    with pytest.raises(DatasetError, match=r"latin1\.json: not valid UTF-8 at byte offset 29"):
        load_karpathy_json(latin1)


def test_load_karpathy_json_drops_empty_captions_with_warning(tmp_path: Path) -> None:
    items = [_coco_item(1, "train"), _coco_item(2, "val", captions=["A cat.", "", "   ", "A kitten."])]
    path = _write_json(tmp_path / "dataset_coco.json", {"images": items})
    pattern = r"dataset_coco\.json: dropped 2 empty caption\(s\) at item 1 \(COCO_train2014_000000000002\.jpg\) x2"
    with pytest.warns(UserWarning, match=pattern):
        records = load_karpathy_json(path)
    assert records[1].captions == ("A cat.", "A kitten.")


def test_load_manifest_resolves_paths_and_default_ids(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "abs.jpg"
    (tmp_path / "sub").mkdir()
    path = _write_lines(
        tmp_path / "sub" / "manifest.jsonl",
        [
            {"image": "imgs/a.jpg", "captions": ["A dog."], "split": "train"},
            "",
            {"image": str(absolute), "captions": ["Un chat.", "Eine Katze."], "split": "test"},
            "   ",
            {"image": "b.png", "captions": ["x"], "split": "val", "image_id": 42, "extra": "ignored"},
        ],
    )
    records = load_manifest(path)
    assert records == [
        ImageRecord(0, tmp_path / "sub" / "imgs" / "a.jpg", ("A dog.",), "train"),
        ImageRecord(1, absolute, ("Un chat.", "Eine Katze."), "test"),
        ImageRecord(42, tmp_path / "sub" / "b.png", ("x",), "val"),
    ]
    rebased = load_manifest(path, images_path=tmp_path / "root")  # found in neither place: the images folder's
    assert rebased[0].path == tmp_path / "root" / "imgs" / "a.jpg"
    assert rebased[1].path == absolute
    assert load_records(path) == records


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ({"captions": ["a"], "split": "train"}, r"line 2: field 'image' is missing"),
        ({"image": "b.jpg", "split": "train"}, r"line 2: field 'captions' is missing"),
        ({"image": "b.jpg", "captions": "a dog", "split": "train"}, r"line 2: field 'captions' must be a list"),
        ({"image": "b.jpg", "captions": ["a"]}, r"line 2: field 'split' is missing"),
        ({"image": "b.jpg", "captions": ["a"], "split": "dev"}, r"line 2: field 'split' has unknown value 'dev'"),
        ({"image": "b.jpg", "captions": [], "split": "train"}, r"line 2: field 'captions' is empty"),
        ({"image": "b.jpg", "captions": ["", " \n"], "split": "train"}, r"line 2: field 'captions' holds only empty"),
        ({"image": "b.jpg", "captions": ["a", 3], "split": "train"}, r"line 2: field captions\[1\] is int"),
        ({"image": "b.jpg", "captions": ["a"], "split": "train", "image_id": 1.5}, r"line 2: field 'image_id'"),
        ({"image": "b.jpg", "captions": ["a"], "split": "train", "image_id": 7}, r"line 2: .*'image_id' 7 .*line 1"),
        ('{"image": "b.jpg", "captions": ["a"], ', r"line 2: invalid JSON at column"),
        ('["b.jpg", ["a"]]', r"line 2: expected a JSON object"),
    ],
)
def test_load_manifest_bad_lines_name_file_line_and_field(tmp_path: Path, line: Any, pattern: str) -> None:
    first = {"image": "a.jpg", "captions": ["ok"], "split": "train", "image_id": 7}
    path = _write_lines(tmp_path / "bad.jsonl", [first, line])
    with pytest.raises(DatasetError, match=r"bad\.jsonl: " + pattern):
        load_manifest(path)


def test_load_manifest_non_utf8_names_byte_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = b'{"image": "a.jpg", "captions": ["ok"], "split": "train"}\n'
    path.write_bytes(good + b'{"image": "b.jpg", "captions": ["caf\xe9"], "split": "train"}\n')
    offset = len(good) + len(b'{"image": "b.jpg", "captions": ["caf')
    with pytest.raises(DatasetError, match=rf"latin1\.jsonl: not valid UTF-8 at byte offset {offset} \(line 2\)"):
        load_manifest(path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good)
    assert load_manifest(bom)[0].captions == ("ok",)


def test_load_manifest_drops_empty_captions_with_warning(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "m.jsonl",
        [
            {"image": "a.jpg", "captions": ["ok"], "split": "train"},
            {"image": "b.jpg", "captions": ["", "fine"], "split": "val"},
        ],
    )
    with pytest.warns(UserWarning, match=r"m\.jsonl: dropped 1 empty caption\(s\) at line 2 \(b\.jpg\)"):
        records = load_manifest(path)
    assert records[1].captions == ("fine",)


def test_load_records_rejects_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"gone\.jsonl: captions file not found$"):
        load_records(tmp_path / "gone.jsonl")
    with pytest.raises(DatasetError, match=r"gone\.csv: captions file not found"):
        load_records(tmp_path / "gone.csv")
    (tmp_path / "data.csv").write_text("image,caption\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"data\.csv: this is a captions CSV .*not a dataset; make a manifest"):
        load_records(tmp_path / "data.csv")


def test_split_records_and_check_images_exist_keep_order(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    records = [
        ImageRecord(1, tmp_path / "a.jpg", ("c",), "val"),
        ImageRecord(2, tmp_path / "b.jpg", ("c",), "train"),
        ImageRecord(3, tmp_path / "c.jpg", ("c",), "train"),
    ]
    groups = split_records(records)
    assert list(groups) == ["train", "val", "test"]
    assert [r.image_id for r in groups["train"]] == [2, 3]
    assert groups["test"] == []
    assert [r.image_id for r in check_images_exist(records)] == [2, 3]


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "nested/c.jpg"):
        (folder / name).write_bytes(b"not decoded here")
    return folder


def _check_manifest(manifest: Path, images: Path) -> list[ImageRecord]:
    records = load_manifest(manifest)
    assert [r.path.resolve() for r in records] == [(images / n).resolve() for n in ("a.jpg", "b.jpg", "nested/c.jpg")]
    for line in manifest.read_text(encoding="utf-8").splitlines():
        assert not Path(json.loads(line)["image"]).is_absolute()
    return records


def test_to_manifest_from_csv_keeps_quoted_commas_and_writes_relative_paths(tmp_path: Path, image_folder: Path) -> None:
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text(
        'image,caption\na.jpg,"A dog, running."\nb.jpg,A cat.\na.jpg,A puppy.\nnested/c.jpg,"Un ""chat"""\n',
        encoding="utf-8",
    )
    output = tmp_path / "out" / "manifest.jsonl"
    plan = plan_manifest(image_folder, csv_file, split="val")
    assert not plan.blocking and len(plan.entries) == 3
    plan.write(output)
    records = _check_manifest(output, image_folder)
    assert records[0].captions == ("A dog, running.", "A puppy.")
    assert records[2].captions == ('Un "chat"',)
    assert {r.split for r in records} == {"val"}
    assert [r.image_id for r in records] == [0, 1, 2]


def test_to_manifest_from_tsv_drops_the_flickr_suffix(tmp_path: Path, image_folder: Path) -> None:
    tsv_file = tmp_path / "Flickr8k.token.txt"
    tsv_file.write_text("a.jpg#0\tA dog.\na.jpg#1\tA brown dog.\nb.jpg\tA cat.\nnested/c.jpg#0\tA bird.\n", "utf-8")
    output = tmp_path / "manifest.jsonl"
    plan_manifest(image_folder, tsv_file).write(output)
    records = _check_manifest(output, image_folder)
    assert records[0].captions == ("A dog.", "A brown dog.")
    assert sorted(r.split for r in records) == ["test", "train", "val"]  # no split given: 0.9,0.05,0.05, one each


def test_to_manifest_split_ratio_is_seeded_and_keeps_the_file_order(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"{i:02d}.jpg" for i in range(20)]
    for name in names:
        (folder / name).write_bytes(b"x")
    captions = _write_json(tmp_path / "captions.json", {name: [f"image {name}", ""] for name in names})
    first, second = tmp_path / "m1.jsonl", tmp_path / "m2.jsonl"
    plan_manifest(folder, captions, split_ratio="0.9,0.05,0.05", seed=3).write(first)
    plan_manifest(folder, captions, split_ratio=(0.9, 0.05, 0.05), seed=3).write(second)
    splits = [r.split for r in load_manifest(first)]
    assert splits == [r.split for r in load_manifest(second)]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (18, 1, 1)
    assert [r.path.name for r in load_manifest(first)] == names  # file order kept, only the split is random
    with pytest.raises(DatasetError, match="summing to 1"):
        plan_manifest(folder, captions, split_ratio="0.5,0.2")


def test_to_manifest_blocks_missing_images_bad_headers_overwrites_and_unknown_splits(
    tmp_path: Path, image_folder: Path
) -> None:
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("image,caption\na.jpg,ok\nmissing.jpg,A ghost.\nb.jpg,ok\nalso_missing.png,x\n", "utf-8")
    output = tmp_path / "manifest.jsonl"
    plan = plan_manifest(image_folder, csv_file)
    assert plan.blocking == (f"nothing written: 2 caption rows name images not in {image_folder} (pass --skip_missing "
                             "to leave such rows out)")
    assert plan.report.found["missing_row"] == ["line 3 'missing.jpg'", "line 5 'also_missing.png'"]
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("file,text\na.jpg,ok\n", "utf-8")
    with pytest.raises(DatasetError, match=r"bad\.csv: line 1: .*'image' and 'caption'"):
        plan_manifest(image_folder, bad_header)
    good = tmp_path / "good.csv"
    good.write_text("image,caption\na.jpg,ok\n", "utf-8")
    plan_manifest(image_folder, good).write(output)
    before = output.read_text("utf-8")
    with pytest.raises(FileExistsError, match=r"manifest\.jsonl: output manifest already exists"):
        plan_manifest(image_folder, good, split="train").write(output)
    assert output.read_text("utf-8") == before
    with pytest.raises(DatasetError, match="split 'dev'"):
        plan_manifest(image_folder, good, split="dev")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_watched([sys.executable, "-m", "data.captions", *args], cwd=REPO_ROOT)


def test_captions_cli_to_manifest_refuses_overwrite(tmp_path: Path, image_folder: Path) -> None:
    captions = tmp_path / "captions.tsv"
    captions.write_text("image\tcaption\na.jpg\tA dog.\nb.jpg\tA cat.\n", "utf-8")
    output = tmp_path / "manifest.jsonl"
    args = ("to-manifest", "--images", str(image_folder), "--captions", str(captions), "--output", str(output))
    done = _cli(*args, "--split", "test")
    assert done.returncode == 0, done.stderr
    assert "wrote 2 images" in done.stdout
    assert [r.split for r in load_manifest(output)] == ["test", "test"]
    refused = _cli(*args)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "already exists" in refused.stderr and str(output) in refused.stderr
    again = _cli(*args, "--overwrite", "--split-ratio", "0.5,0.5,0", "--seed", "1")
    assert again.returncode == 0, again.stderr
    assert sorted(r.split for r in load_manifest(output)) == ["train", "val"]
    checked = _cli("check", "--captions", str(output))
    assert checked.returncode == 0, checked.stderr
    assert "splits: train 1, val 1, test 0" in checked.stdout
    assert "no test images" in checked.stdout  # an empty split is reported with what it means
