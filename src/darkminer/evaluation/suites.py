"""Prompt suites: which images an evaluation draws, one per prompt with its own seed.

Three suites per concept: ``plain`` (prompts that ask for the concept in its own words), ``paraphrase``
(words never seen while erasing) and ``preservation`` (ordinary prompts whose images must not change).
On the testbed they come from the concept registry, with the labels a faithful image has; on Stable
Diffusion from the user's CSV files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from darkminer.errors import DarkMinerError
from darkminer.prompts import read_prompt_csv
from darkminer.targets import DEFAULT_SD_PRESERVE, TESTBED_CSV_ERROR, EraseTarget

if TYPE_CHECKING:
    from darkminer.testbed.concepts import Concept

GENERATED_SUITE_SIZE = 32  # images per suite when neither a count nor a CSV says otherwise
PRESERVATION = "preservation"


@dataclass(frozen=True)
class SuitePrompt:
    text: str
    seed: int
    guidance: float | None = None  # None: the model's default scale
    expected: Mapping[str, str] = field(default_factory=dict)  # testbed labels of a faithful image


@dataclass(frozen=True)
class Suite:
    name: str
    prompts: tuple[SuitePrompt, ...]

    def __post_init__(self) -> None:
        if not self.prompts:
            raise DarkMinerError(f"prompt suite {self.name!r} is empty; give at least one prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]


def testbed_suites(concept: Concept, n: int, seed: int = 0) -> dict[str, Suite]:
    """The registry's direct, paraphrase and preservation prompt sets of a testbed ``Concept``."""
    sets = {
        "plain": concept.direct_prompts(n, seed),
        "paraphrase": concept.paraphrase_prompts(n, seed),
        PRESERVATION: concept.preservation_prompts(n, seed),
    }
    return {
        name: Suite(name, tuple(SuitePrompt(p.text, p.seed, expected=dict(p.expected)) for p in prompts))
        for name, prompts in sets.items()
    }


def csv_suite(name: str, path: str | Path, limit: int | None = None, default_seed: int = 0) -> Suite:
    """One prompt per CSV row, with the row's ``evaluation_seed`` and ``evaluation_guidance`` when given."""
    rows = read_prompt_csv(path, default_seed=default_seed, limit=limit)
    return Suite(name, tuple(SuitePrompt(r.text, r.seed, r.guidance) for r in rows))


def repeated_suite(name: str, texts: Sequence[str], n: int, seed: int = 0) -> Suite:
    """``n`` prompts cycling through ``texts``, prompt ``i`` drawn with seed ``seed + i``."""
    if not texts:
        raise DarkMinerError(f"no prompts for suite {name!r}")
    return Suite(name, tuple(SuitePrompt(texts[i % len(texts)], seed + i) for i in range(n)))


def prompt_suites(
    target: EraseTarget,
    n: int | None,
    seed: int = 0,
    prompts_csv: str | Path | None = None,
    paraphrase_csv: str | Path | None = None,
    preserve_csv: str | Path | None = None,
) -> dict[str, Suite]:
    """The prompt sets of ``target``; ``evaluate`` grades them all, ``attack`` attacks ``plain``.

    Testbed: the registry's direct, paraphrase and preservation prompts. A free-text concept (Stable
    Diffusion): CSVs when given (their first ``n`` rows; every row when ``n`` is None), else ``n`` (default
    32) images of the concept's own word for ``plain`` and of a few everyday prompts for ``preservation``;
    ``paraphrase`` only from a CSV."""
    generated = n or GENERATED_SUITE_SIZE
    if target.testbed_concept is not None:
        if prompts_csv or paraphrase_csv or preserve_csv:
            raise DarkMinerError(TESTBED_CSV_ERROR)
        return testbed_suites(target.testbed_concept, generated, seed)
    suites = {
        "plain": csv_suite("plain", prompts_csv, n, seed) if prompts_csv
        else repeated_suite("plain", [target.word], generated, seed),
        PRESERVATION: (
            csv_suite(PRESERVATION, preserve_csv, n, seed) if preserve_csv
            else repeated_suite(PRESERVATION, DEFAULT_SD_PRESERVE, generated, seed)
        ),
    }
    if paraphrase_csv:
        suites["paraphrase"] = csv_suite("paraphrase", paraphrase_csv, n, seed)
    return suites
