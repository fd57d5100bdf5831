"""``darkminer demo``: the main job on the embedded testbed, end to end.

Erase a concept with Dark Miner and with ESD-x, attack both with every attack, evaluate, and write the
report; then print where it is and the table.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="erase + attack + evaluate on the embedded testbed, with a report",
                       description="Erase a testbed concept with Dark Miner and ESD-x, attack both with all attacks, "
                                   "evaluate, and write results.md and report.html (resumable: rerun to continue). It took "
                                   "9-20 minutes on a 2-core CPU (docs/BENCHMARKS.md); on a shared machine, "
                                   "`darkminer --threads N demo` sets the threads it uses.")
    p.add_argument("--concept", default="blood", help="a testbed concept (default: blood); see `darkminer testbed concepts`")
    p.add_argument("--out", default="darkminer-demo", help="output directory (default: ./darkminer-demo)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import copy
    import time
    from pathlib import Path

    from darkminer.evaluation.benchmark import PRESETS, load_benchmark_config, run_benchmark
    from darkminer.testbed.concepts import get_concept

    get_concept(args.concept)  # an unknown name fails here, listing the known ones
    preset = copy.deepcopy(PRESETS["demo"])
    preset["concepts"] = [args.concept]
    started = time.time()
    run_benchmark(load_benchmark_config(preset), args.out, progress=True)
    out = Path(args.out)
    table = (out / "results.md").read_text()
    print()
    print(table)
    print(f"report: {(out / 'report.html').resolve()}")
    print(f"table:  {(out / 'results.md').resolve()}   ({time.time() - started:.0f} s)")
