"""The concept image pool: images of the concept drawn by the *original* model, cached on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.io import load_tensors, save_tensors
from darkminer.models.base import DiffusionModel, host_to_device
from darkminer.parallel import init_processes, sharded_sample
from darkminer.targets import EraseTarget

PRESERVE_SEED_OFFSET = 500_000  # the preservation pool's seeds never overlap the concept pool's
# Nor do the verifier's: an image drawn from a pool image's own noise would share its layout, and the round
# whose seeds met the pool's (seed 0's round 0) would be scored unlike the others.
VERIFY_SEED_OFFSET = 1_000_000


@dataclass
class ImagePool:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], for the verifier's encoder
    latents: torch.Tensor  # (N, C, h, w), the UNet's input space, for denoising losses
    conds: torch.Tensor  # (N, L, D) the prompts that drew them
    prompts: list[str] = field(default_factory=list)  # their text (mine_in_context inserts the tokens there)

    def pick(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """``k`` distinct random rows."""
        return torch.randperm(len(self.latents), generator=generator)[:k]

    def batch(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = host_to_device(self.pick(k, generator), self.latents.device)
        return self.latents[index], self.conds[index]


def build_pool(
    model: DiffusionModel,
    prompts: tuple[str, ...] | list[str],
    size: int,
    seed: int,
    cache: Path,
    guidance_scale: float | None = None,
    steps: int | None = None,
    label: str = "image pool",
) -> ImagePool:
    """``size`` images for the prompts (cycled), seeds ``seed..seed+size-1``, from the original model;
    ``label`` names the pool on its progress bar."""
    chosen = [prompts[i % len(prompts)] for i in range(size)]
    conds = model.encode(chosen, adapter=False).detach()
    processes = init_processes()
    # One answer for all processes: the sampling below is collective, so all must take the same branch.
    if processes.broadcast_object(cache.is_file()):
        stored = load_tensors(cache, device=model.device)
        return ImagePool(stored["images"].float(), stored["latents"].to(model.dtype), conds, chosen)
    with torch.no_grad():
        # Under a launcher each process draws a share of the batches and all get the whole pool.
        latents = sharded_sample(model, conds, list(range(seed, seed + size)), adapter=False, guidance_scale=guidance_scale,
                                 steps=steps, return_latents=True, progress=label, processes=processes).to(model.device)
        images = torch.cat([model.latents_to_images(latents[i : i + 8]) for i in range(0, size, 8)])
    images = images.half()
    if processes.is_main:  # every process holds the same pool; one writes it
        save_tensors(cache, {"images": images, "latents": latents})
    # The stored precision, so a run that reads the cache sees exactly what this one sees.
    return ImagePool(images.float(), latents, conds, chosen)


def build_pools(model: DiffusionModel, target: EraseTarget, config: DarkMinerConfig, work_dir: Path) -> tuple[ImagePool, ImagePool]:
    """The concept pool and the preservation pool of a Dark Miner run, cached in ``work_dir``."""
    pool = build_pool(model, target.prompts, config.pool_size, config.seed, work_dir / "pool.safetensors",
                      config.guidance_scale, config.pool_steps, label=f"{target.name} image pool")
    preserve = build_pool(model, target.preserve, config.preserve_pool_size, config.seed + PRESERVE_SEED_OFFSET,
                          work_dir / "preserve_pool.safetensors", config.guidance_scale, config.pool_steps,
                          label="preservation pool")
    return pool, preserve
