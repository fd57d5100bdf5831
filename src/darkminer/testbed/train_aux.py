"""Train the testbed's judge and image encoder from a seed: ``python -m darkminer.testbed.train_aux``.

Both train on freshly rendered procedural images (never the same pixels twice), on one CPU core by
default, and write safetensors weights atomically plus a small JSON card with the measured accuracies.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from darkminer.io import save_tensors, write_json
from darkminer.testbed import image_encoder, judge
from darkminer.testbed.captions import caption
from darkminer.testbed.image_encoder import (
    ImageEncoder,
    ImageEncoderNet,
    SentenceEmbedder,
    zero_shot_classifiers,
)
from darkminer.testbed.judge import Judge, JudgeNet
from darkminer.testbed.train_unet import warmup_lr
from darkminer.testbed.world import HEADS, render_batch, sample_batch, sample_scenes

EVAL_IMAGES = 2048
# Judge v2's length: 1,500 steps brought the shape head back to v1's held-out 0.995 (1,000 gave 0.990 under
# the harder, drifted batches).
JUDGE_STEPS = 1500
# Share of each judge batch that is junk (noise, colour fields), so the judge sees no overlay in them.
JUNK_SHARE = 1 / 16
_IGNORE = -100
# The judge's colour drift (``colour_drift``): ranges that include where judge v1 broke on rendered fire
# scenes (saturation x0.6 kept 14% of the fire, contrast x0.6 kept 9%), the range of the UNet's samples.
DRIFT_SHARE = 0.5
DRIFT_SATURATION = (0.45, 1.1)
DRIFT_CONTRAST = (0.55, 1.1)
DRIFT_EXPOSURE = (0.75, 1.1)
DRIFT_CAST = 0.08


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild corruptions of the kind a small diffusion model's samples show: noise, blur, colour drift, blotches."""
    n = images.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    x = images * (0.95 + 0.1 * uniform(n, 1, 1, 1)) + 0.06 * (uniform(n, 3, 1, 1) - 0.5)
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + (uniform(n, 1, 1, 1) < 0.4) * uniform(n, 1, 1, 1) * (blurred - x)
    blotches = F.interpolate(torch.randn(n, 3, 4, 4, generator=generator), size=x.shape[-2:], mode="bilinear")
    x = x + 0.04 * uniform(n, 1, 1, 1) * blotches
    # Up to sigma 0.1: unconverged samples are grainier than clean renders.
    x = x + 0.1 * uniform(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0)


def colour_drift(images: torch.Tensor, generator: torch.Generator, share: float = DRIFT_SHARE) -> torch.Tensor:
    """The testbed UNet's colour drift on a ``share`` of the images: washed-out saturation and contrast,
    darker or lighter exposure, a colour cast. The judge's first version never saw it and missed plainly
    drawn flames on 20% of generated fire images (docs/testbed_world.md, "Judge v2")."""
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    luminance = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = luminance + uniform(*DRIFT_SATURATION, 1, 1, 1) * (images - luminance)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + uniform(*DRIFT_CONTRAST, 1, 1, 1) * (x - mean)
    x = x * uniform(*DRIFT_EXPOSURE, 1, 1, 1) + uniform(-DRIFT_CAST, DRIFT_CAST, 3, 1, 1)
    drifted = torch.rand(n, 1, 1, 1, generator=generator) < share
    return torch.where(drifted, x, images).clamp(0.0, 1.0)


def junk_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Pictures that are no scene at all: uniform noise, colour and grey Gaussian noise, smooth colour fields,
    flat colours. Grey noise (one channel copied to three) was added with judge v2: v1 called it blood."""
    uniform = torch.rand(n, 3, 32, 32, generator=generator)
    spread = 0.1 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    noise = 0.5 + spread * torch.randn(n, 3, 32, 32, generator=generator)
    grey = noise[:, :1].expand(n, 3, 32, 32)
    fields = F.interpolate(torch.rand(n, 3, 4, 4, generator=generator), size=(32, 32), mode="bilinear")
    flat = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, 32, 32)
    kinds = torch.stack([uniform, noise, grey, fields, flat])
    kind = torch.randint(0, len(kinds), (n,), generator=generator)
    return kinds[kind, torch.arange(n)].clamp(0.0, 1.0)


def _junk_label(head: str) -> int:
    # Junk teaches only that an overlay needs evidence: with no scene, the overlay is "none"; the
    # other heads have no right answer and are left out of the loss.
    return HEADS["overlay"].index("none") if head == "overlay" else _IGNORE


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be a positive number of optimiser steps, got {steps}")


def train_judge(
    seed: int = 0,
    steps: int = JUDGE_STEPS,
    out_path: str | Path = judge.WEIGHTS_PATH,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
) -> dict:
    """Train the judge on fresh procedural batches; save weights and card; return the card."""
    _check_steps(steps)
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0])
    generator = torch.Generator().manual_seed(seed)
    net = JudgeNet({head: len(values) for head, values in HEADS.items()})
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = warmup_lr(optimizer, steps, warmup=steps // 20)
    junk_per_batch = round(batch_size * JUNK_SHARE)
    net.train()
    for _ in (progress := tqdm(range(steps), desc="judge", unit="step")):
        _, images, labels = sample_batch(batch_size - junk_per_batch, rng)
        images = torch.cat([augment(colour_drift(images, generator), generator), junk_images(junk_per_batch, generator)])
        labels = {
            head: torch.cat([target, torch.full((junk_per_batch,), _junk_label(head), dtype=torch.long)])
            for head, target in labels.items()
        }
        logits = net(images)
        loss = sum(F.cross_entropy(logits[head], labels[head], ignore_index=_IGNORE) for head in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    trained = Judge(net)
    _, images, labels = sample_batch(EVAL_IMAGES, np.random.default_rng([seed, 1]))
    junk_overlay = trained.predict(junk_images(EVAL_IMAGES, generator))["overlay"]
    card = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": round(time.perf_counter() - started, 1),
        "heldout_accuracy": trained.accuracy(images, labels),
        "heldout_accuracy_augmented": trained.accuracy(augment(images, generator), labels),
        "junk_overlay_none_rate": (junk_overlay == HEADS["overlay"].index("none")).float().mean().item(),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    config = {"widths": list(judge.DEFAULT_WIDTHS), "heads": {h: list(v) for h, v in HEADS.items()}}
    _save(out_path, net.state_dict(), config, card)
    return card


def caption_bank(
    size: int, seed: int, embedder: SentenceEmbedder, batch_size: int = 256
) -> tuple[list, list[str], torch.Tensor]:
    """``size`` scenes, one non-empty training caption each, and the captions' sentence embeddings."""
    rng = np.random.default_rng([seed, 2])
    scenes = sample_scenes(size, rng)
    texts = [caption(scene, rng, dropout=0.0) for scene in scenes]
    chunks = [
        embedder.encode(texts[start : start + batch_size], batch_size)
        for start in tqdm(range(0, size, batch_size), desc="caption embeddings", unit="batch")
    ]
    return scenes, texts, torch.cat(chunks)


def train_image_encoder(
    seed: int = 0,
    steps: int = 600,
    out_path: str | Path = image_encoder.WEIGHTS_PATH,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    bank_size: int = 8192,
) -> dict:
    """Train the image tower with InfoNCE against frozen MiniLM caption embeddings; save; return the card."""
    _check_steps(steps)
    started = time.perf_counter()
    torch.manual_seed(seed)
    embedder = SentenceEmbedder()
    scenes, _, text_embeddings = caption_bank(bank_size, seed, embedder)
    bank_seconds = time.perf_counter() - started

    rng = np.random.default_rng([seed, 3])
    generator = torch.Generator().manual_seed(seed + 1)
    net = ImageEncoderNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = warmup_lr(optimizer, steps, warmup=steps // 20)
    targets = torch.arange(batch_size)
    net.train()
    for _ in (progress := tqdm(range(steps), desc="image encoder", unit="step")):
        index = rng.choice(bank_size, size=batch_size, replace=False)
        images, _ = render_batch([scenes[i] for i in index], rng)
        image_embeddings = net(augment(images, generator))
        logits = net.logit_scale.exp() * image_embeddings @ text_embeddings[index].T
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0.0, np.log(100.0))  # CLIP's cap on the temperature
        progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{net.logit_scale.exp().item():.1f}")

    encoder = ImageEncoder(net, zero_shot_classifiers(embedder))
    _, images, labels = sample_batch(EVAL_IMAGES, np.random.default_rng([seed, 1]))
    card = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "bank_size": bank_size,
        "bank_seconds": round(bank_seconds, 1),
        "train_seconds": round(time.perf_counter() - started, 1),
        "temperature": round(1.0 / net.logit_scale.exp().item(), 4),
        "zero_shot_accuracy": encoder.zero_shot_accuracy(images, labels),
        "chance": {head: round(1.0 / len(values), 3) for head, values in HEADS.items()},
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    config = {
        "widths": list(image_encoder.DEFAULT_WIDTHS),
        "embedding_dim": image_encoder.EMBEDDING_DIM,
        "heads": {h: list(v) for h, v in HEADS.items()},
    }
    _save(out_path, encoder.state_tensors(), config, card)
    return card


def _save(out_path: str | Path, tensors: dict[str, torch.Tensor], config: dict, card: dict) -> None:
    out_path = Path(out_path)
    save_tensors(out_path, tensors, metadata={"config": json.dumps(config), "card": json.dumps(card)})
    write_json(out_path.with_suffix(".json"), card)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the testbed judge and image encoder from a seed.")
    parser.add_argument("--only", choices=("judge", "encoder"), help="train just one of the two")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-steps", type=int, default=JUDGE_STEPS)
    parser.add_argument("--encoder-steps", type=int, default=600)
    parser.add_argument("--bank-size", type=int, default=8192, help="captions embedded once by MiniLM")
    parser.add_argument("--out-dir", type=Path, default=judge.WEIGHTS_PATH.parent)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (keep low on shared machines)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only in (None, "judge"):
        card = train_judge(args.seed, args.judge_steps, args.out_dir / judge.WEIGHTS_PATH.name)
        print(json.dumps({"judge": card}, indent=2))
    if args.only in (None, "encoder"):
        card = train_image_encoder(
            args.seed,
            args.encoder_steps,
            args.out_dir / image_encoder.WEIGHTS_PATH.name,
            bank_size=args.bank_size,
        )
        print(json.dumps({"image_encoder": card}, indent=2))


if __name__ == "__main__":
    main()
