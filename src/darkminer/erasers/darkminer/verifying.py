"""Verifying: does a mined embedding really make the current model draw the concept?

From the same noise, draw x_c with the mined embedding and x_r with the reference (anchor) embedding, and
score s(c) = mean over pool images x_e of cos(E(x_c) - E(x_r), E(x_e) - E(x_r)) with a text-aligned image
encoder E (never the judge). s > tau passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darkminer.models.base import DiffusionModel
from darkminer.models.image_encoders import ImageEmbedder


@torch.no_grad()
def direction_score(encoder: ImageEmbedder, mined_images: torch.Tensor, reference_images: torch.Tensor,
                    pool_images: torch.Tensor) -> float:
    """Mean cosine between the mined-vs-reference direction and every pool-vs-reference direction."""
    e_c, e_r, e_p = encoder.encode(mined_images), encoder.encode(reference_images), encoder.encode(pool_images)
    towards_mined = (e_c - e_r)[:, None, :]  # (k, 1, D)
    towards_pool = e_p[None, :, :] - e_r[:, None, :]  # (k, P, D)
    return F.cosine_similarity(towards_mined, towards_pool, dim=-1).mean().item()


@torch.no_grad()
def verify(model: DiffusionModel, encoder: ImageEmbedder, cond: torch.Tensor, reference: torch.Tensor,
           pool_images: torch.Tensor, seeds: list[int], steps: int, guidance_scale: float | None) -> tuple[float, torch.Tensor]:
    k = len(seeds)
    mined = model.sample(cond.expand(k, -1, -1), seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    ref = model.sample(reference.expand(k, -1, -1), seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    return direction_score(encoder, mined, ref, pool_images), mined
