"""Shared HTTP serving for captioning models: app factory, micro-batching, upload and image checks, URL guard, and
the installable web app."""

from serving.app import create_app
from serving.backend import Backend, CaptionParams, weights_summary
from serving.batching import MicroBatcher, QueueFullError
from serving.settings import ServingSettings, SettingsError, load_settings
from serving.urlguard import UrlFetcher, UrlFetchError

__all__ = [
    "Backend",
    "CaptionParams",
    "MicroBatcher",
    "QueueFullError",
    "ServingSettings",
    "SettingsError",
    "UrlFetchError",
    "UrlFetcher",
    "create_app",
    "load_settings",
    "weights_summary",
]
