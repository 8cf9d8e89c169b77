"""Export a captioner for deployment: ONNX graphs (ONNX Runtime, CPU or CUDA) or a shareable model folder.

    python export.py --load_path ckpt.pth --output model_onnx/ [--opset 17 --precision fp32|fp16]
    python export.py --load_path rf_model.pth --vocab demo_coco_tokens.pickle --output official_onnx/
    python export.py --load_path ckpt.pth --output model_dir/ --format folder     # safetensors, no pickle
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from deploy.onnx_export import DEFAULT_OPSET, PRECISIONS


@dataclass(frozen=True)
class ExportConfig:
    load_path: str
    output: str
    format: str
    vocab: str | None
    precision: str
    opset: int
    features_only: bool


def parse_config(argv: list[str] | None = None) -> ExportConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load_path", required=True,
                   help="training checkpoint, official checkpoint (with --vocab) or model folder")
    p.add_argument("--output", required=True, help="folder to write (created if needed)")
    p.add_argument("--format", choices=("onnx", "folder"), default="onnx",
                   help="onnx: encoder + decoder-step graphs; folder: config.json, vocab.json, model.safetensors")
    p.add_argument("--vocab", default=None, help="vocabulary pickle/JSON of an official checkpoint")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="ONNX weights and activations")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument("--features_only", action="store_true",
                   help="export the captioner without its backbone (its encoder graph takes cached features)")
    a = p.parse_args(argv)
    if not Path(a.load_path).exists():
        p.error(f"--load_path {a.load_path}: no such file or folder")
    if a.vocab and not Path(a.vocab).exists():
        p.error(f"--vocab {a.vocab}: no such file")
    return ExportConfig(a.load_path, a.output, a.format, a.vocab, a.precision, a.opset, a.features_only)


def main(cfg: ExportConfig) -> Path:
    from deploy.folder import card_facts, save_pretrained
    from deploy.loading import load_one, training_facts
    from deploy.onnx_export import export_onnx, onnx_sizes

    loaded = load_one(cfg.load_path, backend="torch", vocab=cfg.vocab, features_only=cfg.features_only,
                      precision="fp32")
    training = training_facts(loaded.checkpoint)
    config = loaded.runtime.config
    if cfg.format == "folder":
        out = save_pretrained(cfg.output, loaded.model, config, loaded.vocab, source=str(cfg.load_path),
                              card_extra=card_facts(training), training=training)
        print(f"wrote model folder {out} (config.json, vocab.json, model.safetensors, README.md)")
        return out
    result = export_onnx(loaded.model, config, loaded.vocab, cfg.output, precision=cfg.precision, opset=cfg.opset,
                         source=str(cfg.load_path), card_extra=card_facts(training), training=training)
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in onnx_sizes(result.folder).items())
    print(f"exported {cfg.load_path} to {result.folder} ({sizes}; opset {cfg.opset}, {cfg.precision}) in "
          f"{result.seconds:.0f} s: onnx.checker passed, ONNX Runtime ran both graphs, step log-probs within "
          f"{result.max_abs_logprob_diff:.2g} of PyTorch")
    return result.folder


if __name__ == "__main__":
    try:
        main(parse_config())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
