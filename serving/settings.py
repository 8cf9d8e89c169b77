"""Serving settings from environment variables or a JSON file: limits, batching, URL fetching and model keys."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from utils.cli import LengthOptions

logger = logging.getLogger("serving")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


_ZERO_MEANS = {"max_wait_ms": "no waiting", "threads": "torch's default", "max_len": "the model's full length",
               "max_len_limit": "the model's full length"}


class SettingsError(ValueError):
    """A configuration value is missing, malformed or out of range; the message names the variable."""


@dataclass(frozen=True)
class ServingSettings:
    """Limits and behaviour shared by every captioning app; each field is read from ``<PREFIX>_<FIELD>``."""

    max_body_bytes: int = 10 * 1024 * 1024  # whole request body (all files together), 413 above
    max_pixels: int = 40_000_000  # width x height after the header is read, 422 above (decompression bombs)
    max_side: int = 16_384  # longest side in pixels, read from the header, 422 above
    max_aspect_ratio: float = 20.0  # longer side / shorter side, read from the header, 422 above
    max_files: int = 16  # files per /predicts request
    max_batch_size: int = 16  # images per model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # images waiting for the model; 503 with Retry-After beyond
    retry_after_s: int = 1  # Retry-After header of 503 answers
    beam_size: int = 5  # default beam width (demo.py's)
    # default caption length cap in tokens; 0: the model's full length, as demo.py and test.py decode (same field)
    max_len: int = LengthOptions.max_len
    num_captions: int = 1  # default captions per image
    max_beam_size: int = 10  # largest beam a client may ask for
    max_len_limit: int = 0  # largest max_len a client may ask for; 0: the model's full length (always capped by it)
    url_fetch: bool = False  # /captioned may download images
    url_allowlist: tuple[str, ...] = ()  # host names /captioned may fetch from ("*.example.com" for subdomains)
    url_timeout_s: float = 10.0  # whole download, DNS included
    body_timeout_s: float = 60.0  # the whole request body must arrive within this time; 408 (connection closed)
    model_timeout_s: float = 60.0  # a request's deadline for its captions, queue wait included; 504 after it
    threads: int = 0  # torch intra-op threads per worker process (0: torch's default)

    def __post_init__(self) -> None:
        positive = ("max_body_bytes", "max_pixels", "max_side", "max_files", "max_batch_size", "queue_size",
                    "retry_after_s", "beam_size", "num_captions", "max_beam_size", "url_timeout_s", "body_timeout_s",
                    "model_timeout_s")
        for key in positive:
            if getattr(self, key) <= 0:
                raise SettingsError(f"{key} must be positive, got {getattr(self, key)}")
        if self.max_aspect_ratio < 1:
            raise SettingsError(f"max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")
        for key in ("max_wait_ms", "threads", "max_len", "max_len_limit"):
            if getattr(self, key) < 0:
                raise SettingsError(f"{key} must not be negative (0: {_ZERO_MEANS[key]}), got {getattr(self, key)}")
        if self.beam_size > self.max_beam_size or not 1 <= self.num_captions <= self.beam_size:
            raise SettingsError(f"defaults must satisfy num_captions ({self.num_captions}) <= beam_size "
                                f"({self.beam_size}) <= max_beam_size ({self.max_beam_size})")
        if self.max_len_limit and self.max_len > self.max_len_limit:
            raise SettingsError(f"default max_len {self.max_len} is above max_len_limit {self.max_len_limit}")


def convert_setting(name: str, raw: Any, default: Any) -> Any:
    """Parse an environment string (or a JSON value) into the type of the default."""
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError("expected an integer")
            return int(raw)
        if isinstance(default, float):
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return value
        if isinstance(default, tuple):
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return tuple(str(item).strip().lower() for item in items if str(item).strip())
        return None if raw is None else str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None


def load_settings(prefix: str, model_keys: Mapping[str, str | None], path_keys: tuple[str, ...] = (),
                  environ: Mapping[str, str] | None = None, defaults: ServingSettings | None = None
                  ) -> tuple[ServingSettings, dict[str, str | None]]:
    """Read ``<PREFIX>_API_CONFIG`` (a JSON object with the same keys as the variables), then the environment.

    Environment variables win over the file. ``model_keys`` are backend-specific keys (short name -> default), e.g.
    ``{"CHECKPOINT": None}`` for ``CAPTION_CHECKPOINT``; ``path_keys`` among them are resolved relative to the config
    file (a key may hold a list of paths in the file; it reaches the backend joined with commas). Returns the shared
    settings and the model keys by short name. Unknown keys in the file are an error. ``defaults``: an app's own
    defaults for the shared settings (ServingSettings() when not given).
    """
    env = os.environ if environ is None else environ
    defaults = defaults or ServingSettings()
    shared = {f.name.upper(): getattr(defaults, f.name) for f in fields(ServingSettings)}
    known = {f"{prefix}_{key}" for key in (*shared, *model_keys)}
    values: dict[str, Any] = {}
    config_path = env.get(f"{prefix}_API_CONFIG")
    if config_path:
        values.update(_read_config_file(Path(config_path), known, {f"{prefix}_{k}" for k in path_keys}))
    for name, raw in env.items():
        if name in known:
            values[name] = raw
        elif name.startswith(f"{prefix}_") and name != f"{prefix}_API_CONFIG":
            logger.warning("ignoring unknown setting %s (known: %s)", name, ", ".join(sorted(known)))
    kwargs = {key.lower(): convert_setting(f"{prefix}_{key}", values[f"{prefix}_{key}"], default)
              for key, default in shared.items() if f"{prefix}_{key}" in values}
    try:
        settings = replace(defaults, **kwargs)
    except SettingsError as exc:
        raise SettingsError(f"{prefix} settings: {exc}") from None
    model = {key: _model_value(values[f"{prefix}_{key}"]) if f"{prefix}_{key}" in values else default
             for key, default in model_keys.items()}
    return settings, model


def _model_value(raw: Any) -> str | None:
    """A model key's value as text: None when empty; a list (from a config file) joined with commas."""
    if raw in (None, "", []):
        return None
    return ",".join(str(item) for item in raw) if isinstance(raw, list) else str(raw)


def _read_config_file(path: Path, known: set[str], path_keys: set[str]) -> dict[str, Any]:
    """The JSON object of a config file; relative paths among ``path_keys`` are taken relative to the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(f"cannot read the API config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the API config file must hold a JSON object")
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"{path}: unknown keys {unknown}; known keys are {sorted(known)}")
    for key in path_keys & set(data):
        items = data[key] if isinstance(data[key], list) else [data[key]]
        if not all(isinstance(item, str) for item in items):
            raise SettingsError(f"{path}: {key} must be a path or a list of paths")
        resolved = [item if not item or Path(item).is_absolute() else str(path.parent / item) for item in items]
        data[key] = resolved if isinstance(data[key], list) else resolved[0]
    return data
