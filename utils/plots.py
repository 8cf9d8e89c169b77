"""Pictures people would rather look at: captioned image grids and training curves, saved as PNG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def save_caption_grid(images: Sequence[Image.Image], captions: Sequence[str], path: str | Path, thumb: int = 256,
                      columns: int = 4, line_chars: int = 34) -> Path:
    """Tile thumbnails with their (wrapped) captions underneath into one PNG."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to draw")
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(c, line_chars) or [""] for c in captions]
    line_h = 14
    text_h = line_h * max(len(w) for w in wrapped) + 8
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (thumb + 8) + 8, rows * (thumb + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x = 8 + (i % columns) * (thumb + 8)
        y = 8 + (i // columns) * (thumb + text_h + 8)
        tile = img.convert("RGB")
        tile.thumbnail((thumb, thumb))
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + 4 + j * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def save_curves(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, title: str = "",
                xlabel: str = "iteration") -> Path:
    """One panel per named series of (x, y) points (loss, reward, validation CIDEr-D...), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError("no data to plot")
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
