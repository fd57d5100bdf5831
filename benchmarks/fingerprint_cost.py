"""What erase's check for unregistered weight edits costs: ``DiffusionModel.weight_fingerprints`` (two
checksums of every UNet and text-encoder weight's bits) on SD-1.4-sized random weights, or tiny-random-sd with
``--small``. An erase takes it twice (before and after the eraser). Median of ``--repeats`` timed calls after
one warm-up (the first call pays for page faults of the freshly built weights).

    python benchmarks/fingerprint_cost.py --out benchmarks/results/fingerprint_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_speed import build_model  # the SD-1.4-sized components, as the speed benchmark builds them

from darkminer.provenance import package_versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny-random-sd instead of SD-1.4-sized weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, _ = build_model(args.small, device, torch.float32)
    parameters = sum(p.numel() for p in model.unet.parameters()) + sum(p.numel() for p in model.text_encoder.parameters())
    model.weight_fingerprints()  # warm-up
    seconds = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        model.weight_fingerprints()
        seconds.append(time.perf_counter() - tick)
    result = {"model": model.name, "device": str(device), "threads": torch.get_num_threads(),
              "parameters_millions": round(parameters / 1e6, 1), "seconds": [round(s, 3) for s in seconds],
              "median_seconds": round(statistics.median(seconds), 3), "versions": package_versions()}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
