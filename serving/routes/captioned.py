"""/captioned: an image downloaded from an allowlisted URL (off unless enabled), checked like an upload."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from serving.context import ServingContext, serving_context
from serving.params import RawParams, query_params
from serving.schemas import ERROR_RESPONSES, CaptionedIn, CaptionedOut, captions_json, json_body, request_body
from serving.uploads import read_json
from serving.urlguard import UrlFetchError

router = APIRouter()

RESPONSES = {**ERROR_RESPONSES, 403: {"description": "fetching disabled, host not allowed or non-public address"},
             502: {"description": "the image server failed"},
             504: {"description": "download timeout, or the model did not answer in time"}}


@router.post("/captioned", response_model=CaptionedOut, openapi_extra=request_body(json_body(CaptionedIn)),
             responses=RESPONSES, summary="Caption an image fetched from an allowlisted URL (off unless enabled)")
async def captioned(request: Request, raw: RawParams = Depends(query_params),
                    context: ServingContext = Depends(serving_context)) -> dict[str, Any]:
    params = await context.params(raw)
    body: CaptionedIn = await read_json(request, CaptionedIn, context.settings)
    data = await download(context, body.imageUrl)
    images = await context.decode([(data, body.imageName or body.imageUrl)])
    result = captions_json((await context.caption(images, params))[0])
    return {"imageName": body.imageName, "imageUrl": body.imageUrl, **result}


async def download(context: ServingContext, url: str) -> bytes:
    """The image at ``url`` through the URL guard; 403 when fetching is off."""
    if context.url_fetcher is None:
        prefix = context.env_prefix
        raise HTTPException(403, f"fetching images by URL is disabled on this server: upload the image to /predict "
                                 f"instead (operators: set {prefix}_URL_FETCH=1 and {prefix}_URL_ALLOWLIST)")
    try:
        return await context.url_fetcher.fetch(url)
    except UrlFetchError as exc:
        raise HTTPException(exc.status, exc.detail) from None
