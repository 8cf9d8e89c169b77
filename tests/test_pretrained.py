"""Shareable model folders: save_pretrained / load_captioner round trip, safetensors only, a model card."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import tiny_config, tiny_vocab

from captioner import load_captioner
from deploy.checkpoints import save_model_checkpoint
from deploy.folder import ModelFolderError, load_pretrained
from export import ExportConfig
from export import main as export_main
from models import build_model, count_parameters


@pytest.fixture
def trained_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    return save_model_checkpoint(tmp_path / "best.pth", build_model(cfg), cfg, tiny_vocab(), phase="scst-e2e",
                                 train_config={"captions_path": "data/dataset_coco.json"},
                                 train_state={"epoch": 2, "it": 480, "best_cider": 113.52})


def test_save_pretrained_round_trip_gives_identical_weights_and_captions(trained_checkpoint, tmp_path):
    cap = load_captioner(trained_checkpoint, backend="torch")
    folder = cap.save_pretrained(tmp_path / "model")
    again = load_captioner(folder, backend="torch")
    assert again.backend == "torch" and again.config == cap.config and again.vocab == cap.vocab
    for (ka, va), (kb, vb) in zip(cap.model.state_dict().items(), again.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert cap.caption(images, beam_size=3, max_len=8, num_captions=2) == \
        again.caption(images, beam_size=3, max_len=8, num_captions=2)
    # the folder remembers where it came from, so a folder of a folder says the same
    assert again.training["train_config"]["captions_path"] == "data/dataset_coco.json"


def test_model_folder_holds_no_pickle_only_json_and_safetensors(trained_checkpoint, tmp_path):
    folder = export_main(ExportConfig(checkpoint=(str(trained_checkpoint),), output_path=str(tmp_path / "model"),
                                      format="folder"))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    for name in ("config.json", "vocab.json"):
        json.loads((folder / name).read_text())
    raw = (folder / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]  # safetensors: 8-byte length, JSON header, raw tensor bytes
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"] == "pt" and "vocab_linear.weight" in header
    for path in folder.iterdir():
        data = path.read_bytes()
        assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]  # no pickle protocol, no torch zip


def test_model_card_states_architecture_size_data_and_recorded_metrics(trained_checkpoint, tmp_path):
    folder = load_captioner(trained_checkpoint, backend="torch").save_pretrained(tmp_path / "model")
    card = (folder / "README.md").read_text()
    model, _, _ = load_pretrained(folder)
    assert f"{count_parameters(model):,}" in card
    for fact in ("optimizer_expansionnet", "2 encoder + 2 decoder layers", "data/dataset_coco.json", "113.52",
                 "scst-e2e", "16 tokens"):
        assert fact in card, fact


def test_broken_folders_are_refused_naming_what_is_wrong(trained_checkpoint, tmp_path):
    folder = load_captioner(trained_checkpoint, backend="torch").save_pretrained(tmp_path / "model")
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    del state["vocab_linear.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing keys.*vocab_linear\.bias"):
        load_captioner(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFolderError, match="not a readable safetensors file"):
        load_captioner(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        load_captioner(folder)
