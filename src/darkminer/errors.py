"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager


class DarkMinerError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class ConfigError(DarkMinerError, ValueError):
    """A config value is out of range or of the wrong kind."""


class ModelLoadError(DarkMinerError):
    """A model or erased-model directory cannot be loaded."""


class DamagedStateError(ModelLoadError):
    """A saved run state (a checkpoint, an evaluation's progress) that was written whole but cannot be read
    back: edited, or damaged on disk. ``problem`` says what is wrong with it."""

    def __init__(self, path: object, problem: str) -> None:
        self.problem = " ".join(problem.split())  # one line: torch's load_state_dict errors run over several
        super().__init__(f"{path} is damaged ({self.problem}); delete it to redo its work")


class DarkMinerWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line. A category,
    not the file it is raised from, marks it as ours: a warning raised through a decorator (torch's
    ``no_grad``) is attributed to the decorator's file."""


@contextmanager
def logs_silenced(library: str) -> Iterator[None]:
    """Within the block ``library`` ("diffusers" or "transformers") logs nothing. Where it logs an error and
    then raises it, the caller turns the raised one into its own one-line error, which the log would only
    repeat; where it warns of a choice darkminer made, the warning would only mislead."""
    logging = importlib.import_module(f"{library}.utils.logging")
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
