"""Caption local images (files or folders): python demo.py --checkpoint ckpt.pth --image_paths a.jpg photos/"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from captioner import load_captioner
from data.images import ImageLoadError, list_images, open_image
from deploy.checkpoints import CheckpointError, require_end_to_end
from utils.cli import CheckpointOptions, LengthOptions, parse_dataclass, plain_warnings, resolve_max_len
from utils.fields import option
from utils.plots import save_caption_grid
from utils.runtime import RuntimeOptions


@dataclass(frozen=True)
class DemoConfig(CheckpointOptions, LengthOptions, RuntimeOptions):
    """Every demo.py setting (the checkpoint, length and runtime flags are shared with the other scripts)."""

    image_paths: tuple[str, ...] = option((), "image files or folders of images", nargs="+", required=True,
                                          group="data")
    beam_size: int = option(5, "beam width", group="evaluation")
    num_captions: int = option(1, "captions per image (at most --beam_size)", group="evaluation")
    json: bool = option(False, "print JSON lines instead of text", group="evaluation")
    grid: str = option("", "also save the images with their captions as this PNG", group="evaluation")


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    # the reference demo's model flags are accepted and ignored: the checkpoint describes its own model
    cfg, p = parse_dataclass(DemoConfig, argv, __doc__, ignored=("--model_dim", "--N_enc", "--N_dec"))
    if cfg.beam_size < 1 or not 1 <= cfg.num_captions <= cfg.beam_size:
        p.error(f"--num_captions must be between 1 and --beam_size ({cfg.beam_size}), and --beam_size at least 1")
    return cfg


def expand_paths(paths: tuple[str, ...]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); missing paths are kept to be reported."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(list_images(p))
        else:
            out.append(p)
    return out


def main(cfg: DemoConfig) -> int:
    captioner = load_captioner(list(cfg.checkpoint), device=cfg.device, vocab=cfg.vocab or None,
                               precision=cfg.precision, backend=cfg.backend, onnx_cache=cfg.onnx_cache or None,
                               compile=cfg.compile)
    require_end_to_end(captioner.config, cfg.checkpoint[0])
    max_len = resolve_max_len(cfg, captioner.max_seq_len - 1)
    images, names, failures = [], [], 0
    for path in expand_paths(cfg.image_paths):
        try:
            images.append(open_image(path))
            names.append(str(path))
        except (ImageLoadError, OSError) as e:
            failures += 1
            print(f"error: {e}", file=sys.stderr)
    captions = captioner.caption(images, beam_size=cfg.beam_size, max_len=max_len,
                                 num_captions=cfg.num_captions) if images else []
    for name, caps in zip(names, captions):
        if cfg.json:
            print(json.dumps({"image": name, "captions": [{"caption": c.text, "score": c.score} for c in caps]}))
        else:
            print(f"{name}:")
            for c in caps:
                print(f"  {c.text}  ({c.score:.3f})")
    if cfg.grid and images:
        path = save_caption_grid(images, [caps[0].text for caps in captions], cfg.grid)
        print(f"saved {path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    plain_warnings()
    try:
        sys.exit(main(parse_config()))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
