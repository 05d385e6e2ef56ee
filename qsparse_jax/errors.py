"""User-facing errors: each message is one line saying what was wrong and what is allowed.

Kept free of JAX imports so that tools which never touch a device (``prepare``) start fast."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming it."""


class DataError(ConfigError):
    """A data source is missing, empty or unreadable (one line)."""

