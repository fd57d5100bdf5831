"""The sample grid of docs/testbed.md: eight prompts, two seeds each, from the shipped testbed model.

    python benchmarks/testbed_samples.py --out docs/img/testbed_samples.png
"""

from __future__ import annotations

import argparse

import torch

from darkminer.imaging import make_grid, save_png
from darkminer.models import load_model

PROMPTS = ["a red star", "a bloody blue circle", "a burning green heart", "a striped yellow square",
           "a sketch of a purple triangle", "a checkered orange diamond", "a blue cross on grey", "a crescent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/testbed_samples.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("testbed")
    prompts = [p for p in PROMPTS for _ in range(2)]
    images = model.generate(prompts, [seed for _ in PROMPTS for seed in (0, 1)])
    save_png(make_grid(images, ncols=8, scale=3), args.out)


if __name__ == "__main__":
    main()
