"""The erased-model directory: what an eraser writes and every other command loads.

::

    DIR/darkminer.json                      method, concept, anchor, config, base model, kind, versions
    DIR/pytorch_lora_weights.safetensors    kind "lora": loads with diffusers' pipe.load_lora_weights(DIR)
    DIR/unet/                               kind "unet": a full diffusers UNet folder (edited weights)
    DIR/text_encoder/                       kind "text_encoder": a full transformers text-encoder folder
                                            (edited weights; loads with CLIPTextModel.from_pretrained)
    DIR/guidance.json                       kind "guidance": inference-time settings (SLD)
    DIR/erased_on/                          an erasure stacked on another (``erase --erased``): a copy of the
                                            erased model it was made on, applied first (kinds "lora" and
                                            "guidance"; the weights of a "unet" or "text_encoder"
                                            erasure already hold it, each component whose weights any
                                            erasure of the stack edited written as its folder)

A diffusers UNet folder made by another tool (``config.json`` and ``diffusion_pytorch_model.safetensors``,
e.g. a published unlearned model) loads the same way, as method ``external`` of kind ``unet`` on the base
model the user names: attacks and evaluation then take that base as the original.

The directory is written under a temporary name and renamed when complete, so a directory that exists
with a ``darkminer.json`` is whole.
"""

from __future__ import annotations

import datetime as _dt
import os
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from darkminer.config import fits
from darkminer.errors import ConfigError, DarkMinerWarning, ModelLoadError
from darkminer.io import (
    ERASED_MODEL_RECORD,
    EXPORT_RECORD,
    link_tree,
    load_tensors,
    output_directory,
    read_json,
    write_json,
)
from darkminer.models import adapters
from darkminer.models.base import TEXT_ENCODER_PREFIX, DiffusionModel, guidance_from_dict
from darkminer.models.loading import CONVERT_PICKLED, only_pickled_weights
from darkminer.provenance import file_record, package_versions

INFO_NAME = ERASED_MODEL_RECORD
OUTPUT_KIND = "an erased model"  # what may be replaced at --out
FORMAT_VERSION = 1
KINDS = ("lora", "unet", "text_encoder", "guidance")
WEIGHT_KINDS = ("unet", "text_encoder")  # weights edited in place, written whole
EXTERNAL_METHOD = "external"  # a UNet folder from another tool: no darkminer.json, no recorded base
ORIGINAL_METHOD = "original"  # what results call a model with no erasure (the benchmark's reference row)
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "model.safetensors"  # what transformers' save_pretrained writes
ERASED_ON = "erased_on"  # the folder of the erased model a stacked erasure was made on
STACK_IDENTITY = ("method", "concept", "base_model", "kind", "created")  # what tells an erased_on/ folder apart


@dataclass
class ErasedModelInfo:
    method: str
    concept: str
    base_model: str
    kind: str
    anchor: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    erased_on: dict[str, Any] | None = None  # the record of the erased model this erasure was stacked on
    code: dict[str, Any] | None = None  # a plugin eraser's file (provenance.code_record); None for darkminer's own
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    format: int = FORMAT_VERSION

    @classmethod
    def read(cls, directory: str | Path) -> ErasedModelInfo:
        if not isinstance(directory, str | os.PathLike):
            raise ModelLoadError(f"an erased model is a folder path (--erased), got {type(directory).__name__} {directory!r}")
        directory = Path(directory)
        if directory.is_file():
            raise ModelLoadError(f"erased model {directory} is a file; give the folder `darkminer erase` wrote")
        if not directory.is_dir():
            raise ModelLoadError(f"erased model {directory} does not exist (make it with `darkminer erase`)")
        if not (directory / INFO_NAME).exists() and (directory / "config.json").is_file() and (
            directory / UNET_WEIGHTS
        ).is_file():
            return cls(method=EXTERNAL_METHOD, concept="", base_model="", kind="unet", created="")
        if not (directory / INFO_NAME).exists() and (directory / EXPORT_INFO).is_file():
            raise ModelLoadError(f"{directory} is a pipeline darkminer exported, the erasure in its weights: load it "
                                 f"as the model, --model {directory} (it carries its text encoder too)")
        if not (directory / INFO_NAME).exists() and (directory / "unet" / UNET_WEIGHTS).is_file():
            raise ModelLoadError(f"{directory} is a whole pipeline folder, not an erased model: give its UNet, "
                                 f"--erased {directory / 'unet'}, with --model naming the base it came from")
        if not (directory / INFO_NAME).exists() and (directory / "config.json").is_file():
            # another tool's UNet folder, but not as we load one
            pickled = only_pickled_weights(directory)
            found = (f"only pickled weights ({pickled}); darkminer loads safetensors only: {CONVERT_PICKLED}"
                     if pickled else f"no {UNET_WEIGHTS}")
            raise ModelLoadError(f"{directory} has no {INFO_NAME}, and as another tool's diffusers UNet folder it holds "
                                 f"{found}")
        if not (directory / INFO_NAME).exists():
            raise ModelLoadError(f"{directory} is not an erased model (it has no {INFO_NAME}); give a folder "
                                 "`darkminer erase` wrote, or another tool's diffusers UNet folder (config.json and "
                                 f"{UNET_WEIGHTS})")
        data = read_json(directory / INFO_NAME)
        if not isinstance(data, dict):
            raise ModelLoadError(f"{directory / INFO_NAME} is not an erased model's record (a JSON object); re-create it")
        missing = [k for k in ("method", "concept", "base_model", "kind") if k not in data]
        if missing:
            raise ModelLoadError(f"{directory / INFO_NAME} lacks {missing}; the directory is not an erased model")
        hints = typing.get_type_hints(cls)
        wrong = [k for k in data if k in hints and not fits(data[k], hints[k])]
        if data.get("erased_on") is not None and not _is_stack_record(data["erased_on"]):
            wrong.append("erased_on")
        if wrong:
            raise ModelLoadError(f"{directory / INFO_NAME}: {', '.join(wrong)} of the wrong type (edited or damaged); "
                                 "re-create the erased model")
        if data["kind"] not in KINDS:
            raise ModelLoadError(f"{directory / INFO_NAME}: unknown kind {data['kind']!r}, expected one of {KINDS}")
        if data.get("format", FORMAT_VERSION) > FORMAT_VERSION:  # read as this version knows it, it may be another model
            raise ModelLoadError(f"{directory} was written by a newer darkminer (record format {data['format']}, this "
                                 f"version reads {FORMAT_VERSION}); upgrade darkminer to load it")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def method_label(self) -> str:
        return method_label(asdict(self))

    def record(self, directory: str | Path) -> dict[str, Any]:
        """Which erased model a result was made on, as results files (metrics.json, attack.json) keep it, and
        as a resume compares it. Another tool's UNet folder has no record of its own: its weights' digest
        tells it from other weights put in the same folder."""
        record = {"path": str(Path(directory).resolve()), "info": asdict(self)}
        if self.method == EXTERNAL_METHOD:
            record["weights"] = file_record(Path(directory) / UNET_WEIGHTS)
        return record


def _is_stack_record(record: Any) -> bool:
    """Whether ``erased_on`` holds what ``record`` wrote, at every level of the stack."""
    info = record.get("info") if isinstance(record, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("method"), str):
        return False
    return info.get("erased_on") is None or _is_stack_record(info["erased_on"])


def stack_records(info: dict[str, Any]) -> list[dict[str, Any]]:
    """An erased model's record (as a dict) and those of the erasures it was stacked on, top first; a damaged
    level (no method) ends the list."""
    records: list[dict[str, Any]] = []
    while isinstance(info, dict) and isinstance(info.get("method"), str):
        records.append(info)
        below = info.get("erased_on")
        info = below.get("info") if isinstance(below, dict) else None
    return records


def stack_description(info: dict[str, Any]) -> str:
    """An erased model's record (as a dict) in words, top first: "esd-x on blood, over uce on nudity"."""
    return ", over ".join(f"{record['method']} on {record['concept']}" for record in stack_records(info))


def erased_concepts(info: ErasedModelInfo | dict[str, Any]) -> list[str]:
    """The concepts an erased model (its record, or the record as a dict) was made to erase, once each, top of a
    stack first (none for a UNet folder from another tool)."""
    concepts = [record.get("concept") for record in stack_records(info if isinstance(info, dict) else asdict(info))]
    return list(dict.fromkeys(c for c in concepts if isinstance(c, str) and c))


def warn_unless_erased(info: ErasedModelInfo | dict[str, Any] | None, concept: str, erased: object) -> None:
    """Warn where an erased model is graded or attacked on a concept none of its erasures was made for: its
    rates then read as a failed erasure ("uce on blood: plain 100%") of a model that erased fire. Allowed (how
    an erasure spares the other concepts is worth measuring), but never by a mistyped --concept unnoticed."""
    known = erased_concepts(info) if info is not None else []
    if known and concept.casefold() not in {c.casefold() for c in known}:
        warnings.warn(f"{erased} erased {' and '.join(map(repr, known))}, not {concept!r}: these results are of a "
                      "concept it was not made to erase (--concept names the concept graded)", DarkMinerWarning,
                      stacklevel=2)


def method_label(info: dict[str, Any]) -> str:
    """An erased model's method as results name it (``info``: its record as a dict); a stack's methods from
    the bottom up, joined by "+" (``darkminer+esd-x``: ESD-x erased on top of a Dark Miner erasure); "" for
    a record without one."""
    return "+".join(record["method"] for record in reversed(stack_records(info)))


EXPORT_INFO = EXPORT_RECORD  # beside model_index.json: which erasure an exported pipeline carries


def exported_erasure(model: str | Path | None) -> dict[str, Any] | None:
    """What ``darkminer export`` recorded in a pipeline folder (the erased model it came from and its
    record), or None for any other model name or folder."""
    if model is None or not (Path(model) / EXPORT_INFO).is_file():
        return None
    return read_json(Path(model) / EXPORT_INFO)


def save_erased(
    model: DiffusionModel,
    directory: str | Path,
    info: ErasedModelInfo,
    write_extra: Callable[[Path], None] | None = None,
    erased_on: str | Path | None = None,
) -> Path:
    """Write the erased model held by ``model`` (its LoRA, edited weights or guidance) to ``directory``.

    ``write_extra`` may add method-specific files (mined embeddings, logs) before the rename. ``erased_on``:
    the erased model this erasure was stacked on (``erasure_adopted``); a LoRA or guidance needs it
    underneath, so it is copied in (hard links where the file system allows), while whole weights hold it:
    the folder of each component (UNet, text encoder) that any erasure of the stack edited.
    """
    with output_directory(directory, INFO_NAME, OUTPUT_KIND) as tmp:
        if info.kind == "lora":
            adapters.save_lora(model, tmp)
        elif info.kind in WEIGHT_KINDS:  # the erasure's own component, and any other one the stack edited
            for component in sorted({info.kind} | model.edited_components):
                getattr(model, component).save_pretrained(tmp / component, safe_serialization=True)
        else:
            write_json(tmp / "guidance.json", model.guidance.to_dict())
        if erased_on is not None and info.kind not in WEIGHT_KINDS:
            # Erased models are written whole under a new name and never changed in place: a link is a copy.
            link_tree(Path(erased_on), tmp / ERASED_ON)
        if write_extra is not None:
            write_extra(tmp)
        write_json(tmp / INFO_NAME, asdict(info))
    return Path(directory)


def apply_erased(model: DiffusionModel, directory: str | Path) -> ErasedModelInfo:
    """Load an erased model onto its base ``model``; the original stays reachable via ``model.original()``.
    A stacked erasure's ``erased_on`` folder is applied first, its adapter merged into the weights."""
    directory = Path(directory)
    info = ErasedModelInfo.read(directory)
    if info.erased_on is not None and info.kind not in WEIGHT_KINDS:
        if not (directory / ERASED_ON).is_dir():
            raise ModelLoadError(f"{directory} was erased on top of another erased model, but its {ERASED_ON}/ "
                                 "folder is missing; copy the whole folder, or re-create it")
        below, recorded = asdict(ErasedModelInfo.read(directory / ERASED_ON)), info.erased_on["info"]
        if differs := [key for key in STACK_IDENTITY if below.get(key) != recorded.get(key)]:
            raise ModelLoadError(f"{directory / ERASED_ON} is not the erased model {directory} was made on (its "
                                 f"{', '.join(differs)} differ from the record); copy the whole folder, or re-create it")
        _apply_folded(model, directory / ERASED_ON)
    if info.kind == "lora":
        adapters.load_lora(model, directory)
    elif info.method == EXTERNAL_METHOD:
        _load_weights(model, directory / UNET_WEIGHTS, "unet")
    elif info.kind in WEIGHT_KINDS:
        if not (directory / info.kind).is_dir():
            raise ModelLoadError(f"{directory} is an erased model of kind {info.kind!r}, but its {info.kind}/ folder "
                                 "is missing; copy the whole folder, or re-create it")
        for component, weights in (("unet", UNET_WEIGHTS), ("text_encoder", TEXT_ENCODER_WEIGHTS)):
            if (directory / component).is_dir():
                _load_weights(model, directory / component / weights, component)
    else:
        model.guidance = guidance_from_dict(model, read_json(directory / "guidance.json"))
    return info


def read_stackable(directory: str | Path) -> ErasedModelInfo:
    """The record of an erased model that another erasure may be stacked on (refused: an SLD guidance)."""
    info = ErasedModelInfo.read(directory)
    if info.kind == "guidance":
        raise ConfigError(f"{directory} is an inference-time erasure ({info.method}): it changes sampling, not "
                          "weights, so nothing can be trained on top of it; erase the other concepts first "
                          f"and {info.method} last, with --erased naming their result")
    return info


@contextmanager
def erasure_adopted(model: DiffusionModel, directory: str | Path) -> Iterator[None]:
    """Within the block ``model`` carries the erased model ``directory`` as its own weights (its adapter
    merged), so that an erasure run in the block is stacked on it: its teacher and its image pools are the
    erased model, not the base. Afterwards the original is the base again (``DiffusionModel.edits_adopted``)."""
    read_stackable(directory)
    _apply_folded(model, directory)
    with model.edits_adopted():
        yield


def _apply_folded(model: DiffusionModel, directory: Path | str) -> None:
    """``apply_erased`` with its adapter merged into the weights, so that another erasure can go on top."""
    apply_erased(model, directory)
    if adapters.has_lora(model):
        adapters.merge_lora(model)


def _load_weights(model: DiffusionModel, file: Path, component: str) -> None:
    """Put the weights in ``file`` into the model's ``component`` ("unet" or "text_encoder") in place, the
    originals of those that differ remembered."""
    state = load_tensors(file, device=model.device)
    params = dict(getattr(model, component).named_parameters())
    if set(state) != set(params) or any(state[n].shape != p.shape for n, p in params.items()):
        raise ModelLoadError(f"{file.parent} holds a {component} of another architecture than the base model "
                             f"{model.name!r}'s; name its own base model")
    changed = [n for n, v in state.items() if not torch.equal(v.to(params[n].dtype), params[n].data)]
    model.remember_originals([n if component == "unet" else TEXT_ENCODER_PREFIX + n for n in changed])
    with torch.no_grad():
        for name in changed:
            params[name].copy_(state[name])


