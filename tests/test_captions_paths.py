"""How a manifest's relative image paths combine with --images_path: under the images folder when the file is there,
otherwise beside the manifest, the same in every reader; a missing image names both places."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data.captions import main
from data.check import check_dataset
from data.formats import load_records
from data.records import missing_image_message


def _to_manifest(photos: str, output: str) -> None:
    Path("captions.csv").write_text("".join(f"img{i:03d}.jpg,photo {i}\n" for i in range(4)), "utf-8")
    assert main(["to-manifest", "--images", photos, "--captions", "captions.csv", "--output", output,
                 "--split-ratio", "0.5,0.25,0.25"]) == 0


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Path("photos").mkdir()
    for i in range(4):
        Path(f"photos/img{i:03d}.jpg").write_bytes(b"\xff\xd8\xff")
    return tmp_path


def test_images_path_given_as_the_to_manifest_images_folder_finds_the_images(workdir: Path) -> None:
    # the scenario: to-manifest --images photos/, then data_generator.py --images_path photos/
    _to_manifest("photos/", "manifest.jsonl")
    from engine.features import check_images_present  # what data_generator.py runs before any work

    for images_path in ("photos/", None, ".", str(workdir / "photos")):
        records = load_records("manifest.jsonl", images_path)
        assert [r.path for r in records] == [Path(f"photos/img{i:03d}.jpg") for i in range(4)], images_path
        check_images_present(records, 0.0, images_path or "")
    report = check_dataset("manifest.jsonl", "photos/")
    assert report.facts[0].endswith("0 found under photos/, 4 beside the manifest") and not report.found


def test_images_path_is_preferred_when_the_file_is_there(workdir: Path) -> None:
    _to_manifest("photos", "manifest.jsonl")  # "image": "photos/img000.jpg"
    shutil.copytree("photos", "resized/photos")
    records = load_records("manifest.jsonl", "resized")  # both exist: the images folder wins
    assert [r.path for r in records] == [Path(f"resized/photos/img{i:03d}.jpg") for i in range(4)]
    Path("resized/photos/img002.jpg").unlink()  # not in the copy: found beside the manifest
    assert load_records("manifest.jsonl", "resized")[2].path == Path("photos/img002.jpg")
    Path("runs").mkdir()
    _to_manifest("photos", "runs/manifest.jsonl")  # written relative to the manifest's folder: ../photos/img000.jpg
    assert load_records("runs/manifest.jsonl")[0].path == Path("runs/../photos/img000.jpg")
    found = load_records("runs/manifest.jsonl", "photos")[0].path  # photos/../photos/img000.jpg: the same file
    assert found.resolve() == (workdir / "photos" / "img000.jpg").resolve()


def test_a_missing_image_names_both_places_looked_up(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _to_manifest("photos/", "manifest.jsonl")
    Path("photos/img001.jpg").unlink()
    record = load_records("manifest.jsonl", "photos/")[1]
    assert record.path == Path("photos/photos/img001.jpg")
    assert record.tried == (Path("photos/photos/img001.jpg"), Path("photos/img001.jpg"))
    assert missing_image_message(record) == (
        "photos/photos/img001.jpg: image file not found (looked under the images folder and beside the manifest: "
        "photos/photos/img001.jpg and photos/img001.jpg)")
    assert main(["check", "--captions", "manifest.jsonl", "--images", "photos/"]) == 1
    out = capsys.readouterr().out
    assert "1 image file is missing: photos/photos/img001.jpg (also looked for photos/img001.jpg)" in out
