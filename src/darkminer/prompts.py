"""Prompt sets from CSV files, in the format the field shares (I2P, UnlearnDiffAtk, Ring-A-Bell); row
conditions that cut a subset out of such a file (``darkminer prompts``); and the text helpers that find and
replace a concept's words in a prompt."""

from __future__ import annotations

import csv
import io
import math
import operator
import os
import re
import statistics
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from darkminer.config import PROMPT_SEED_LIMIT
from darkminer.errors import DarkMinerError, DarkMinerWarning
from darkminer.io import atomic_path, check_output_file, read_text


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
    table = read_csv_table(path)
    path = table.path
    if "prompt" not in table.columns:
        raise DarkMinerError(f"{path} has no `prompt` column (columns: {table.columns}); add a header row with `prompt`")
    rows, empty = [], 0
    for index, row in enumerate(record.cells for record in table.records):
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
        warnings.warn(f"{path}: skipped {empty} row(s) with an empty prompt", DarkMinerWarning, stacklevel=2)
    return rows


def _seed(value: str) -> int:
    """A seed cell: an integer, also as spreadsheets and pandas write one ("42.0"), in torch's seed range."""
    number = _number(value, "evaluation_seed")
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(f"evaluation_seed {value!r} is not a whole number")
    seed = int(number)
    if not 0 <= seed < PROMPT_SEED_LIMIT:
        raise ValueError(f"evaluation_seed {value!r} is outside 0 .. 2**64 - 1")
    return seed


def _guidance(value: str) -> float:
    try:
        scale = float(_number(value, "evaluation_guidance"))  # "7" is 7.0, as the records had it
    except OverflowError:  # a whole number of hundreds of digits
        raise ValueError(f"evaluation_guidance {value!r} is not a finite number") from None
    if not math.isfinite(scale):
        raise ValueError(f"evaluation_guidance {value!r} is not a finite number")
    if scale <= 0:  # as --guidance is refused: at 0 the image ignores its prompt, below 0 it steers away from it
        raise ValueError(f"evaluation_guidance {value!r} is not above 0")
    return scale


def _number(value: str, column: str) -> int | float:
    """A cell of a number column, read as the filters read it ("7_5" is no number, not 75)."""
    number = _as_number(value)
    if number is None:
        raise ValueError(f"{column} {value!r} is not a number")
    return number


# ------------------------------------------------------------------------------------- filtering rows
@dataclass(frozen=True)
class RowCondition:
    """One test on one column of a CSV row, written ``COLUMN OP VALUE``:

    - ``categories~sexual``: the cell, a comma-separated list, holds the item (trimmed, any case);
    - ``hard=1`` / ``hard!=1``: the cell equals the value, as numbers where both are numbers ("1.0" = "1"),
      else as text (trimmed, case kept); ``!=`` keeps exactly the rows ``=`` drops, empty cells included;
    - ``nudity_percentage>=50`` (also ``>``, ``<=``, ``<``): a numeric comparison; a cell that is empty or
      not a number does not match.
    """

    column: str
    operator: str
    value: str

    OPERATORS: ClassVar[tuple[str, ...]] = ("~", "!=", ">=", "<=", "=", ">", "<")  # two-character ones first
    NUMERIC: ClassVar[frozenset[str]] = frozenset((">=", "<=", ">", "<"))
    FORMS: ClassVar[str] = ("COLUMN~ITEM (list cell holds ITEM), COLUMN=VALUE, COLUMN!=VALUE, "
                            "COLUMN>=NUMBER, COLUMN>NUMBER, COLUMN<=NUMBER, COLUMN<NUMBER")

    def __post_init__(self) -> None:
        if self.operator not in self.OPERATORS:
            raise DarkMinerError(f"unknown operator {self.operator!r} in a row condition; accepted forms: {self.FORMS}")
        if not self.column.strip():
            raise DarkMinerError(f"row condition {self} names no column; accepted forms: {self.FORMS}")
        if self.operator in self.NUMERIC and _as_number(self.value) is None:
            raise DarkMinerError(f"row condition {self} compares with {self.value!r}, which is not a number; "
                                 f"accepted forms: {self.FORMS}")
        if self.operator == "~" and not self.value.strip():
            raise DarkMinerError(f"row condition {self} names no item; accepted forms: {self.FORMS}")

    @classmethod
    def parse(cls, text: str) -> RowCondition:
        """``text`` such as ``categories~sexual`` or ``nudity_percentage>=50`` as a condition."""
        operators = "|".join(re.escape(op) for op in cls.OPERATORS)
        match = re.fullmatch(rf"\s*([^~=!<>]+?)\s*({operators})\s*(.*?)\s*", text, flags=re.DOTALL)
        # "hard==1" or "a=>5" would otherwise compare with the text "=1" or ">5": a typo, not a wish
        if match is None or match.group(3)[:1] in ("~", "=", "!", "<", ">"):
            # an unquoted `--where col>=50` reaches us as "col": the shell took ">=50" as a redirection
            hint = ("" if re.search(r"[~=!<>]", text) else
                    "; in a shell, quote a condition with > or <, e.g. --where 'nudity_percentage>=50'")
            raise DarkMinerError(f"cannot read the row condition {text!r}; accepted forms: {cls.FORMS}{hint}")
        return cls(*match.groups())

    def __str__(self) -> str:
        return f"{self.column}{self.operator}{self.value}"

    def matches(self, cell: str | None) -> bool:
        """Whether a cell (None: the row is too short to have one) passes."""
        cell = (cell or "").strip()
        value = self.value.strip()
        if self.operator == "~":
            return value.casefold() in {item.strip().casefold() for item in cell.split(",")}
        if self.operator in ("=", "!="):
            cell_number, value_number = _as_number(cell), _as_number(value)
            if cell_number is not None and value_number is not None:
                equal = cell_number == value_number
            else:
                equal = cell == value
            return equal if self.operator == "=" else not equal
        number, bound = _as_number(cell), _as_number(value)
        if number is None or bound is None:
            return False
        return _COMPARISONS[self.operator](number, bound)


_COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def _as_number(text: str) -> int | float | None:
    """A cell as a number, None if it is not one (or NaN). Integers stay integers: seeds reach 2**64,
    beyond what a float holds exactly."""
    if "_" in text:  # Python reads "1_0" as 10; a CSV cell does not mean that
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class CsvRecord:
    """One data row of a CSV: its cells by column, and its text in the file, line ending included."""

    cells: dict[str, str | None]
    text: str


@dataclass(frozen=True)
class CsvTable:
    path: Path
    columns: list[str]
    header_text: str
    records: list[CsvRecord]

    def require_column(self, column: str) -> None:
        if column not in self.columns:
            raise DarkMinerError(f"{self.path} has no column {column!r} (columns: {', '.join(self.columns)})")


def read_csv_table(path: str | Path, what: str = "prompt file") -> CsvTable:
    """A CSV's header and rows, each row with the exact text it has in the file, so that a subset can be
    written back without re-quoting anything. Read as ``read_prompt_csv`` reads (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DarkMinerError(f"{what} {path} {'is a folder; give a CSV file' if path.is_dir() else 'does not exist'}")
    lines = io.StringIO(read_text(path, what, newline=""), newline="")  # "\r\n" kept
    consumed: list[str] = []

    def feed() -> Iterator[str]:
        for line in lines:
            consumed.append(line)
            yield line

    header: list[str] | None = None
    header_text = ""
    records: list[CsvRecord] = []
    # One line at a time: what it has consumed is the record's text. Strict: an unclosed quote is an error,
    # not a cell that swallows every row after it.
    reader = csv.reader(feed(), strict=True)
    try:
        for row in reader:
            text = "".join(consumed)
            consumed.clear()
            if not row:
                continue
            if header is None:
                # unnamed columns (a spreadsheet's trailing commas) are never read, so they may repeat
                if doubled := sorted({name for name in row if name.strip() and row.count(name) > 1}):
                    raise DarkMinerError(f"{path}: the header names {', '.join(map(repr, doubled))} more than once; "
                                         "give each column its own name")
                header, header_text = row, text
            else:
                padded = row + [None] * (len(header) - len(row))  # a short row: missing cells, as DictReader
                records.append(CsvRecord(dict(zip(header, padded, strict=False)), text))
    except csv.Error as exc:
        raise DarkMinerError(f"{path}, line {reader.line_num}: not readable as CSV ({exc})") from None
    if header is None:
        raise DarkMinerError(f"{path} is empty; a prompt CSV starts with a header row")
    return CsvTable(path, header, header_text, records)


def parse_conditions(conditions: Sequence[RowCondition | str]) -> list[RowCondition]:
    return [c if isinstance(c, RowCondition) else RowCondition.parse(c) for c in conditions]


@dataclass(frozen=True)
class FilterResult:
    kept: int
    total: int
    out: Path


def filter_prompt_csv(source: str | Path, out: str | Path, conditions: Sequence[RowCondition | str]) -> FilterResult:
    """Write the rows of ``source`` that pass every condition to ``out`` (atomically): all columns, the
    header and each row exactly as in ``source``, in its order. Refuses an unknown column, a condition it
    cannot read, an ``out`` that is ``source``, and a selection with no row."""
    parsed = parse_conditions(conditions)
    source, out = Path(source), check_output_file(out)
    if out.exists() and source.exists() and os.path.samefile(source, out):
        raise DarkMinerError(f"--out {out} is the input file; name another file (the input is never overwritten)")
    table = read_csv_table(source)
    for condition in parsed:
        table.require_column(condition.column)
    kept = [r for r in table.records if all(c.matches(r.cells.get(c.column)) for c in parsed)]
    if not kept:
        where = " and ".join(str(c) for c in parsed)
        raise DarkMinerError(f"no row of {source} ({len(table.records)} rows) has {where}; nothing written")
    with atomic_path(out) as tmp:  # newline="": the rows keep their own line endings, on every platform
        tmp.write_text(table.header_text + "".join(r.text for r in kept), encoding="utf-8", newline="")
    return FilterResult(len(kept), len(table.records), out)


@dataclass(frozen=True)
class ColumnSummary:
    """One column over all rows: ``numbers`` (min, median, max) when every non-empty cell is a number,
    else ``items``, the rows holding each comma-separated item, most frequent first."""

    column: str
    empty: int
    numbers: tuple[int | float, int | float, int | float] | None = None
    items: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class CsvSummary:
    path: Path
    rows: int
    columns: list[str]
    column: ColumnSummary | None


def summarize_prompt_csv(path: str | Path, column: str | None = None) -> CsvSummary:
    """A CSV's row count and columns, and a summary of ``column`` (default: ``categories`` if present)."""
    table = read_csv_table(path)
    if column is None:
        column = "categories" if "categories" in table.columns else None
    if column is not None:
        table.require_column(column)
    summary = _summarize_column(column, [r.cells.get(column) for r in table.records]) if column else None
    return CsvSummary(table.path, len(table.records), table.columns, summary)


def _summarize_column(column: str, cells: list[str | None]) -> ColumnSummary:
    filled = [cell.strip() for cell in cells if cell and cell.strip()]
    empty = len(cells) - len(filled)
    numbers = [_as_number(cell) for cell in filled]
    if filled and all(n is not None for n in numbers):
        return ColumnSummary(column, empty, numbers=(min(numbers), statistics.median(numbers), max(numbers)))
    # items are counted once per row and without case, as a ``COLUMN~ITEM`` condition matches them
    counts: Counter[str] = Counter()
    first_spelling: dict[str, str] = {}
    for cell in filled:
        row_items = {item.strip().casefold(): item.strip() for item in cell.split(",") if item.strip()}
        for key, spelled in row_items.items():
            first_spelling.setdefault(key, spelled)
        counts.update(row_items.keys())
    ordered = sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))
    return ColumnSummary(column, empty, items=tuple((first_spelling[key], n) for key, n in ordered))


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
