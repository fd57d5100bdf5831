"""What a running attack keeps in its work directory so that a killed one resumes (``run_attack`` opens
it with ``resumable``): each per-prompt search as soon as its batch ends, one file per prompt
(``SearchJournal``, read and written by ``search_in_batches``), and CCE's training state every ``checkpoint_every`` steps.

A search is keyed by the prompt's place in the attacked list, which the work directory's record pins (a
resume with other prompts, another attack or config is refused before anything is read).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

from darkminer.attacks.base import AttackResult
from darkminer.errors import DarkMinerError
from darkminer.io import load_state, save_state

SEARCHES_NAME = "searches"  # in the work directory: the SearchJournal

# What a per-prompt search returns: a whole result (UnlearnDiffAtk, P4D) or token ids (Ring-A-Bell, which
# judges all its prompts together once they are found).
Found = AttackResult | torch.Tensor


class SearchJournal:
    """The finished searches of one attack run, in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, index: int) -> Path:
        """Where the search of prompt ``index`` is written."""
        return self.directory / f"{index}.safetensors"

    def write(self, index: int, found: Found, seconds: float) -> None:
        entry = ({"result": found.to_dict(), "embeddings": found.embeddings} if isinstance(found, AttackResult)
                 else {"ids": found})
        save_state(self.path(index), {"seconds": seconds, **entry})

    def read(self, indices: Sequence[int]) -> dict[int, tuple[Found, float]]:
        """The entries of ``indices`` that were written, with their searches' seconds. An entry that cannot be
        read back (damaged since) counts as not written: that prompt is searched again."""
        entries = {}
        for index in indices:
            if not self.path(index).is_file():
                continue
            try:
                state = load_state(self.path(index))
                found: Found = (AttackResult.from_dict(state["result"], state["embeddings"]) if "result" in state
                                else state["ids"])
                entries[index] = (found, float(state["seconds"]))
            except (DarkMinerError, KeyError, TypeError, ValueError):
                continue
        return entries


_OPEN: ContextVar[Path | None] = ContextVar("darkminer_attack_work_directory", default=None)


@contextmanager
def resumable(work_dir: Path | None) -> Iterator[None]:
    """Within the block, the attacks keep their progress in ``work_dir`` and resume from what it holds
    (None: they keep nothing)."""
    token = _OPEN.set(work_dir)
    try:
        yield
    finally:
        _OPEN.reset(token)


def attack_work_directory() -> Path | None:
    """The running attack's work directory (``resumable``), if it has one."""
    return _OPEN.get()


def search_journal() -> SearchJournal | None:
    """The running attack's journal of per-prompt searches, if it keeps one."""
    work_dir = attack_work_directory()
    return None if work_dir is None else SearchJournal(work_dir / SEARCHES_NAME)
