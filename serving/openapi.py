"""/openapi.json from the limits the server enforces (serving.params.RequestLimits): a client generated from it never
sends a request that is refused for a reason the description does not state."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.params import OUR_NAME, RequestLimits

BEAM_OF = {"num_captions": "beam_size", "num_return_sequences": "num_beams"}  # at most that parameter's value
MAXIMUM_PARAMETER = "x-maximum-parameter"  # the one rule between two parameters, in a form a generator can read
TYPES = {"beam_size": "integer", "max_len": "integer", "num_captions": "integer", "repetition_penalty": "number",
         "no_repeat_ngram_size": "integer"}


def parameter_schema(name: str, limits: RequestLimits) -> dict[str, Any] | None:
    """The JSON schema of a decoding parameter (ours or its Hugging Face name) on this server; None when the model
    does not take it."""
    bounds = limits.bounds()
    if name not in bounds:
        return None
    low, high = bounds[name]
    schema: dict[str, Any] = {"type": TYPES[OUR_NAME.get(name, name)], "minimum": low}
    if high is not None:
        schema["maximum"] = high
    if name in BEAM_OF:
        schema[MAXIMUM_PARAMETER] = BEAM_OF[name]
    return schema


def describe(app: FastAPI, limits: RequestLimits, url_fetch: bool) -> dict[str, Any]:
    """FastAPI's description of the app's routes with every decoding parameter bounded by ``limits`` (those the model
    does not take left out), /predicts's file count bounded, and /captioned only when URL fetching is on."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    if not url_fetch:
        schema["paths"].pop("/captioned", None)
    for item in schema["paths"].values():
        for operation in item.values():
            kept = []
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query" and parameter["name"] in TYPES.keys() | OUR_NAME.keys():
                    parameter["schema"] = parameter_schema(parameter["name"], limits)
                    if parameter["schema"] is None:
                        continue
                kept.append(parameter)
            operation["parameters"] = kept
            for media in operation.get("requestBody", {}).get("content", {}).values():
                bound_body(media["schema"], limits)
    return schema


def bound_body(schema: dict[str, Any], limits: RequestLimits) -> None:
    """In place: arrays of files at most ``limits.max_files``; a JSON ``parameters`` object's decoding parameters
    bounded (null still allowed: it means the default)."""
    for prop in schema.get("properties", {}).values():
        if prop.get("type") == "array" and prop["items"].get("format") == "binary":
            prop["maxItems"] = limits.max_files
    parameters = schema.get("properties", {}).get("parameters", {}).get("anyOf", [{}])[0]
    for name in list(parameters.get("properties", {})):
        bounded = parameter_schema(name, limits)
        if bounded is None:
            del parameters["properties"][name]
        else:
            described = parameters["properties"][name]
            parameters["properties"][name] = {"anyOf": [bounded, {"type": "null"}],
                                              "description": described.get("description", "")}


def openapi_of(app: FastAPI, current: Callable[[], tuple[RequestLimits, bool]]) -> Callable[[], dict[str, Any]]:
    """``app.openapi``: the description for the limits in force now (they change once the model is loaded: its full
    length caps max_len), made once per distinct limits."""
    made: dict[tuple[RequestLimits, bool], dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        key = current()
        if key not in made:
            made[key] = describe(app, *key)
        return copy.deepcopy(made[key])

    return openapi
