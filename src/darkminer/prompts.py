"""Prompt sets from CSV files, in the format the field shares (I2P, UnlearnDiffAtk, Ring-A-Bell)."""

from __future__ import annotations

import csv
import io
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
    rows = []
    for index, row in enumerate(reader):
        text = (row.get("prompt") or "").strip()
        if not text:
            continue
        try:
            seed = int(float(row["evaluation_seed"])) if row.get("evaluation_seed") else default_seed + index
            guidance = float(row["evaluation_guidance"]) if row.get("evaluation_guidance") else None
        except ValueError as exc:
            raise DarkMinerError(f"{path}, row {index + 2}: {exc}") from None
        rows.append(PromptRow(text, seed, guidance))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DarkMinerError(f"{path} holds no prompts")
    return rows
