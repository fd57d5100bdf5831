"""UCE's preserve scale and RECE's per-kind recipes on the testbed (docs/methods.md, "UCE" and "RECE").

For each setting: the concept rate on direct prompts (judge v2) and the relative change of the noise
prediction, on one noisy input per prompt, for preservation prompts (outside the preserve set) and for the
empty prompt.

    python benchmarks/closed_form_settings.py [--n 48] [--out benchmarks/results/closed_form_settings.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from darkminer.erasers.base import get_eraser
from darkminer.models import load_model
from darkminer.targets import resolve_target
from darkminer.testbed.concepts import get_concept
from darkminer.testbed.judge import Judge

SETTINGS = [
    ("uce", "blood", {"preserve_scale": 0.1}), ("uce", "blood", {}),
    ("uce", "sketch", {"preserve_scale": 0.1}), ("uce", "sketch", {}),
    ("rece", "star", {}), ("rece", "star", {"epochs": 1, "regularisation": 1e-3}),
    ("rece", "star", {"epochs": 5, "regularisation": 1e-3}),
    ("rece", "striped", {}), ("rece", "striped", {"epochs": 1, "regularisation": 1e-3}),
    ("rece", "striped", {"epochs": 5, "regularisation": 1e-3}),
]


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((((after - before) ** 2).flatten(1).sum(1) / (before**2).flatten(1).sum(1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="direct prompts per concept (seed 1)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    judge, rows = Judge.load(), []
    for method, name, options in SETTINGS:
        concept = get_concept(name)
        prompts = concept.direct_prompts(args.n, seed=1)
        preserved = [p.text for p in concept.preservation_prompts(16, seed=1)]
        model = load_model("testbed")
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(32, *model.latent_shape, generator=g), torch.randint(0, 1000, (32,), generator=g)
        with torch.no_grad():
            states = model.encode(preserved + [""] * 16)
            before = model.eps(x, t, states)
        eraser = get_eraser(method)
        eraser(eraser.config_class.from_dict(options)).erase(model, resolve_target(model, name), Path(tempfile.mkdtemp()))
        with torch.no_grad():
            after = model.eps(x, t, states)
        images = model.generate([p.text for p in prompts], [p.seed for p in prompts])
        row = {"method": method, "concept": name, "options": options or "default",
               "concept_rate": round(float(judge.has_concept(images, concept).float().mean()), 3),
               "change_preservation": relative_change(before[:16], after[:16]),
               "change_empty": relative_change(before[16:], after[16:])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
