"""Caption local images (files or folders) with a checkpoint: python demo.py --load_path ckpt.pth --image_paths a.jpg"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from captioner import load_captioner
from data.images import ImageLoadError, list_images, open_image
from utils.plots import save_caption_grid


@dataclass(frozen=True)
class DemoConfig:
    load_path: str
    image_paths: tuple[str, ...]
    beam_size: int
    max_seq_len: int
    num_captions: int
    device: str
    precision: str
    vocab: str | None
    json: bool
    grid: str | None


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--load_path", required=True, help="checkpoint (ours, or the official one together with --vocab)")
    p.add_argument("--image_paths", nargs="+", required=True, help="image files or folders of images")
    p.add_argument("--beam_size", type=int, default=5, help="beam width")
    p.add_argument("--max_seq_len", type=int, default=20, help="maximum generated tokens per caption (EOS included)")
    p.add_argument("--num_captions", type=int, default=1, help="captions per image (at most beam_size)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--vocab", default=None, help="vocabulary file for official checkpoints (demo_coco_tokens.pickle)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON lines instead of text")
    p.add_argument("--grid", default=None, help="also save the images with their captions as this PNG")
    # accepted for compatibility with the reference demo; the checkpoint describes its own model
    for legacy in ("--model_dim", "--N_enc", "--N_dec"):
        p.add_argument(legacy, type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.beam_size < 1 or not 1 <= a.num_captions <= a.beam_size:
        p.error(f"--num_captions must be between 1 and --beam_size ({a.beam_size}), and --beam_size at least 1")
    return DemoConfig(a.load_path, tuple(a.image_paths), a.beam_size, a.max_seq_len, a.num_captions, a.device,
                      a.precision, a.vocab, a.json, a.grid)


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
    captioner = load_captioner(cfg.load_path, device=cfg.device, vocab=cfg.vocab, precision=cfg.precision)
    images, names, failures = [], [], 0
    for path in expand_paths(cfg.image_paths):
        try:
            images.append(open_image(path))
            names.append(str(path))
        except (ImageLoadError, OSError) as e:
            failures += 1
            print(f"error: {e}", file=sys.stderr)
    captions = captioner.caption(images, beam_size=cfg.beam_size, max_len=cfg.max_seq_len,
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
    sys.exit(main(parse_config()))
