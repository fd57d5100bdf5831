"""How long the ``darkminer`` command takes to refuse a bad argument: each case runs as a fresh process (as a
user's mistyped command does), ``--repeats`` times; the table has the median wall time and the error line.

    python benchmarks/refusal_time.py --out benchmarks/results/refusal_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from darkminer.provenance import package_versions

# (what, arguments); "{tmp}" is a scratch folder holding a config with an unknown option
CASES = [
    ("unknown method", ["erase", "--method", "esd-q", "--concept", "nudity", "--out", "{tmp}/o"]),
    ("unknown testbed concept", ["erase", "--method", "esd-x", "--concept", "nudityy", "--out", "{tmp}/o"]),
    ("missing config file", ["erase", "--method", "esd-x", "--concept", "blood", "--config", "{tmp}/no.yaml",
                             "--out", "{tmp}/o"]),
    ("unknown config option", ["erase", "--method", "esd-x", "--concept", "blood", "--config", "{tmp}/bad.yaml",
                               "--out", "{tmp}/o"]),
    ("unknown attack", ["attack", "--attack", "p5d", "--concept", "nudity", "--out", "{tmp}/o"]),
    ("missing erased model", ["evaluate", "--erased", "{tmp}/no_such_model", "--out", "{tmp}/o"]),
    ("missing model folder", ["generate", "--model", "{tmp}/no_such_folder", "--prompt", "a cat", "--out", "{tmp}/o.png"]),
    ("unknown option (argparse)", ["erase", "--methd", "esd-x"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    command = [sys.executable, "-m", "darkminer.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bad.yaml").write_text("iterationz: 5\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        for what, arguments in CASES:
            argv = [a.replace("{tmp}", tmp) for a in arguments]
            seconds, line, code = [], "", None
            for _ in range(args.repeats):
                start = time.perf_counter()
                done = subprocess.run([*command, *argv], capture_output=True, text=True, env=env)
                seconds.append(time.perf_counter() - start)
                line, code = done.stderr.strip().splitlines()[-1].replace(tmp, "TMP"), done.returncode
            rows.append({"case": what, "seconds": round(statistics.median(seconds), 2), "exit": code, "error": line})
            print(f"{what:28s} {rows[-1]['seconds']:6.2f} s  rc {code}  {line[:110]}")
    if args.out is not None:
        record = {"repeats": args.repeats, "threads": os.cpu_count(), "versions": package_versions(), "rows": rows}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
