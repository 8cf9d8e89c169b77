"""Tests for the synthetic shapes captioning dataset (data/synthetic.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from processes import run_watched

from data.synthetic import (
    ALL_COLOURS,
    GROUND_TRUTH_NAME,
    IMAGES_DIR,
    JSON_NAME,
    MARKER_NAME,
    PARTIAL_MARKER_NAME,
    SHIFTED_BACKGROUNDS,
    SHIFTED_COLOURS,
    SHIFTED_SHAPES,
    SyntheticConfig,
    caption_from_ground_truth,
    generate_synthetic_dataset,
    load_ground_truth,
    shape_vocabulary,
)
from eval.cider import best_constant_caption
from eval.grounded import GroundingWords, grounded_accuracy

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(num_train=60, num_val=10, num_test=10, seed=0)


def _grounded(captions: dict[Any, Any], gt_path: Path) -> dict[str, float]:
    """Grounded accuracies against a ground-truth file, with the grammar's words."""
    return grounded_accuracy(captions, load_ground_truth(gt_path), GroundingWords.from_vocabulary(shape_vocabulary()))


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(json_path: Path) -> dict[str, Any]:
    """The Karpathy json."""
    return json.loads(json_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60/10/10 dataset generated once for the read-only tests; returns the json path."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic_small"), SMALL, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism


def test_generate_same_seed_is_byte_identical(tmp_path: Path, small_dataset: Path) -> None:
    """A second run with the same config writes exactly the same bytes (images and json files)."""
    other = generate_synthetic_dataset(tmp_path / "again", SMALL, progress=False)
    first, second = _files(small_dataset.parent), _files(other.parent)
    assert sorted(first) == sorted(second)
    assert len([k for k in first if k.startswith(IMAGES_DIR)]) == SMALL.num_images
    for name, data in first.items():
        assert data == second[name], name


def test_generate_other_seed_differs(tmp_path: Path, small_dataset: Path) -> None:
    """Another seed gives other images and other captions."""
    other = generate_synthetic_dataset(tmp_path / "seed1", SyntheticConfig(60, 10, 10, seed=1), progress=False)
    first, second = _files(small_dataset.parent), _files(other.parent)
    images = [k for k in first if k.startswith(IMAGES_DIR)]
    assert sum(first[k] == second[k] for k in images) == 0
    assert first[JSON_NAME] != second[JSON_NAME]


# ----------------------------------------------------------------------------------------------------------------------
# Karpathy json and images


def test_karpathy_json_has_splits_captions_and_files(small_dataset: Path) -> None:
    """Splits, ids, 5 sentences with matching tokens, file paths that exist, RGB images of the right size."""
    data = _load(small_dataset)
    assert data["dataset"] == "synthetic"
    images = data["images"]
    splits = [im["split"] for im in images]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (60, 10, 10)
    assert [im["imgid"] for im in images] == list(range(80))
    sentids = [sid for im in images for sid in im["sentids"]]
    assert len(set(sentids)) == len(sentids) == 80 * 5
    for im in images:
        assert im["cocoid"] == im["imgid"]
        assert im["filepath"] == IMAGES_DIR and im["filename"] == f"{im['imgid']:06d}.png"
        assert len(im["sentences"]) == 5
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert s["tokens"] == s["raw"].replace(",", " ").split()
        path = small_dataset.parent / im["filepath"] / im["filename"]
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)


def test_generate_image_size_parameter(tmp_path: Path) -> None:
    """image_size sets the side of every image and scales the ground-truth coordinates."""
    path = generate_synthetic_dataset(tmp_path, SyntheticConfig(4, 1, 1, image_size=96), progress=False)
    for im in _load(path)["images"]:
        with Image.open(path.parent / im["filepath"] / im["filename"]) as img:
            assert img.size == (96, 96) and img.mode == "RGB"
    gt = load_ground_truth(path.parent / GROUND_TRUTH_NAME)
    assert max(o["x"] + o["radius"] for e in gt.values() for o in e["objects"]) <= 96


def test_images_show_shapes_in_their_colour(small_dataset: Path) -> None:
    """At every object's centre the pixel is close to the named colour (the shapes are drawn and visible)."""
    from data.synthetic import COLOURS

    gt = load_ground_truth(small_dataset.parent / GROUND_TRUTH_NAME)
    for imgid, entry in gt.items():
        arr = np.asarray(Image.open(small_dataset.parent / IMAGES_DIR / f"{imgid:06d}.png"), dtype=np.int64)
        for obj in entry["objects"]:
            pixel = arr[int(round(obj["y"])), int(round(obj["x"]))]
            assert np.abs(pixel - np.asarray(COLOURS[obj["colour"]])).max() <= 20, (imgid, obj, pixel)


# ----------------------------------------------------------------------------------------------------------------------
# Captions


def test_captions_are_distinct_lowercase_and_varied(small_dataset: Path) -> None:
    """Five different captions per image, 5-20 lowercase words, and many distinct captions overall."""
    images = _load(small_dataset)["images"]
    all_raw = [s["raw"] for im in images for s in im["sentences"]]
    for im in images:
        raws = [s["raw"] for s in im["sentences"]]
        assert len(set(raws)) == 5
        for s in im["sentences"]:
            assert 5 <= len(s["tokens"]) <= 20
            assert all(t.isalpha() and t.islower() for t in s["tokens"])
    assert len(set(all_raw)) >= 0.9 * len(all_raw)
    first_words = {s["tokens"][0] for im in images for s in im["sentences"]}
    assert len(first_words) >= 5  # several sentence templates


def test_captions_agree_with_ground_truth(small_dataset: Path) -> None:
    """Every caption names exactly the ground-truth groups (colour, shape, count) and no other colour."""
    images = _load(small_dataset)["images"]
    gt_path = small_dataset.parent / GROUND_TRUTH_NAME
    gt = load_ground_truth(gt_path)
    colour_words = shape_vocabulary()["colour_words"]
    for k in range(5):
        scores = _grounded({im["imgid"]: im["sentences"][k]["raw"] for im in images}, gt_path)
        for key in ("colour_accuracy", "shape_accuracy", "count_accuracy", "object_recall", "scene_accuracy"):
            assert scores[key] == 1.0, (k, key, scores)
        assert scores["hallucination_rate"] == 0.0
    for im in images:
        true_colours = {g["colour"] for g in gt[im["imgid"]]["groups"]}
        for s in im["sentences"]:
            assert {colour_words[t] for t in s["tokens"] if t in colour_words} == true_colours


def test_ground_truth_layout_is_consistent(small_dataset: Path) -> None:
    """Objects lie inside the image and do not overlap; groups are ordered along the layout axis."""
    gt = load_ground_truth(small_dataset.parent / GROUND_TRUTH_NAME)
    assert {e["split"] for e in gt.values()} == {"train", "val", "test"}
    for entry in gt.values():
        objs, groups, layout = entry["objects"], entry["groups"], entry["layout"]
        assert entry["background"]["kind"] in shape_vocabulary()["backgrounds"]
        assert sum(g["count"] for g in groups) == len(objs) and 1 <= len(objs) <= 3
        assert len({(g["colour"], g["shape"]) for g in groups}) == len(groups)
        for o in objs:
            assert o["radius"] <= o["x"] <= 64 - o["radius"] and o["radius"] <= o["y"] <= 64 - o["radius"]
            assert (o["colour"], o["shape"], o["size"]) == tuple(
                groups[o["group"]][k] for k in ("colour", "shape", "size")
            )
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                oa, ob = objs[a], objs[b]
                assert math.hypot(oa["x"] - ob["x"], oa["y"] - ob["y"]) > oa["radius"] + ob["radius"]
        if len(groups) > 1:
            coord = layout["axis"]
            assert coord in ("x", "y") and sorted(layout["order"]) == list(range(len(groups)))
            for first, second in zip(layout["order"], layout["order"][1:]):
                last_of_first = max(o[coord] for o in objs if o["group"] == first)
                assert all(o[coord] > last_of_first for o in objs if o["group"] == second)


# ----------------------------------------------------------------------------------------------------------------------
# The language prior cannot score well


def test_language_prior_best_constant_caption_scores_low(tmp_path: Path) -> None:
    """The best single training caption, used for every test image, scores far below a ground-truth caption.

    Measured (seeds 0-2, 300 train / 100 test, all ~1,470 distinct training captions searched): best constant
    CIDEr-D 0.47-0.54, canonical ground-truth caption 2.59-2.73 (4000/500/500: 0.47 vs 2.68). The bounds (< 0.8,
    oracle > 2 and > 3x) leave room for noise but fail if colour, shape or count became predictable from text alone.
    """
    from pycocoevalcap.cider.cider import Cider

    path = generate_synthetic_dataset(tmp_path, SyntheticConfig(300, 0, 100, seed=0), progress=False)
    images = _load(path)["images"]
    gt = load_ground_truth(path.parent / GROUND_TRUTH_NAME)
    refs = {im["imgid"]: [" ".join(s["tokens"]) for s in im["sentences"]] for im in images if im["split"] == "test"}
    candidates = sorted({" ".join(s["tokens"]) for im in images if im["split"] == "train" for s in im["sentences"]})
    assert len(candidates) > 1000
    best_caption, best_score = best_constant_caption(candidates, list(refs.values()))
    coco_best, _ = Cider().compute_score(refs, {i: [best_caption] for i in refs})
    assert coco_best == pytest.approx(best_score, abs=1e-6)
    oracle = {i: [" ".join(caption_from_ground_truth(gt[i]).replace(",", " ").split())] for i in refs}
    coco_oracle, _ = Cider().compute_score(refs, oracle)
    assert coco_best < 0.8, (coco_best, best_caption)
    assert coco_oracle > 2.0 and coco_oracle > 3 * coco_best, (coco_oracle, coco_best)


# ----------------------------------------------------------------------------------------------------------------------
# Grounded accuracy


def _write_gt(tmp_path: Path, groups: list[dict[str, Any]]) -> Path:
    """A one-image ground-truth file with the given groups (objects follow the counts)."""
    objects = [dict(g, x=10.0, y=10.0, radius=5.0, group=k) for k, g in enumerate(groups) for _ in range(g["count"])]
    entry = {"split": "test", "groups": groups, "objects": objects, "layout": {"axis": None, "order": [0]}}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"version": 1, "image_size": 64, "images": {"7": entry}}), encoding="utf-8")
    return path


def test_grounded_accuracy_oracle_is_perfect_and_garbage_is_zero(small_dataset: Path) -> None:
    """Ground-truth captions score 1.0; empty, garbage and non-string captions score 0 without raising."""
    gt_path = small_dataset.parent / GROUND_TRUTH_NAME
    gt = load_ground_truth(gt_path)
    oracle = _grounded({i: caption_from_ground_truth(e) for i, e in gt.items()}, gt_path)
    assert oracle["colour_accuracy"] == oracle["shape_accuracy"] == oracle["count_accuracy"] == 1.0
    assert oracle["object_recall"] == oracle["scene_accuracy"] == 1.0 and oracle["hallucination_rate"] == 0.0
    assert oracle["num_images"] == 80
    ids = sorted(gt)
    junk: dict[Any, Any] = {ids[0]: "", ids[1]: "qwerty zzz !!! \n", ids[2]: "a a a of the the", ids[3]: None}
    junk.update({str(ids[4]): "UNK UNK", 10**9: "a red circle", "not-an-id": "a red circle"})
    bad = _grounded(junk, gt_path)
    assert bad["num_images"] == 5
    for key in ("colour_accuracy", "shape_accuracy", "count_accuracy", "object_recall", "scene_accuracy"):
        assert bad[key] == 0.0
    assert bad["hallucination_rate"] == 0.0 and bad["num_mentions"] == 0
    assert _grounded({}, gt_path)["colour_accuracy"] == 0.0


def test_grounded_accuracy_matching_rules(tmp_path: Path) -> None:
    """Synonyms map back; wrong colours count for shape only; counts and extra mentions are judged."""
    gt_path = _write_gt(
        tmp_path,
        [
            {"colour": "red", "shape": "circle", "count": 2, "size": "small"},
            {"colour": "purple", "shape": "square", "count": 1, "size": "large"},
        ],
    )
    exact = _grounded({7: "Two little RED discs, and one big violet box!"}, gt_path)
    assert exact["colour_accuracy"] == exact["count_accuracy"] == exact["scene_accuracy"] == 1.0
    wrong = _grounded({7: "three red circles next to a green square and a blue star"}, gt_path)
    assert wrong["shape_accuracy"] == 1.0 and wrong["colour_accuracy"] == 0.5
    assert wrong["count_accuracy"] == 0.0 and wrong["scene_accuracy"] == 0.0
    assert wrong["object_recall"] == pytest.approx(2 / 3)
    assert wrong["hallucination_rate"] == pytest.approx(2 / 3)
    plural = _grounded({7: "red circles"}, gt_path)
    assert plural["colour_accuracy"] == 0.5 and plural["count_accuracy"] == 0.0
    repeated = _grounded({7: "a purple square and a purple square"}, gt_path)
    assert repeated["colour_accuracy"] == 0.5 and repeated["hallucination_rate"] == 0.5


def test_shape_vocabulary_lists_grammar_words() -> None:
    """The vocabulary names the canonical words and maps every synonym back."""
    v = shape_vocabulary()
    assert {"red", "green", "blue", "yellow"} <= set(v["colours"])
    assert {"circle", "square", "triangle"} <= set(v["shapes"]) and v["sizes"] == ["small", "large"]
    assert v["counts"]["two"] == 2 and v["counts"]["a"] == 1 and v["counts"]["three"] == 3
    assert v["shape_words"]["boxes"] == "square" and v["colour_words"]["violet"] == "purple"
    assert set(v["shape_words"].values()) == set(v["shapes"])


# ----------------------------------------------------------------------------------------------------------------------
# Output directory handling and CLI


def test_generate_refuses_foreign_nonempty_dir(tmp_path: Path) -> None:
    """A non-empty directory that is not ours is refused; overwrite writes there and keeps the foreign file."""
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="non-empty"):
        generate_synthetic_dataset(tmp_path, SyntheticConfig(3, 1, 1), progress=False)
    assert not (tmp_path / JSON_NAME).exists()
    path = generate_synthetic_dataset(tmp_path, SyntheticConfig(3, 1, 1), overwrite=True, progress=False)
    assert path.is_file() and (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_generate_refuses_other_config_unless_overwrite(tmp_path: Path) -> None:
    """A complete dataset with another config is not silently replaced; overwrite replaces it fully."""
    generate_synthetic_dataset(tmp_path, SyntheticConfig(5, 1, 1), progress=False)
    with pytest.raises(FileExistsError, match="different config"):
        generate_synthetic_dataset(tmp_path, SyntheticConfig(3, 1, 1), progress=False)
    path = generate_synthetic_dataset(tmp_path, SyntheticConfig(3, 1, 1), overwrite=True, progress=False)
    assert len(_load(path)["images"]) == 5 and len(list((tmp_path / IMAGES_DIR).iterdir())) == 5


def test_generate_again_with_the_same_config_rewrites_nothing(small_dataset: Path) -> None:
    """Re-running with the same config returns the same path at once and rewrites nothing."""
    root = small_dataset.parent
    marker = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["config"]["num_train"] == 60
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_synthetic_dataset(root, SMALL, progress=False) == small_dataset
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_generate_redoes_incomplete_output(tmp_path: Path) -> None:
    """An interrupted run (partial marker, no completion marker) or a deleted image is regenerated, not trusted.

    (A corrupted-but-present image is not detected: completeness is checked by file names, to stay cheap.)
    """
    config = SyntheticConfig(4, 1, 1)
    path = generate_synthetic_dataset(tmp_path, config, progress=False)
    expected = _files(tmp_path)
    (tmp_path / MARKER_NAME).unlink()
    (tmp_path / PARTIAL_MARKER_NAME).write_text("{}", encoding="utf-8")
    (tmp_path / IMAGES_DIR / "000002.png").unlink()
    assert generate_synthetic_dataset(tmp_path, config, progress=False) == path
    assert _files(tmp_path) == expected
    (tmp_path / IMAGES_DIR / "000003.png").unlink()
    (tmp_path / IMAGES_DIR / "000001.png").write_bytes(b"stale")
    assert generate_synthetic_dataset(tmp_path, config, progress=False) == path
    assert (tmp_path / IMAGES_DIR / "000003.png").is_file()


def test_config_rejects_invalid_values() -> None:
    """Negative counts, an empty dataset, tiny images and too many captions are refused."""
    for kwargs in (
        {"num_train": -1},
        {"num_train": 0, "num_val": 0, "num_test": 0},
        {"image_size": 8},
        {"captions_per_image": 0},
        {"seed": -3},
    ):
        with pytest.raises(ValueError):
            SyntheticConfig(**kwargs)


def test_cli_generates_dataset_and_reports_errors(tmp_path: Path) -> None:
    """`python -m data.synthetic` writes the dataset and prints the json path; a foreign dir exits with 2."""
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "data.synthetic",
        "--out",
        str(out),
        "--num_train",
        "3",
        "--num_val",
        "1",
        "--num_test",
        "1",
        "--image_size",
        "48",
        "--seed",
        "5",
        "--quiet",
    ]
    done = run_watched(cmd, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / JSON_NAME)
    marker = json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["config"] == {
        "num_train": 3,
        "num_val": 1,
        "num_test": 1,
        "image_size": 48,
        "seed": 5,
        "captions_per_image": 5,
    }
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x", encoding="utf-8")
    cmd[cmd.index(str(out))] = str(foreign)
    refused = run_watched(cmd, cwd=REPO_ROOT)
    assert refused.returncode == 2 and "non-empty" in refused.stderr


# ----------------------------------------------------------------------------------------------------------------------
# The shifted domain (fine-tuning experiments)


def test_shifted_domain_draws_new_colours_shapes_and_backgrounds_and_captions_them_truthfully(tmp_path: Path) -> None:
    """domain=shifted adds pink/brown/cyan, hearts/rings/arrows and checkered/dotted backgrounds (words the quickstart
    never uses) beside the quickstart's; every caption still names exactly the ground-truth groups."""
    path = generate_synthetic_dataset(tmp_path, SyntheticConfig(120, 0, 0, domain="shifted"), progress=False)
    truth = load_ground_truth(tmp_path / GROUND_TRUTH_NAME)
    groups = [g for e in truth.values() for g in e["groups"]]
    assert {g["colour"] for g in groups} >= set(SHIFTED_COLOURS) and {g["shape"] for g in groups} >= set(SHIFTED_SHAPES)
    assert {e["background"]["kind"] for e in truth.values()} >= set(SHIFTED_BACKGROUNDS)
    assert {g["colour"] for g in groups} & {"red", "blue"} and {g["shape"] for g in groups} & {"circle", "star"}
    images = _load(path)["images"]
    for k in range(5):
        scores = _grounded({im["imgid"]: im["sentences"][k]["raw"] for im in images}, tmp_path / GROUND_TRUTH_NAME)
        assert scores["scene_accuracy"] == 1.0 and scores["hallucination_rate"] == 0.0, (k, scores)
    words = {t for im in images for s in im["sentences"] for t in s["tokens"]}
    assert {"pink", "brown", "hearts", "ring", "arrow", "checkered", "dotted"} <= words
    for imgid, entry in truth.items():  # shapes are drawn in their colour (a ring's centre is its hole: not there)
        arr = np.asarray(Image.open(tmp_path / IMAGES_DIR / f"{imgid:06d}.png"), dtype=np.int64)
        for obj in entry["objects"]:
            if obj["shape"] != "ring":
                pixel = arr[int(round(obj["y"])), int(round(obj["x"]))]
                assert np.abs(pixel - np.asarray(ALL_COLOURS[obj["colour"]])).max() <= 20, (imgid, obj, pixel)


def test_the_quickstart_domain_writes_the_files_it_wrote_before_domains_existed(tmp_path: Path) -> None:
    """The default domain is recorded nowhere (marker, ground truth), so earlier quickstart datasets stay complete
    and the same config gives the same bytes; another domain is recorded, and is another config."""
    generate_synthetic_dataset(tmp_path / "q", SyntheticConfig(3, 1, 1), progress=False)
    assert "domain" not in json.loads((tmp_path / "q" / MARKER_NAME).read_text())["config"]
    assert "domain" not in json.loads((tmp_path / "q" / GROUND_TRUTH_NAME).read_text())
    with pytest.raises(FileExistsError, match="different config"):
        generate_synthetic_dataset(tmp_path / "q", SyntheticConfig(3, 1, 1, domain="shifted"), progress=False)
    generate_synthetic_dataset(tmp_path / "s", SyntheticConfig(3, 1, 1, domain="shifted"), progress=False)
    assert json.loads((tmp_path / "s" / GROUND_TRUTH_NAME).read_text())["domain"] == "shifted"
    with pytest.raises(ValueError, match="SyntheticConfig.domain must be one of quickstart, shifted"):
        SyntheticConfig(domain="moon")
