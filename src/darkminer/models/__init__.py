"""Models: one interface (:class:`DiffusionModel`) over Stable Diffusion and the embedded testbed."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darkminer.errors import DarkMinerWarning, ModelLoadError
from darkminer.models.base import DiffusionModel, Guidance, SamplingOptions
from darkminer.models.erased import EXTERNAL_METHOD, ErasedModelInfo, apply_erased
from darkminer.models.loading import names_a_folder

if TYPE_CHECKING:
    from darkminer.parallel.speed import SpeedOptions

TESTBED_IDS = ("testbed", "toy")
TINY_SD_ID = "tiny-random-sd"  # tiny random SD components built from configs (models/tiny.py)
DEFAULT_MODEL = "testbed"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def is_testbed(model: DiffusionModel) -> bool:
    return model.name == "testbed"


def model_id(spec: str | os.PathLike | None) -> str:
    """The name a base model is recorded under: ``testbed`` for its aliases, an existing local folder as
    its absolute path, anything else (a hub id, ``tiny-random-sd``) as given; None is the default model."""
    if spec is None:
        return DEFAULT_MODEL
    if not isinstance(spec, str | os.PathLike):
        raise ModelLoadError(f"a model is a name or a folder path, got {type(spec).__name__} {spec!r}")
    spec = os.fspath(spec)
    if spec in TESTBED_IDS:
        return "testbed"
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec and path.exists() else spec


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    erased: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = torch.float32,
    speed: SpeedOptions | dict[str, Any] | None = None,
) -> DiffusionModel:
    """A model by name: ``testbed`` (default, alias ``toy``), ``tiny-random-sd``, a local diffusers folder,
    or a hub id already in the cache. ``erased`` applies an erased-model directory on top. ``speed``
    switches on the GPU path's options (``SpeedOptions``: autocast precision, attention kernel, gradient
    checkpointing, channels-last). ``device`` and ``dtype`` None: cpu and float32.

    With ``erased`` and no ``spec``, the base model recorded in the directory is used; another base is
    refused (an erasure applied to other weights is neither that erasure nor that model).
    """
    device = "cpu" if device is None else device
    dtype = torch.float32 if dtype is None else as_dtype(dtype)
    check_device(device)
    from darkminer.parallel.speed import apply_speed_options, as_speed_options

    as_speed_options(speed)  # bad options fail before the (long) load
    model_id(spec)  # a name or a path, or one line
    if erased is not None:
        spec = erased_base(erased, spec)
    model = _load_base(os.fspath(spec) if spec is not None else DEFAULT_MODEL, device=device, dtype=dtype)
    if erased is not None:
        apply_erased(model, erased)
    if speed is not None:
        apply_speed_options(model, speed)
    return model


def base_id(model: str | os.PathLike | DiffusionModel | None, erased: str | Path | None = None) -> str:
    """The ``model_id`` of the base model that ``model`` (a name, a path or a loaded model) and ``erased`` stand
    for, known before anything loads: what depends on it alone (a testbed concept's name) is refused at once."""
    if isinstance(model, DiffusionModel):
        return model.name
    if model is None and erased is not None:
        model = erased_base(erased, None)
    # A base named beside ``erased`` is checked against the recorded one when it loads, not here: twice would
    # warn twice where the recorded base is not on this machine.
    return model_id(model)


def erased_base(erased: str | Path, spec: str | os.PathLike | None) -> str | os.PathLike:
    """The base model that the erased model ``erased`` goes on: the one it records where ``spec`` is None;
    ``spec`` where it is that model (another is refused)."""
    info = ErasedModelInfo.read(erased)
    recorded = info.base_model
    if spec is None:
        if not recorded:
            what = "a UNet folder from another tool" if info.method == EXTERNAL_METHOD else "an erased model that records no base model"
            raise ModelLoadError(f"{erased} is {what}: name the base model it was made from with --model (model= in Python)")
        if names_a_folder(recorded) and not Path(recorded).expanduser().exists():
            raise ModelLoadError(f"{erased} was erased from the folder {recorded}, which is not there any more: "
                                 "name where that base model is now with --model (model= in Python)")
        return recorded
    if recorded:
        _check_same_base(erased, recorded, os.fspath(spec))
    return spec


def local_copy(spec: str) -> str | None:
    """Where the base model ``spec`` is on this machine: the built-in models by name, a folder as its
    resolved path, a hub id as its snapshot folder in the Hugging Face cache; None if it is not here."""
    if spec in (*TESTBED_IDS, TINY_SD_ID):
        return model_id(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    from darkminer.models.loading import cached_snapshot

    snapshot = cached_snapshot(spec)
    return None if snapshot is None else str(snapshot)


def check_model_here(spec: str | os.PathLike | None) -> None:
    """Refuse, before any work, a base model that is not on this machine (``local_copy``)."""
    spec = model_id(spec)
    if local_copy(spec) is None:
        raise ModelLoadError(f"model {spec!r} is not here: not a built-in model (testbed, tiny-random-sd), a folder, "
                             f"or a hub id in the Hugging Face cache. darkminer never downloads: fetch it first "
                             f"(`hf download {spec}`)")


def _check_same_base(erased: str | Path, recorded: str, spec: str) -> None:
    """An erasure applied to other weights is neither that erasure nor that model: refused where the
    recorded base is here to compare with (a hub id in the cache and its snapshot folder are the same
    model); where it is not (a folder from another machine), applied with a warning."""
    if model_id(spec) == model_id(recorded):
        return
    here = local_copy(recorded)
    if here is None:
        warnings.warn(f"{erased} was erased from {recorded!r}, which is not here; applying it to {spec!r}, taken "
                      "to be the same model", DarkMinerWarning, stacklevel=4)  # the caller of load_model (or erase)
    elif here != local_copy(spec):
        raise ModelLoadError(f"{erased} was erased from {recorded!r}, not {spec!r}: leave the model out to load its own base")


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` as a torch dtype (a name from ``DTYPES`` or one of their dtypes), or one line."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return dtype


def check_placement(model: DiffusionModel, device: str | torch.device | None, dtype: str | torch.dtype | None) -> None:
    """A loaded model runs where it is and in its own dtype: a ``device`` or ``dtype`` asked for that it is
    not on is refused, not ignored (None: whatever it is on)."""
    if device is not None:
        check_device(device)
        wanted, here = torch.device(device), model.device
        if wanted.type != here.type or (wanted.index is not None and wanted.index != (here.index or 0)):
            raise ModelLoadError(f"the loaded model is on {here}, not {device}: load it there "
                                 f"(load_model(..., device={str(device)!r})) or leave device out")
    if dtype is not None and as_dtype(dtype) != model.dtype:
        raise ModelLoadError(f"the loaded model is in {model.dtype}, not {dtype}: load it so "
                             f"(load_model(..., dtype=...)) or leave dtype out")


def check_device(device: str | torch.device) -> None:
    """Fail in one line on a device this machine does not have (torch's own errors are tracebacks)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "mps": int(torch.backends.mps.is_available())}
    if parsed.type in available and (parsed.index or 0) >= available[parsed.type]:
        raise ModelLoadError(f"device {device!r} is not available here (torch {torch.__version__} sees "
                             f"{available[parsed.type]} {parsed.type} device(s)); use device='cpu' (--device cpu)")


def _load_base(spec: str, *, device: str | torch.device, dtype: torch.dtype) -> DiffusionModel:
    if not spec or not spec.strip():
        raise ModelLoadError("empty model name: use 'testbed', 'tiny-random-sd', a folder or a hub id")
    if spec in TESTBED_IDS:
        from darkminer.testbed.model import TestbedModel

        return TestbedModel.load(device=device, dtype=dtype)
    from darkminer.models.stable_diffusion import StableDiffusionModel

    if spec == TINY_SD_ID:
        from darkminer.models.tiny import build_tiny_sd_pipeline

        # built in float32; casting to float32 again would only print diffusers' cast warning
        pipe = build_tiny_sd_pipeline().to(device=device, dtype=None if dtype == torch.float32 else dtype)
        return StableDiffusionModel.from_pipeline(pipe, name=TINY_SD_ID)
    return StableDiffusionModel.from_pretrained(spec, dtype=dtype, device=device)


__all__ = ["DiffusionModel", "ErasedModelInfo", "Guidance", "SamplingOptions", "load_model"]
