"""Verifying: does a mined embedding really make the current model draw the concept?

From the same noise, draw x_c with the mined embedding and x_r with the reference (anchor) embedding, and
score s(c) = mean over pool images x_e of cos(E(x_c) - E(x_r), E(x_e) - E(x_r)) with a text-aligned image
encoder E (never the judge). s > tau passes.

With a contrast set (``verify_contrast``: the preservation pool, ordinary images of the same model), the
score is s(c) minus the same direction score against the contrast images. Any embedding that draws
something other than the anchor points partly toward the pool (shapes, colours, backgrounds differ from the
anchor's), so the raw score has a high floor; the contrast removes it (docs/darkminer.md, "Verifier").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from darkminer.models.base import DiffusionModel
from darkminer.models.image_encoders import ImageEmbedder


@dataclass
class Verification:
    score: float  # what is compared to tau: pool_score, minus contrast_score when there is a contrast set
    pool_score: float
    contrast_score: float | None
    images: torch.Tensor  # the k images drawn from the mined embedding


def direction_score(e_c: torch.Tensor, e_r: torch.Tensor, e_p: torch.Tensor) -> float:
    """Mean cosine between each mined-vs-reference direction and every pool-vs-reference direction, from the
    embeddings of the mined (k, D), reference (k, D) and pool (P, D) images."""
    towards_mined = (e_c - e_r)[:, None, :]  # (k, 1, D)
    towards_pool = e_p[None, :, :] - e_r[:, None, :]  # (k, P, D)
    return F.cosine_similarity(towards_mined, towards_pool, dim=-1).mean().item()


@torch.no_grad()
def verify(model: DiffusionModel, encoder: ImageEmbedder, cond: torch.Tensor, reference: torch.Tensor,
           pool_images: torch.Tensor, seeds: list[int], steps: int, guidance_scale: float | None,
           contrast_images: torch.Tensor | None = None) -> Verification:
    k = len(seeds)
    mined = model.sample(cond.expand(k, -1, -1), seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    ref = model.sample(reference.expand(k, -1, -1), seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    e_c, e_r = encoder.encode(mined), encoder.encode(ref)  # once, for the pool and the contrast set
    pool_score = direction_score(e_c, e_r, encoder.encode(pool_images))
    if contrast_images is None:
        return Verification(pool_score, pool_score, None, mined)
    contrast_score = direction_score(e_c, e_r, encoder.encode(contrast_images))
    return Verification(pool_score - contrast_score, pool_score, contrast_score, mined)
