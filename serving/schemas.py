"""Request and answer shapes of the API, and their OpenAPI descriptions (bodies read by hand are declared here)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serving.imageguard import ACCEPTED_FORMATS


class CaptionOut(BaseModel):
    caption: str
    score: float | None = Field(description="mean log-probability per token (higher is better)")


class PredictOut(BaseModel):
    caption: str = Field(description="the best caption")
    score: float | None
    captions: list[CaptionOut] = Field(description="num_captions captions, best first")


class PredictsItem(PredictOut):
    filename: str | None = Field(description="the client's file name, echoed as a label (never used as a path)")


class CaptionedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    imageUrl: str = Field(description="http(s) URL of an image on an allowlisted host")
    imageName: str | None = None


class CaptionedOut(PredictOut):
    imageName: str | None
    imageUrl: str


class HFParameters(BaseModel):
    """Hugging Face generation parameter names (their bounds depend on the server: serving.params.RequestLimits)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    num_beams: int | None = Field(None, description="beam width")
    max_new_tokens: int | None = Field(None, description="most tokens to generate, EOS included")
    num_return_sequences: int | None = Field(None, description="captions, best first: at most num_beams (the beam "
                                                               "widens to it when num_beams is not given)")
    repetition_penalty: float | None = Field(None, description=">1 discourages repeats")
    no_repeat_ngram_size: int | None = Field(None, description="forbid repeated n-grams of this size (0: off)")


class HFRequest(BaseModel):
    """The Hugging Face image-to-text request: a base64 image (or data URL) and optional parameters."""

    model_config = ConfigDict(extra="forbid")
    inputs: str = Field(description="base64-encoded image bytes (JPEG, PNG, WebP, GIF, BMP or TIFF), or a "
                                    "data:image/...;base64 URL",
                        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/*"})
    parameters: HFParameters | None = Field(None, description="generation parameters; each overrides the query "
                                                              "parameter of the same name")


class GeneratedText(BaseModel):
    generated_text: str
    score: float | None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    408: {"description": "the body did not arrive in time (connection closed)"},
    413: {"description": "body too large"},
    415: {"description": "wrong content type, or an image format outside JPEG, PNG, WebP, GIF, BMP, TIFF"},
    422: {"description": "not valid JSON, corrupt image, over a pixel, side or aspect-ratio limit, or bad parameters"},
    503: {"description": "queue full or model not loaded (Retry-After)"},
    504: {"description": "the model did not answer before the request's deadline"},
}


def score_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity."""
    return float(value) if math.isfinite(value) else None


def captions_json(captions: list[tuple[str, float]]) -> dict[str, Any]:
    """One image's (text, score) pairs as {caption, score, captions}."""
    listed = [{"caption": text, "score": score_or_none(score)} for text, score in captions]
    return {"caption": listed[0]["caption"], "score": listed[0]["score"], "captions": listed}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its $defs inlined, usable as an OpenAPI request body schema."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


IMAGE_MEDIA_TYPES = tuple(f"image/{name.lower()}" for name in ACCEPTED_FORMATS)  # what the upload checks accept


def multipart_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI media type of a multipart form with the image(s) in ``field`` and nothing else (serving.openapi sets
    the most files a request may carry); the format is read from each file's first bytes, whatever its part says."""
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": file_schema, "minItems": 1} if many else file_schema
    schema = {"type": "object", "properties": {field: prop}, "required": [field], "additionalProperties": False}
    return {"multipart/form-data": {"schema": schema,
                                    "encoding": {field: {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}}}}


def image_body() -> dict[str, Any]:
    """OpenAPI media types of a request body that is the image itself."""
    return {kind: {"schema": {"type": "string", "format": "binary"}} for kind in IMAGE_MEDIA_TYPES}


def request_body(content: dict[str, Any]) -> dict[str, Any]:
    """A route's ``openapi_extra`` declaring a required request body of these media types."""
    return {"requestBody": {"required": True, "content": content}}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI media type of a JSON object described by ``model``."""
    return {"application/json": {"schema": inline_schema(model)}}
