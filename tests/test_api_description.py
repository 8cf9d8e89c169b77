"""/openapi.json states exactly what the servers accept (issue 24): its bounds are the settings' and the model's, for
default and other settings, on both apps; and requests generated from it alone (values at, inside and outside every
declared bound, bodies with the declared fields and others) get a 2xx whenever it calls them valid and never a 5xx,
from real servers on loopback."""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_blip_api import build_tiny_blip, load_main

import api
from serving import load_settings
from serving.openapi import MAXIMUM_PARAMETER
from serving.testing import image_bytes, ready_client, uvicorn_server

ROOT = Path(__file__).resolve().parents[1]
BLIP_DIR = ROOT / "blip-image-captioning-api"
ARTIFACTS = ROOT / "test-artifacts"
CAPACITY = 23  # the tiny checkpoint's full length: max_seq_len 24, SOS not counted
BLIP_CAPACITY = 7  # the tiny BLIP's here: 8 positions, BOS not counted (a random model decodes to the cap: short)
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF", "image/bmp": "BMP",
           "image/tiff": "TIFF"}  # media type -> Pillow's format name, for the sample images
OTHER_SETTINGS = {"MAX_BEAM_SIZE": "3", "BEAM_SIZE": "2", "NUM_CAPTIONS": "2", "MAX_FILES": "3", "MAX_LEN": "4",
                  "MAX_LEN_LIMIT": "6", "URL_FETCH": "1", "URL_ALLOWLIST": "images.example.org"}


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("blip") / "model"
    build_tiny_blip(directory, positions=BLIP_CAPACITY + 1)
    return directory


def prefixed(prefix: str, settings: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}_{key}": value for key, value in settings.items()}


# ---------------------------------------------------------------- the description's bounds against the settings


def query_schemas(spec: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p["schema"] for p in spec["paths"][path]["post"]["parameters"] if p["in"] == "query"}


def json_parameter_schemas(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The /v1/caption JSON body's ``parameters`` properties, each without its null alternative."""
    body = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False
    parameters = body["properties"]["parameters"]["anyOf"][0]
    assert parameters["additionalProperties"] is False
    return {name: prop["anyOf"][0] for name, prop in parameters["properties"].items()}


def assert_bounds_are(spec: dict[str, Any], max_beam: int, max_len: int | None, max_files: int, repetition: bool,
                      url_fetch: bool) -> None:
    """Every decoding parameter of every operation, /predicts's files and the bodies' closure as expected."""
    length = {"type": "integer", "minimum": 1, **({"maximum": max_len} if max_len else {})}
    ours = {"beam_size": {"type": "integer", "minimum": 1, "maximum": max_beam}, "max_len": length,
            "num_captions": {"type": "integer", "minimum": 1, "maximum": max_beam, MAXIMUM_PARAMETER: "beam_size"}}
    hf = {"num_beams": ours["beam_size"], "max_new_tokens": length,
          "num_return_sequences": {**ours["num_captions"], MAXIMUM_PARAMETER: "num_beams"}}
    if repetition:  # the bounds resolve_params enforces; the ExpansionNet model takes no other value than the default
        controls = {"repetition_penalty": {"type": "number", "minimum": 1.0, "maximum": 10.0},
                    "no_repeat_ngram_size": {"type": "integer", "minimum": 0, "maximum": 10}}
        ours, hf = ours | controls, hf | controls
    assert query_schemas(spec, "/predict") == query_schemas(spec, "/predicts") == ours
    assert query_schemas(spec, "/v1/caption") == json_parameter_schemas(spec) == hf
    assert ("/captioned" in spec["paths"]) is url_fetch
    if url_fetch:
        assert query_schemas(spec, "/captioned") == ours
    forms = {path: spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
             for path in ("/predict", "/predicts", "/v1/caption")}
    assert all(form["additionalProperties"] is False for form in forms.values())
    files = forms["/predicts"]["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (1, max_files)


@pytest.mark.parametrize("settings", [{}, OTHER_SETTINGS], ids=["default", "other"])
def test_api_description_bounds_are_the_settings_and_the_models(module_checkpoint: Path,
                                                                settings: dict[str, str]) -> None:
    env = {"CAPTION_CHECKPOINT": str(module_checkpoint), **prefixed("CAPTION", settings)}
    expected, _ = load_settings("CAPTION", api.MODEL_KEYS, environ=env)
    before = TestClient(api.build_app(environ=env)).get("/openapi.json").json()  # not started: no model yet
    with ready_client(api.build_app(environ=env)) as client:
        loaded = client.get("/openapi.json").json()
        limits = client.get("/ready").json()["limits"]
    model_len = min(cap for cap in (expected.max_len_limit, CAPACITY) if cap)
    assert limits["max_len_limit"] == model_len and limits["max_beam_size"] == expected.max_beam_size
    common = {"max_beam": expected.max_beam_size, "max_files": expected.max_files, "repetition": False,
              "url_fetch": expected.url_fetch}
    assert_bounds_are(before, max_len=expected.max_len_limit or None, **common)  # the model's length is not known
    assert_bounds_are(loaded, max_len=model_len, **common)


@pytest.mark.parametrize("settings", [{}, OTHER_SETTINGS], ids=["default", "other"])
def test_blip_description_bounds_are_the_settings_and_the_models(blip_dir: Path, settings: dict[str, str]) -> None:
    main = load_main()
    env = {"BLIP_MODEL_DIR": str(blip_dir), **prefixed("BLIP", settings)}
    expected, _ = load_settings("BLIP", main.MODEL_KEYS, environ=env, defaults=main.DEFAULTS)
    with ready_client(main.build_app(environ=env)) as client:
        spec = client.get("/openapi.json").json()
    assert_bounds_are(spec, expected.max_beam_size, min(expected.max_len_limit, BLIP_CAPACITY), expected.max_files,
                      repetition=True, url_fetch=expected.url_fetch)


# ---------------------------------------------------------------- requests generated from the description alone


@dataclass(frozen=True)
class Case:
    """One generated request, and whether the description calls it valid."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    media_type: str  # of the body; "" for none
    body: Any  # multipart: [(field, (file name, bytes, part type))]; JSON: a value; otherwise bytes
    valid: bool
    label: str


def contents(media_types: list[str]) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, valid) of file contents: an image of each declared media type, and data of none of them."""
    images = [(f"image.{FORMATS[kind].lower()}", image_bytes((48, 32), FORMATS[kind]), True) for kind in media_types]
    return images + [("notes.txt", b"just some text\n", False), ("empty.png", b"", False),
                     ("figure.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", False)]


def declared_media_types(operation: dict[str, Any]) -> list[str]:
    """The image media types an operation declares for its files (multipart encoding) or as its own body."""
    content = operation["requestBody"]["content"]
    kinds = [kind for kind in content if kind.startswith("image/")]
    for media in content.values():
        for encoding in media.get("encoding", {}).values():
            kinds += [kind.strip() for kind in encoding["contentType"].split(",")]
    return list(dict.fromkeys(kinds))


def scalar_candidates(schema: dict[str, Any]) -> list[Any]:
    """Values at and inside the bounds, just outside them, and of other types."""
    low, high = schema["minimum"], schema.get("maximum")
    top = high if high is not None else low + 30
    if schema["type"] == "integer":
        inside = sorted({low, (low + top) // 2, top})
        return [*inside, low - 1, *([high + 1] if high is not None else []), 1.5, "two", True]
    inside = sorted({low, (low + top) / 2, top})
    return [*inside, low - 0.5, *([high + 0.5] if high is not None else []), "x", None]


def conforms(schema: dict[str, Any], value: Any, images: tuple[str, ...] = ()) -> bool:
    """Whether a JSON value conforms to the description's schema (the subset it uses: types, bounds, anyOf,
    properties, required, additionalProperties, base64 content) and to its declared parameter rule; ``images``: the
    media types the operation declares for images."""
    if "anyOf" in schema:
        return any(conforms(option, value, images) for option in schema["anyOf"])
    kind = schema.get("type")
    if kind == "null":
        return value is None
    if kind == "integer" and not (isinstance(value, int) and not isinstance(value, bool)):
        return False
    if kind == "number" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and math.isfinite(value)):
        return False
    if kind in ("integer", "number"):
        return schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    if kind == "string":
        return isinstance(value, str) and content_conforms(schema, value, images)
    if kind == "object":
        if not isinstance(value, dict) or not set(schema.get("required", ())) <= set(value):
            return False
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False and not set(value) <= set(properties):
            return False
        return all(conforms(properties[k], v, images) for k, v in value.items() if k in properties) and rule_holds(
            {k: v for k, v in value.items() if v is not None}, {k: first_branch(p) for k, p in properties.items()})
    return True


def first_branch(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["anyOf"][0] if "anyOf" in schema else schema


def content_conforms(schema: dict[str, Any], text: str, images: tuple[str, ...]) -> bool:
    """A base64 string (contentEncoding) decodes; an image (contentMediaType image/...) is of a declared type."""
    if schema.get("contentEncoding") != "base64":
        return True
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return not schema.get("contentMediaType", "").startswith("image/") or media_type_of(data) in images


def media_type_of(data: bytes) -> str | None:
    """The image media type of the data as Pillow reads it, or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            return next((kind for kind, name in FORMATS.items() if name == image.format), None)
    except Exception:
        return None


def rule_holds(values: dict[str, Any], schemas: dict[str, dict[str, Any]]) -> bool:
    """The one rule between two parameters: a value at most the named parameter's, when both are given."""
    return all(values[name] <= values[schema[MAXIMUM_PARAMETER]] for name, schema in schemas.items()
               if MAXIMUM_PARAMETER in schema and name in values and schema[MAXIMUM_PARAMETER] in values
               and all(isinstance(values[n], (int, float)) for n in (name, schema[MAXIMUM_PARAMETER])))


def query_value(schema: dict[str, Any], text: str) -> Any:
    """A query parameter's text read as its declared type (None when it is not one)."""
    pattern = r"-?\d+" if schema["type"] == "integer" else r"-?\d+(\.\d+)?([eE][-+]?\d+)?"
    return (int(text) if schema["type"] == "integer" else float(text)) if re.fullmatch(pattern, text) else None


def query_cases(schemas: dict[str, dict[str, Any]]) -> list[tuple[tuple[tuple[str, str], ...], bool]]:
    """Each parameter alone at each candidate; every pair of parameters under the rule at their valid values; a
    parameter the description does not declare."""
    def render(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    def judged(pairs: dict[str, Any]) -> tuple[tuple[tuple[str, str], ...], bool]:
        texts = {name: render(value) for name, value in pairs.items()}
        values = {name: query_value(schemas[name], text) for name, text in texts.items()}
        valid = all(v is not None and conforms(schemas[n], v) for n, v in values.items()) and rule_holds(values,
                                                                                                         schemas)
        return tuple(texts.items()), valid

    cases = [judged({name: value}) for name, schema in schemas.items() for value in scalar_candidates(schema)
             if value is not None]
    for name, schema in schemas.items():
        other = schema.get(MAXIMUM_PARAMETER)
        if other in schemas:
            mine = [v for v in scalar_candidates(schema) if conforms(schema, v)]
            theirs = [v for v in scalar_candidates(schemas[other]) if conforms(schemas[other], v)]
            cases += [judged({name: a, other: b}) for a, b in itertools.product(mine, theirs)]
    return [*cases, ((("temperature", "0.7"),), False)]


def multipart_cases(schema: dict[str, Any], files: list[tuple[str, bytes, bool]]) -> list[tuple[Any, bool, str]]:
    """Forms with the declared file field (each content; at, inside and beyond an array's item counts), without it,
    and with a field the description does not declare."""
    (field, prop), = schema["properties"].items()
    good = next(f for f in files if f[2])

    def part(file: tuple[str, bytes, bool]) -> tuple[str, tuple[str, bytes, str]]:
        return field, (file[0], file[1], "application/octet-stream")

    cases = [([part(f)], f[2], f"{field}: {f[0]}") for f in files]
    if prop.get("type") == "array":
        for count in sorted({0, prop["minItems"], prop["maxItems"], prop["maxItems"] + 1}):
            valid = prop["minItems"] <= count <= prop["maxItems"]
            cases.append(([part(good)] * count, valid, f"{count} files"))
    cases.append(([part(good), ("beam_size", (None, b"3", "text/plain"))], False, "an undeclared text field"))
    cases.append(([part(good), ("other", ("x.png", good[1], "image/png"))], False, "an undeclared file field"))
    return cases


def json_cases(schema: dict[str, Any], files: list[tuple[str, bytes, bool]], images: tuple[str, ...]
               ) -> list[tuple[Any, bool, str]]:
    """JSON objects: each content as ``inputs``; each ``parameters`` property alone at each candidate and every pair
    under the rule; null and empty parameters; an undeclared key at each level; no inputs; no base64."""
    good = base64.b64encode(next(f for f in files if f[2])[1]).decode()
    bodies: list[Any] = [{"inputs": base64.b64encode(f[1]).decode()} for f in files]
    bodies += [{"inputs": "not base64 !!!"}, {}, {"inputs": good, "parameters": None},
               {"inputs": good, "parameters": {}}, {"inputs": good, "extra": 1},
               {"inputs": good, "parameters": {"temperature": 0.7}}]
    parameters = schema["properties"]["parameters"]["anyOf"][0]["properties"]
    for name, prop in parameters.items():
        bodies += [{"inputs": good, "parameters": {name: value}} for value in scalar_candidates(first_branch(prop))]
        other = first_branch(prop).get(MAXIMUM_PARAMETER)
        if other in parameters:
            mine = [v for v in scalar_candidates(first_branch(prop)) if conforms(prop, v)]
            theirs = [v for v in scalar_candidates(first_branch(parameters[other])) if conforms(parameters[other], v)]
            bodies += [{"inputs": good, "parameters": {name: a, other: b}} for a, b in itertools.product(mine, theirs)]
    return [(body, conforms(schema, body, images), json.dumps(body)[:80]) for body in bodies]


def generate_cases(spec: dict[str, Any]) -> list[Case]:
    """Every operation's requests: each body case without query parameters, and each query case with a valid body
    (each kind in turn); deterministic: no randomness, the same description gives the same cases."""
    cases: list[Case] = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            schemas = {p["name"]: p["schema"] for p in operation.get("parameters", []) if p["in"] == "query"}
            if "requestBody" not in operation:
                cases.append(Case(method, path, (), "", None, True, "no body"))
                continue
            images = declared_media_types(operation)
            files = contents(images)
            bodies: list[tuple[str, Any, bool, str]] = []
            for kind, media in operation["requestBody"]["content"].items():
                if kind == "multipart/form-data":
                    bodies += [(kind, *case) for case in multipart_cases(media["schema"], files)]
                elif kind == "application/json" and "parameters" in media["schema"]["properties"]:
                    bodies += [(kind, *case) for case in json_cases(media["schema"], files, tuple(images))]
                elif kind.startswith("image/"):
                    bodies += [(kind, data, valid, name) for name, data, valid in files if name.endswith(kind[6:])]
            bodies.append(("image/png", files[-3][1], False, "text sent as image/png"))
            cases += [Case(method, path, (), kind, body, valid, label) for kind, body, valid, label in bodies]
            valid_kinds: dict[str, tuple[Any, str]] = {}  # the first valid body of each kind: no JSON parameters
            for kind, body, valid, label in bodies:
                if valid:
                    valid_kinds.setdefault(kind, (body, label))
            kinds = itertools.cycle(valid_kinds.items())  # each query case with the next kind of body, in turn
            for (query, valid), (kind, (body, label)) in zip(query_cases(schemas), kinds):
                cases.append(Case(method, path, query, kind, body, valid, f"{label} + {query}"))
    return cases


def send(client: httpx.Client, case: Case) -> httpx.Response:
    kwargs: dict[str, Any] = {"params": list(case.query)}
    if case.media_type == "multipart/form-data":
        kwargs["files"] = case.body
    elif case.media_type == "application/json":
        kwargs["content"] = json.dumps(case.body).encode()
        kwargs["headers"] = {"content-type": "application/json"}
    elif case.media_type:
        kwargs["content"], kwargs["headers"] = case.body, {"content-type": case.media_type}
    return client.request(case.method.upper(), case.path, **kwargs)


@pytest.fixture(scope="module", params=["api-default", "api-other", "blip-default"])
def server_spec(request: pytest.FixtureRequest, module_checkpoint: Path, blip_dir: Path) -> Iterator[tuple[str, Any]]:
    """Each app under uvicorn, with the default settings and with others (a smaller beam, length and file count,
    URL fetching on)."""
    name, which = request.param.split("-")
    settings = {"MAX_WAIT_MS": "1", **(OTHER_SETTINGS if which == "other" else {})}
    log = ARTIFACTS / f"description_{request.param}.log"
    if name == "api":
        env = {"CAPTION_CHECKPOINT": str(module_checkpoint), **prefixed("CAPTION", settings)}
        server = uvicorn_server("api:app", env, log)
    else:
        env = {"BLIP_MODEL_DIR": str(blip_dir), **prefixed("BLIP", settings)}
        server = uvicorn_server("main:app", env, log, app_dir=BLIP_DIR, cwd=BLIP_DIR)
    with server as running:
        yield request.param, running
        text = running.log()
    assert "Traceback" not in text, text


@pytest.mark.slow
def test_requests_generated_from_the_description_get_2xx_when_valid_and_never_5xx(server_spec: tuple[str, Any]
                                                                                   ) -> None:
    name, server = server_spec
    with server.client(timeout=120) as client:
        spec = client.get("/openapi.json").json()
        cases = generate_cases(spec)
        answers = [(case, send(client, case)) for case in cases]
    refused = [(c.path, c.label, a.status_code, a.text[:200]) for c, a in answers if c.valid and a.status_code >= 300]
    errors = [(c.path, c.label, a.status_code, a.text[:200]) for c, a in answers if a.status_code >= 500]
    accepted = [(c.path, c.label) for c, a in answers if not c.valid and a.status_code < 300]
    valid = sum(c.valid for c in cases)
    print(f"{name}: {len(cases)} cases ({valid} described as valid), {len(refused)} valid ones refused, "
          f"{len(errors)} server errors, {len(accepted)} invalid ones accepted")
    assert not refused and not errors, (refused, errors)
    assert not accepted, accepted  # the server refuses what the description does not allow, too
    assert len(cases) > 150 and 0 < valid < len(cases)
