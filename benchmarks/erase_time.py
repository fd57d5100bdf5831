"""Time one erase on the testbed against the 10-minute budget, with the machine's speed beside it.

Blood's erase took 399 s in one session and 638 s in another, on 2-core machines of different speed,
with the same round code (docs/darkminer.md, "Erase time at the session-13 default"). So every timing here comes with a machine-speed reference: the testbed's own speed
gate's workload (64 images at 25 DDIM steps, `darkminer testbed check`) on diffusers' plain kernels,
measured in the same process just before the erase. Run it with the machine to itself:

    python benchmarks/erase_time.py --concept star --out benchmarks/results/erase_time_star.json

Writes: wall seconds of the erase, the per-round stage seconds from its round log, the part outside the
stages (model load, the two pools, checkpoints), peak RSS, threads, CPU model and package versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

import darkminer
from darkminer.config import load_config_file
from darkminer.erasers.darkminer.loop import ROUND_LOG_FILE, read_round_log
from darkminer.io import write_json
from darkminer.parallel.speed import SpeedOptions, apply_speed_options
from darkminer.provenance import package_versions
from darkminer.testbed.check import sampling_seconds
from darkminer.testbed.model import TestbedModel

BUDGET_SECONDS = 600  # the Dark Miner issue: any of the six concepts in <= 10 minutes on 2 cores


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="star", help="a testbed concept (default: star)")
    parser.add_argument("--method", default="darkminer")
    parser.add_argument("--config", default=None, help="JSON/YAML of the method's options (default: its defaults)")
    parser.add_argument("--speed", default=None, type=json.loads,
                        help='speed options of the erase as JSON, over the model\'s defaults, e.g. \'{"attention": "sdpa"}\' '
                             "(the reference always runs SDPA and contiguous convolutions: it measures the machine)")
    parser.add_argument("--reference-images", type=int, default=64, help="images in the speed reference")
    parser.add_argument("--keep", default=None, help="keep the erased model here (default: a temporary folder)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    testbed = TestbedModel.load()
    # The reference is a fixed workload: diffusers' plain kernels, as in every reference recorded before
    # the testbed's own defaults changed (session 15), so references stay comparable across sessions.
    apply_speed_options(testbed, SpeedOptions())
    reference = [round(sampling_seconds(testbed, args.reference_images), 2) for _ in range(2)]
    del testbed  # the erase loads its own copy
    with tempfile.TemporaryDirectory() as tmp:
        erased = Path(args.keep or Path(tmp) / "erased")
        tick = time.perf_counter()
        darkminer.erase(args.method, args.concept, erased, config=args.config, speed=args.speed)
        seconds = time.perf_counter() - tick
        rounds = read_round_log(erased) if (erased / ROUND_LOG_FILE).is_file() else []  # other methods keep none
    stages = [{key: r[key] for key in r if key.startswith("seconds_")} for r in rounds]
    in_rounds = sum(sum(s.values()) for s in stages)
    write_json(args.out, {
        "method": args.method, "concept": args.concept,
        "config": load_config_file(args.config) if args.config else "defaults", "speed": args.speed,
        "erase_seconds": round(seconds, 1), "budget_seconds": BUDGET_SECONDS, "within_budget": seconds <= BUDGET_SECONDS,
        "seconds_outside_stages": round(seconds - in_rounds, 1) if rounds else None,
        "round_stage_seconds": stages,
        f"reference_seconds_{args.reference_images}_images": reference,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "versions": package_versions(),
    })
    print(f"{args.method} on {args.concept}: {seconds:.0f} s (budget {BUDGET_SECONDS} s); "
          f"reference {reference} s for {args.reference_images} images")


if __name__ == "__main__":
    main()
