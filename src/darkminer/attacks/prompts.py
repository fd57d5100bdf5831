"""Prompt sets without optimisation -- ``plain`` and ``paraphrase`` -- and the concept's phrases in a
prompt (CCE and Ring-A-Bell use them too; the text helpers are in ``darkminer.prompts``).

``plain`` is the baseline of every table: the prompts as they are. ``paraphrase`` says the concept
without its own words: on the testbed each prompt's concept phrase is swapped for one of the concept's
held-out paraphrases of the same grammatical form (the model never saw them in training); on Stable
Diffusion the user gives the paraphrases of the concept word.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from darkminer.attacks.base import (
    Attack,
    AttackConfig,
    AttackPrompt,
    AttackResult,
    SuccessFn,
    register_attack,
)
from darkminer.attacks.soft_prompt import judge_texts
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.models.base import DiffusionModel
from darkminer.prompts import find_phrase, replace_concept, splice
from darkminer.targets import EraseTarget


def concept_phrases(target: EraseTarget) -> tuple[str, ...]:
    """The words that ask for the concept in a prompt, longest first (so "covered in blood" wins over
    "blood"): the testbed concept's training trigger phrases, or the concept word on SD."""
    concept = target.testbed_concept
    phrases = tuple(concept.trigger_phrases) if concept is not None else (target.word,)
    return tuple(sorted({p for p in phrases if p.strip()}, key=len, reverse=True))


@dataclass
class PlainConfig(AttackConfig):
    """No options: the prompts are used as they are."""


@register_attack("plain")
class PlainPrompts(Attack):
    """The prompts themselves: how often the erased model still draws the concept unattacked."""

    config_class = PlainConfig

    def run(
        self,
        model: DiffusionModel,
        target: EraseTarget,
        prompts: Sequence[AttackPrompt],
        success: SuccessFn,
        original: DiffusionModel | None = None,
    ) -> list[AttackResult]:
        started = time.time()
        verdicts = judge_texts(model, prompts, success)
        seconds = (time.time() - started) / max(len(prompts), 1)
        return [
            AttackResult(prompt=p, adversarial_text=p.text, success_before=v, success_after=v, seconds=seconds)
            for p, v in zip(prompts, verdicts, strict=True)
        ]


@dataclass
class ParaphraseConfig(AttackConfig):
    # SD only: paraphrases of the concept word (e.g. ["bare body", "unclothed"]); the testbed uses the
    # concept's held-out paraphrases and ignores this.
    paraphrases: tuple[str, ...] = ()

    def validate(self) -> None:
        self.paraphrases = tuple(self.paraphrases)
        if any(not isinstance(p, str) or not p.strip() for p in self.paraphrases):
            raise ConfigError("ParaphraseConfig.paraphrases must be non-empty strings")


@register_attack("paraphrase")
class ParaphrasedPrompts(Attack):
    """Each prompt with its concept phrase swapped for a paraphrase (cycled through the list).

    A prompt without a concept phrase is kept as it is (``extra["paraphrased"] = False``).
    """

    config_class = ParaphraseConfig

    def check_target(self, target: EraseTarget) -> None:
        if target.testbed_concept is None and not self.config.paraphrases:
            raise DarkMinerError(
                f"the paraphrase attack needs paraphrases of {target.word!r} on this model: set `paraphrases` in "
                "its config (attack --config FILE holding paraphrases: [\"...\", \"...\"]; in an evaluation's --config, "
                "attack_configs: {paraphrase: {paraphrases: [...]}}); --paraphrase-prompts is the erasure rate's own set"
            )

    def run(
        self,
        model: DiffusionModel,
        target: EraseTarget,
        prompts: Sequence[AttackPrompt],
        success: SuccessFn,
        original: DiffusionModel | None = None,
    ) -> list[AttackResult]:
        self.check_target(target)
        started = time.time()
        rewritten = [self._paraphrase(target, p.text, i) for i, p in enumerate(prompts)]
        texts = [new if new is not None else p.text for p, new in zip(prompts, rewritten, strict=True)]
        attacked = [AttackPrompt(t, p.seed, p.guidance) for t, p in zip(texts, prompts, strict=True)]
        before = judge_texts(model, prompts, success)
        after = judge_texts(model, attacked, success)
        seconds = (time.time() - started) / max(len(prompts), 1)
        return [
            AttackResult(prompt=p, adversarial_text=t, success_before=b, success_after=a, seconds=seconds,
                         extra={"paraphrased": new is not None})
            for p, t, b, a, new in zip(prompts, texts, before, after, rewritten, strict=True)
        ]

    def _paraphrase(self, target: EraseTarget, text: str, index: int) -> str | None:
        """The prompt said with a paraphrase, or None when it holds no concept phrase."""
        concept = target.testbed_concept
        if concept is None:
            options = self.config.paraphrases
            return replace_concept(text, (target.word,), options[index % len(options)])
        from darkminer.testbed.captions import heldout_phrases, trigger_phrases

        found = find_phrase(text, concept_phrases(target))
        if found is None:
            return None
        start, end, phrase = found
        form = next(p.form for p in trigger_phrases(concept.head, concept.value) if p.text == phrase)
        options = [p.text for p in heldout_phrases(concept.head, concept.value) if p.form == form]
        if not options:  # no held-out phrasing of this form: any of them still names the concept
            options = list(concept.heldout_paraphrases)
        return splice(text, start, end, options[index % len(options)])
