"""Choose the testbed's sampling guidance: per guidance scale, the judge's concept rate on each concept's
*direct* prompts and the attribute accuracy on neutral prompts (never the held-out paraphrases).

    python benchmarks/testbed_guidance.py --unet src/darkminer/testbed/weights/unet --scales 2,2.5,3,4 -n 48

Prompt sets use seed 7, not the seed 0 of `darkminer testbed check`, so the gate is not measured on the
prompts the choice was made on. The shipped default is the scale with the best worst-case direct rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from darkminer.evaluation.metrics import attribute_accuracy
from darkminer.testbed.check import drawn_concept_rate, neutral_prompts
from darkminer.testbed.concepts import concept_names, get_concept
from darkminer.testbed.judge import Judge
from darkminer.testbed.model import UNET_DIR, TestbedModel

SEED = 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default=str(UNET_DIR))
    parser.add_argument("--scales", default="2,2.5,3,4")
    parser.add_argument("-n", type=int, default=48, help="images per prompt set")
    parser.add_argument("--out", default=None, help="JSON of the results")
    parser.add_argument("--judge", default=None, help="v1 (the scan of session 2), v2 (default) or a judge file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, judge = TestbedModel.load(args.unet), Judge.load(args.judge)
    results = {}
    for scale in (float(s) for s in args.scales.split(",")):
        model.default_sampling = dataclasses.replace(model.default_sampling, guidance_scale=scale)
        concepts = [get_concept(name) for name in concept_names()]
        row = {c.name: round(drawn_concept_rate(model, judge, c.direct_prompts(args.n, SEED), c, 25), 4) for c in concepts}
        neutral = neutral_prompts(args.n, SEED)
        predicted = judge.predict_values(model.generate([p.text for p in neutral], [p.seed for p in neutral], steps=25))
        row["attribute_accuracy"] = round(attribute_accuracy(predicted, [p.expected for p in neutral])["accuracy"], 4)
        results[scale] = row
        print(scale, json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
