"""Time the testbed UNet under each attention kernel and memory format, the choice behind
``TestbedModel.default_speed``.

For each combination (SDPA or classic attention, contiguous or channels-last; `auto` with channels-last),
interleaved over ``--repeats`` passes so that a slow spell of the machine hits every combination alike:

- ``forward_16`` / ``forward_24``: one no-grad forward at 16 rows (a sampling step of 8 images with CFG)
  and at 24 rows (a circumventing step's teacher);
- ``lora_step_16``: forward and backward at 16 rows with gradients to a default Dark Miner LoRA only
  (a circumventing step's student);
- ``sample_64``: on the first ``--sampling-passes`` passes, the testbed's speed gate (64 images at 25 DDIM
  steps, ``darkminer testbed check``).

Writes min and median milliseconds per call. Run it with the machine to itself:

    python benchmarks/testbed_kernels.py --out benchmarks/results/testbed_kernels_2threads.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from darkminer.erasers.darkminer import DarkMinerConfig
from darkminer.io import write_json
from darkminer.models.adapters import add_lora
from darkminer.parallel.speed import SpeedOptions, apply_speed_options
from darkminer.provenance import package_versions
from darkminer.testbed.check import sampling_seconds
from darkminer.testbed.model import TestbedModel

COMBINATIONS = {
    "sdpa": SpeedOptions(),
    "sdpa + channels-last": SpeedOptions(channels_last=True),
    "classic": SpeedOptions(attention="classic"),
    "classic + channels-last": SpeedOptions(attention="classic", channels_last=True),
    "auto + channels-last": SpeedOptions(attention="auto", channels_last=True),
}


def crossover(model: TestbedModel, rows: list[int], repeats: int) -> dict[str, dict[int, dict[str, float]]]:
    """Min and median ms of one no-grad forward at each row count, SDPA vs classic (channels-last)."""
    g = torch.Generator().manual_seed(0)
    n = max(rows)
    x = torch.randn(n, *model.latent_shape, generator=g)
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=g)
    cond = model.encode(["a red star on a blue sky"]).repeat(n, 1, 1)
    kernels = {a: SpeedOptions(attention=a, channels_last=True) for a in ("sdpa", "classic")}
    times: dict[str, dict[int, list[float]]] = {a: {r: [] for r in rows} for a in kernels}
    with torch.no_grad():
        for _ in range(repeats):
            for attention, options in kernels.items():
                apply_speed_options(model, options)
                for r in rows:
                    model.eps(x[:r], t[:r], cond[:r], adapter=False)  # warm-up after the switch
                    tick = time.perf_counter()
                    model.eps(x[:r], t[:r], cond[:r], adapter=False)
                    times[attention][r].append((time.perf_counter() - tick) * 1000)
    return {a: {r: {"min_ms": round(min(v), 1), "median_ms": round(statistics.median(v), 1)} for r, v in by_rows.items()}
            for a, by_rows in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--sampling-passes", type=int, default=2, help="passes that also time 64 images (~30 s each)")
    parser.add_argument("--crossover", default=None, help="comma-separated row counts: time SDPA vs classic only")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model = TestbedModel.load()
    if args.crossover:
        rows = [int(r) for r in args.crossover.split(",")]
        table = crossover(model, rows, args.repeats)
        write_json(args.out, {"repeats": args.repeats, "threads": torch.get_num_threads(), "forward_ms_by_rows": table,
                              "versions": package_versions()})
        for r in rows:
            print(f"{r:>4} rows: " + ", ".join(f"{a} {table[a][r]['min_ms']:.0f}/{table[a][r]['median_ms']:.0f} ms" for a in table))
        return
    params = add_lora(model, DarkMinerConfig().lora, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, *model.latent_shape, generator=g)
    t = torch.randint(0, model.num_train_timesteps, (24,), generator=g)
    cond = model.encode(["a red star on a blue sky"] * 24)

    def forward(n: int) -> None:
        with torch.no_grad():
            model.eps(x[:n], t[:n], cond[:n], adapter=False)

    def lora_step(n: int) -> None:
        torch.autograd.grad(model.eps(x[:n], t[:n], cond[:n]).square().mean(), params)

    calls = {"forward_16": lambda: forward(16), "forward_24": lambda: forward(24), "lora_step_16": lambda: lora_step(16)}
    times: dict[str, dict[str, list[float]]] = {name: {call: [] for call in [*calls, "sample_64"]} for name in COMBINATIONS}
    for index in range(args.repeats):
        for name, options in COMBINATIONS.items():
            apply_speed_options(model, options)
            for call, run in calls.items():
                run()  # warm-up after the switch
                tick = time.perf_counter()
                run()
                times[name][call].append((time.perf_counter() - tick) * 1000)
            if index < args.sampling_passes:
                times[name]["sample_64"].append(sampling_seconds(model, 64) * 1000)
    table = {name: {call: {"min_ms": round(min(v), 1), "median_ms": round(statistics.median(v), 1)}
                    for call, v in calls_.items() if v} for name, calls_ in times.items()}
    write_json(args.out, {"repeats": args.repeats, "threads": torch.get_num_threads(), "ms": table,
                          "versions": package_versions()})
    for name, row in table.items():
        print(f"{name:>24}: " + ", ".join(f"{call} {v['min_ms']:.0f}/{v['median_ms']:.0f} ms" for call, v in row.items()))


if __name__ == "__main__":
    main()
