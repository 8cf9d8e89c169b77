"""test.py: metrics JSON and table, COCO results files, sharded evaluation over processes, folder prediction; the
record of what an evaluation measured (engine.evaluate.decoding_record) in every metrics and predictions file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_tiny_dataset, tiny_config
from processes import run_watched
from pycocotools.coco import COCO

from data.formats import load_records
from data.splits import split_records
from data.vocab import build_vocabulary
from deploy.checkpoints import save_model_checkpoint
from engine.evaluate import as_runtime, decoding_record, prediction_rows
from models import build_model
from utils.checkpoint import state_dict_sha256


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny end-to-end checkpoint whose training config points at a synthetic dataset."""
    root = tmp_path_factory.mktemp("eval")
    captions, _ = make_tiny_dataset(root, num_train=24)
    records = load_records(captions, captions.parent)
    vocab = build_vocabulary([c for r in records for c in r.captions], min_count=1)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(vocab))
    ckpt = save_model_checkpoint(root / "ckpt" / "model.pth", build_model(cfg), cfg, vocab,
                                 train_config={"captions_path": str(captions)})
    return root, captions, ckpt


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_watched([sys.executable, "test.py", *args], cwd=ROOT)


@pytest.mark.slow
def test_evaluation_writes_metrics_and_a_results_file_pycocotools_loads(evaluated, tmp_path):
    root, captions, ckpt = evaluated
    out = tmp_path / "out"
    proc = _run("--save_model_path", str(ckpt), "--images_path", str(captions.parent), "--eval_beam_sizes", "[2]",
                "--max_len", "6", "--metrics", "BLEU", "CIDEr", "--output_dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CIDEr-D" in proc.stdout and "dangling" in proc.stdout
    row = json.loads((out / "metrics_test_beam2.json").read_text())
    assert row["num_images"] == 8 and row["split"] == "test" and row["beam_size"] == 2
    assert len(row["weights_sha256"]) == 64 and row["tokenizer"] in ("ptb", "python")
    assert row["backend"] in ("torch", "onnx")  # what backend auto chose on this machine, recorded
    assert (row["precision"], row["max_len"], row["split_size"]) == ("fp32", 6, 8)
    assert {"BLEU-4", "CIDEr-D"} <= set(row["metrics"]) and "mean_length" in row["caption_stats"]
    results = json.loads((out / "predictions_test_beam2.json").read_text())
    assert all(r["weights_sha256"] == row["weights_sha256"] and r["beam_size"] == 2 for r in results)
    test_ids = {r.image_id for r in split_records(load_records(captions, captions.parent))["test"]}
    assert {r["image_id"] for r in results} == test_ids
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in test_ids],
                  "annotations": [{"id": k, "image_id": i, "caption": "x"} for k, i in enumerate(test_ids)]}
    gt.createIndex()
    loaded = gt.loadRes(str(out / "predictions_test_beam2.json"))
    assert set(loaded.getImgIds()) == test_ids


@pytest.mark.slow
def test_two_processes_each_decode_a_shard_and_cover_the_split_once(evaluated, tmp_path):
    root, captions, ckpt = evaluated
    single, double = tmp_path / "one", tmp_path / "two"
    for out, procs in ((single, "1"), (double, "2")):
        proc = _run("--save_model_path", str(ckpt), "--images_path", str(captions.parent), "--split", "val",
                    "--eval_beam_sizes", "2", "--max_len", "6", "--predictions_only", "--output_dir", str(out),
                    "--num_gpus", procs, "--device", "cpu", "--ddp_sync_port", "29561", "--num_workers", "0")
        assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((single / "predictions_val_beam2.json").read_text())
    b = json.loads((double / "predictions_val_beam2.json").read_text())
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b] and len(a) == 8
    assert [r["caption"] for r in a] == [r["caption"] for r in b]


@pytest.mark.slow
def test_a_plain_folder_is_captioned_without_references(evaluated, tmp_path):
    root, captions, ckpt = evaluated
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("COCO_val2014_000000391895.jpg", "COCO_val2014_000000000042.png"):
        shutil.copy(next((captions.parent / "images").glob("*.png")), folder / name)
    (folder / "notes.txt").write_text("not an image")
    results_json = tmp_path / "results.json"
    proc = _run("--save_model_path", str(ckpt), "--images_path", str(folder), "--captions_path", "",
                "--predictions_only", "--results_json", str(results_json), "--device", "cpu", "--max_len", "5",
                "--eval_beam_sizes", "2", "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(results_json.read_text())
    assert sorted(r["image_id"] for r in results) == [42, 391895]
    assert all(isinstance(r["caption"], str) and r["file_name"].startswith("COCO_") for r in results)
    assert all((r["precision"], r["beam_size"], r["max_len"], r["split_size"]) == ("fp32", 2, 5, 2) for r in results)


def test_decoding_record_names_the_weights_and_how_they_decoded():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    for precision in ("fp32", "bf16"):
        record = decoding_record(as_runtime(model, torch.device("cpu"), precision), beam_size=3, max_len=7,
                                 split="val", split_size=8)
        assert record == {"weights_sha256": state_dict_sha256(model.state_dict()), "backend": "torch",
                          "precision": precision, "beam_size": 3, "max_len": 7, "split": "val", "split_size": 8}
    rows = prediction_rows({9: "b", 2: "a"}, {"beam_size": 3}, {9: "x.jpg", 2: "y.jpg"})
    assert rows == [{"image_id": 2, "caption": "a", "file_name": "y.jpg", "beam_size": 3},
                    {"image_id": 9, "caption": "b", "file_name": "x.jpg", "beam_size": 3}]
