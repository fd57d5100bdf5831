"""The eraser interface and its registry (one config dataclass per method, as in peft)."""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from darkminer.config import Config, load_config_file
from darkminer.erasers import BUILTIN_ERASERS
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.models.base import DiffusionModel
from darkminer.models.erased import EXTERNAL_METHOD, KINDS, ORIGINAL_METHOD
from darkminer.registry import Registry
from darkminer.targets import EraseTarget


@dataclass
class EraserConfig(Config):
    seed: int = 0

    def check_model(self, model: str) -> None:
        """Refuse, before any work, a base model (its ``models.model_id``) that this config cannot erase from."""


class Eraser(ABC):
    """Removes a concept from ``model`` in place: by a LoRA (kind ``lora``), by editing UNet or text-encoder
    weights after ``model.remember_originals`` (kinds ``unet``, ``text_encoder``), or by replacing
    ``model.guidance`` (kind ``guidance``). The runner saves the result as an erased-model directory."""

    name: ClassVar[str]
    kind: ClassVar[str]
    config_class: ClassVar[type[EraserConfig]] = EraserConfig
    # Defaults on the embedded testbed, over the config class's (the authors' Stable Diffusion settings),
    # for methods whose SD settings barely erase there (docs/methods.md, "Testbed budgets").
    testbed_config: ClassVar[dict[str, Any]] = {}

    @classmethod
    def config_for(cls, value: EraserConfig | Mapping[str, Any] | str | os.PathLike | None, model: str) -> EraserConfig:
        """``value`` (as ``Config.coerce`` takes it) as this method's config on ``model`` (a model id): on
        the testbed, options given as a mapping or a file go over ``testbed_config``; a config object is
        complete and taken as it is."""
        if model == "testbed" and cls.testbed_config:
            if isinstance(value, str | os.PathLike):  # an empty path is no file, as Config.from_file reads it
                value = load_config_file(value) if os.fspath(value) else None
            if value is None or isinstance(value, Mapping):  # anything else: coerce's own error
                value = {**cls.testbed_defaults(value or {}), **(value or {})}
        return cls.config_class.coerce(value)

    @classmethod
    def testbed_defaults(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The testbed budget that ``options`` (the user's) go over: ``testbed_config``, unless an option
        changes what the budget is for (AdvUnlearn's ``layers``)."""
        return dict(cls.testbed_config)

    def __init__(self, config: EraserConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"{self.name} takes a {self.config_class.__name__}, got {type(self.config).__name__}")

    @property
    def output_kind(self) -> str:
        """The kind of erased model this eraser writes with its config: ``kind``, unless an option of the
        config chooses what is trained (AdvUnlearn's ``layers``)."""
        return self.kind

    @abstractmethod
    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        """Erase ``target`` from ``model``; ``work_dir`` is for checkpoints (resume). Returns a summary
        (losses, timings) recorded in darkminer.json."""


def damaged_checkpoint(work_dir: Path, problem: object) -> DarkMinerError:
    """The one-line error for a checkpoint that cannot be resumed from."""
    return DarkMinerError(f"the checkpoint in {work_dir} is damaged ({problem}); delete that folder to start over")


def check_finite(value: float, stage: str, hint: str) -> float:
    """Stop a run whose loss went NaN/inf with one line that says what to change."""
    if not math.isfinite(value):
        raise DarkMinerError(f"{stage} diverged (loss {value}); {hint}")
    return value


ERASERS: Registry[type[Eraser]] = Registry("method", BUILTIN_ERASERS)
E = TypeVar("E", bound=Eraser)


def register_eraser(name: str, kind: str) -> Callable[[type[E]], type[E]]:
    """Register an eraser class under ``name``; ``kind`` is what its erasure leaves on the model, as the
    erased-model folder stores it: ``lora``, ``unet``, ``text_encoder`` or ``guidance`` (see ``Eraser``)."""
    if name in (ORIGINAL_METHOD, EXTERNAL_METHOD):  # results' labels for no erasure and another tool's UNet
        raise DarkMinerError(f"eraser name {name!r} is reserved (results call a model with no erasure "
                             f"{ORIGINAL_METHOD!r}, another tool's UNet folder {EXTERNAL_METHOD!r}); choose another")
    if kind not in KINDS:
        raise DarkMinerError(f"eraser {name!r}: kind {kind!r} is not one of {', '.join(KINDS)} (what the erasure "
                             "leaves on the model: a LoRA, edited UNet or text-encoder weights, or a guidance)")
    return ERASERS.register(name, kind=kind)


def get_eraser(name: str) -> type[Eraser]:
    return ERASERS.lookup(name)
