"""Attack success rates on the testbed, against the original model and against an erased one.

    .venv/bin/python benchmarks/attacks_testbed.py --concept blood --n-prompts 16 --out runs/attacks-blood

Erases the concept with ``--method`` (default esd-x; or reuse a directory with ``--erased``), then runs
every attack with the CPU budgets below on the same prompts and seeds, against the original model and
against the erased one. Writes OUT/results.json and OUT/results.md (the table in docs/attacks.md) and
each attack's directory (replayable with ``darkminer attack --replay``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from darkminer.attacks.base import AttackPrompt, attack_success_rate, before_and_after_rates, get_attack
from darkminer.attacks.io import run_attack
from darkminer.evaluation import concept_detector
from darkminer.models import load_model
from darkminer.targets import resolve_target

# CPU budgets (the authors' defaults are for a GPU; see docs/attacks.md): fewer steps/rounds/generations.
BUDGETS: dict[str, dict] = {
    "plain": {},
    "paraphrase": {},
    "cce": {"steps": 300, "gradient_accumulation": 1},
    "unlearndiff": {"rounds": 5},
    "p4d": {"iterations": 200},
    "ringabell": {"generations": 50},
}

# The erasers' calibrated testbed budget (benchmarks/erasers_testbed.py): the authors' settings with a
# 100x learning rate, 25 DDIM steps.
ERASER_BUDGETS: dict[str, dict] = {"esd-x": {"iterations": 200, "ddim_steps": 25, "lr": 1e-3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="blood")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks and the eraser")
    parser.add_argument("--prompt-seed", type=int, default=1, help="seed of the attacked direct prompts")
    parser.add_argument("--method", default="esd-x", help="eraser for the erased model")
    parser.add_argument("--erase-config", default=None,
                        help="JSON/YAML config of the eraser (default: the erasers' testbed budget, see below)")
    parser.add_argument("--erased", default=None, help="reuse this erased-model directory instead of erasing")
    parser.add_argument("--attacks", default=",".join(BUDGETS), help="comma-separated attack names")
    parser.add_argument("--skip-original", action="store_true", help="attack only the erased model")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = load_model("testbed")
    target = resolve_target(base, args.concept, seed=args.seed)
    success = concept_detector(base, target)
    # Seed 1's prompts: CCE draws its training images from the target's prompts, which are seed 0's.
    rows = target.testbed_concept.direct_prompts(args.n_prompts, args.prompt_seed)
    prompts = [AttackPrompt(p.text, p.seed) for p in rows]
    erased_dir = Path(args.erased) if args.erased else out / f"erased-{args.method}"
    if not args.erased and not (erased_dir / "darkminer.json").is_file():
        from darkminer.api import erase

        started = time.time()
        config = args.erase_config or ERASER_BUDGETS.get(args.method)
        erase(args.method, args.concept, erased_dir, config=config)
        print(f"erased {args.concept} with {args.method} in {time.time() - started:.0f} s")
    models = {"erased": load_model("testbed", erased=erased_dir)}
    if not args.skip_original:
        models["original"] = base

    rows = []
    for model_name, model in models.items():
        for name in args.attacks.split(","):
            attack_cls = get_attack(name)
            config = attack_cls.config_class.from_dict({**BUDGETS.get(name, {}), "seed": args.seed})
            started = time.time()
            results = run_attack(attack_cls(config), model, target, prompts, success, out=out / f"{model_name}-{name}")
            before, after = before_and_after_rates(results)
            row = {"model": model_name, "attack": name, "asr": attack_success_rate(results),
                   "before": before, "after": after,
                   "seconds_per_prompt": (time.time() - started) / len(results), "budget": BUDGETS.get(name, {})}
            rows.append(row)
            print(f"{model_name:9s} {name:12s} ASR {row['asr']:.2f} (unattacked {row['before']:.2f}, "
                  f"attacked {row['after']:.2f}) "
                  f"{row['seconds_per_prompt']:.1f} s/prompt", flush=True)

    (out / "results.json").write_text(json.dumps({"concept": args.concept, "n_prompts": args.n_prompts,
                                                  "method": args.method, "rows": rows}, indent=2) + "\n")
    table = ["| model | attack | ASR | unattacked | attacked prompt works | s/prompt | budget |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['attack']} | {r['asr']:.2f} | {r['before']:.2f} | {r['after']:.2f} | "
              f"{r['seconds_per_prompt']:.1f} | "
              f"{json.dumps(r['budget']) if r['budget'] else 'defaults'} |" for r in rows]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
