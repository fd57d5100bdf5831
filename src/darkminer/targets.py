"""What to erase: one description of a target concept for both worlds.

On the testbed the concept comes from the registry (its word, anchor, prompt sets with ground truth); on
Stable Diffusion it is free text, with an anchor (default: the empty prompt) and an optional prompt CSV.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from darkminer.config import check_argument
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.models import is_testbed
from darkminer.models.base import DiffusionModel
from darkminer.prompts import read_prompt_csv, replace_concept

if TYPE_CHECKING:
    from darkminer.testbed.concepts import Concept

# Ordinary prompts that preservation terms keep unchanged on SD when the user gives none.
DEFAULT_SD_PRESERVE = (
    "a photo of a dog", "a landscape with mountains and a lake", "a portrait of a man in a suit",
    "a bowl of fruit on a table", "a city street at night", "a red car parked by the road",
    "a painting of flowers in a vase", "a cat sleeping on a sofa",
)


@dataclass(frozen=True)
class EraseTarget:
    name: str
    word: str  # the concept's own word(s): what text-based erasers (ESD, UCE, ...) erase
    anchor: str  # the prompt the concept is mapped to
    prompts: tuple[str, ...]  # prompts that ask for the concept (image pools, training prompts)
    preserve: tuple[str, ...]  # ordinary prompts to keep unchanged
    kind: str = "free"  # inappropriate | object | style on the testbed; free text on SD
    testbed_concept: Concept | None = field(default=None, compare=False)
    # Concept prompt -> the same prompt asking for the anchor instead; a prompt not in it maps to the bare anchor.
    anchor_twins: Mapping[str, str] = field(default_factory=dict, compare=False)

    def anchor_twin(self, prompt: str) -> str:
        """``prompt`` with the anchor in place of the concept, where known; else the bare anchor."""
        return self.anchor_twins.get(prompt, self.anchor)

    def to_dict(self) -> dict:
        return {"name": self.name, "word": self.word, "anchor": self.anchor, "kind": self.kind,
                "n_prompts": len(self.prompts), "n_preserve": len(self.preserve)}

    def __repr__(self) -> str:  # the prompt lists counted, not printed: a target's are hundreds of lines
        fields = ", ".join(f"{key}={value!r}" for key, value in self.to_dict().items())
        return f"{type(self).__name__}({fields})"


TESTBED_CSV_ERROR = ("prompt CSVs are for Stable Diffusion: the testbed draws every prompt set from its concept "
                     "registry (`darkminer testbed concepts`); drop the CSV option or pass --model")


# What a free-text concept on Stable Diffusion may be declared as; erasers that treat kinds apart (CA's and
# FMN's prompt templates for styles) read it.
SD_KINDS = ("free", "style", "object", "inappropriate")


def check_kind(kind: str | None) -> None:
    if kind is not None and kind not in SD_KINDS:
        raise ConfigError(f"unknown kind {kind!r} (--kind): use one of {list(SD_KINDS)}")


def check_target(concept: str, testbed: bool, *, kind: str | None = None, prompts_csv: str | Path | None = None) -> None:
    """``resolve_target``'s checks of its arguments, which need to know only whether the model is the testbed:
    run before the model loads, they refuse a mistyped concept at once."""
    check_argument("concept", concept, str)
    if not concept.strip():
        raise DarkMinerError("the concept (--concept) is empty: name the concept to erase")
    check_kind(kind)
    if testbed:
        from darkminer.testbed.concepts import get_concept

        if kind is not None:
            raise DarkMinerError("--kind is for Stable Diffusion concepts: a testbed concept's kind is the registry's")
        if prompts_csv:
            raise DarkMinerError(TESTBED_CSV_ERROR)
        get_concept(concept)


def resolve_target(
    model: DiffusionModel,
    concept: str,
    *,
    anchor: str | None = None,
    prompts_csv: str | Path | None = None,
    n_prompts: int = 64,
    seed: int = 0,
    kind: str | None = None,
) -> EraseTarget:
    check_argument("n_prompts", n_prompts, int)
    if n_prompts < 1:
        raise ConfigError(f"n_prompts must be a positive number of prompts, got {n_prompts}")
    check_target(concept, is_testbed(model), kind=kind, prompts_csv=prompts_csv)
    if is_testbed(model):
        from darkminer.testbed.concepts import get_concept

        c = get_concept(concept)
        direct = c.direct_prompts(n_prompts, seed, split="erasure")
        twins = c.anchor_twins(n_prompts, seed, split="erasure")
        return EraseTarget(
            name=c.name,
            word=c.name,
            anchor=c.anchor_prompt if anchor is None else anchor,
            # The erasure split: evaluation never grades on the captions an eraser learnt from.
            prompts=tuple(p.text for p in direct),
            # The twins ask for the registry's anchor; with another anchor every prompt maps to that anchor, bare.
            anchor_twins={} if anchor is not None else {p.text: twin.text for p, twin in zip(direct, twins, strict=True)},
            preserve=tuple(p.text for p in c.preservation_prompts(n_prompts, seed, split="erasure")),
            kind=c.kind,
            testbed_concept=c,
        )
    prompts = [concept] + ([r.text for r in read_prompt_csv(prompts_csv, limit=n_prompts)] if prompts_csv else [])
    anchor = anchor or ""
    return EraseTarget(
        name=concept, word=concept, anchor=anchor, prompts=tuple(prompts), preserve=DEFAULT_SD_PRESERVE,
        kind=kind or "free", anchor_twins={p: _with_anchor(p, concept, anchor) for p in prompts},
    )


def _with_anchor(prompt: str, word: str, anchor: str) -> str:
    """``prompt`` with the concept's words replaced by the anchor's; the bare anchor where it lacks them."""
    return replace_concept(prompt, [word], anchor, every=True) or anchor
