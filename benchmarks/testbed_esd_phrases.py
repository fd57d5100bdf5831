"""Where ESD-x's residual direct rate comes from: the erased word, or the concept's other trigger phrases.

    python benchmarks/testbed_esd_phrases.py --concepts blood,fire,sketch --seeds 0,1,2 \
        --out benchmarks/results/testbed_esd_phrases.json

For each concept and ESD-x seed: ESD-x on the concept's word at ``darkminer testbed check``'s setting
(``CheckConfig``: 200 iterations, lr 1e-3, 25 DDIM steps), then the judge on the direct prompts of the
check (seed 0), split by whether the prompt holds the erased word as a whole word (``holds_word``).
The direct set draws all trigger phrases; the word split shows what ESD-x erased (the word) beside what it
never saw ("wounded", "blazing", "line art").
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from darkminer.io import write_json
from darkminer.models import load_model
from darkminer.models.erased import INFO_NAME as ERASED_INFO
from darkminer.provenance import file_digest
from darkminer.testbed.check import CheckConfig, esd_x
from darkminer.testbed.concepts import get_concept, holds_word
from darkminer.testbed.judge import Judge, judge_weights


def measure(name: str, seed: int, n: int, judge: Judge, work_dir: Path) -> dict:
    check = CheckConfig()
    concept = get_concept(name)
    erased_dir = work_dir / f"{name}_seed{seed}"
    if not (erased_dir / ERASED_INFO).exists():  # kept, so a rerun only grades
        esd_x(name, erased_dir, replace(check, seed=seed))  # the ESD-x seed; the prompts keep the check's
    erased = load_model("testbed", erased=erased_dir)
    prompts = concept.direct_prompts(n, check.seed)
    hits = judge.has_concept(erased.generate([p.text for p in prompts], [p.seed for p in prompts], steps=check.steps), concept)
    word = torch.tensor([holds_word(p.text, name) for p in prompts])
    return {"concept": name, "esd_seed": seed, "direct": hits.float().mean().item(),
            "with_word": hits[word].float().mean().item(), "n_with_word": int(word.sum()),
            "without_word": hits[~word].float().mean().item(), "n_without_word": int((~word).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default="blood,fire,sketch")
    parser.add_argument("--seeds", default="0,1,2", help="ESD-x seeds")
    parser.add_argument("-n", type=int, default=200, help="direct prompts per cell")
    parser.add_argument("--work-dir", default="runs/esd_phrases", help="the erased models, reused when present")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    judge = Judge.load()
    rows = []
    for name in args.concepts.split(","):
        for seed in args.seeds.split(","):
            rows.append(measure(name, int(seed), args.n, judge, Path(args.work_dir)))
            print(rows[-1], flush=True)
    write_json(args.out, {"esd": {"iterations": CheckConfig.esd_iterations, "lr": CheckConfig.esd_lr},
                          "judge": file_digest(judge_weights(None)), "n_prompts": args.n, "rows": rows})


if __name__ == "__main__":
    main()
