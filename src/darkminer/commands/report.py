"""``darkminer report``: evaluations run apart (models erased by other tools) in one table and report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="compare evaluations in one table and report.html",
        description="Put evaluation folders (each written by `darkminer evaluate --out`) side by side, as the "
                    "benchmark does: results.json, results.md and a self-contained report.html. A row is named "
                    "NAME=FOLDER, or by its folder's name (the original model's: original); the rows of a concept "
                    "must have been graded alike (same options, prompts and detector).",
    )
    p.add_argument("evaluations", nargs="+", metavar="[NAME=]FOLDER",
                   help="a folder `darkminer evaluate --out` wrote; its row is NAME, or the folder's name")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from darkminer.evaluation.report import compare_evaluations

    n = len(compare_evaluations([_named(arg) for arg in args.evaluations], args.out)["cells"])
    print(f"wrote {args.out}/results.json, results.md, report.html ({n} evaluation{'s' if n != 1 else ''})")


def _named(arg: str) -> str | tuple[str, str]:
    """NAME=FOLDER as a (row name, folder) pair; a folder alone (a path that holds "=" is a folder)."""
    name, sep, folder = arg.partition("=")
    return (name, str(Path(folder).expanduser())) if sep and not Path(arg).exists() else arg
