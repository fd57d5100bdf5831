"""Replay a Dark Miner run round by round on the testbed: the residual after each round, and whether the
verifier's verdicts were right.

For round r = 0..R-1 the erased directory holds the embedding mined in round r and the adapter after
round r (``round_adapters.safetensors``). For every state "after round r" (and "before", the original
model) this measures, with the judge:

- ``direct`` / ``paraphrase``: concept rate from the concept's direct prompts and held-out paraphrases;
- ``cce``: attack success rate of CCE (textual inversion against that state; pre + post as the
  UnlearnDiffAtk authors count);
- ``mined_here_rate``: the share of images drawn *from round r's mined embedding* by the model it was mined
  against (the state before round r, i.e. this one) that show the concept -- the ground truth for the verifier's
  verdict in round r, logged next to its score.

    python benchmarks/darkminer_rounds.py runs/dm-blood --concept blood --out benchmarks/results/rounds-blood.json \
        --plot docs/img/darkminer_rounds_blood.png

The judge is used here only to grade; the method never sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict

from darkminer.attacks.base import AttackPrompt
from darkminer.attacks.cce import CCEConfig, ConceptInversion
from darkminer.erasers.darkminer.loop import load_rounds, read_round_log
from darkminer.io import read_json, write_json
from darkminer.models import load_model
from darkminer.models.adapters import ADAPTER_NAME
from darkminer.targets import resolve_target
from darkminer.testbed.check import drawn_concept_rate
from darkminer.testbed.concepts import get_concept
from darkminer.testbed.judge import Judge

PROMPT_SEED = 1  # evaluation prompt sets; Dark Miner's own pool comes from seed 0's prompts
STEPS = 25  # the testbed's DDIM steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("erased", help="a Dark Miner erased-model directory on the testbed")
    parser.add_argument("--concept", required=True)
    parser.add_argument("--n-images", type=int, default=128, help="images per prompt set and state")
    parser.add_argument("--attack-prompts", type=int, default=8)
    parser.add_argument("--cce-steps", type=int, default=300)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", default=None, help="PNG of the rates per round")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    concept, judge = get_concept(args.concept), Judge.load()
    model = load_model(erased=args.erased)  # the final adapter; states are swapped in below
    rounds = load_rounds(args.erased)
    log = read_round_log(args.erased)
    results = read_json(args.out) if Path(args.out).is_file() else {"concept": args.concept, "states": []}
    direct = concept.direct_prompts(args.n_images, PROMPT_SEED)
    paraphrase = concept.paraphrase_prompts(args.n_images, PROMPT_SEED)
    attacked = [AttackPrompt(p.text, p.seed) for p in direct[: args.attack_prompts]]
    # State 0 is the original model: the adapter with every weight zero.
    states = [{k: torch.zeros_like(v) for k, v in rounds[0][1].items()}] + [state for _, state in rounds]
    for index in range(len(results["states"]), len(states)):
        tick = time.time()
        set_peft_model_state_dict(model.unet, states[index], adapter_name=ADAPTER_NAME)
        entry = {"after_round": index - 1,
                 "direct": drawn_concept_rate(model, judge, direct, concept, STEPS),
                 "paraphrase": drawn_concept_rate(model, judge, paraphrase, concept, STEPS)}
        target = resolve_target(model, args.concept, seed=0)
        found = ConceptInversion(CCEConfig(steps=args.cce_steps, seed=0)).run(
            model, target, attacked, lambda images: judge.has_concept(images, concept))
        entry["cce"] = sum(r.success_after or r.success_before for r in found) / len(found)
        if index < len(rounds):  # round `index` mined against this state: was its verdict right?
            mined, _ = rounds[index]
            with torch.no_grad():
                cond = mined.condition(model)
                images = model.sample(cond.expand(args.n_images // 4, -1, -1), seeds=list(range(args.n_images // 4)))
            entry["mined_here_rate"] = judge.has_concept(images, concept).float().mean().item()
            entry["mined_here_score"] = log[index].get("score")
            entry["mined_here_passed"] = log[index]["passed"]
        entry["seconds"] = round(time.time() - tick, 1)
        results["states"].append(entry)
        write_json(args.out, results)
        print(json.dumps(entry))
    if args.plot:
        _plot(results, args.plot)


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = results["states"]
    x = [s["after_round"] + 1 for s in states]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=120)
    for key, label in (("direct", "direct prompts"), ("paraphrase", "held-out paraphrases"), ("cce", "CCE attack")):
        ax.plot(x, [s[key] for s in states], marker="o", label=label)
    mined = [(s["after_round"] + 1, s["mined_here_rate"]) for s in states if "mined_here_rate" in s]
    ax.plot([m[0] for m in mined], [m[1] for m in mined], "k--", marker="x", label="embedding mined against this state")
    ax.set_xlabel("rounds done (0 = original model)")
    ax.set_ylabel(f"{results['concept']} rate (judge)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
