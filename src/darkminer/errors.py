"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class DarkMinerError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class ConfigError(DarkMinerError, ValueError):
    """A config value is out of range or of the wrong kind."""


class ModelLoadError(DarkMinerError):
    """A model or erased-model directory cannot be loaded."""
