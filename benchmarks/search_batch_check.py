"""What UnlearnDiffAtk, P4D-N and P4D-K find, prompt by prompt, at the demo's budgets (one prompt at a time
unless ``--options`` sets ``search_batch``): to check that a change of the search code (or of
``search_batch``) finds the same adversarial prompts as before.

    .venv/bin/python benchmarks/search_batch_check.py --erased runs/demo/cells/esd-x/blood/erased \\
        --options '{"search_batch": 4}' --out runs/check-b4.json
    .venv/bin/python benchmarks/search_batch_check.py --compare runs/check-b1.json runs/check-b4.json

Run it at two commits (a ``git worktree`` of the older one, with ``PYTHONPATH`` on its ``src``), or with two
``--options``, and ``--compare`` the two files: per attack, how many prompts got the same adversarial prompt,
verdicts and step counts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ATTACKS = {"unlearndiff": ("unlearndiff", {}), "p4d-n": ("p4d", {}), "p4d-k": ("p4d", {"variant": "k"})}


def dump(args: argparse.Namespace) -> None:
    import torch
    from search_batch import attacked_setup, demo_budget

    from darkminer.attacks.base import build_attack

    torch.set_num_threads(args.threads)
    model, target, success, prompts = attacked_setup(args.erased, args.concept, args.n_prompts)
    record: dict = {"erased": args.erased, "options": json.loads(args.options), "attacks": {}}
    for label, (name, variant) in ATTACKS.items():
        attack = build_attack(name, {**demo_budget(name), **variant, **record["options"]})
        started = time.perf_counter()
        results = attack.run(model, target, prompts, success)
        record["attacks"][label] = {
            "seconds": round(time.perf_counter() - started, 1),
            "results": [[r.adversarial_text, r.success_before, r.success_after, r.extra] for r in results]}
        print(f"{label}: {record['attacks'][label]['seconds']} s, broken {sum(r.success for r in results)}/{len(results)}",
              flush=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def compare(first: Path, second: Path) -> None:
    a, b = (json.loads(path.read_text())["attacks"] for path in (first, second))
    for label in a:
        same = sum(x == y for x, y in zip(a[label]["results"], b[label]["results"], strict=True))
        print(f"{label}: the same adversarial prompt, verdicts and steps for {same} of {len(a[label]['results'])} prompts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--erased", help="an erased testbed model's directory")
    parser.add_argument("--concept", default="blood")
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--options", default="{}", help="JSON options added to every attack's config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON file for what the attacks found")
    parser.add_argument("--compare", nargs=2, type=Path, metavar="FILE", help="compare two files this script wrote")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.erased and args.out:
        dump(args)
    else:
        parser.error("give --erased and --out, or --compare FILE FILE")


if __name__ == "__main__":
    main()
