"""The FastAPI app factory shared by api.py and the BLIP API: the model's lifespan, error handlers and the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.backend import Backend
from serving.context import ServingContext
from serving.errors import install_error_handlers
from serving.routes import ROUTERS
from serving.settings import ServingSettings
from serving.urlguard import UrlFetcher


def create_app(load_backend: Callable[[], Backend], settings: ServingSettings, *, title: str,
               description: str = "", env_prefix: str = "CAPTION", url_fetcher: UrlFetcher | None = None) -> FastAPI:
    """Build the app; ``load_backend`` runs once at start-up (lifespan), never at import.

    URL fetching for /captioned is on when ``settings.url_fetch`` is true (or a ``url_fetcher`` is given).
    """
    if url_fetcher is None and settings.url_fetch:
        url_fetcher = UrlFetcher(settings.url_allowlist, settings.max_body_bytes, settings.url_timeout_s)
    context = ServingContext(settings, env_prefix, url_fetcher)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await context.start(load_backend)
        try:
            yield
        finally:
            await context.stop()

    app = FastAPI(title=title, description=description, lifespan=lifespan)
    app.state.serving = context
    app.state.settings = settings
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
