"""Shareable model folders: config.json, vocab.json, model.safetensors and a generated README.md model card.

The format users expect on a model hub: weights in safetensors (no pickle anywhere, nothing executed on load), the
model config and vocabulary as JSON, and a short card (architecture, parameter count, training data and the metrics
recorded in the checkpoint). Training checkpoints (.pth) stay the format for resuming.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from data.vocab import Vocabulary
from deploy.checkpoints import load_weights
from models import ExpansionNet, ModelConfig, build_model, count_parameters

FOLDER_FORMAT = "expansionnet-captioning-model"
FOLDER_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


class ModelFolderError(ValueError):
    """A model folder that cannot be used; the message names the folder and what is wrong."""


def is_model_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / WEIGHTS_FILE).is_file()


def save_pretrained(folder: str | Path, model: nn.Module, config: ModelConfig, vocab: Vocabulary, *,
                    source: str = "", card_extra: dict[str, Any] | None = None,
                    training: dict[str, Any] | None = None) -> Path:
    """Write the folder (created if needed; its four files replaced): weights as safetensors, config, vocabulary,
    model card. Weights are written to a temporary file and renamed, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "model": config.name})
        os.replace(tmp, out / WEIGHTS_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    manifest = {"format": FOLDER_FORMAT, "format_version": FOLDER_VERSION, "model_config": config.to_dict(),
                "source": source, "training": training or {}}
    (out / "config.json").write_text(json.dumps(manifest, indent=1) + "\n")
    vocab.save(out / "vocab.json", overwrite=True)
    write_model_card(out, config, vocab, count_parameters(model), source=source, extra=card_extra,
                     files={WEIGHTS_FILE: "weights (safetensors)"})
    return out


def load_pretrained(folder: str | Path) -> tuple[ExpansionNet, ModelConfig, Vocabulary]:
    """Rebuild the model of a folder written by save_pretrained (strictly: every weight present, right shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFolderError(f"{folder} has no config.json: not a model folder")
    try:
        manifest = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{cfg_path} is not valid JSON: {e}") from e
    if manifest.get("format") != FOLDER_FORMAT:
        raise ModelFolderError(f"{cfg_path} has format {manifest.get('format')!r}, expected {FOLDER_FORMAT!r}")
    if manifest.get("format_version", 0) > FOLDER_VERSION:
        raise ModelFolderError(f"{folder} has format version {manifest['format_version']}, newer than this code "
                               f"({FOLDER_VERSION}); update the code")
    try:
        config = ModelConfig.from_dict(manifest["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{cfg_path}: cannot read its model config: {e}") from e
    vocab = Vocabulary.load(folder / "vocab.json")
    if len(vocab) != config.vocab_size:
        raise ModelFolderError(f"{folder}: vocab.json has {len(vocab)} tokens but the model has {config.vocab_size} "
                               "outputs")
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
    model = build_model(config)
    load_weights(model, state, str(folder / WEIGHTS_FILE))
    return model.eval(), config, vocab


def card_facts(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a training checkpoint records that a model card should say: phase, data, progress, best metric."""
    facts: dict[str, Any] = {}
    if checkpoint.get("phase"):
        facts["training phase"] = checkpoint["phase"]
    train = checkpoint.get("train_config") or {}
    for key in ("captions_path", "features_path", "images_path"):
        if train.get(key):
            facts[f"training data ({key})"] = str(train[key])
    state = checkpoint.get("train_state") or {}
    if "epoch" in state:
        facts["epochs / iterations"] = f"{state['epoch']} / {state.get('it', '?')}"
    if state.get("best_cider", -1) >= 0:
        facts["best validation CIDEr-D (training-time, Python tokenizer)"] = f"{state['best_cider']:.2f}"
    return facts


def write_model_card(folder: Path, config: ModelConfig, vocab: Vocabulary, num_parameters: int, *, source: str = "",
                     extra: dict[str, Any] | None = None, files: dict[str, str] | None = None,
                     onnx: dict[str, Any] | None = None) -> Path:
    """A short README.md: what the model is, how big, what it was trained on, how to use it."""
    bb = config.backbone
    arch = (f"{config.name}: {config.N_enc} encoder + {config.N_dec} decoder layers, d_model {config.d_model}, "
            f"{config.num_heads} heads, feed-forward {config.ff}, static expansion {list(config.num_exp_enc_list)}, "
            f"dynamic expansion {config.num_exp_dec}, memory slots {config.memory_slots}, multiplicative residual "
            f"{config.mult_residual}")
    lines = [f"# {config.name} image captioner", "",
             "Generated model card (ExpansionNet v2 / Optimizer-ExpansionNet captioning toolkit).", "",
             "| | |", "|---|---|",
             f"| architecture | {arch} |",
             f"| backbone | {f'{bb.name}, {bb.img_size} px' if bb else 'none (works on cached backbone features)'} |",
             f"| parameters | {num_parameters:,} |",
             f"| vocabulary | {len(vocab):,} tokens |",
             f"| max caption length | {config.max_seq_len} positions |"]
    if onnx:
        lines.append(f"| ONNX | precision {onnx['precision']}, opset {onnx['opset']} |")
    if source:
        lines.append(f"| converted from | `{source}` |")
    for key, value in (extra or {}).items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "Files: " + ", ".join(f"`{k}` ({v})" for k, v in (files or {}).items())
              + ", `config.json` (model config), `vocab.json` (vocabulary).", "",
              "```python", "from captioner import load_captioner",
              f"captioner = load_captioner(\"{folder.name}\")",
              "captioner.caption([\"photo.jpg\"], beam_size=5)", "```", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path

