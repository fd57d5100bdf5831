"""``darkminer benchmark``: methods x concepts x attacks into results.json, results.md and report.html."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="run methods x concepts x attacks and write the report",
        description="Erase every concept with every method, evaluate each under every attack, and write "
                    "results.json, results.md and a self-contained report.html. Rerunning with the same --out "
                    "resumes: finished cells are not computed again.",
    )
    p.add_argument("--config", required=True, help="a preset (demo, quick, full) or a JSON/YAML benchmark config file")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from darkminer.evaluation import run_benchmark

    results = run_benchmark(args.config, args.out)
    print(f"wrote {args.out}/results.json, results.md, report.html ({len(results['cells'])} cell{'s' if len(results['cells']) != 1 else ''})")
