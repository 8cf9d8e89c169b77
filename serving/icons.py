"""The app's icons, drawn at first request (a camera over two caption lines) instead of binary files in the repo."""

from __future__ import annotations

import io
from functools import cache

from PIL import Image, ImageDraw

THEME_COLOR = "#2563eb"
BACKGROUND_COLOR = "#f7f7f8"
ICON_SIZES = (192, 512)
_DRAWN_AT = 512


@cache
def icon_png(size: int, maskable: bool = False) -> bytes:
    """A size x size PNG. Maskable icons fill the square (the launcher cuts its shape); the others are rounded. The
    drawing stays inside the central 60%, the safe zone of maskable icons."""
    s = _DRAWN_AT
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    if maskable:
        draw.rectangle((0, 0, s, s), fill=THEME_COLOR)
    else:
        draw.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 5, fill=THEME_COLOR)
    white = "#ffffff"
    draw.rounded_rectangle((0.22 * s, 0.28 * s, 0.78 * s, 0.62 * s), radius=s // 20, fill=white)  # camera body
    draw.rounded_rectangle((0.40 * s, 0.23 * s, 0.60 * s, 0.31 * s), radius=s // 50, fill=white)  # viewfinder
    draw.ellipse((0.39 * s, 0.34 * s, 0.61 * s, 0.56 * s), fill=THEME_COLOR)  # lens
    draw.ellipse((0.44 * s, 0.39 * s, 0.56 * s, 0.51 * s), fill=white)
    draw.rounded_rectangle((0.22 * s, 0.68 * s, 0.78 * s, 0.72 * s), radius=s // 60, fill=white)  # caption lines
    draw.rounded_rectangle((0.22 * s, 0.76 * s, 0.62 * s, 0.80 * s), radius=s // 60, fill=white)
    if size != s:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()
