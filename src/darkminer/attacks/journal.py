"""The journal of a running attack: each per-prompt search is written down as soon as it ends, one file per
prompt (written atomically), so that an attack killed after hours resumes with the prompts it had not
finished. ``run_attack`` opens one in the attack's work directory; ``search_each`` reads and writes it.

An entry is keyed by the prompt's place in the attacked list, which the work directory's record pins (a
resume with other prompts is refused before any entry is read).
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

# What a per-prompt search returns: a whole result (UnlearnDiffAtk, P4D) or token ids (Ring-A-Bell, which
# judges all its prompts together once they are found).
Found = AttackResult | torch.Tensor


class SearchJournal:
    """The finished searches of one attack run, in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, index: int) -> Path:
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


_OPEN: ContextVar[SearchJournal | None] = ContextVar("darkminer_search_journal", default=None)


@contextmanager
def journaled(journal: SearchJournal | None) -> Iterator[None]:
    """Within the block, the attacks' per-prompt searches read and write ``journal`` (None: none)."""
    token = _OPEN.set(journal)
    try:
        yield
    finally:
        _OPEN.reset(token)


def open_journal() -> SearchJournal | None:
    return _OPEN.get()

