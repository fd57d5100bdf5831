"""What searching several prompts side by side (``search_batch``) buys UnlearnDiffAtk and P4D, and what it
changes in what they find.

    .venv/bin/darkminer demo --out runs/demo   # its cells/esd-x/blood/erased is the model attacked below
    .venv/bin/python benchmarks/search_batch.py --erased runs/demo/cells/esd-x/blood/erased \\
        --out benchmarks/results/search_batch_cpu.json

Runs each attack (the demo's budgets by default) on the same ``--n-prompts`` direct prompts of the concept
against the erased testbed model, once per ``search_batch`` and per repeat, the batch sizes in alternating
order from one repeat to the next (so that a drift of the host's speed does not favour one). Reports each
run's wall time (the whole attack: unattacked judging, target drawing and the searches) and, against
``search_batch`` 1, how many prompts got the same adversarial prompt (in every repeat) and how many were
broken.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from darkminer.attacks.base import AttackPrompt, SuccessFn, build_attack
from darkminer.evaluation import concept_detector
from darkminer.evaluation.benchmark import PRESETS
from darkminer.models import load_model
from darkminer.models.base import DiffusionModel
from darkminer.targets import EraseTarget, resolve_target


def demo_budget(name: str) -> dict:
    """The demo preset's budget of attack ``name``, without its ``search_batch`` (which these scripts set)."""
    return {k: v for k, v in PRESETS["demo"]["evaluation"]["attack_configs"][name].items() if k != "search_batch"}


def attacked_setup(
    erased: str, concept: str, n_prompts: int, prompt_seed: int = 1
) -> tuple[DiffusionModel, EraseTarget, SuccessFn, list[AttackPrompt]]:
    """The erased testbed model, the concept's target and detector, and its first ``n_prompts`` direct prompts
    of ``prompt_seed`` (seed 1's: CCE draws its training images from seed 0's)."""
    base = load_model("testbed")
    target = resolve_target(base, concept, seed=0)
    prompts = [AttackPrompt(p.text, p.seed) for p in target.testbed_concept.direct_prompts(n_prompts, prompt_seed)]
    return load_model("testbed", erased=erased), target, concept_detector(base, target), prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--erased", required=True, help="an erased testbed model's directory (darkminer erase)")
    parser.add_argument("--concept", default="blood")
    parser.add_argument("--attacks", default="unlearndiff,p4d")
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--prompt-seed", type=int, default=1, help="seed of the attacked direct prompts")
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated search_batch values; 1 is the reference")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    if batches[0] != 1:
        raise SystemExit("--batches must start with 1, the reference the others are compared with")

    model, target, success, prompts = attacked_setup(args.erased, args.concept, args.n_prompts, args.prompt_seed)

    seconds: dict[tuple[str, int], list[float]] = {}
    found: dict[tuple[str, int], list[list[tuple[str, bool]]]] = {}  # per repeat, per prompt
    for repeat in range(args.repeats):
        for batch in batches if repeat % 2 == 0 else batches[::-1]:
            for name in args.attacks.split(","):
                attack = build_attack(name, {**demo_budget(name), "search_batch": batch})
                started = time.perf_counter()
                results = attack.run(model, target, prompts, success)
                seconds.setdefault((name, batch), []).append(time.perf_counter() - started)
                found.setdefault((name, batch), []).append([(r.adversarial_text, r.success) for r in results])
                print(f"repeat {repeat} {name} search_batch {batch}: {seconds[(name, batch)][-1]:.1f} s, "
                      f"broken {sum(r.success for r in results)}/{len(prompts)}", flush=True)

    rows = []
    for name in args.attacks.split(","):
        reference = statistics.median(seconds[(name, 1)])
        for batch in batches:
            reference_found = found[(name, 1)][0]
            same = sum(all(run[i] == reference_found[i] for run in found[(name, batch)]) for i in range(len(prompts)))
            rows.append({"attack": name, "search_batch": batch, "seconds": [round(s, 1) for s in seconds[(name, batch)]],
                         "median_seconds": round(statistics.median(seconds[(name, batch)]), 1),
                         "speed_up": round(reference / statistics.median(seconds[(name, batch)]), 2),
                         "same_prompt_as_batch_1": same,
                         "broken": [sum(ok for _, ok in run) for run in found[(name, batch)]]})
    record = {"erased": str(args.erased), "concept": args.concept, "n_prompts": args.n_prompts,
              "threads": args.threads, "repeats": args.repeats, "budgets": {n: demo_budget(n) for n in args.attacks.split(",")},
              "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print("| attack | search_batch | seconds (median) | speed-up | same prompt as 1 | broken |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['search_batch']} | {r['median_seconds']} | {r['speed_up']}x | "
              f"{r['same_prompt_as_batch_1']}/{args.n_prompts} | "
              f"{', '.join(f'{n}/{args.n_prompts}' for n in r['broken'])} |")


if __name__ == "__main__":
    main()
