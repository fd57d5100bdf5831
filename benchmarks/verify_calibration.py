"""Calibrate the verifier's threshold tau on the testbed: its score s(c) against the judge's ground truth.

The verifier must pass an embedding that makes the *current* model draw the concept and fail one that does
not. For a concept, this scores candidate embeddings with exactly the verifier Dark Miner runs
(``verify``: k images from c and from the anchor, same noise, direction score against the concept pool)
and grades the k images drawn from c with the judge (the share showing the concept). Candidates:

- ``direct`` / ``paraphrase``: the concept's direct prompts and held-out paraphrases (evaluation seed);
- ``other``: preservation prompts (other shapes, colours, styles; no target concept asked for);
- ``random``: ``n_tokens`` random vocabulary tokens, as the miner's random initialisation;
- ``mined``: every round's mined embedding of a Dark Miner run (``--erased``).

each scored on the original model and, with ``--erased``, on the erased one, where the concept's own words
should no longer draw it -- the case a useful verifier must reject. Both scores are recorded: the raw
direction score against the pool, and the contrast score (minus the same against the preservation pool,
``verify_contrast``), each with a sweep of thresholds.

    python benchmarks/verify_calibration.py --concept blood --erased runs/dm-blood \
        --out benchmarks/results/verify_calibration.json --plot docs/img/verify_calibration.png

Several concepts append to the same ``--out`` file (one entry per concept; a rerun of a concept, e.g. at
another ``--verify-steps``, replaces its entry: give each step count its own ``--out``). The judge only grades.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.erasers.darkminer.loop import load_rounds
from darkminer.erasers.darkminer.mining import initial_embedding
from darkminer.erasers.darkminer.pool import build_pools
from darkminer.erasers.darkminer.verifying import verify
from darkminer.io import read_json, write_json
from darkminer.models import load_model
from darkminer.models.base import DiffusionModel
from darkminer.models.image_encoders import load_image_encoder
from darkminer.targets import resolve_target
from darkminer.testbed.concepts import Concept, get_concept
from darkminer.testbed.judge import Judge

PROMPT_SEED = 1  # evaluation prompts; Dark Miner's pool is drawn from seed 0's
TAUS = (-0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
DRAWS = 0.25  # an embedding "draws the concept" when at least this share of its k images shows it


def candidates(model: DiffusionModel, concept: Concept, n: int, cfg: DarkMinerConfig,
               erased: str | None) -> list[tuple[str, str, torch.Tensor]]:
    """(kind, label, (1, L, D) condition) for every candidate embedding."""
    out = []
    with torch.no_grad():
        for kind, rows in (("direct", concept.direct_prompts(n, PROMPT_SEED)),
                           ("paraphrase", concept.paraphrase_prompts(n, PROMPT_SEED)),
                           ("other", concept.preservation_prompts(n, PROMPT_SEED))):
            out += [(kind, row.text, model.encode([row.text])) for row in rows]
        random_cfg = DarkMinerConfig(init="random", n_tokens=cfg.n_tokens)
        for i in range(n):
            start = initial_embedding(model, concept.value, random_cfg, torch.Generator().manual_seed(i), None)
            _, words = model.nearest_tokens(start.values)
            out.append(("random", " ".join(w[0] for w in words), start.condition(model)))
        if erased:
            for index, (mined, _) in enumerate(load_rounds(erased)):
                out.append(("mined", f"round {index}", mined.condition(model)))
    return out


def auc(draws: list[float], clean: list[float]) -> float | None:
    """Area under the ROC curve: the chance that an embedding that draws the concept outscores one that
    does not (ties count half). 1.0 separates perfectly; 0.5 is a coin."""
    if not draws or not clean:
        return None
    wins = sum((d > c) + 0.5 * (d == c) for d in draws for c in clean)
    return round(wins / (len(draws) * len(clean)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="blood")
    parser.add_argument("--erased", default=None, help="a Dark Miner erased-model directory of this concept")
    parser.add_argument("-n", type=int, default=8, help="candidates per prompt kind")
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--verify-steps", type=int, default=None,
                        help="DDIM steps of the verifier's images (default: DarkMinerConfig's verify_steps)")
    parser.add_argument("--work", default="runs/verify-calibration",
                        help="cache of the pools, one folder per concept (delete it after changing the config)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tick = time.time()
    # The verifier exactly as the loop runs it (k, verify_steps, guidance, pool), verify_steps as asked.
    cfg = DarkMinerConfig() if args.verify_steps is None else DarkMinerConfig(verify_steps=args.verify_steps)
    concept, judge = get_concept(args.concept), Judge.load()
    models = {"original": load_model("testbed")}
    if args.erased:
        models["erased"] = load_model("testbed", erased=args.erased)
    base = models["original"]
    target = resolve_target(base, args.concept, seed=cfg.seed)
    pool, preserve = build_pools(base, target, cfg, Path(args.work) / args.concept)  # the loop's own pools
    encoder = load_image_encoder(base, cfg.image_encoder)
    rows, verifying = [], 0.0
    for model_name, model in models.items():
        with torch.no_grad():
            anchor = model.encode([target.anchor])
        for i, (kind, label, cond) in enumerate(candidates(model, concept, args.n, cfg, args.erased)):
            seeds = [10_000 + 100 * i + j for j in range(cfg.k)]
            started = time.perf_counter()
            result = verify(model, encoder, cond, anchor, pool.images[: cfg.k], seeds, cfg.verify_steps,
                            cfg.guidance_scale, contrast_images=preserve.images[: cfg.k])
            verifying += time.perf_counter() - started
            rate = judge.has_concept(result.images, concept).float().mean().item()
            rows.append({"model": model_name, "kind": kind, "label": label, "raw": round(result.pool_score, 4),
                         "contrast": round(result.score, 4), "judge_rate": rate})
            print(f"{model_name:8s} {kind:10s} raw={result.pool_score:+.3f} contrast={result.score:+.3f} "
                  f"judge={rate:.2f}  {label[:50]}", flush=True)
    draws = [r for r in rows if r["judge_rate"] >= DRAWS]
    clean = [r for r in rows if r["judge_rate"] < DRAWS]
    sweep = {score: [{"tau": tau,
                      "pass_when_draws": sum(r[score] > tau for r in draws) / max(1, len(draws)),
                      "pass_when_clean": sum(r[score] > tau for r in clean) / max(1, len(clean))} for tau in TAUS]
             for score in ("raw", "contrast")}
    separation = {score: auc([r[score] for r in draws], [r[score] for r in clean]) for score in ("raw", "contrast")}
    entry = {"concept": args.concept, "auc": separation, "erased": args.erased, "k": cfg.k, "verify_steps": cfg.verify_steps,
             "draws_threshold": DRAWS, "n_draws": len(draws), "n_clean": len(clean), "sweep": sweep, "rows": rows,
             "seconds": round(time.time() - tick, 1), "seconds_verifying": round(verifying, 1)}
    results = read_json(args.out) if Path(args.out).is_file() else {"concepts": {}}
    results["concepts"][args.concept] = entry
    write_json(args.out, results)
    for score, thresholds in sweep.items():
        for s in thresholds:
            print(f"{score:8s} tau {s['tau']:+.2f}: passes {s['pass_when_draws']:.2f} of embeddings that draw the "
                  f"concept, {s['pass_when_clean']:.2f} of those that do not")
    if args.plot:
        _plot(results, args.plot)


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["concepts"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.0 * len(names), 5.6), dpi=110, squeeze=False, sharey="row")
    markers = {"direct": "o", "paraphrase": "s", "other": "^", "random": "x", "mined": "*"}
    for row, score in enumerate(("raw", "contrast")):
        for ax, name in zip(axes[row], names, strict=True):
            for model_name, colour in (("original", "tab:blue"), ("erased", "tab:red")):
                for kind, marker in markers.items():
                    pts = [r for r in results["concepts"][name]["rows"] if r["model"] == model_name and r["kind"] == kind]
                    if pts:
                        ax.scatter([r["judge_rate"] for r in pts], [r[score] for r in pts], c=colour, marker=marker,
                                   s=18, alpha=0.7, label=f"{model_name}: {kind}")
            ax.set_title(f"{name}: {score} score", fontsize=9)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("verifier score")
    for ax in axes[1]:
        ax.set_xlabel("judge: share of the k images with the concept", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
