"""CLIP (image and text towers with their projections), the one loader behind Dark Miner's verifier on
Stable Diffusion and the evaluation's CLIP score and zero-shot detector.

Weights come from a local folder or a hub id already in the cache, safetensors only, never downloaded;
``tiny-random-clip`` is a small randomly initialised CLIP for tests and dry runs. Images are preprocessed
in torch with CLIP's own recipe (shortest side to the model's size, bicubic; centre crop; CLIP mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from darkminer.errors import DarkMinerError, ModelLoadError
from darkminer.models.base import seeded
from darkminer.models.loading import (
    bars_hidden,
    check_tokenizer,
    checked_weights,
    first_line,
    only_pickled_weights,
)

TINY_CLIP_ID = "tiny-random-clip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_BATCH = 32  # images per forward pass
_HOW_TO_PASS = (
    "pass a local CLIP folder with safetensors weights, or a hub id already in the cache (download it once with "
    "`hf download openai/clip-vit-large-patch14`), as `image_encoder` (Dark Miner) or `--clip-model` (evaluate, attack); "
    "for a dry run on tiny-random-sd, tiny-random-clip"
)


def build_tiny_clip(seed: int = 0) -> tuple[Any, Any]:
    """``tiny-random-clip``: a CLIPModel with 32x32 images and 16-d projections, and the offline byte-BPE
    tokenizer of ``tiny-random-sd``; deterministic for a seed, without touching the global RNG."""
    from transformers import CLIPConfig, CLIPModel

    from darkminer.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": tokenizer.model_max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16,
    )
    with seeded(seed):
        model = CLIPModel(config)
    return model, tokenizer


class Clip:
    """A transformers ``CLIPModel`` with its tokenizer. ``image_features``/``encode`` map images (B, 3, H, W)
    in [0, 1] to L2-normalised (B, D); ``text_features`` does the same for captions. Features stay on the
    model's device."""

    def __init__(self, model: Any, tokenizer: Any, source: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.source = tokenizer, source
        self.size = int(model.config.vision_config.image_size)
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Clip:
        """CLIP from a local folder or a cached hub id (never downloaded), or ``tiny-random-clip``."""
        if name_or_path == TINY_CLIP_ID:
            model, tokenizer = build_tiny_clip()
            return cls(model.to(device, dtype), tokenizer, name_or_path)
        folder = Path(name_or_path).expanduser()
        if not folder.exists() and (folder.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") > 1):
            raise ModelLoadError(f"cannot load CLIP {name_or_path!r} (no such folder); {_HOW_TO_PASS}")
        if only_pickled_weights(folder):
            raise ModelLoadError(f"CLIP {name_or_path!r} has only pickled weights, which darkminer does not load; "
                                 f"convert them to safetensors or {_HOW_TO_PASS}")
        from transformers import AutoTokenizer, CLIPModel

        what = f"CLIP {name_or_path!r}"
        try:
            source = str(folder) if folder.is_dir() else name_or_path
            with bars_hidden("transformers"):
                loaded = CLIPModel.from_pretrained(source, local_files_only=True, use_safetensors=True,
                                                   output_loading_info=True)
            model = checked_weights(loaded, what)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except ModelLoadError:
            raise
        except Exception as exc:  # any library error while reading foreign files: one line, what to do
            raise ModelLoadError(f"cannot load {what} ({type(exc).__name__}: {first_line(exc, 160)}); {_HOW_TO_PASS}") from None
        check_tokenizer(tokenizer, what)
        return cls(model.to(device, dtype), tokenizer, name_or_path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's preprocessing in torch: shortest side to ``size`` (bicubic, antialiased), centre crop to
        ``size`` x ``size``, normalise with CLIP's mean and std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DarkMinerError(f"CLIP takes images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        height, width = x.shape[-2:]
        scale = self.size / min(height, width)
        resized = (max(self.size, int(height * scale)), max(self.size, int(width * scale)))
        if resized != (height, width):
            x = F.interpolate(x, size=resized, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (resized[0] - self.size) // 2, (resized[1] - self.size) // 2
        x = x[:, :, top : top + self.size, left : left + self.size]
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> L2-normalised embeddings (B, D), on the model's device; in
        batches of ``IMAGE_BATCH``, so that a large set does not pass through ViT-L at once."""
        features = [self.model.get_image_features(pixel_values=self.preprocess(batch)).pooler_output
                    for batch in images.split(IMAGE_BATCH)]
        return F.normalize(torch.cat(features).float(), dim=-1)

    encode = image_features  # the verifier's ImageEmbedder protocol

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> L2-normalised embeddings (len(texts), D), on the model's device."""
        tokens = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length)
        output = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return F.normalize(output.pooler_output.float(), dim=-1)

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """CLIP score per image on the CPU, 100 * max(cos, 0) (Hessel et al. 2021; torchmetrics' definition)."""
        if len(texts) != images.shape[0]:
            raise DarkMinerError(f"{len(texts)} captions for {images.shape[0]} images")
        cosine = (self.image_features(images) * self.text_features(texts)).sum(-1)
        return (100 * cosine).clamp(min=0).cpu()

    def describe(self) -> dict[str, Any]:
        return {"name": "clip-score", "model": self.source, "scale": "100 * max(cos, 0)"}
