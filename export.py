"""Export a captioner for deployment: ONNX graphs (ONNX Runtime, CPU or CUDA) or a shareable model folder.

    python export.py --checkpoint ckpt.pth --output_path model_onnx/ [--opset 17 --precision fp32|fp16]
    python export.py --checkpoint rf_model.pth --vocab demo_coco_tokens.pickle --output_path official_onnx/
    python export.py --checkpoint ckpt.pth --output_path model_dir/ --format folder     # safetensors, no pickle

(--load_path, the reference's name for --checkpoint, is read too.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.folder import card_facts, save_pretrained
from deploy.loading import load_one, training_facts
from deploy.onnx_export import DEFAULT_OPSET, PRECISIONS, export_onnx, onnx_sizes
from utils.cli import ArgumentParser, ModelSourceOptions, add_dataclass_flags, dataclass_values, plain_warnings
from utils.fields import option


@dataclass(frozen=True)
class ExportConfig(ModelSourceOptions):
    """Every export.py setting: the model to read (--checkpoint, --vocab, as in test.py and demo.py) and what to
    write."""

    output_path: str = option("", "folder to write (created if needed)", aliases=("--output",), required=True,
                              group="data")
    format: str = option("onnx", "onnx: encoder + decoder-step graphs; folder: config.json, vocab.json, "
                         "model.safetensors", choices=("onnx", "folder"), group="data")
    precision: str = option("fp32", "ONNX weights and activations", choices=PRECISIONS, group="model")
    opset: int = option(DEFAULT_OPSET, "ONNX opset version", group="model")
    features_only: bool = option(False, "export the captioner without its backbone (its encoder graph takes cached "
                                 "features)", group="model")


def parse_config(argv: list[str] | None = None) -> ExportConfig:
    p = ArgumentParser(description=__doc__)
    add_dataclass_flags(p, ExportConfig, notes={"checkpoint": "export.py takes one"})
    cfg = ExportConfig(**dataclass_values(p.parse_args(argv), ExportConfig))
    if len(cfg.checkpoint) != 1:
        p.error(f"--checkpoint: export.py exports one model, got {len(cfg.checkpoint)}")
    if not Path(cfg.checkpoint[0]).exists():
        p.error(f"--checkpoint {cfg.checkpoint[0]}: no such file or folder")
    if cfg.vocab and not Path(cfg.vocab).exists():
        p.error(f"--vocab {cfg.vocab}: no such file")
    return cfg


def main(cfg: ExportConfig) -> Path:
    source = cfg.checkpoint[0]
    loaded = load_one(source, backend="torch", vocab=cfg.vocab or None, features_only=cfg.features_only,
                      precision="fp32")
    training = training_facts(loaded.checkpoint)
    config = loaded.runtime.config
    if cfg.format == "folder":
        out = save_pretrained(cfg.output_path, loaded.model, config, loaded.vocab, source=str(source),
                              card_extra=card_facts(training), training=training)
        print(f"wrote model folder {out} (config.json, vocab.json, model.safetensors, README.md)")
        return out
    result = export_onnx(loaded.model, config, loaded.vocab, cfg.output_path, precision=cfg.precision, opset=cfg.opset,
                         source=str(source), card_extra=card_facts(training), training=training)
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in onnx_sizes(result.folder).items())
    print(f"exported {source} to {result.folder} ({sizes}; opset {cfg.opset}, {cfg.precision}) in "
          f"{result.seconds:.0f} s: onnx.checker passed, ONNX Runtime ran both graphs, step log-probs within "
          f"{result.max_abs_logprob_diff:.2g} of PyTorch")
    return result.folder


if __name__ == "__main__":
    plain_warnings()
    try:
        main(parse_config())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
