"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class DarkMinerError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class ConfigError(DarkMinerError, ValueError):
    """A config value is out of range or of the wrong kind."""


class ModelLoadError(DarkMinerError):
    """A model or erased-model directory cannot be loaded."""


class DarkMinerWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line. A category,
    not the file it is raised from, marks it as ours: a warning raised through a decorator (torch's
    ``no_grad``) is attributed to the decorator's file."""


@contextmanager
def diffusers_log_silenced() -> Iterator[None]:
    """Within the block diffusers logs nothing: where it logs an error and then raises it, the caller turns
    the raised one into its own one-line error, which the log would only repeat."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
