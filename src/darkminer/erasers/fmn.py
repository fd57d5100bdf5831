"""Forget-Me-Not (FMN; Zhang et al., CVPR-W 2024): attention re-steering.

On noised images of the concept, captioned "a photo of <word>", the UNet is fine-tuned to minimise the
norm of the cross-attention probabilities that fall on the concept's tokens (and on the end-of-text
token), so the image stops attending to the concept's words. Follows SHI-Labs/Forget-Me-Not,
src/train_attn.py and configs/attn.yaml (plain-text variant, ``use_ti: false``); see docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from darkminer.config import check_non_negative, check_positive, check_sampling_steps
from darkminer.erasers.base import Eraser, EraserConfig, register_eraser
from darkminer.erasers.training import (
    loss_summary,
    noised_batch,
    original_latents,
    train_parameters,
    trainable_unet_parameters,
)
from darkminer.errors import DarkMinerError
from darkminer.models.adapters import TARGET_PRESETS
from darkminer.models.base import DiffusionModel
from darkminer.parallel.speed import gradient_scaler
from darkminer.targets import EraseTarget

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

WHOLE_UNET = r".+"


@dataclass
class FmnConfig(EraserConfig):
    """Defaults of configs/attn.yaml: 35 steps, batch 1, lr 2e-6, AdamW (decay 1e-2, clipping at 1), the
    whole UNet trained, the end-of-text token included (``use_pooler``)."""

    iterations: int = 35
    lr: float = 2e-6
    batch_size: int = 1
    only_cross_attention: bool = False
    use_end_token: bool = True
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # Ours: the authors train on a folder of real images of the concept; we draw them from the original.
    concept_images: int = 8
    # Sampling steps of the generated images; None: the model's default (50 for SD).
    image_steps: int | None = None
    checkpoint_every: int = 50

    def validate(self) -> None:
        check_positive(
            self, iterations=self.iterations, lr=self.lr, batch_size=self.batch_size,
            concept_images=self.concept_images, max_grad_norm=self.max_grad_norm,
            checkpoint_every=self.checkpoint_every,
        )
        check_non_negative(self, weight_decay=self.weight_decay)
        check_sampling_steps(self, image_steps=self.image_steps)


class _RecordingAttnProcessor:
    """diffusers' plain attention, which also hands its attention probabilities to ``sink``. It wraps the plain
    processor rather than subclassing it, so that diffusers is imported only when FMN trains (a bad config is
    refused before)."""

    def __init__(self, sink: list[torch.Tensor]) -> None:
        from diffusers.models.attention_processor import AttnProcessor

        self.sink = sink
        self.plain = AttnProcessor()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        scores = attn.get_attention_scores

        def recording(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            probs = scores(query, key, mask)
            self.sink.append(probs)
            return probs

        attn.get_attention_scores = recording
        try:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        finally:
            del attn.get_attention_scores


@contextmanager
def recorded_cross_attention(model: DiffusionModel) -> Iterator[list[torch.Tensor]]:
    """Within the block every cross-attention layer appends its probabilities (B·heads, queries, tokens)
    to the yielded list; the UNet's own processors are restored afterwards."""
    sink: list[torch.Tensor] = []
    saved = dict(model.unet.attn_processors)
    recorder = _RecordingAttnProcessor(sink)
    model.unet.set_attn_processor({name: recorder if ".attn2." in name else proc for name, proc in saved.items()})
    try:
        yield sink
    finally:
        model.unet.set_attn_processor(saved)


def concept_token_mask(model: DiffusionModel, prompt: str, word: str, use_end_token: bool) -> torch.Tensor:
    """Positions (L,) of ``word``'s tokens in the tokenized ``prompt``, plus the end token if asked."""
    ids = model.tokenize([prompt])[0].tolist()
    word_ids = model.tokenizer(word, add_special_tokens=False).input_ids
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            mask[start : start + len(word_ids)] = True
    if not mask.any():
        raise DarkMinerError(f"the concept word {word!r} does not fit in the prompt {prompt!r}; use a shorter concept")
    if use_end_token:
        mask[ids.index(model.eos_id)] = True
    return mask


def attention_on(maps: list[torch.Tensor], mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The norm of all attention probabilities that land on the masked token positions (FMN's loss)."""
    squares = [probs.unflatten(0, (batch_size, -1))[..., mask.to(probs.device)].pow(2).sum() for probs in maps]
    return torch.stack(squares).sum().sqrt()


@register_eraser("fmn", kind="unet")
class ForgetMeNot(Eraser):
    config_class = FmnConfig

    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        cfg: FmnConfig = self.config  # type: ignore[assignment]
        # first: it refuses half-precision weights before any image is drawn
        params = trainable_unet_parameters(model, TARGET_PRESETS["cross-attn"] if cfg.only_cross_attention else WHOLE_UNET)
        images = original_latents(model, target.prompts, cfg.concept_images, cfg.seed, cfg.image_steps)
        prompt = f"a photo in the style of {target.word}" if target.kind == "style" else f"a photo of {target.word}"
        mask = concept_token_mask(model, prompt, target.word, cfg.use_end_token).to(model.device)  # once, not per step
        with torch.no_grad():
            states = model.encode([prompt]).expand(cfg.batch_size, -1, -1)

        def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
            x_t, t = noised_batch(model, images, cfg.batch_size, generator)
            with recorded_cross_attention(model) as maps:
                model.eps(x_t, t, states)
            return attention_on(maps, mask, cfg.batch_size)

        losses = train_parameters(
            params, loss_fn, iterations=cfg.iterations, lr=cfg.lr, seed=cfg.seed, work_dir=work_dir,
            checkpoint_every=cfg.checkpoint_every, desc=self.name, scaler=gradient_scaler(model), weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
        )
        return {**loss_summary(losses), "trained_parameters": len(params), "prompt": prompt}
