"""What a killed ``darkminer evaluate`` costs with ``--resume``, measured through the command itself.

One uninterrupted run, then the same evaluation into another folder stopped with SIGTERM (what schedulers
send) after each of ``--kill-after`` seconds of its run and resumed with ``--resume``, until it completes.
Reported: each run's wall time (process start to exit, model loading included), the kills, the time the
resumed evaluation took in all against the uninterrupted one, and whether its metrics (all but the
``seconds``) and per-image judgements equal the uninterrupted run's.

    python benchmarks/resume_check.py --erased runs/blood --concept blood --attacks unlearndiff \
        --config benchmarks/presets/resume_check.yaml --kill-after 90,90 --out benchmarks/results/resume_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: list[str], kill_after: float | None) -> tuple[int, float]:
    """The command's exit code and wall seconds; with ``kill_after``, SIGTERM once that many seconds passed."""
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate()
    if process.returncode not in (0, 128 + signal.SIGTERM):
        sys.exit(f"{' '.join(command)} failed ({process.returncode}): {err.strip().splitlines()[-1:]}")
    return process.returncode, round(time.time() - started, 2)


def comparable(folder: Path) -> tuple[dict, list]:
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("seconds", "resumed"):
        metrics.pop(key, None)
    for details in metrics["attack_details"].values():
        details.pop("seconds")
    return metrics, json.loads((folder / "judgements.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", required=True)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--erased", default=None)
    parser.add_argument("--attacks", default="")
    parser.add_argument("-n", type=int, default=None)
    parser.add_argument("--config", default=None, help="evaluation options file (e.g. the attacks' budgets)")
    parser.add_argument("--kill-after", default="40", help="comma-separated seconds: one kill per value, in order")
    parser.add_argument("--out", required=True, help="JSON file of the results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="resume_check_"))
    base = [sys.executable, "-m", "darkminer.cli", "evaluate", "--concept", args.concept, "--model", args.model,
            "--attacks", args.attacks, "--save-images"]
    base += ["--erased", args.erased] if args.erased else []
    base += ["-n", str(args.n)] if args.n else []
    base += ["--config", args.config] if args.config else []
    try:
        _, whole_seconds = run([*base, "--out", str(work / "whole")], None)
        runs = []
        for i, after in enumerate([float(s) for s in args.kill_after.split(",")]):
            code, seconds = run([*base, "--out", str(work / "resumed"), *(["--resume"] if i else [])], after)
            runs.append({"killed_after": after, "exit": code, "seconds": seconds})
            if code == 0:
                break
        else:
            code, seconds = run([*base, "--out", str(work / "resumed"), "--resume"], None)
            runs.append({"killed_after": None, "exit": code, "seconds": seconds})
        same = comparable(work / "whole") == comparable(work / "resumed")
        images = sorted(p.relative_to(work / "whole") for p in (work / "whole").rglob("*.png"))
        same_images = all((work / "whole" / p).read_bytes() == (work / "resumed" / p).read_bytes() for p in images)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": " ".join(base[2:]),
        "uninterrupted_seconds": whole_seconds,
        "runs": runs,
        "kills": sum(r["exit"] != 0 for r in runs),
        "resumed_total_seconds": round(sum(r["seconds"] for r in runs), 2),
        "same_metrics_and_judgements": same,
        "same_images": same_images,
        "n_png": len(images),
        "cpu_threads": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
