"""/v1/caption, the Hugging Face image-to-text convention: a raw image body, a multipart file, or JSON
``{"inputs": base64, "parameters": {...}}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from serving.backend import CaptionParams
from serving.context import ServingContext, serving_context
from serving.errors import plain_text
from serving.params import RawParams, hf_body_params, hf_query_params
from serving.schemas import (
    ERROR_RESPONSES,
    GeneratedText,
    HFRequest,
    image_body,
    json_body,
    multipart_body,
    request_body,
    score_or_none,
)
from serving.uploads import decode_base64_image, media_type, read_body, read_files, read_json

router = APIRouter()

HF_BODY = request_body({**json_body(HFRequest), **multipart_body("file", many=False), **image_body()})


@router.post("/v1/caption", response_model=list[GeneratedText], openapi_extra=HF_BODY, responses=ERROR_RESPONSES,
             summary="Hugging Face image-to-text convention: raw image, multipart or JSON {inputs, parameters}")
async def hf_caption(request: Request, raw: RawParams = Depends(hf_query_params),
                     context: ServingContext = Depends(serving_context)) -> list[dict[str, Any]]:
    await context.loaded_backend()
    params, blobs = await read_hf_request(request, raw, context)
    images = await context.decode(blobs)
    captions = (await context.caption(images, params))[0]
    return [{"generated_text": text, "score": score_or_none(score)} for text, score in captions]


async def read_hf_request(request: Request, raw: RawParams, context: ServingContext
                          ) -> tuple[CaptionParams, list[tuple[bytes, str]]]:
    """The decoding parameters (query, overridden by a JSON body's) and the one image, by Content-Type."""
    kind = media_type(request)
    if kind == "application/json":
        body: HFRequest = await read_json(request, HFRequest, context.settings)
        params = await context.params(raw.merged(hf_body_params(body.parameters)))
        return params, [(decode_base64_image(body.inputs), "inputs")]
    if kind == "multipart/form-data":
        params = await context.params(raw)
        return params, await read_files(request, "file", 1, context.settings)
    if kind.startswith("image/") or kind == "application/octet-stream":
        params = await context.params(raw)
        return params, [(await read_body(request, context.settings), "body")]
    raise HTTPException(415, f"unsupported Content-Type {plain_text(kind) or '(none)'}: send image/* bytes, "
                             "multipart/form-data (field 'file') or application/json {inputs, parameters}")
