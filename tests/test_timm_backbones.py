"""Any timm model as a backbone (`backbone.py create --timm NAME [--pretrained [--weights FILE]]`): its input size and
normalisation come from timm's data config and travel in the backbone file to features, training and inference;
published weights load through timm's own code (offline here: from a file, as a user's download would be)."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from conftest import ROOT
from PIL import Image
from processes import run_watched
from safetensors.torch import save_file

import backbone as backbone_cli
from data.images import preprocess
from data.synthetic import SyntheticConfig, generate_synthetic_dataset
from deploy.checkpoints import read_backbone_file
from engine.pretrain import published_backbone
from models.backbone import BackboneWeightsError, backbone_output_shape, create_backbone, timm_backbone_config


@pytest.mark.parametrize("name, tokens, channels", [("test_convnext", 25, 64), ("test_vit", 101, 64),
                                                    ("test_efficientnet", 25, 256)])
def test_a_timm_model_by_name_carries_its_input_size_and_normalisation(name, tokens, channels):
    cfg = timm_backbone_config(name)
    data = timm.data.resolve_model_data_config(timm.create_model(name, num_classes=0))
    assert (cfg.img_size, cfg.mean, cfg.std) == (data["input_size"][-1], data["mean"], data["std"])
    assert backbone_output_shape(cfg) == (tokens, channels)  # feature maps and token sequences both become tokens
    assert timm_backbone_config(name, img_size=64).img_size == 64


def test_a_name_timm_does_not_know_is_refused_in_one_line_with_the_closest_it_knows():
    with pytest.raises(ValueError, match="timm .* has no such model; did you mean convnext_tiny"):
        timm_backbone_config("convnxt_tiny")


def test_published_weights_load_through_timm_from_a_file_and_fail_clearly_without_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    published = timm.create_model("test_vit", num_classes=1000)  # the classifier is dropped on loading
    save_file({k: v.contiguous() for k, v in published.state_dict().items()}, tmp_path / "model.safetensors")
    cfg = timm_backbone_config("test_vit")
    loaded = published_backbone(cfg, str(tmp_path / "model.safetensors"))
    expected = {k: v for k, v in published.state_dict().items() if not k.startswith("head.")}
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(BackboneWeightsError, match="--pretrained: timm could not fetch the published weights of "
                                                   "test_vit .*huggingface.co/timm/test_vit.*pass the file with "
                                                   "--weights"):
        published_backbone(cfg)
    with pytest.raises(BackboneWeightsError, match="--weights .*: timm could not load it into test_convnext"):
        published_backbone(timm_backbone_config("test_convnext"), str(tmp_path / "model.safetensors"))
    with pytest.raises(BackboneWeightsError, match="no such file"):
        published_backbone(cfg, str(tmp_path / "missing.pth"))


def test_backbone_create_writes_a_file_whose_config_preprocesses_and_whose_weights_are_the_published(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(4)
    published = timm.create_model("test_convnext", num_classes=1000)
    torch.save(published.state_dict(), tmp_path / "pytorch_model.pth")
    out = tmp_path / "convnext.pth"
    assert backbone_cli.main(*backbone_cli.parse_config(
        ["create", "--timm", "test_convnext", "--pretrained", "--weights", str(tmp_path / "pytorch_model.pth"),
         "--output", str(out)])) == 0
    bb, state = read_backbone_file(out)
    assert (bb.name, bb.img_size, bb.mean, bb.std) == ("test_convnext", 160, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.equal(state["stem.0.weight"], published.state_dict()["stem.0.weight"])
    white = preprocess(Image.new("RGB", (40, 30), (255, 255, 255)), bb.img_size, bb.mean, bb.std)
    assert white.shape == (3, 160, 160) and torch.allclose(white, torch.ones_like(white))  # (1 - 0.5) / 0.5
    rebuilt = create_backbone(bb)
    rebuilt.load_state_dict(state)


@pytest.mark.parametrize("argv, message", [
    (["create", "--output", "x.pth"], "give one of --size (a named backbone) or --timm NAME"),
    (["create", "--size", "quickstart", "--timm", "test_vit", "--output", "x.pth"], "give one of --size"),
    (["create", "--size", "quickstart", "--pretrained", "--output", "x.pth"], "use it with --timm NAME"),
    (["create", "--timm", "test_vit", "--weights", "w.pth", "--output", "x.pth"], "add --pretrained"),
])
def test_create_refuses_flag_combinations_that_mean_nothing(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        backbone_cli.parse_config(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_a_timm_backbone_file_trains_a_captioner_whose_checkpoint_captions_with_its_normalisation(tmp_path):
    """The small preset started from a timm backbone file (--backbone): features at timm's input size, training end
    to end, and demo.py captioning with the checkpoint, which records the backbone's name, size, mean and std."""
    captions = generate_synthetic_dataset(tmp_path / "data", SyntheticConfig(40, 8, 8, image_size=64), progress=False)
    made = run_watched([sys.executable, "backbone.py", "create", "--timm", "test_convnext", "--img_size", "64",
                        "--output", str(tmp_path / "bb.pth")], cwd=ROOT)
    assert made.returncode == 0, made.stderr
    tiny = ["phase2.num_epochs=2", "phase3.num_epochs=1", "phase5.num_epochs=1", "phase6.num_epochs=1",
            "eval_beam_sizes=[2]", "scst_samples=2", "scst_max_len=8", "eval_max_len=8"]
    run = run_watched([sys.executable, "pipeline.py", "--preset", "small", "--images_path", str(captions.parent),
                       "--captions_path", str(captions), "--backbone", str(tmp_path / "bb.pth"), "--run_dir",
                       str(tmp_path / "run"), "--no_report", "--set", *tiny], cwd=ROOT, watch=[tmp_path])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "== start: the pretrained backbone" in run.stdout and "test_convnext" in run.stdout
    final = tmp_path / "run" / "phase6-scst-e2e" / "best.pth"
    config = torch.load(final, weights_only=True)["model_config"]["backbone"]
    assert (config["name"], config["img_size"], config["mean"], config["std"]) == ("test_convnext", 64, [0.5] * 3,
                                                                                   [0.5] * 3)
    demo = run_watched([sys.executable, "demo.py", "--load_path", str(final), "--image_paths",
                        str(captions.parent / "images" / "000000.png"), "--json"], cwd=ROOT)
    assert demo.returncode == 0, demo.stderr
    assert json.loads(demo.stdout.strip().splitlines()[-1])["captions"][0]["caption"].strip()
