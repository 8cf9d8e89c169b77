"""The installable web app: the page, its script and style, the service worker, the web app manifest, the icons."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from serving.errors import plain_text
from serving.icons import BACKGROUND_COLOR, ICON_SIZES, THEME_COLOR, icon_png
from serving.imageguard import ACCEPTED_FORMATS

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; manifest-src 'self'; worker-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
SHELL_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}  # revalidated: updates show
SHARE_FIELD = "images"
SHARE_ACCEPT = ["image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", ".jpg", ".jpeg",
                ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"]
ICONS = {f"icon-{size}.png": (size, False) for size in ICON_SIZES} | {"maskable-512.png": (512, True)}
_STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


@cache
def static_text(name: str) -> str:
    """A file of serving/static, read once."""
    return (STATIC_DIR / name).read_text(encoding="utf-8")


@cache
def page_html(name: str) -> str:
    """A page of serving/static with the lines every page's <head> starts with (head.html) in place of <!--head-->."""
    return static_text(name).replace("<!--head-->", static_text("head.html").rstrip("\n"))


@cache
def shell_version(title: str) -> str:
    """A hash of everything the app shell caches: the service worker's cache name, so any change replaces the cache."""
    digest = hashlib.sha256(json.dumps(web_app_manifest(title), sort_keys=True).encode())
    for name in ("index.html", "head.html", "app.js", "app.css", "share.html", "sw.js"):
        digest.update(static_text(name).encode())
    for size, maskable in ICONS.values():
        digest.update(icon_png(size, maskable))
    return digest.hexdigest()[:16]


def web_app_manifest(title: str) -> dict[str, Any]:
    """The manifest: standalone display, theme, icons, and a share target that posts photos to /share."""
    name = title.removesuffix(" API").strip() or "Image captioning"
    return {
        "id": "./", "name": name, "short_name": "Captions", "start_url": "./", "scope": "./",
        "description": "Caption a photo: take one with the camera, choose one, or share one to this app. Formats: "
                       + ", ".join(ACCEPTED_FORMATS.values()) + ".",
        "display": "standalone", "orientation": "any", "theme_color": THEME_COLOR,
        "background_color": BACKGROUND_COLOR, "categories": ["photo", "utilities"],
        "icons": [{"src": f"icons/{file}", "sizes": f"{size}x{size}", "type": "image/png",
                   "purpose": "maskable" if maskable else "any"} for file, (size, maskable) in ICONS.items()],
        "share_target": {"action": "share", "method": "POST", "enctype": "multipart/form-data",
                         "params": {"files": [{"name": SHARE_FIELD, "accept": SHARE_ACCEPT}]}},
    }


@router.get("/")
async def index() -> HTMLResponse:
    return HTMLResponse(page_html("index.html"), headers={**SHELL_HEADERS, "Content-Security-Policy": PAGE_CSP})


@router.get("/app.js")
async def app_script() -> Response:
    return Response(static_text("app.js"), media_type=_STATIC_TYPES["app.js"], headers=SHELL_HEADERS)


@router.get("/app.css")
async def app_style() -> Response:
    return Response(static_text("app.css"), media_type=_STATIC_TYPES["app.css"], headers=SHELL_HEADERS)


@router.get("/sw.js")
async def service_worker(request: Request) -> Response:
    script = static_text("sw.js").replace("__SHELL_VERSION__", shell_version(request.app.title))
    return Response(script, media_type=_STATIC_TYPES["app.js"], headers=SHELL_HEADERS)


@router.get("/manifest.webmanifest")
async def manifest(request: Request) -> JSONResponse:
    return JSONResponse(web_app_manifest(request.app.title), media_type="application/manifest+json",
                        headers=SHELL_HEADERS)


@router.get("/icons/{name}")
async def icon(name: str) -> Response:
    if name not in ICONS:
        raise HTTPException(404, f"no icon {plain_text(name)!r}; icons: {sorted(ICONS)}")
    size, maskable = ICONS[name]
    return Response(icon_png(size, maskable), media_type="image/png", headers=SHELL_HEADERS)
