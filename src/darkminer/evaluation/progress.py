"""What an evaluation keeps of its image sets while it draws them chunk by chunk: each set's grid images,
with ``save_images`` every image as a PNG, and, with an output folder, each set's progress in the work
directory, so that a killed evaluation resumes where it stopped (``evaluate(..., resume=True)``,
``darkminer evaluate --resume``).

::

    WORK/run.json                 what the evaluation is (a resume must be the same one)
    WORK/sets/NAME.safetensors    per image set: the rows done, their scores, the grid's images...
    WORK/images/NAME/NNNN.png     with save_images, each image once its chunk is drawn
    WORK/attacks/NAME/            each attack's results, once whole (``run_attack``'s output)
    WORK/attacks/.NAME.work/      until then, its progress (``attacks.journal``)

A set's state is rewritten (atomically) after each chunk of images, so a kill loses one chunk at most.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from darkminer.errors import DamagedStateError
from darkminer.imaging import save_png, to_pil
from darkminer.io import load_state, save_state
from darkminer.parallel import init_processes

SETS_NAME = "sets"
IMAGES_NAME = "images"
ATTACKS_NAME = "attacks"


class Chunked(Protocol):
    """What draws the images (``evaluate.Painter``): the chunks it draws a set in, and its image count."""

    count: int

    def chunks(self, n: int) -> list[slice]: ...


def image_path(suite: str, index: int) -> str:
    """Where ``save_images`` writes image ``index`` of a set, relative to the output (or work) directory."""
    return f"{IMAGES_NAME}/{suite}/{index:04d}.png"


class Progress:
    """The image sets of one evaluation as they are drawn; ``work_dir`` None (no output folder): nothing
    is written, and nothing resumed."""

    def __init__(self, painter: Chunked, work_dir: Path | None, grid_images: int, save_images: bool) -> None:
        self.painter, self.work_dir = painter, work_dir
        self.grid_images, self.save_images = grid_images, save_images
        self.grids: dict[str, torch.Tensor] = {}  # the first grid_images of each set

    def resume(self, name: str, per_row: int = 1, needs: Mapping[str, type] | None = None) -> dict[str, Any]:
        """Set ``name``'s state as a killed run last saved it (empty: nothing done; ``rows``: the rows done),
        with its grids' images restored and its ``per_row`` images a row counted as drawn. ``needs``: what the
        caller reads of a state with rows done, by type (a state without it is damaged)."""
        path = self._state_path(name)
        state = {} if path is None else init_processes().on_main(lambda: load_state(path) if path.is_file() else {})
        grids, rows = state.get("grids", {}), state.get("rows", 0)
        kept = {"grids": dict, **(needs or {})} if state else {}
        if not (all(isinstance(state.get(key), kind) for key, kind in kept.items()) and isinstance(rows, int)
                and rows >= 0 and all(isinstance(g, torch.Tensor) for g in grids.values())):
            raise DamagedStateError(path, "it does not hold what a run writes (rows, grids, "
                                          f"{', '.join(needs or {}) or 'nothing else'})")
        self.grids.update(grids)
        self.painter.count += per_row * rows
        return state

    def chunks(self, done: int, n: int) -> list[slice]:
        """The painter's chunks of rows ``done``..``n``: after a resume under another number of processes
        (other chunks), the first is cut where the killed run stopped."""
        return [slice(max(rows.start, done), rows.stop) for rows in self.painter.chunks(n) if rows.stop > done]

    def keep(self, name: str, images: torch.Tensor, start: int) -> None:
        """What the output needs of a chunk of set ``name`` (its rows from ``start``): the grid's images
        (copies, so the chunk is freed) and, with save_images, every image as a PNG in the work directory."""
        if start < self.grid_images:
            part = images[: self.grid_images - start].clone()
            self.grids[name] = torch.cat([self.grids[name], part]) if name in self.grids else part
        if self.save_images and (folder := self.work_dir) is not None:
            def write() -> None:
                for i, image in enumerate(images):
                    save_png(to_pil(image), folder / image_path(name, start + i))

            init_processes().on_main(write)

    def save(self, name: str, rows: int, sets: Sequence[str], **state: Any) -> None:
        """Set ``name``'s state once its first ``rows`` rows are done; ``sets``: the image sets it drew (whose
        grids it holds)."""
        if (path := self._state_path(name)) is not None:
            whole = {"rows": rows, "grids": {s: self.grids[s] for s in sets}, **state}
            init_processes().on_main(lambda: save_state(path, whole))

    def images(self) -> Path | None:
        """The folder of the PNGs ``save_images`` wrote."""
        return None if self.work_dir is None else self.work_dir / IMAGES_NAME

    def attack(self, name: str) -> Path | None:
        """The folder attack ``name`` runs into (``run_attack``'s ``out``)."""
        return None if self.work_dir is None else self.work_dir / ATTACKS_NAME / name

    def _state_path(self, name: str) -> Path | None:
        return None if self.work_dir is None else self.work_dir / SETS_NAME / f"{name}.safetensors"
