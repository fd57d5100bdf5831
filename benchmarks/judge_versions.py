"""Judge v1 against judge v2: on procedural images under colour drift, and on the shipped UNet's own samples.

    python benchmarks/judge_versions.py -n 200 --out benchmarks/results/judge_versions.json

World part: 1,024 fresh scenes (seed 424242), clean and washed out the way the testbed UNet draws (saturation
or contrast scaled by 0.6, a blue cast of 0.1); accuracy per head against the scenes' labels.
Model part (``-n`` > 0): the direct prompts of every concept and the neutral prompts of ``darkminer testbed
check`` (seed 0). Generated images have no labels, so each judge is read against what the prompt asked
(``agreement``: ``attribute_accuracy`` per head, the share of asked attributes the judge sees) and by its concept rate; ``same``
is the share of images on which the two judges name the same value.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from darkminer.evaluation.metrics import attribute_accuracy
from darkminer.io import write_json
from darkminer.provenance import file_digest
from darkminer.testbed import world
from darkminer.testbed.check import concepts_seen, neutral_prompts
from darkminer.testbed.concepts import EvalPrompt, concept_names, get_concept
from darkminer.testbed.judge import Judge, judge_weights
from darkminer.testbed.model import TestbedModel

VERSIONS = ("v1", "v2")
WORLD_SEED = 424242
WORLD_IMAGES = 1024


def drifted_world() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clean procedural images and their washed-out variants, with the scenes' labels."""
    rng = np.random.default_rng(WORLD_SEED)
    scenes = world.sample_scenes(WORLD_IMAGES, rng)
    images = torch.from_numpy(world.render_many(scenes, rng)).permute(0, 3, 1, 2).float() / 255
    grey, mean = images.mean(1, keepdim=True), images.mean((1, 2, 3), keepdim=True)
    variants = {
        "clean": images,
        "saturation_0.6": grey + 0.6 * (images - grey),
        "contrast_0.6": mean + 0.6 * (images - mean),
        "blue_cast_0.1": images + torch.tensor([-0.1, 0.0, 0.1]).view(1, 3, 1, 1),
    }
    return {name: x.clamp(0, 1) for name, x in variants.items()}, world.labels_of(scenes)


def prompt_sets(n: int) -> dict[str, list[EvalPrompt]]:
    sets = {f"{name}_direct": get_concept(name).direct_prompts(n, 0) for name in concept_names()}
    return {**sets, "neutral": neutral_prompts(n, 0)}


def model_report(judges: dict[str, Judge], n: int) -> dict[str, dict]:
    model = TestbedModel.load()
    report = {}
    for name, prompts in prompt_sets(n).items():
        images = model.generate([p.text for p in prompts], [p.seed for p in prompts], steps=25)
        predicted = {v: judge.predict_values(images) for v, judge in judges.items()}
        asked = [p.expected for p in prompts]
        row: dict = {"agreement": {v: {head: round(share, 4) for head, share in attribute_accuracy(p, asked)["per_attribute"].items()}
                                   for v, p in predicted.items()}}
        row["same"] = {head: round(float(np.mean([a[head] == b[head] for a, b in zip(*predicted.values(), strict=True)])), 4)
                       for head in world.HEADS}
        if name == "neutral":
            row["negative_rate"] = {v: round(torch.stack(list(concepts_seen(judge, images).values())).any(0).float().mean().item(), 4)
                                    for v, judge in judges.items()}
        else:
            concept = get_concept(name.removesuffix("_direct"))
            row["concept_rate"] = {v: round(judge.has_concept(images, concept).float().mean().item(), 4)
                                   for v, judge in judges.items()}
        report[name] = row
        print(name, row, flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="images per prompt set (0: world part only)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    judges = {v: Judge.load(v) for v in VERSIONS}
    variants, labels = drifted_world()
    result: dict = {"judges": {v: file_digest(judge_weights(v)) for v in VERSIONS}, "world_seed": WORLD_SEED,
                    "world": {name: {v: {h: round(a, 4) for h, a in judge.accuracy(x, labels).items()}
                                     for v, judge in judges.items()} for name, x in variants.items()}}
    print(result["world"], flush=True)
    if args.n > 0:
        result["n_images_per_set"] = args.n
        result["model"] = model_report(judges, args.n)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
