"""The concept image pool: images of the concept drawn by the *original* model, cached on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from darkminer.io import load_tensors, save_tensors
from darkminer.models.base import DiffusionModel
from darkminer.parallel import init_processes, sharded_sample


@dataclass
class ImagePool:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], for the verifier's encoder
    latents: torch.Tensor  # (N, C, h, w), the UNet's input space, for denoising losses
    conds: torch.Tensor  # (N, L, D) the prompts that drew them

    def batch(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randperm(len(self.latents), generator=generator)[:k]
        return self.latents[index], self.conds[index]


def build_pool(
    model: DiffusionModel,
    prompts: tuple[str, ...] | list[str],
    size: int,
    seed: int,
    cache: Path,
    guidance_scale: float | None = None,
    steps: int | None = None,
) -> ImagePool:
    """``size`` images for the prompts (cycled), seeds ``seed..seed+size-1``, from the original model."""
    chosen = [prompts[i % len(prompts)] for i in range(size)]
    conds = model.encode(chosen).detach()
    if cache.is_file():
        stored = load_tensors(cache, device=model.device)
        return ImagePool(stored["images"].float(), stored["latents"].to(model.dtype), conds)
    with torch.no_grad():
        # Under a launcher each process draws a share of the batches and all get the whole pool.
        latents = sharded_sample(model, conds, list(range(seed, seed + size)), adapter=False, guidance_scale=guidance_scale,
                                 steps=steps, return_latents=True, progress=True)
        images = torch.cat([model.latents_to_images(latents[i : i + 8]) for i in range(0, size, 8)])
    images = images.half()
    if init_processes().is_main:  # every process holds the same pool; one writes it
        save_tensors(cache, {"images": images, "latents": latents})
    # The stored precision, so a run that reads the cache sees exactly what this one sees.
    return ImagePool(images.float(), latents, conds)
