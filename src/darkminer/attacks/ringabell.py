"""Ring-A-Bell (Tsai et al., ICLR 2024): a black-box, model-agnostic search that needs only the text encoder.

1. Concept extraction: the concept vector is the mean difference of the text encoder's token states
   between prompts with and without the concept, ``v = mean(E(sensitive) - E(normal))`` (L, D).
2. Prompt discovery: for each prompt, a genetic algorithm searches ``prompt_length`` real tokens whose
   states come closest (squared error over all positions) to ``E(prompt) + eta * v``.

``E`` is the original model's text encoder, the public one an attacker holds, also where an erasure
trained the model's own (AdvUnlearn's text encoder); the erased model only judges the prompts found.

Defaults follow the authors' notebooks (chiayi-hsu/Ring-A-Bell, ``InversePrompt.ipynb``,
``Get_Concept_Vector.ipynb``): population 200, 3000 generations, mutation rate 0.25, crossover rate 0.5,
16 tokens, eta ("cof") 3. Each generation keeps the better half, lets each survivor breed by one-point
crossover with a random survivor with the crossover rate, then mutates one random position of each
individual with the mutation rate. Pairs come from a CSV (``sensitive prompt``, ``normal prompt``
columns, as the RECE/Ring-A-Bell sets), else from the target's own prompts with and without the concept
phrase (on the testbed the phrase is replaced by the anchor's word, e.g. "star" -> "circle").
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from darkminer.attacks.base import (
    Attack,
    AttackConfig,
    AttackPrompt,
    AttackResult,
    SuccessFn,
    register_attack,
)
from darkminer.attacks.prompts import concept_phrases
from darkminer.attacks.soft_prompt import as_original, judge_conditions, judge_texts, search_in_batches
from darkminer.config import check_non_negative, check_positive
from darkminer.errors import ConfigError, DarkMinerError, DarkMinerWarning
from darkminer.models.base import DiffusionModel
from darkminer.models.slots import allowed_token_ids, build_slotted, check_token_room
from darkminer.prompts import find_phrase, read_csv_table, replace_concept
from darkminer.targets import EraseTarget

PAIR_COLUMNS = ("sensitive prompt", "normal prompt")
_ENCODE_BATCH = 256


@dataclass
class RingABellConfig(AttackConfig):
    population: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5
    prompt_length: int = 16  # tokens searched (authors: 16, or 75 for K = 77)
    eta: float = 3.0  # strength of the concept vector (authors' `cof`)
    pairs_csv: str = ""  # CSV of sensitive/normal prompt pairs; empty: pairs from the target's prompts

    def input_files(self) -> dict[str, str]:
        return {"pairs_csv": self.pairs_csv} if self.pairs_csv else {}

    def validate(self) -> None:
        check_positive(self, population=self.population, generations=self.generations, prompt_length=self.prompt_length)
        check_non_negative(self, eta=self.eta)
        for name in ("mutation_rate", "crossover_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"RingABellConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.population < 2:
            raise ConfigError("RingABellConfig.population must be >= 2 (the better half breeds)")


# Words that, right before the concept phrase, negate it.
_NEGATIONS = frozenset({"no", "not", "non", "without", "never", "zero"})
# Fewer default pairs than this make a noisy concept vector (the RECE/Ring-A-Bell sets hold 49 and 79).
_FEW_PAIRS = 8


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    table = read_csv_table(path, "Ring-A-Bell pairs file")
    if not set(PAIR_COLUMNS) <= set(table.columns):
        raise DarkMinerError(f"{path} needs the columns {list(PAIR_COLUMNS)} (has {table.columns})")
    sensitive, normal = PAIR_COLUMNS
    pairs = [((r.cells[sensitive] or "").strip(), (r.cells[normal] or "").strip()) for r in table.records]
    pairs = [(s, n) for s, n in pairs if s and n]
    if not pairs:
        raise DarkMinerError(f"{path} holds no prompt pairs")
    return pairs


def negates_concept(text: str, phrases: Sequence[str]) -> bool:
    """Whether the concept phrase in ``text`` is negated ("safe for work, no nudity", "non-nude")."""
    found = find_phrase(text, phrases)
    before = text[: found[0]].replace("-", " ").split() if found else []
    return bool(before) and before[-1].lower().strip(",;:(") in _NEGATIONS


def concept_pairs(target: EraseTarget) -> list[tuple[str, str]]:
    """(with concept, without) pairs from the target's prompts: the concept phrase removed, or on the
    testbed replaced by the anchor's word ("none" -> removed). A prompt that negates the concept would
    turn the vector against it, so it makes no pair."""
    concept = target.testbed_concept
    neutral = "" if concept is None or concept.anchor == "none" else concept.anchor
    phrases = concept_phrases(target)
    pairs = [(p, replace_concept(p, phrases, neutral)) for p in target.prompts if not negates_concept(p, phrases)]
    pairs = [(p, n) for p, n in pairs if n is not None and n != p]
    if not pairs:
        raise DarkMinerError(
            f"none of the target's prompts names {target.word!r}, so Ring-A-Bell has no prompt pairs: "
            "give pairs_csv (columns 'sensitive prompt', 'normal prompt')"
        )
    if len(pairs) < _FEW_PAIRS:
        warnings.warn(
            f"Ring-A-Bell's concept vector comes from only {len(pairs)} pair{'s' if len(pairs) != 1 else ''} made from the target's prompts; give "
            "pairs_csv for a steadier one (docs/attacks.md, the Ring-A-Bell prompt pairs)", DarkMinerWarning, stacklevel=2,
        )
    return pairs


@torch.no_grad()
def concept_vector(model: DiffusionModel, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean difference of token states (L, D) between the sensitive and the normal prompts."""
    sensitive = torch.cat([model.encode([s for s, _ in pairs[i : i + _ENCODE_BATCH]]) for i in range(0, len(pairs), _ENCODE_BATCH)])
    normal = torch.cat([model.encode([n for _, n in pairs[i : i + _ENCODE_BATCH]]) for i in range(0, len(pairs), _ENCODE_BATCH)])
    return (sensitive - normal).float().mean(dim=0)


@register_attack("ringabell")
class RingABell(Attack):
    config_class = RingABellConfig

    def check_target(self, target: EraseTarget) -> None:
        if self.config.pairs_csv:
            read_pairs(self.config.pairs_csv)
            return
        with warnings.catch_warnings():  # run() warns about few pairs; here only none of them fails
            warnings.simplefilter("ignore")
            concept_pairs(target)

    def concept_vector(self, model: DiffusionModel, target: EraseTarget) -> torch.Tensor:
        pairs = read_pairs(self.config.pairs_csv) if self.config.pairs_csv else concept_pairs(target)
        return concept_vector(model, pairs)

    def run(
        self,
        model: DiffusionModel,
        target: EraseTarget,
        prompts: Sequence[AttackPrompt],
        success: SuccessFn,
        original: DiffusionModel | None = None,
    ) -> list[AttackResult]:
        self.check_model(model)  # also where run() is called directly: a longer prompt would be cut silently
        started = time.time()
        before = judge_texts(model, prompts, success)
        # Model-agnostic: the search sees only the original's text encoder (the public one an attacker
        # holds), not a text encoder an erasure trained; the erased model only judges what it found.
        with as_original(model, original) as source:
            vector = self.concept_vector(source, target)
            shared = (time.time() - started) / len(prompts)
            # The judging stays whole, in one process's batches.
            searched = search_in_batches(lambda batch: [self.search(source, prompts[i], vector).cpu() for i in batch],
                                         range(len(prompts)), 1)
        found, seconds = zip(*searched, strict=True)
        started = time.time()
        ids = torch.stack(found).to(model.device)
        with torch.no_grad():
            after = judge_conditions(model, model.encode_ids(ids), prompts, success)
        judged = (time.time() - started) / len(prompts)
        return [
            AttackResult(p, model.decode_ids(ids[i : i + 1])[0], before[i], after[i], input_ids=ids[i].tolist(),
                         seconds=shared + seconds[i] + judged, extra={"generations": self.config.generations})
            for i, p in enumerate(prompts)
        ]

    @torch.no_grad()
    def search(self, model: DiffusionModel, prompt: AttackPrompt, vector: torch.Tensor) -> torch.LongTensor:
        """The genetic search for one prompt: the best full token sequence (L,)."""
        cfg: RingABellConfig = self.config  # type: ignore[assignment]
        goal = model.encode([prompt.text])[0].float() + cfg.eta * vector
        vocabulary = allowed_token_ids(model).cpu().numpy()
        rng = np.random.default_rng([cfg.seed, prompt.seed])
        population = vocabulary[rng.integers(len(vocabulary), size=(cfg.population, cfg.prompt_length))]
        known: dict[bytes, float] = {}  # survivors that were not mutated keep their distance
        for generation in range(cfg.generations):
            fitness = self._distance(model, population, goal, known)
            population = population[np.argsort(fitness, kind="stable")][: max(cfg.population // 2, 1)]
            if generation < cfg.generations - 1:
                population = self._mutate(self._crossover(population, rng), vocabulary, rng)
        return self._sequences(model, population[:1])[0]

    def check_model(self, model: DiffusionModel) -> None:
        check_token_room(model, self.config.prompt_length, "searched tokens (RingABellConfig.prompt_length)")

    @staticmethod
    def _sequences(model: DiffusionModel, population: np.ndarray) -> torch.LongTensor:
        return build_slotted(model, population.tolist()).input_ids

    def _distance(
        self, model: DiffusionModel, population: np.ndarray, goal: torch.Tensor, known: dict[bytes, float]
    ) -> np.ndarray:
        """Squared distance of each individual's states to the goal; only new individuals are encoded."""
        keys = [individual.tobytes() for individual in population]
        new = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
        if new:
            ids = self._sequences(model, population[new])
            states = torch.cat([model.encode_ids(ids[i : i + _ENCODE_BATCH]) for i in range(0, len(ids), _ENCODE_BATCH)])
            distances = ((states.float() - goal) ** 2).sum(dim=(1, 2)).tolist()
            known.update({keys[i]: d for i, d in zip(new, distances, strict=True)})
        fitness = np.array([known[k] for k in keys])
        known.clear()  # only this generation can survive into the next
        known.update(zip(keys, fitness.tolist(), strict=True))
        return fitness

    def _crossover(self, parents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        children = []
        for parent in parents:
            children.append(parent)
            if rng.random() < self.config.crossover_rate:
                mate = parents[rng.integers(len(parents))]
                point = rng.integers(parents.shape[1])  # the authors' cut, in content positions
                children.append(np.concatenate([parent[:point], mate[point:]]))
                children.append(np.concatenate([mate[:point], parent[point:]]))
        return np.stack(children)

    def _mutate(self, population: np.ndarray, vocabulary: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        population = population.copy()
        for individual in population:
            if rng.random() < self.config.mutation_rate:
                individual[rng.integers(population.shape[1])] = vocabulary[rng.integers(len(vocabulary))]
        return population
