"""Prompt sets from CSV files, in the format the field shares (I2P, UnlearnDiffAtk, Ring-A-Bell), and
the text helpers that find and replace a concept's words in a prompt."""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from darkminer.errors import DarkMinerError
from darkminer.io import read_text


@dataclass(frozen=True)
class PromptRow:
    """One row: a prompt, the seed its image is drawn with, and optionally its guidance scale."""

    text: str
    seed: int
    guidance: float | None = None


def read_prompt_csv(path: str | Path, default_seed: int = 0, limit: int | None = None) -> list[PromptRow]:
    """Rows of a CSV with a ``prompt`` column; ``evaluation_seed`` and ``evaluation_guidance`` are optional.

    Rows without a seed get ``default_seed + row index`` so that every image has a recorded seed.
    """
    path = Path(path)
    if not path.is_file():
        raise DarkMinerError(f"prompt file {path} does not exist")
    reader = csv.DictReader(io.StringIO(read_text(path, "prompt file"), newline=""))
    columns = reader.fieldnames or []
    if "prompt" not in columns:
        raise DarkMinerError(f"{path} has no `prompt` column (columns: {columns}); add a header row with `prompt`")
    rows, empty = [], 0
    for index, row in enumerate(reader):
        text = (row.get("prompt") or "").strip()
        if not text:
            empty += 1
            continue
        try:
            seed = _seed(row["evaluation_seed"]) if row.get("evaluation_seed") else default_seed + index
            guidance = _guidance(row["evaluation_guidance"]) if row.get("evaluation_guidance") else None
        except ValueError as exc:
            raise DarkMinerError(f"{path}, row {index + 2}: {exc}; correct that cell or leave it empty") from None
        rows.append(PromptRow(text, seed, guidance))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DarkMinerError(f"{path} holds no prompts")
    if empty:
        warnings.warn(f"{path}: skipped {empty} row(s) with an empty prompt", stacklevel=2)
    return rows


def _seed(value: str) -> int:
    """A seed cell: an integer, also as spreadsheets and pandas write one ("42.0"), in torch's seed range.
    Parsed as an integer first: a float would round seeds above 2**53."""
    try:
        seed = int(value)
    except ValueError:
        number = _number(value, "evaluation_seed")
        if not number.is_integer():
            raise ValueError(f"evaluation_seed {value!r} is not a whole number") from None
        seed = int(number)
    if not 0 <= seed < 2**64:
        raise ValueError(f"evaluation_seed {value!r} is outside 0 .. 2**64 - 1")
    return seed


def _guidance(value: str) -> float:
    scale = _number(value, "evaluation_guidance")
    if not math.isfinite(scale):
        raise ValueError(f"evaluation_guidance {value!r} is not a finite number")
    return scale



def _number(value: str, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{column} {value!r} is not a number") from None


# ------------------------------------------------------------------------------------------ text helpers
def find_phrase(text: str, phrases: Sequence[str]) -> tuple[int, int, str] | None:
    """(start, end, phrase) of the first whole-word occurrence of the longest matching phrase."""
    for phrase in sorted(phrases, key=len, reverse=True):
        match = re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE)
        if match:
            return match.start(), match.end(), phrase
    return None


def split_at_concept(text: str, phrases: Sequence[str]) -> tuple[str, str]:
    """The text before and after the concept phrase; without one, ("", text) -- the place CCE's I2P
    captions put their token: in front of the prompt."""
    found = find_phrase(text, phrases)
    if found is None:
        return "", text
    start, end, _ = found
    return text[:start].strip(), text[end:].strip()


def splice(text: str, start: int, end: int, replacement: str) -> str:
    """``text`` with ``text[start:end]`` replaced, spaces tidied and the article before it agreeing
    ("a injured star" -> "an injured star", "an injured star" minus the phrase -> "a star")."""
    head = text[:start].split()
    tail = f"{replacement} {text[end:]}".split()
    if head and tail and head[-1].lower() in ("a", "an"):
        article = "an" if tail[0][:1].lower() in "aeiou" else "a"
        head[-1] = article.capitalize() if head[-1][0].isupper() else article
    return re.sub(r" ([,.;:!?])", r"\1", " ".join(head + tail))  # "a dog , a cat" -> "a dog, a cat"


def replace_concept(text: str, phrases: Sequence[str], replacement: str, every: bool = False) -> str | None:
    """``text`` with its (first, or ``every``) concept phrase replaced, articles kept agreeing; None when it
    has none."""
    found = find_phrase(text, phrases)
    if found is None:
        return None
    while found is not None:
        start, end, _ = found
        text = splice(text, start, end, replacement)
        # A replacement that holds a phrase itself would be found again: it is replaced once only.
        found = find_phrase(text, phrases) if every and find_phrase(replacement, phrases) is None else None
    return text
