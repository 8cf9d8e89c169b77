"""Shared HTTP serving for captioning models: app factory, micro-batching, upload checks, URL guard, web page."""

from serving.app import create_app
from serving.backend import Backend, CaptionParams
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
]
