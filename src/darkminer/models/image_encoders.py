"""Image encoders that map images into a text-aligned space: CLIP (``models.clip.Clip``) on Stable Diffusion,
the testbed's contrastive encoder on the testbed. Dark Miner's verifier scores directions in this space."""

from __future__ import annotations

from typing import Protocol

import torch

from darkminer.errors import ModelLoadError
from darkminer.models.base import DiffusionModel
from darkminer.models.clip import Clip

SET_IMAGE_ENCODER = ("set the config option `image_encoder` to a local CLIP folder (safetensors) or a cached hub id "
                     "(e.g. openai/clip-vit-large-patch14); for a dry run on tiny-random-sd, tiny-random-clip")


class ImageEmbedder(Protocol):
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> L2-normalised embeddings (B, D)."""
        ...


def load_image_encoder(model: DiffusionModel, spec: str | None = None) -> ImageEmbedder:
    """The verifier's encoder for ``model``: the testbed encoder on the testbed; a CLIP otherwise."""
    from darkminer.models import is_testbed

    if spec in (None, "testbed") and is_testbed(model):
        from darkminer.testbed.image_encoder import ImageEncoder

        return ImageEncoder.load(device=model.device)
    if spec is None:
        raise ModelLoadError(
            f"this model needs a CLIP image encoder for verification: {SET_IMAGE_ENCODER}"
        )
    return Clip.load(spec, device=model.device)
