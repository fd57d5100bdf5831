"""More than one process: generation sharded over processes, the adapter trained under DDP.

Every process runs the same program (``accelerate launch --multi_gpu --num_processes N ...`` or
``torchrun --nproc-per-node N ...``); accelerate's ``PartialState`` reads the launcher's environment,
opens the process group (NCCL on GPUs, gloo on CPUs) and pins each process to its GPU. Launched without
one, everything runs in this process and the helpers below reduce to the single-process calls.

* Generation: ``sharded_sample`` gives each process a contiguous block of whole sampling batches and
  gathers the images in order on every process. The batches are the ones a single process would draw,
  and each image depends on its own seed only (``DiffusionModel.initial_noise``), so the images equal a
  single process's bit for bit on the same hardware.
* Training: every process draws the same batch from the same seeded generator and trains on its slice
  of the rows; ``DistributedDataParallel`` averages the gradients, so the adapter follows the
  single-process run with the same total batch (to rounding).
* Searches: ``Processes.map_items`` gives each process a block of independent work items (the attacks'
  per-prompt searches) and gathers the results in order on every process.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from darkminer.errors import DarkMinerError
from darkminer.models.base import DiffusionModel

V = TypeVar("V")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run (one process when not launched distributed)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    def share(self, n_units: int) -> range:
        """This process's contiguous block of ``n_units`` work units; blocks differ in size by at most one
        and, in rank order, cover the units in order."""
        base, extra = divmod(n_units, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def rows(self, batch: int) -> slice:
        """This process's equal slice of a training batch of ``batch`` rows."""
        if batch % self.world_size:
            raise DarkMinerError(
                f"a batch of {batch} rows does not split evenly over {self.world_size} processes; "
                f"choose a batch size (k) that is a multiple of {self.world_size}"
            )
        size = batch // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    # ------------------------------------------------------------------------------- collectives
    def gather_objects(self, items: Sequence[Any]) -> list[Any]:
        """Every process's ``items`` (picklable), concatenated in rank order, on every process."""
        if not self.distributed:
            return list(items)
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    def gather_rows(self, local: torch.Tensor | None) -> torch.Tensor:
        """Every process's rows (None: no rows) concatenated in rank order, on every process."""
        if not self.distributed:
            if local is None:
                raise DarkMinerError("nothing to gather: no process produced any rows")
            return local
        layouts = self.gather_objects([None if local is None else (local.shape, local.dtype)])
        present = [layout for layout in layouts if layout is not None]
        if not present:
            raise DarkMinerError("nothing to gather: no process produced any rows")
        counts = [0 if layout is None else layout[0][0] for layout in layouts]
        shape, dtype = present[0]
        # all_gather needs equal shapes: pad every block to the longest, then trim. Booleans travel as bytes.
        wire = torch.uint8 if dtype == torch.bool else dtype
        padded = torch.zeros((max(counts), *shape[1:]), dtype=wire, device=self.device)
        if local is not None:
            padded[: len(local)] = local.to(self.device, wire)
        blocks = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(blocks, padded)
        return torch.cat([block[:count] for block, count in zip(blocks, counts, strict=True)]).to(dtype)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """``fn``, a row-wise function (a detector, a scorer), applied by each process to its block of
        ``rows``; every process gets all results, in order, on the device ``fn`` returns them on."""
        if not self.distributed:
            return fn(rows)
        block = self.share(len(rows))
        local = fn(rows[block.start : block.stop]) if len(block) else None
        gathered = self.gather_rows(local)
        return gathered.to(local.device if local is not None else rows.device)

    def map_items(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``fn`` applied to every item, each process taking its block of ``items``; every process gets all
        results, in order. Every process must pass the same items. ``fn`` must not call collectives, and its
        results travel pickled, so they should hold CPU tensors only (a CUDA tensor would come back on the
        sending process's GPU). When ``fn`` fails on one process, every process stops, not only that one."""
        if not self.distributed:
            return [fn(item) for item in items]
        payload, failure = b"", None
        try:  # the results pickled here too, so that an unpicklable one fails like any other error
            payload = pickle.dumps([fn(items[i]) for i in self.share(len(items))])
        except Exception as exc:  # re-raised below, once the others know
            failure = exc
        # One exchange: each process's item count, its failure (if any) and its results.
        parts = self.gather_objects([(len(items), None if failure is None else _error_line(failure), payload)])
        if failure is not None:
            raise failure
        if len({count for count, _, _ in parts}) > 1:
            raise DarkMinerError("the processes passed different numbers of items to share out; every process "
                                 "must pass the same items")
        failures = [line for _, line, _ in parts if line is not None]
        if failures:
            raise DarkMinerError(f"another process failed: {failures[0]}")
        return [result for _, _, part in parts for result in pickle.loads(part)]

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` with the main process's values, in place."""
        if self.distributed:
            with self._staged(tensor) as wire:
                dist.broadcast(wire, src=0)
        return tensor

    @contextmanager
    def _staged(self, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        """``tensor`` on this process's device for a collective (NCCL takes no CPU tensors: a model left on
        the CPU under a GPU launch), copied back into ``tensor`` afterwards."""
        wire = tensor.to(self.device).contiguous()
        yield wire
        if wire is not tensor:
            with torch.no_grad():
                tensor.copy_(wire)

    def broadcast_object(self, value: Any) -> Any:
        """The main process's ``value`` (picklable), on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], V]) -> V:
        """``fn()`` run by the main process alone (what writes, or reads what it wrote), the others waiting
        for it; every process returns its value (picklable). When it fails, every process stops, not only the
        main one (with the same line when it refuses: a ``DarkMinerError``)."""
        if not self.distributed:
            return fn()
        error, value = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as exc:  # re-raised below, once the others know
                error = exc
        if error is None:
            refusal = None
        elif isinstance(error, DarkMinerError):
            refusal = (True, str(error))
        else:
            refusal = (False, _error_line(error))
        refusal, value = self.broadcast_object((refusal, value))
        if error is not None:
            raise error
        if refusal is not None:
            refused, line = refusal
            raise DarkMinerError(line if refused else f"the main process failed: {line}")
        return value

    def barrier(self) -> None:
        """Wait until every process got here (e.g. until the main process finished writing)."""
        if self.distributed:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` by its sum over the processes, in place."""
        if self.distributed:
            with self._staged(tensor) as wire:
                dist.all_reduce(wire, op=dist.ReduceOp.SUM)
        return tensor

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` by its mean over the processes, in place (gloo has no AVG: sum, then divide)."""
        if self.distributed:
            self.sum_(tensor)
            tensor /= self.world_size
        return tensor


def _error_line(error: BaseException) -> str:
    """An error as one line for the other processes, its kind named (an AssertionError may have no text)."""
    return f"{type(error).__name__}: {error}"


def init_processes() -> Processes:
    """This process's place in the run, opening the process group through accelerate when a launcher
    started several processes (idempotent). Call it before loading a model, so that ``device="cuda"``
    lands on this process's GPU (``Processes.device`` names it)."""
    if dist.is_available() and dist.is_initialized():
        return _current_processes()
    try:
        world_size = int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise DarkMinerError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes; unset it, or "
                             "start the run with accelerate launch or torchrun") from None
    if world_size <= 1:
        return Processes(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if not state.use_distributed:
        raise DarkMinerError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but accelerate opened no process group; launch with "
            "`accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc-per-node N`"
        )
    return _current_processes()


def _current_processes() -> Processes:
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


# ------------------------------------------------------------------------------------------ generation
def sharded_sample(
    model: DiffusionModel,
    cond: torch.Tensor,
    seeds: Sequence[int],
    *,
    uncond: torch.Tensor | None = None,
    batch_size: int | None = None,
    processes: Processes | None = None,
    **options: Any,
) -> torch.Tensor:
    """``model.sample(cond, seeds=seeds, ...)`` with the batches shared out over the processes; every
    process returns all images (or latents), in order. Every process must call it with the same inputs."""
    processes = processes or init_processes()
    if not processes.distributed:
        return model.sample(cond, seeds=seeds, uncond=uncond, batch_size=batch_size, **options)
    if len(seeds) != cond.shape[0]:
        raise DarkMinerError(f"{len(seeds)} seeds for {cond.shape[0]} conditionings")
    batch_size = batch_size or model.default_sampling.batch_size
    batches = processes.share(math.ceil(len(seeds) / batch_size))
    rows = slice(batches.start * batch_size, min(batches.stop * batch_size, len(seeds)))
    if uncond is not None and uncond.shape[0] > 1:
        uncond = uncond[rows]
    local = None
    if rows.start < rows.stop:
        local = model.sample(cond[rows], seeds=list(seeds[rows]), uncond=uncond, batch_size=batch_size, **options)
    return processes.gather_rows(local)


# -------------------------------------------------------------------------------------------- training
class AdaptedNoise(nn.Module):
    """The adapted model's noise prediction (``model.eps`` with the adapter on) as a module that owns
    the UNet, so DistributedDataParallel can hook its trainable parameters."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        self.unet = model.unet
        self.model = model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.eps(x_t, t, cond)


def data_parallel(model: DiffusionModel, processes: Processes) -> nn.Module:
    """The adapted model's noise prediction, under DDP when there are several processes.

    Wrapping broadcasts the main process's weights (the trainable adapter and, once per stage, the frozen
    UNet: milliseconds over NVLink against a stage of minutes), so every process starts from the same
    state whatever it loaded.
    """
    predictor = AdaptedNoise(model)
    if not processes.distributed:
        return predictor
    if model.device != processes.device:
        raise DarkMinerError(
            f"this process (rank {processes.rank}) holds its model on {model.device}, not on its own device "
            f"{processes.device}: call darkminer.parallel.init_processes() before loading the model"
        )
    device_ids = [model.device.index] if model.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(predictor, device_ids=device_ids)
