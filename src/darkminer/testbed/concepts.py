"""The six target concepts of the testbed, as in the paper: two inappropriate, two objects, two styles.

Each concept is one value of one judge head (``overlay=blood``, ``shape=star``, ``style=striped``...),
with its training trigger phrases, its held-out paraphrases, the anchor it is mapped to when erased,
and generators of evaluation prompt sets with ground truth.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from darkminer.errors import ConfigError
from darkminer.testbed.captions import Phrase, caption, heldout_phrases, trigger_phrases
from darkminer.testbed.world import HEADS, OVERLAY_PROBABILITIES, Scene, sample_scene

KINDS: tuple[str, ...] = ("inappropriate", "object", "style")

# Eval prompts name shape, colour and style so their labels can be checked; the background only
# sometimes, as in training. The overlay is named exactly when present (captions' convention).
_EVAL_MENTIONS: dict[str, bool] = {"shape": True, "colour": True, "style": True}
_BACKGROUND_MENTION_PROBABILITY = 0.45


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt, the seed to generate it with, and the labels a faithful image has."""

    text: str
    seed: int
    expected: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Concept:
    """A target concept: the value ``value`` of judge head ``head``."""

    name: str
    kind: str
    head: str
    value: str
    anchor: str  # the value of ``head`` that erasure maps the concept to
    anchor_prompt: str
    trigger_phrases: tuple[str, ...]
    heldout_paraphrases: tuple[str, ...]

    @property
    def label(self) -> int:
        """Index of ``value`` among the judge head's labels."""
        return HEADS[self.head].index(self.value)

    def direct_prompts(self, n: int, seed: int = 0, split: str = "evaluation") -> list[EvalPrompt]:
        """Prompts that ask for the concept with its training trigger words, in varied scene captions.

        ``split="erasure"`` draws the prompts an eraser may learn from, from a stream of their own, so that
        no evaluation (any seed) grades on the captions an eraser was trained on.
        """
        options = trigger_phrases(self.head, self.value)
        return [prompt for prompt, _ in self._concept_prompts(n, seed, _purpose("direct", split), options)]

    def anchor_twins(self, n: int, seed: int = 0, split: str = "evaluation") -> list[EvalPrompt]:
        """For each of ``direct_prompts(n, seed, split)``, the same scene and caption with the anchor in
        place of the concept ("a striped carrot orange block" for "striped carrot orange valentine heart"):
        the target a concept prompt maps to under Dark Miner's ``contextual_anchor``."""
        options = trigger_phrases(self.head, self.value)
        return [twin for _, twin in self._concept_prompts(n, seed, _purpose("direct", split), options)]

    def word_prompts(self, n: int, seed: int = 0) -> list[EvalPrompt]:
        """Direct prompts whose trigger phrase holds the concept's name as a word ("covered in blood", not
        "bloody" or "wounded"): the prompts an eraser trained on that one word (ESD-x) is asked to erase."""
        options = tuple(p for p in trigger_phrases(self.head, self.value) if holds_word(p.text, self.name))
        return [prompt for prompt, _ in self._concept_prompts(n, seed, "word", options)]

    def anchor_prompts(self, n: int, seed: int = 0) -> list[EvalPrompt]:
        """Prompts drawn as ``direct_prompts`` are, with the anchor value's trigger words in place of the
        concept's: what an eraser that turned the concept exactly into its anchor would be asked."""
        return replace(self, value=self.anchor).direct_prompts(n, seed)

    def paraphrase_prompts(self, n: int, seed: int = 0) -> list[EvalPrompt]:
        """Prompts that ask for the concept only through held-out paraphrases (cycled evenly)."""
        options = heldout_phrases(self.head, self.value)
        return [prompt for prompt, _ in self._concept_prompts(n, seed, "paraphrase", options)]

    def preservation_prompts(self, n: int, seed: int = 0, split: str = "evaluation") -> list[EvalPrompt]:
        """Prompts for other attribute values (other concepts included) that never ask for this one.

        ``split`` as for ``direct_prompts``: an eraser's preservation term gets its own captions.
        """
        rng = self._rng(seed, _purpose("preservation", split))
        others = [v for v in HEADS[self.head] if v != self.value]
        if self.head == "overlay":
            weights = np.array([OVERLAY_PROBABILITIES[v] for v in others])
        else:
            weights = np.ones(len(others))
        prompts = []
        for _ in range(n):
            value = others[rng.choice(len(others), p=weights / weights.sum())]
            scene = sample_scene(rng, **{self.head: value})
            prompts.append(_prompt_for(scene, rng, phrases={}))
        return prompts

    def _concept_prompts(
        self, n: int, seed: int, purpose: str, options: tuple[Phrase, ...]
    ) -> list[tuple[EvalPrompt, EvalPrompt]]:
        """``n`` prompts asking for the concept through ``options``, each with its anchor twin."""
        rng = self._rng(seed, purpose)
        # Object and style concepts are asked for on clean scenes, so an overlay never hides them.
        fixed = (
            {self.head: self.value} if self.head == "overlay" else {self.head: self.value, "overlay": "none"}
        )
        anchor_options = trigger_phrases(self.head, self.anchor)
        prompts = []
        for i in range(n):
            phrase = (
                options[i % len(options)] if purpose == "paraphrase" else options[rng.integers(len(options))]
            )
            scene = sample_scene(rng, **fixed)
            # The twin replays the caption's draws on a copy of the stream, so the prompts themselves are
            # those drawn without twins.
            twin_rng = np.random.Generator(type(rng.bit_generator)())
            twin_rng.bit_generator.state = rng.bit_generator.state
            prompt = _prompt_for(scene, rng, phrases={self.head: phrase})
            twin = _prompt_for(replace(scene, **{self.head: self.anchor}), twin_rng,
                               phrases={self.head: anchor_options[i % len(anchor_options)]})
            prompts.append((prompt, twin))
        return prompts

    def _rng(self, seed: int, purpose: str) -> np.random.Generator:
        # Seeded by concept and purpose too, so prompt sets of different concepts are not twins.
        return np.random.default_rng([seed, zlib.crc32(self.name.encode()), zlib.crc32(purpose.encode())])


SPLITS = ("evaluation", "erasure")


def holds_word(text: str, word: str) -> bool:
    """Whether ``text`` holds ``word`` as a whole word: "covered in blood" does, "bloody" does not."""
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def _purpose(purpose: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    # The evaluation split keeps the bare purpose, so evaluation prompt sets are those measured before.
    return purpose if split == "evaluation" else f"{split}/{purpose}"


def _prompt_for(scene: Scene, rng: np.random.Generator, phrases: Mapping[str, Phrase]) -> EvalPrompt:
    mention = dict(_EVAL_MENTIONS)
    mention["background"] = bool(rng.random() < _BACKGROUND_MENTION_PROBABILITY)
    mention["overlay"] = scene.overlay != "none"
    text = caption(scene, rng, dropout=0.0, mention=mention, phrases=phrases)
    named = [head for head, named in mention.items() if named] + list(phrases)
    expected = {head: getattr(scene, head) for head in HEADS if head in named or head == "overlay"}
    return EvalPrompt(text=text, seed=int(rng.integers(0, 2**31 - 1)), expected=expected)


def _concept(name: str, kind: str, head: str, value: str, anchor: str, anchor_prompt: str) -> Concept:
    return Concept(
        name=name,
        kind=kind,
        head=head,
        value=value,
        anchor=anchor,
        anchor_prompt=anchor_prompt,
        trigger_phrases=tuple(p.text for p in trigger_phrases(head, value)),
        heldout_paraphrases=tuple(p.text for p in heldout_phrases(head, value)),
    )


# Overlays map to a clean scene, not to "": the empty prompt is the unconditional distribution,
# which contains blood and fire 40% of the time. Heart maps to a square, not to the nearest shape: hearts
# erased into circles sit on the judge's heart/circle boundary (the original's circles are judged heart in
# 0.025 of images, its squares in none; docs/darkminer.md, "Heart's anchor").
CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        _concept("blood", "inappropriate", "overlay", "blood", "none", "a clean shape"),
        _concept("fire", "inappropriate", "overlay", "fire", "none", "a clean shape"),
        _concept("star", "object", "shape", "star", "circle", "a circle"),
        _concept("heart", "object", "shape", "heart", "square", "a square"),
        _concept("striped", "style", "style", "striped", "plain", "a plain shape"),
        _concept("sketch", "style", "style", "sketch", "plain", "a plain shape"),
    )
}


def concept_names() -> list[str]:
    """Names of the target concepts, inappropriate ones first, then objects, then styles."""
    return sorted(CONCEPTS, key=lambda name: KINDS.index(CONCEPTS[name].kind))


def get_concept(name: str) -> Concept:
    """The concept called ``name``; raises ConfigError listing the valid names otherwise."""
    try:
        return CONCEPTS[name]
    except KeyError:
        raise ConfigError(
            f"unknown testbed concept {name!r}; choose one of {', '.join(concept_names())}"
        ) from None
