"""The Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darkminer.config import load_config_file
from darkminer.erasers.base import EraserConfig, get_eraser
from darkminer.errors import ConfigError
from darkminer.io import check_output_directory, claim_record
from darkminer.models import DEFAULT_MODEL, load_model
from darkminer.models.base import DiffusionModel
from darkminer.models.erased import INFO_NAME, OUTPUT_KIND, ErasedModelInfo, save_erased
from darkminer.targets import resolve_target

if TYPE_CHECKING:
    from darkminer.parallel import SpeedOptions


def _base_spec(spec: str | None) -> str:
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


RUN_FILE = "run.json"


def work_directory(out: str | Path) -> Path:
    """Where an erase into ``out`` keeps its checkpoints until it completes (``resume`` continues from it)."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def _claim_work_dir(work_dir: Path, run: dict) -> None:
    """Record what this erase is in its work directory; a resumed erase must be the same run, or its
    checkpoint and image pool would silently be reused for another concept or config."""
    work_dir.mkdir(parents=True, exist_ok=True)
    changed = claim_record(work_dir / RUN_FILE, run)
    if changed:
        raise ConfigError(f"--resume: the checkpoint in {work_dir} is from another run (its {', '.join(changed)} "
                          "differ); run again without --resume to start over")


def erase(
    method: str,
    concept: str,
    out: str | Path,
    *,
    model: str | DiffusionModel | None = None,
    config: EraserConfig | dict[str, Any] | str | Path | None = None,
    anchor: str | None = None,
    prompts: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    speed: SpeedOptions | dict[str, Any] | None = None,
) -> Path:
    """Erase ``concept`` with ``method`` and write the erased-model directory ``out``.

    ``resume`` continues a killed run from its last checkpoint (kept in ``out``'s work directory).
    ``speed``: the speed options (``SpeedOptions``, or a dict of the ones to change over the model's
    defaults), applied to the loaded model.
    """
    from darkminer.parallel import init_processes
    from darkminer.parallel.speed import (
        apply_speed_options,
        as_speed_options,
        resolve_speed_options,
        speed_run_record,
    )

    # Under `accelerate launch` every process runs the whole erase (DDP in circumventing); only the main
    # process writes the work directory's checkpoints and the output.
    processes = init_processes()
    out = check_output_directory(out, INFO_NAME, OUTPUT_KIND)  # before the work, not after it
    as_speed_options(speed)  # bad options fail before the (long) load
    eraser_cls = get_eraser(method)
    if isinstance(config, EraserConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = eraser_cls.config_class.from_dict(config)
    else:
        cfg = eraser_cls.config_class.from_dict(load_config_file(config) if config else {})
    if isinstance(model, DiffusionModel):
        base = model
        if speed is not None:
            apply_speed_options(base, speed)
    else:
        base = load_model(_base_spec(model if isinstance(model, str) else None), device=device, dtype=dtype,
                          speed=speed)
    if speed is not None:  # what the model now runs with: the options given over its defaults
        speed = resolve_speed_options(base, speed)
    target = resolve_target(base, concept, anchor=anchor, prompts_csv=prompts, seed=cfg.seed)
    work_dir = work_directory(out)
    if processes.is_main:
        if work_dir.exists() and not resume:
            shutil.rmtree(work_dir)
        record = {"method": method, "base_model": base.name, "config": cfg.to_dict(),
                  "target": {**target.to_dict(), "prompts": list(target.prompts), "preserve": list(target.preserve)}}
        if speed_record := speed_run_record(base, speed):  # a resume must not mix fp32 and bf16 rounds
            record["speed"] = speed_record
        if base.dtype != torch.float32:  # nor weights stored in other dtypes (float32 unrecorded, as before)
            record["dtype"] = str(base.dtype)
        _claim_work_dir(work_dir, record)
    processes.barrier()
    started = time.time()
    summary = eraser_cls(cfg).erase(base, target, work_dir)
    summary["seconds"] = round(time.time() - started, 2)
    info = ErasedModelInfo(
        method=method,
        concept=target.name,
        base_model=base.name if base.name in ("testbed", "tiny-random-sd") else _base_spec(base.name),
        kind=eraser_cls.kind,
        anchor=target.anchor,
        config=cfg.to_dict(),
        extra={"target": target.to_dict(), "speed": speed.to_dict() if speed else None, **summary},
    )
    processes.barrier()  # every process is done with the work directory before the main one removes it
    if processes.is_main:
        artifacts = work_dir / "artifacts"
        save_erased(base, out, info,
                    write_extra=(lambda d: shutil.copytree(artifacts, d, dirs_exist_ok=True)) if artifacts.is_dir() else None)
        shutil.rmtree(work_dir, ignore_errors=True)
    processes.barrier()
    return out
