"""The benchmark's tables and report: ``results.md`` and a self-contained ``report.html``; the same for
evaluations run on their own (``compare_evaluations``: models erased by other tools, side by side).

Rows are methods, columns concept x condition, then each erase's time; the best eraser in each column is bold
(the original model is the reference row and never competes; where every eraser ties, none is). The HTML
inlines everything -- image grids and matplotlib plots as base64 PNG -- so the one file can be mailed or
archived.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkminer.errors import DarkMinerError
from darkminer.evaluation.evaluate import (
    GRADER_OPTIONS,
    METRICS_KEYS,
    METRICS_NAME,
    ORIGINAL_METHOD,
    PRESERVATION,
    resolved_options,
)
from darkminer.io import changed_keys, exclusive_output, output_directory, read_record, write_json, write_text
from darkminer.models import model_id

MISSING = "–"
ERASURE_GROUP, ATTACK_GROUP, PRESERVATION_GROUP, COST_GROUP = "erasure", "attack success", "preservation", "cost"
ERASE_SECONDS = "erase_seconds"  # a cell's own number beside its metrics (results.json's cells)


@dataclass(frozen=True)
class Condition:
    """One column of a concept: how to read it from metrics.json, which way is better, how to print it."""

    key: str
    label: str
    group: str  # erasure | attack success | preservation | cost
    read: Callable[[dict], float | None]
    lower_is_better: bool
    percent: bool = True
    digits: int = 1

    @property
    def heading(self) -> str:
        """The label with its group where names clash (the ``plain`` attack vs the ``plain`` prompt set)."""
        return f"ASR {self.label}" if self.group == ATTACK_GROUP else self.label

    def format(self, value: float | None) -> str:
        if value is None:
            return MISSING
        return f"{100 * value:.{self.digits}f}" if self.percent else f"{value:.{self.digits}f}"


def conditions(attacks: Sequence[str]) -> list[Condition]:
    """Columns of one concept: erasure (plain, paraphrase), each attack, preservation, then the erase time."""
    columns = [
        Condition(name, name, ERASURE_GROUP, lambda m, name=name: m["erasure"].get(name), lower_is_better=True)
        for name in ("plain", "paraphrase")
    ]
    columns += [
        Condition(f"attack-{name}", name, ATTACK_GROUP, lambda m, name=name: m["attacks"].get(name), lower_is_better=True)
        for name in attacks
    ]
    kept = PRESERVATION_GROUP
    columns += [
        Condition("accuracy", "acc", kept, lambda m: m["preservation"].get("accuracy"), lower_is_better=False),
        Condition("clip", "clip", kept, lambda m: m["preservation"].get("clip"), lower_is_better=False, percent=False),
        Condition("fid", "fid", kept, lambda m: m["preservation"].get("fid"), lower_is_better=True, percent=False, digits=3),
        Condition(ERASE_SECONDS, "erase s", COST_GROUP, lambda m: m.get(ERASE_SECONDS), lower_is_better=True,
                  percent=False, digits=0),
    ]
    return columns


def _numbers(cell: dict) -> dict:
    """What the conditions read from a cell: its metrics, and its erase time beside them."""
    return {**cell["metrics"], ERASE_SECONDS: cell.get(ERASE_SECONDS)}


def _cells_by_key(results: dict) -> dict[tuple[str, str], dict]:
    return {(c["method"], c["concept"]): _numbers(c) for c in results["cells"]}


def best_methods(results: dict, concept: str, condition: Condition) -> set[str]:
    """Erasers (not the original) with the best value of ``condition`` for ``concept``; ties share it. Empty
    where fewer than two erasers have a value, or all have the same (every attack at 100%: none is better)."""
    cells = _cells_by_key(results)
    values = {
        method: condition.read(cells[(method, concept)])
        for method in results["methods"]
        if method != ORIGINAL_METHOD and (method, concept) in cells
    }
    # As printed: two erase times of 12.3 and 12.4 s both read "12", and both are the best
    values = {m: round(v * (100 if condition.percent else 1), condition.digits) for m, v in values.items() if v is not None}
    if len(values) < 2 or len(set(values.values())) == 1:  # best of one, or of equals, is no comparison
        return set()
    best = min(values.values()) if condition.lower_is_better else max(values.values())
    return {m for m, v in values.items() if v == best}


def _present_conditions(results: dict, concept: str) -> list[Condition]:
    """The concept's conditions that at least one method has a value for (SD has no accuracy, ...)."""
    cells = [_numbers(c) for c in results["cells"] if c["concept"] == concept]
    return [c for c in conditions(results["attacks"]) if any(c.read(m) is not None for m in cells)]


def _table(results: dict) -> tuple[list[tuple[str, Condition]], list[tuple[str, list[tuple[str, bool]]]]]:
    """Columns (concept, condition) and rows (method, [(text, is_best)])."""
    cells = _cells_by_key(results)
    columns = [(concept, c) for concept in results["concepts"] for c in _present_conditions(results, concept)]
    best = {(concept, c.key): best_methods(results, concept, c) for concept, c in columns}
    rows = []
    for method in results["methods"]:
        row = []
        for concept, condition in columns:
            metrics = cells.get((method, concept))
            text = condition.format(condition.read(metrics)) if metrics else MISSING
            row.append((text, method in best[(concept, condition.key)]))
        rows.append((method, row))
    return columns, rows


_EXPLAINED = {  # what each kind of column is, for the legend under the table
    ERASURE_GROUP: "plain, paraphrase: % of images in which the detector sees the concept (lower is better)",
    ATTACK_GROUP: "ASR columns: % of attacked prompts broken, before or after the attack, as UnlearnDiffAtk counts "
                  "(lower is better)",
    "accuracy": "acc: % of asked-for attributes shown on preservation prompts",
    "clip": "clip: image-text alignment 100*max(cos,0) on preservation prompts ({aligner})",
    "fid": "fid: FID of preservation images against {fid_reference} (lower is better)",
    COST_GROUP: "erase s: seconds the erase took, on this run's machine (– where unknown: a resumed or deleted erase)",
}


def legend(results: dict) -> str:
    """What the table's columns are, those it shows only."""
    columns, _ = _table(results)
    present = {c.group if c.group != PRESERVATION_GROUP else c.key for _, c in columns}
    aligner = "the testbed's image and text encoders" if model_id(results["model"]) == "testbed" else "CLIP"
    folder = results.get("config", {}).get("evaluation", {}).get("fid_reference")
    fid_reference = f"the reference images in {folder}" if folder else "the original model's images of the same prompts"
    parts = [text.format(aligner=aligner, fid_reference=fid_reference) for kind, text in _EXPLAINED.items() if kind in present]
    return ". ".join(parts + ["Bold: best eraser per column where two or more are compared and not all tie; the "
                              "original model is the reference row."])


def render_markdown(results: dict) -> str:
    columns, rows = _table(results)
    header = ["method"] + [f"{concept} · {c.heading}" for concept, c in columns]
    lines = [
        f"# {_title(results)} ({results['model']})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method, row in rows:
        label = f"*{method}*" if method == ORIGINAL_METHOD else method
        lines.append("| " + " | ".join([label] + [f"**{t}**" if b else t for t, b in row]) + " |")
    return "\n".join(lines + ["", legend(results), "", SAMPLE_SIZES.format(counts="`counts`"), "", *(f"- {line}" for line in _sample_sizes(results)), ""])


SAMPLE_SIZES = "Sample sizes (95% Wilson intervals of every rate: each cell's metrics.json, {counts}):"


def _concept_metrics(results: dict) -> dict[str, list[dict]]:
    """Each concept's cells' metrics. Every row of a concept is graded alike (the benchmark draws the same
    sets with one detector; a report of evaluations refuses rows that are not), but rows may differ in
    which attacks and preservation metrics ran."""
    found: dict[str, list[dict]] = {}
    for cell in results["cells"]:
        found.setdefault(cell["concept"], []).append(cell["metrics"])
    return {concept: found[concept] for concept in results["concepts"] if concept in found}


def _sample_sizes(results: dict) -> list[str]:
    """What each rate is out of and who judged it, per concept (every method draws the same sets): a rate over
    4 prompts and one over 128 images read the same in the table."""
    lines = []
    for concept, rows in _concept_metrics(results).items():
        suites: dict[str, int] = {}  # each set once: a row without preservation has no such set
        for metrics in rows:
            for name, n in metrics.get("suites", {}).items():
                suites.setdefault(name, n)
        sets = ", ".join(f"{name} {n}" for name, n in suites.items())
        prompts = sorted({d["n_prompts"] for metrics in rows for d in metrics.get("attack_details", {}).values()})
        attacked = f"; attacks on {', '.join(map(str, prompts))} prompt{'s' if prompts != [1] else ''}" if prompts else ""
        detector = rows[0].get("detector", {}).get("name")
        lines.append(f"{concept}: images per set: {sets}{attacked}{f'; detector {detector}' if detector else ''}")
    return lines


# ------------------------------------------------------------------------------------------------- HTML
def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def attack_plot(results: dict) -> bytes:
    """Grouped bars per concept: for each method, the concept rate under plain, paraphrase and each attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts, methods = results["concepts"], results["methods"]
    columns = [c for c in conditions(results["attacks"]) if c.group in (ERASURE_GROUP, ATTACK_GROUP)]
    cells = _cells_by_key(results)
    fig, axes = plt.subplots(1, len(concepts), figsize=(max(5.0, 1.2 * len(methods)) * len(concepts), 3.6), squeeze=False)
    width = 0.8 / len(columns)
    for ax, concept in zip(axes[0], concepts, strict=True):
        for j, condition in enumerate(columns):
            read = [condition.read(cells[(m, concept)]) if (m, concept) in cells else None for m in methods]
            bars = ax.bar([i + (j - (len(columns) - 1) / 2) * width for i in range(len(methods))],
                          [100 * (value or 0) for value in read], width, label=condition.heading)
            # a bar of height 0 is invisible: say 0 (or that there is no value) where it would stand
            ax.bar_label(bars, labels=["0" if value == 0 else MISSING if value is None else "" for value in read],
                         fontsize=6, padding=1)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("% with concept (images; attacks: prompts)")
        ax.set_title(concept)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px 32px;color:#1d2330;max-width:1400px}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #dde;padding-bottom:4px}
.lead{color:#556;margin:0 0 16px}.legend{color:#556;font-size:13px;max-width:1000px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #dde;padding:4px 8px;text-align:right}
th{background:#f3f4f8;text-align:center}td.method,th.method{text-align:left;font-weight:600}
tr.reference td{color:#667;font-style:italic}td b{color:#0a5}
.grid td{text-align:center;vertical-align:top}.grid img{image-rendering:pixelated;width:152px}
.wide{overflow-x:auto}pre{background:#f6f7f9;padding:8px;font-size:12px;overflow-x:auto}
"""


def _spans(keys: Sequence[Any]) -> str:
    """Header cells spanning runs of equal keys (a key is a concept or a (concept, group) pair)."""
    cells, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            text = keys[start][-1] if isinstance(keys[start], tuple) else keys[start]
            cells.append(f'<th colspan="{i - start}">{html.escape(text)}</th>')
            start = i
    return "".join(cells)


def _results_table_html(results: dict) -> str:
    columns, rows = _table(results)
    head1 = '<tr><th class="method" rowspan="3">method</th>' + _spans([concept for concept, _ in columns]) + "</tr>"
    head2 = "<tr>" + _spans([(concept, c.group) for concept, c in columns]) + "</tr>"
    head3 = "<tr>" + "".join(f"<th>{html.escape(c.label)}</th>" for _, c in columns) + "</tr>"
    body = []
    for method, row in rows:
        cls = ' class="reference"' if method == ORIGINAL_METHOD else ""
        cells = "".join(f"<td>{'<b>' + t + '</b>' if b else t}</td>" for t, b in row)
        body.append(f'<tr{cls}><td class="method">{html.escape(method)}</td>{cells}</tr>')
    return f'<div class="wide"><table>{head1}{head2}{head3}{"".join(body)}</table></div>'


def _image_grid_html(results: dict, root: Path, concept: str) -> str:
    """Rows methods, columns conditions: the grids each evaluation saved, inlined."""
    cells = {(c["method"], c["concept"]): c for c in results["cells"] if c["concept"] == concept}
    candidates = ["plain", "paraphrase"] + [f"attack-{a}" for a in results["attacks"]] + [PRESERVATION]
    # Columns no method has images for (SD without a paraphrase CSV) are left out.
    names = [n for n in candidates if any(n in c["metrics"].get("images", {}) for c in cells.values())]
    head = '<tr><th class="method">method</th>' + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    rows = []
    for method in results["methods"]:
        cell = cells.get((method, concept))
        tds = []
        for name in names:
            path = root / cell["evaluation"] / "images" / f"{name}.png" if cell else None
            if path is not None and path.is_file():
                tds.append(f'<td><img alt="{html.escape(method)} {html.escape(name)}" src="{_png_data_uri(path.read_bytes())}"></td>')
            else:
                tds.append(f"<td>{MISSING}</td>")
        rows.append(f'<tr><td class="method">{html.escape(method)}</td>{"".join(tds)}</tr>')
    return f'<div class="wide"><table class="grid">{head}{"".join(rows)}</table></div>'


def render_html(results: dict, root: Path) -> str:
    """The report; ``root`` is the folder the cells' evaluation folders (and their image grids) are relative to."""
    def described(key: str) -> Any:  # the CLIP-score and FID networks, as the first row that used them says
        return next((c["metrics"][key] for c in results["cells"] if c["metrics"].get(key)), None)

    erasers = [m for m in results["methods"] if m != ORIGINAL_METHOD]
    lead = (
        f"model <b>{html.escape(results['model'])}</b> · erasers: {html.escape(', '.join(erasers))} · "
        f"concepts: {html.escape(', '.join(results['concepts']))} · attacks: "
        f"{html.escape(', '.join(results['attacks']) or 'none')} · created {html.escape(results['created'])}"
    )
    sizes = "".join(f"<li>{html.escape(line)}</li>" for line in _sample_sizes(results))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_title(results)} — {html.escape(results['model'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_title(results)}</h1>",
        f"<p class='lead'>{lead}</p>",
        "<h2>Results</h2>",
        _results_table_html(results),
        f"<p class='legend'>{html.escape(legend(results))}</p>",
    ]
    if sizes:
        parts.append(f"<p class='legend'>{SAMPLE_SIZES.format(counts='<code>counts</code>')}</p><ul class='legend'>{sizes}</ul>")
    if results["cells"]:
        parts += ["<h2>Concept rate under each attack</h2>",
                  f"<div class='wide'><img alt='attack success per method' src='{_png_data_uri(attack_plot(results))}'></div>"]
    parts.append("<h2>Images</h2><p class='legend'>Rows: methods; columns: prompt sets and attacks. "
                 "Each grid shows the first images of its set, drawn with the same seeds for every method; a red "
                 "frame marks an image the detector saw the concept in.</p>")
    for concept in results["concepts"]:
        parts += [f"<h3>{html.escape(concept)}</h3>", _image_grid_html(results, root, concept)]
    # The detector is chosen per concept (NudeNet for nudity, CLIP for a style); the other graders per run.
    setup = {"config": results["config"], "versions": results["versions"],
             "detectors": {concept: rows[0].get("detector") for concept, rows in _concept_metrics(results).items()},
             "alignment": described("alignment"), "fid_features": described("fid_features")}
    parts += ["<h2>Setup</h2>", f"<pre>{html.escape(json.dumps(setup, indent=2))}</pre>", "</body></html>"]
    return "\n".join(parts)


def cell_summary(results: dict) -> list[dict[str, Any]]:
    """One flat record per (method, concept): the headline numbers, for scripts that read results.json. Not the
    erase time, which is each cell's own ``erase_seconds``: the same run on another machine has the same table."""
    columns = [col for col in conditions(results["attacks"]) if col.group != COST_GROUP]
    return [
        {"method": c["method"], "concept": c["concept"], **{col.key: col.read(c["metrics"]) for col in columns}}
        for c in results["cells"]
    ]


def _title(results: dict) -> str:
    return "darkminer evaluations" if EVALUATIONS in results else "darkminer benchmark"


def write_results(folder: Path, results: dict, root: Path) -> None:
    """results.json, results.md and report.html into ``folder`` (``root``: where the cells' folders are)."""
    write_json(folder / "results.json", results)
    write_text(folder / "results.md", render_markdown(results))
    write_text(folder / "report.html", render_html(results, root))


# ------------------------------------------------------------------------------------ evaluations apart
EVALUATIONS = "evaluations"  # results.json's key of a report on evaluations (a benchmark's has none)
REPORT_KIND = "a report of evaluations"
# Options that change no number in a row another has: which attacks and metrics ran (a missing one shows as
# missing), and how images are batched and saved; the grader's options are compared as the detector's own
# description (a default spelled out is the same detector).
_NOT_COMPARED = ("attacks", "attack_configs", "preservation", "save_images", "grid_images", "batch_size", *GRADER_OPTIONS)
_FID_OPTIONS = ("fid_reference", "inception_weights")


@exclusive_output()
def compare_evaluations(folders: Sequence[str | Path | tuple[str, str | Path]], out: str | Path) -> dict[str, Any]:
    """The benchmark's table, plot and image grids for evaluations run apart (``darkminer evaluate --out``
    folders: models erased by other tools, or by darkminer), written into ``out`` as results.json,
    results.md and report.html. ``folders``: each a folder, whose row is named by the folder's name, or a
    ``(row name, folder)`` pair (one row name may stand in several concepts' columns); the unerased model's
    row is the reference row ``original`` either way. Rows of one concept must be graded alike (the same
    options, prompt sets, prompt files and detector; each attack with the same options), or their numbers
    would not compare: anything else is refused, naming it."""
    if isinstance(folders, str | os.PathLike) or not folders:
        raise DarkMinerError("name the evaluation folders to compare, a list (each written by `darkminer evaluate --out`)")
    named = [item if isinstance(item, tuple) else (Path(item).resolve().name, item) for item in folders]
    if bad := [item for item in named if len(item) != 2]:
        raise DarkMinerError(f"a named evaluation is a (row name, folder) pair, got {bad[0]!r}")
    cells = [_evaluation_cell(name, Path(folder)) for name, folder in named]
    seen: dict[tuple[str, str], str] = {}
    for cell in cells:
        key = (cell["method"], cell["concept"])
        if key in seen:
            raise DarkMinerError(f"{seen[key]} and {cell['evaluation']} are both row {key[0]!r} on {key[1]!r}: name "
                                 "the rows (NAME=FOLDER; the original model's is original)")
        seen[key] = cell["evaluation"]
    models = sorted({cell["metrics"]["model"] for cell in cells})
    if len(models) > 1:
        raise DarkMinerError(f"the evaluations are of models with different bases ({', '.join(models)}); compare "
                             "those of one base model")
    for concept in dict.fromkeys(cell["concept"] for cell in cells):
        _check_graded_alike([cell for cell in cells if cell["concept"] == concept])
    methods = sorted(dict.fromkeys(cell["method"] for cell in cells), key=lambda m: m != ORIGINAL_METHOD)
    results = {
        "format": 1,
        "model": models[0],
        "methods": methods,
        "concepts": list(dict.fromkeys(cell["concept"] for cell in cells)),
        "attacks": list(dict.fromkeys(a for cell in cells for a in cell["metrics"]["attacks"])),
        EVALUATIONS: {f"{cell['method']} x {cell['concept']}": cell["evaluation"] for cell in cells},
        "config": {"evaluation": cells[0]["metrics"].get("config", {})},  # graded alike: the first stands for all
        "versions": {f"{cell['method']} x {cell['concept']}": cell["metrics"].get("versions") for cell in cells},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cells": cells,
    }
    results["table"] = cell_summary(results)
    with output_directory(out, "results.json", REPORT_KIND, marker_keys=(EVALUATIONS, "cells")) as tmp:
        write_results(tmp, results, Path.cwd())  # the cells' folders are absolute
    return results


def _evaluation_cell(name: str, folder: Path) -> dict[str, Any]:
    """One evaluation folder as the benchmark cell of row ``name`` (the original model's: ``original``), its
    erase time from the erased model's record, if any."""
    if not isinstance(name, str) or not name.strip():
        raise DarkMinerError(f"a row's name is a non-empty string, got {name!r} (for {folder})")
    metrics = read_record(folder / METRICS_NAME, METRICS_KEYS) if folder.is_dir() else None
    if metrics is None:
        raise DarkMinerError(f"{folder} holds no darkminer {METRICS_NAME}; give folders that `darkminer evaluate "
                             "--out` wrote")
    unerased = metrics.get("method") == ORIGINAL_METHOD
    if name == ORIGINAL_METHOD and not unerased:
        raise DarkMinerError(f"{folder} is an erased model's evaluation: the row name {ORIGINAL_METHOD!r} is the "
                             "unerased model's (the reference row); name it otherwise")
    method = ORIGINAL_METHOD if unerased else name
    erased = (metrics.get("inputs") or {}).get("erased") or {}
    return {"method": method, "concept": metrics["concept"], "evaluation": str(folder.resolve()),
            "erase_seconds": erase_seconds((erased.get("info") or {}).get("extra")), "metrics": metrics}


def erase_seconds(extra: dict[str, Any] | None) -> float | None:
    """An erase's time from its record's ``extra``: none for a resumed erase, which timed only its last part
    (no time is better than a wrong one)."""
    extra = extra or {}
    return None if extra.get("resumed") else extra.get("seconds")


def _check_graded_alike(cells: list[dict[str, Any]]) -> None:
    """Refuse rows of one concept whose numbers were made differently (see ``compare_evaluations``). Every pair:
    what two rows both measured is not what a third measured (two that ran attacks, beside one that ran none)."""
    for i, first in enumerate(cells):
        for cell in cells[i + 1:]:
            _check_pair(first, cell)


def _check_pair(first: dict[str, Any], cell: dict[str, Any]) -> None:
    """Refuse two rows of one concept whose numbers were made differently."""
    ours, theirs = _grading(first["metrics"], cell["metrics"]), _grading(cell["metrics"], first["metrics"])
    differs = changed_keys(ours, theirs)
    done, others = (c["metrics"].get("attack_details", {}) for c in (first, cell))
    differs += [f"{name} options" for name in sorted(done.keys() & others.keys())
                if done[name].get("config") != others[name].get("config")]
    if differs:
        raise DarkMinerError(f"{first['evaluation']} and {cell['evaluation']} graded {cell['concept']!r} "
                             f"differently ({', '.join(differs)}), so their numbers do not compare; evaluate "
                             "them with the same options and prompts")


def _grading(metrics: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics``' numbers depend on, of what ``other`` measured too: options (as they resolve, so that a
    record from an older version compares), prompt sets and files, detector, CLIP-score and FID networks."""
    def config(m: dict[str, Any]) -> dict[str, Any]:
        testbed = model_id(m["model"]) == "testbed"
        return resolved_options(m.get("config") or {}, None if testbed else (m.get("inputs") or {}).get("kind", "free"))

    mine, theirs = config(metrics), config(other)
    both = set(mine["preservation"]) & set(theirs["preservation"])
    skip = {*_NOT_COMPARED, *(() if mine["attacks"] and theirs["attacks"] else ("attack_prompts",)),
            *(() if "fid" in both else _FID_OPTIONS)}
    files = (metrics.get("inputs") or {}).get("prompt_files") or {}
    suites = metrics.get("suites") or {}
    return {"config": {k: v for k, v in mine.items() if k not in skip},
            "suites": {name: n for name, n in suites.items() if name in (other.get("suites") or {})},
            "prompt_files": {name: record.get("sha256") for name, record in files.items()},
            "detector": metrics.get("detector"),
            **({"alignment": metrics.get("alignment")} if "clip" in both else {}),
            **({"fid_features": metrics.get("fid_features")} if "fid" in both else {})}
