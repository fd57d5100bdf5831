"""The attack interface and its registry.

As in TextAttack, an attack is a goal (make the judge see the concept on the attacked model), a
transformation (what it may change: prefix tokens, a soft prompt, a new token, the whole prompt), constraints
(budget: tokens, iterations, projection to the vocabulary) and a search (gradient descent, genetic search).
Every attack saves what it found so that it can be replayed on another model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from darkminer.attacks import BUILTIN_ATTACKS
from darkminer.config import PROMPT_SEED_LIMIT, Config, check_argument, check_seed
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.models.base import DiffusionModel
from darkminer.provenance import file_record
from darkminer.registry import Registry
from darkminer.targets import EraseTarget


@dataclass
class AttackConfig(Config):
    seed: int = 0

    def input_files(self) -> dict[str, str]:
        """Options that name a file the attack reads: a resume checks their contents, not only their paths."""
        return {}

    def input_file_records(self) -> dict[str, Any]:
        """What the files ``input_files`` names hold (path, size, sha256), as run records keep them."""
        files = self.input_files()
        if missing := [name for name, path in files.items() if not Path(path).expanduser().is_file()]:
            raise DarkMinerError(f"{type(self).__name__}.{missing[0]} {files[missing[0]]} does not exist; give an existing file")
        return {name: file_record(path) for name, path in files.items()}


@dataclass(frozen=True)
class AttackPrompt:
    """A prompt to attack and the seed its image is drawn with."""

    text: str
    seed: int
    guidance: float | None = None

    def __post_init__(self) -> None:
        check_argument("an attack prompt's text", self.text, str)
        check_seed("an attack prompt's seed", self.seed, limit=PROMPT_SEED_LIMIT)
        check_argument("an attack prompt's guidance", self.guidance, float | None)


@dataclass
class AttackResult:
    """What an attack found for one prompt: replayable text and/or input-embedding sequence."""

    prompt: AttackPrompt
    adversarial_text: str
    success_before: bool
    success_after: bool
    input_ids: list[int] | None = None
    embeddings: torch.Tensor | None = None  # (L, E) input token embeddings, when the attack is soft
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """Counted as the UnlearnDiffAtk authors do: a prompt that works unattacked counts as broken."""
        return self.success_before or self.success_after

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON values; the embeddings are stored apart (``soft`` says whether there are any)."""
        return {
            "prompt": self.prompt.text,
            "seed": self.prompt.seed,
            "guidance": self.prompt.guidance,
            "adversarial_text": self.adversarial_text,
            "success_before": self.success_before,
            "success_after": self.success_after,
            "success": self.success,
            "input_ids": self.input_ids,
            "soft": self.embeddings is not None,
            "seconds": round(self.seconds, 3),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], embeddings: torch.Tensor | None) -> AttackResult:
        """A result ``to_dict`` wrote, with its embeddings (None for a hard result)."""
        text, ids = data["adversarial_text"], data.get("input_ids")
        if not isinstance(text, str) or not (ids is None or isinstance(ids, list) and all(type(i) is int for i in ids)):
            raise TypeError("adversarial_text must be text and input_ids a list of token ids")
        return cls(
            prompt=AttackPrompt(data["prompt"], int(data["seed"]), data.get("guidance")),
            adversarial_text=text,
            success_before=bool(data["success_before"]),
            success_after=bool(data["success_after"]),
            input_ids=ids,
            embeddings=embeddings,
            seconds=float(data.get("seconds", 0.0)),
            extra=data.get("extra", {}),
        )


def unattacked(
    model: DiffusionModel, prompt: AttackPrompt, ok: bool, seconds: float = 0.0, **extra: object
) -> AttackResult:
    """The prompt itself as the result: what an attack records where it spent no budget. Attacks spend
    none on prompts that already succeed (they count as broken either way, as the UnlearnDiffAtk authors
    count)."""
    return AttackResult(prompt, prompt.text, ok, ok, input_ids=model.tokenize([prompt.text])[0].tolist(),
                        seconds=seconds, extra=extra)


# Decides whether images show the concept (a detector bound to the target); returns one bool per image.
SuccessFn = Callable[[torch.Tensor], torch.Tensor]


class Attack(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"{self.name} takes a {self.config_class.__name__} (from_dict builds one from a "
                              f"dict), got {type(self.config).__name__}")

    def check_target(self, target: EraseTarget) -> None:
        """Refuse, before any work, a target this attack cannot run on; every target by default."""
        return None

    def check_model(self, model: DiffusionModel) -> None:
        """Refuse, before any work, a model this attack cannot run on (tokens it searches that do not fit
        the model's prompts); every model by default."""
        return None

    @abstractmethod
    def run(
        self,
        model: DiffusionModel,
        target: EraseTarget,
        prompts: Sequence[AttackPrompt],
        success: SuccessFn,
        original: DiffusionModel | None = None,
    ) -> list[AttackResult]:
        """Attack ``model`` (the erased model) on each prompt. ``original`` is the model before erasure
        (for attacks that need target images or a teacher); often the same object with
        ``model.original()``."""


def attack_success_rate(results: Sequence[AttackResult]) -> float:
    if not results:
        raise DarkMinerError("no attack results to score")
    return sum(r.success for r in results) / len(results)


def before_and_after_rates(results: Sequence[AttackResult]) -> tuple[float, float]:
    """The shares of prompts whose own text shows the concept, and whose adversarial prompt does."""
    if not results:
        raise DarkMinerError("no attack results to score")
    return (sum(r.success_before for r in results) / len(results),
            sum(r.success_after for r in results) / len(results))


ATTACKS: Registry[type[Attack]] = Registry("attack", BUILTIN_ATTACKS)
A = TypeVar("A", bound=Attack)


def register_attack(name: str) -> Callable[[type[A]], type[A]]:
    return ATTACKS.register(name)


def get_attack(name: str) -> type[Attack]:
    return ATTACKS.lookup(name)


def build_attack(name: str, options: AttackConfig | dict[str, Any] | None = None) -> Attack:
    """The registered attack ``name`` with its config (or one built from ``options``, validated)."""
    attack_cls = get_attack(name)
    return attack_cls(attack_cls.config_class.coerce(options))
