"""/predict and /predicts: images uploaded as multipart files, decoding parameters in the query."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from serving.context import ServingContext, serving_context
from serving.params import RawParams, query_params
from serving.schemas import ERROR_RESPONSES, PredictOut, PredictsItem, captions_json, multipart_body, request_body
from serving.uploads import read_files

router = APIRouter()


@router.post("/predict", response_model=PredictOut, openapi_extra=request_body(multipart_body("file", many=False)),
             summary="Caption one uploaded image (multipart field 'file')", responses=ERROR_RESPONSES)
async def predict(request: Request, raw: RawParams = Depends(query_params),
                  context: ServingContext = Depends(serving_context)) -> dict[str, Any]:
    params = await context.params(raw)
    blobs = await read_files(request, "file", 1, context.settings)
    images = await context.decode(blobs)
    return captions_json((await context.caption(images, params))[0])


@router.post("/predicts", response_model=list[PredictsItem],
             openapi_extra=request_body(multipart_body("files", many=True)),
             summary="Caption several uploaded images (multipart field 'files', repeated)", responses=ERROR_RESPONSES)
async def predicts(request: Request, raw: RawParams = Depends(query_params),
                   context: ServingContext = Depends(serving_context)) -> list[dict[str, Any]]:
    params = await context.params(raw)
    blobs = await read_files(request, "files", context.settings.max_files, context.settings)
    images = await context.decode(blobs)
    results = await context.caption(images, params)
    return [{"filename": name, **captions_json(captions)} for (_, name), captions in zip(blobs, results)]
