"""POST /share, the web app's share target: photos shared from a phone's gallery, answered by a page of captions."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from string import Template
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from PIL import Image

from serving.context import Captions, ServingContext, serving_context
from serving.errors import plain_text
from serving.params import RawParams
from serving.routes.page import SHARE_FIELD, page_html
from serving.schemas import score_or_none
from serving.uploads import read_files

router = APIRouter(include_in_schema=False)

SHARE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
             "frame-ancestors 'none'")
SHARE_CAPTIONS = 3  # captions shown per photo, best first
THUMBNAIL_SIDE = 480  # of the photo shown above its captions (embedded in the page: nothing is stored)


@router.post("/share")
async def share(request: Request, context: ServingContext = Depends(serving_context)) -> HTMLResponse:
    try:
        shared = await caption_shared_photos(request, context)
    except HTTPException as exc:
        message = f'<p id="status" class="error">{html.escape(error_text(exc.detail))}</p>'
        return share_page("Could not caption the photo", message, "failed", exc.status_code, exc.headers)
    sections = "\n".join(photo_section(name, thumbnail, captions) for name, thumbnail, captions in shared)
    return share_page("Captions" if len(shared) > 1 else "Caption", sections, "captioned")


async def caption_shared_photos(request: Request, context: ServingContext) -> list[tuple[str, str, Captions]]:
    """(file name, thumbnail data URL, captions) of each shared photo; any title or text of the share is ignored."""
    settings = context.settings
    params = await context.params(RawParams(num_captions=min(SHARE_CAPTIONS, settings.max_beam_size)))
    blobs = await read_files(request, SHARE_FIELD, settings.max_files, settings, ignore_text_fields=True)
    prepare = getattr(context.ready_backend(), "prepare", None)

    def prepare_with_thumbnail(image: Image.Image) -> tuple[Any, str]:
        return (prepare(image) if prepare is not None else image), thumbnail_data_url(image)

    decoded = await context.decode(blobs, prepare=prepare_with_thumbnail)
    results = await context.caption([item for item, _ in decoded], params)
    return [(name, thumbnail, captions) for (_, name), (_, thumbnail), captions in zip(blobs, decoded, results)]


def thumbnail_data_url(image: Image.Image) -> str:
    """A small JPEG of the photo as a data: URL."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def photo_section(name: str, thumbnail: str, captions: Captions) -> str:
    """One shared photo with its captions and scores."""
    items = "".join(f'<li><span class="text">{html.escape(text)}</span><span class="score">'
                    f'{"" if score_or_none(score) is None else f"score {score:.3f}"}</span></li>'
                    for text, score in captions)
    label = html.escape(plain_text(name))
    return (f'<section class="card shared"><img src="{thumbnail}" alt="{label}"><p class="name">{label}</p>'
            f'<ol class="captions">{items}</ol></section>')


def error_text(detail: Any) -> str:
    """An error's detail as one line of text (validation errors list their messages)."""
    if isinstance(detail, list):
        return "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
    return str(detail)


def share_page(title: str, content: str, state: str, status: int = 200,
               headers: Mapping[str, str] | None = None) -> HTMLResponse:
    """The share result page (self-contained but for app.css; no script)."""
    page = Template(page_html("share.html")).substitute(title=html.escape(title), content=content, state=state)
    return HTMLResponse(page, status_code=status, headers={"Content-Security-Policy": SHARE_CSP,
                                                           "X-Content-Type-Options": "nosniff", **(headers or {})})
