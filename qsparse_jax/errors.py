"""TODO docstring (errors)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming it."""


class DataError(ConfigError):
    """A data source is missing, empty or unreadable (one line)."""

