"""Exceptions shared across modules (kept free of imports so every module can use them)."""


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent (message names the key)."""
