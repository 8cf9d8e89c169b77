"""Phase 0 (engine/pretrain.py, backbone.py): labels from the synthetic ground truth or from caption words, a backbone
file phases 1 and 3 read, a probe, curves, and a killed run that continues to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_dataset

import backbone as backbone_cli
from data.records import DatasetError, ImageRecord
from data.synthetic import SyntheticConfig, generate_synthetic_dataset
from deploy.checkpoints import read_backbone_file
from engine.pretrain import (
    PretrainConfig,
    Pretrainer,
    ground_truth_targets,
    load_phase0_data,
    pretrain,
    word_list,
    word_targets,
)
from models.backbone import backbone_output_shape
from models.config import backbone_preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    captions, _ = make_tiny_dataset(tmp_path_factory.mktemp("phase0"), num_train=24)
    return captions


def _config(captions, out, **kw) -> PretrainConfig:
    settings = {"images_path": str(captions.parent), "captions_path": str(captions), "output_path": str(out),
                "img_size": 32, "epochs": 2, "batch_size": 8, "device": "cpu", **kw}
    return PretrainConfig(**settings)


def test_ground_truth_labels_mark_the_cells_an_object_covers_with_its_colour_shape_and_group_count():
    truth = {7: {"background": {"kind": "noise", "brightness": "dark"},
                 "groups": [{"colour": "red", "shape": "star", "count": 2, "size": "large"}],
                 "objects": [{"colour": "red", "shape": "star", "size": "large", "x": 8.0, "y": 24.0, "radius": 6.0,
                              "group": 0}]}}
    t = ground_truth_targets([ImageRecord(7, None, (), "train")], truth, side=32, grid=4)  # 8-px cells
    colour, shape, count, centre = (t[k].view(4, 4) for k in ("colour", "shape", "count", "centre"))
    assert colour[3, 1] == 1 + 0 and shape[3, 1] == 1 + 4 and count[3, 1] == 2  # red = 0, star = 4 in the grammar
    assert centre[3, 1] == 1 and centre.sum() == 1  # the object's centre (8, 24) is in row 3, column 1
    assert colour[0, 3] == 0 and shape[0, 0] == 0  # far cells are background
    assert t["dark"].tolist() == [1] and t["bg"].tolist() == [1]  # noise is the second background kind


def test_word_labels_say_which_frequent_words_the_captions_of_an_image_use():
    records = [ImageRecord(i, None, (f"a {c} circle",), "train") for i, c in enumerate(["red"] * 6 + ["blue"] * 5)]
    words = word_list(records)
    assert words == ["blue", "red"]  # 'a' and 'circle' name every image: they tell nothing apart
    assert word_targets(records[:1] + records[-1:], words)["words"].tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_phase0_writes_a_backbone_file_phases_1_and_3_read_with_a_probe_and_curves(tiny, tmp_path):
    out = tmp_path / "phase0" / "backbone.pth"
    summary = pretrain(_config(tiny, out))
    assert summary["labels"] == "ground_truth"  # ground_truth.json is beside the captions file
    assert {"colour", "shape", "size", "count", "background"} <= set(summary["probe_val"])
    bb, state = read_backbone_file(out)
    assert bb.name == "resnet10t" and bb.img_size == 32 and backbone_output_shape(bb) == (16, 128)
    rows = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["train", "probe", "train", "probe"]
    assert (out.parent / "curves.png").stat().st_size > 0 and (out.parent / "phase0.json").exists()
    words = pretrain(_config(tiny, tmp_path / "words" / "backbone.pth", labels="words", epochs=1))
    assert words["labels"] == "words" and "word" in words["probe_val"] and words["words"]


def test_a_killed_phase0_continues_from_its_last_epoch_to_the_same_weights(tiny, tmp_path, monkeypatch):
    whole = tmp_path / "whole" / "backbone.pth"
    pretrain(_config(tiny, whole))
    killed = tmp_path / "killed" / "backbone.pth"
    original = Pretrainer._train_epoch

    def die_in_the_second_epoch(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Pretrainer, "_train_epoch", die_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(tiny, killed))
    monkeypatch.setattr(Pretrainer, "_train_epoch", original)
    assert not killed.exists() and (killed.parent / "pretrain_state.pth").exists()
    pretrain(_config(tiny, killed))
    a, b = read_backbone_file(whole)[1], read_backbone_file(killed)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_backbone_command_creates_converts_and_describes_backbone_files(tmp_path, capsys):
    made = tmp_path / "made.pth"
    assert backbone_cli.main(*backbone_cli.parse_config(["create", "--size", "quickstart", "--img_size", "32",
                                                         "--output", str(made)])) == 0
    converted = tmp_path / "converted.pth"
    backbone_cli.main(*backbone_cli.parse_config(["convert", "--weights", str(made), "--output", str(converted)]))
    backbone_cli.main(*backbone_cli.parse_config(["info", "--path", str(converted)]))
    assert "resnet10t" in capsys.readouterr().out
    a, b = read_backbone_file(made), read_backbone_file(converted)
    assert a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    with pytest.raises(SystemExit):
        backbone_cli.parse_config(["create", "--size", "huge", "--output", str(made)])


def test_ground_truth_labels_refuse_a_shifted_domain_naming_what_the_heads_do_not_know(tmp_path):
    captions = generate_synthetic_dataset(tmp_path / "data", SyntheticConfig(30, 4, 0, image_size=32,
                                                                             domain="shifted"), progress=False)
    cfg = _config(captions, tmp_path / "bb.pth", labels="ground_truth")
    with pytest.raises(DatasetError, match="another domain than the quickstart's .*pink.*use --labels words"):
        load_phase0_data(cfg, backbone_preset("quickstart", img_size=32), grid=4)
