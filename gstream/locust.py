"""Alias of :mod:`gstream.contrib.locust` (Locust users), kept so existing imports work."""

from __future__ import annotations

from .contrib.locust import *  # noqa: F403 (the alias re-exports the package's public names)
from .contrib.locust import __all__ as __all__
