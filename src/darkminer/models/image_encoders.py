"""Image encoders that map images into a text-aligned space: CLIP's image tower for Stable Diffusion, the
testbed's contrastive encoder on the testbed. Dark Miner's verifier scores directions in this space."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from darkminer.errors import ModelLoadError
from darkminer.models.base import DiffusionModel

TINY_CLIP_ID = "tiny-random-clip"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEmbedder(Protocol):
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> L2-normalised embeddings (B, D)."""
        ...


class ClipImageEncoder:
    """CLIP's image tower with its projection, preprocessing done in torch (no PIL round trip)."""

    def __init__(self, vision_model: torch.nn.Module) -> None:
        self.model = vision_model.eval().requires_grad_(False)
        self.size = int(vision_model.config.image_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu") -> ClipImageEncoder:
        from transformers import CLIPVisionModelWithProjection

        if name_or_path == TINY_CLIP_ID:
            from transformers import CLIPVisionConfig

            torch.manual_seed(0)
            config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
            return cls(CLIPVisionModelWithProjection(config).to(device))
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(name_or_path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load CLIP {name_or_path!r} ({str(exc).splitlines()[0][:160]}); pass a local CLIP folder "
                "with safetensors weights or a hub id already in the cache (e.g. openai/clip-vit-large-patch14)"
            ) from None
        return cls(model.to(device))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = F.interpolate(images.to(param.device, torch.float32), size=(self.size, self.size), mode="bicubic", antialias=True)
        mean = torch.tensor(_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_CLIP_STD, device=x.device).view(1, 3, 1, 1)
        embeds = self.model(pixel_values=((x - mean) / std).to(param.dtype)).image_embeds
        return F.normalize(embeds.float(), dim=-1)


def load_image_encoder(model: DiffusionModel, spec: str | None = None) -> ImageEmbedder:
    """The verifier's encoder for ``model``: the testbed encoder on the testbed; a CLIP otherwise."""
    from darkminer.targets import is_testbed

    if spec in (None, "testbed") and is_testbed(model):
        from darkminer.testbed.image_encoder import ImageEncoder

        return ImageEncoder.load(device=model.device)
    if spec is None:
        raise ModelLoadError(
            "this model needs a CLIP image encoder for verification: set the config option `image_encoder` to a "
            "local CLIP folder or cached hub id (e.g. openai/clip-vit-large-patch14)"
        )
    return ClipImageEncoder.from_pretrained(spec, device=model.device)
