"""The FastAPI app factory shared by api.py and the BLIP API: the model's background load, error handlers, the routes
and their OpenAPI description."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.backend import Backend
from serving.context import ServingContext
from serving.errors import install_error_handlers
from serving.openapi import openapi_of
from serving.routes import ROUTERS
from serving.settings import ServingSettings
from serving.urlguard import UrlFetcher


def create_app(load_backend: Callable[[], Backend], settings: ServingSettings, *, title: str,
               description: str = "", env_prefix: str = "CAPTION", url_fetcher: UrlFetcher | None = None,
               check_model: Callable[[], object] | None = None, repetition_controls: bool = True) -> FastAPI:
    """Build the app; nothing loads at import.

    At start-up (lifespan) ``check_model`` runs first, quickly (settings that name no model fail the start, before the
    port opens); then ``load_backend`` runs in the background: /health answers at once, /ready is 503 until the model
    is loaded, and a captioning request that arrives meanwhile waits for it (up to its deadline). URL fetching for
    /captioned is on when ``settings.url_fetch`` is true (or a ``url_fetcher`` is given). ``repetition_controls``:
    whether the model takes repetition_penalty and no_repeat_ngram_size (/openapi.json leaves them out otherwise).
    """
    if url_fetcher is None and settings.url_fetch:
        url_fetcher = UrlFetcher(settings.url_allowlist, settings.max_body_bytes, settings.url_timeout_s)
    context = ServingContext(settings, env_prefix, url_fetcher, repetition_controls)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if check_model is not None:
            check_model()
        context.start_loading(load_backend)
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
    app.openapi = openapi_of(app, lambda: (context.request_limits, context.url_fetcher is not None))  # type: ignore
    return app
