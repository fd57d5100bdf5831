"""Does a light background read as sketch to the judge? Sketch's direct prompts and their anchor twins (the
same scenes and captions with the anchor, plain, in place of sketch), drawn by a model and judged, counted by
the background the prompt names and by the background the judge reads.

    python benchmarks/testbed_sketch_background.py --out benchmarks/results/testbed_sketch_background.json
    python benchmarks/testbed_sketch_background.py --erased runs/sketch-seed2 --out ...  # an erased model

The twins on the original model are the judge's false positives: images that never asked for sketch.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from darkminer.io import write_json
from darkminer.models import load_model
from darkminer.testbed.concepts import get_concept
from darkminer.testbed.judge import Judge


def by_background(prompts: list, values: list[dict[str, str]]) -> dict:
    """[sketch verdicts, images] per named background ("unnamed" when the prompt names none) and per judged one."""
    named: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    judged: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for prompt, value in zip(prompts, values, strict=True):
        hit = int(value["style"] == "sketch")
        for table, key in ((named, prompt.expected.get("background", "unnamed")), (judged, value["background"])):
            table[key][0] += hit
            table[key][1] += 1
    return {"named": dict(named), "judged": dict(judged), "rate": sum(v["style"] == "sketch" for v in values) / len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--erased", default=None, help="an erased testbed model (default: the original)")
    parser.add_argument("-n", type=int, default=200, help="prompts per set")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    judge, concept = Judge.load(), get_concept("sketch")
    model = load_model("testbed", erased=args.erased)
    rows = {}
    for name, prompts in (("direct", concept.direct_prompts(args.n, 0)), ("twins", concept.anchor_twins(args.n, 0))):
        images = model.generate([p.text for p in prompts], [p.seed for p in prompts])
        rows[name] = by_background(prompts, judge.predict_values(images))
        print(name, rows[name], flush=True)
    write_json(args.out, {"erased": args.erased, "n": args.n, **rows})


if __name__ == "__main__":
    main()
