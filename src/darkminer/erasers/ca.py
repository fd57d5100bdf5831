"""Concept Ablation (CA; Kumari et al., ICCV 2023), model-based variant.

Images of the anchor concept are drawn from the frozen original; on their noised versions the model's
prediction for a prompt that names the concept is pulled toward the original's prediction for the
anchor prompt, so the concept's words come to draw the anchor. Follows nupurkmr9/concept-ablation,
diffusers/train.py (``--loss_type_reverse model-based``, ``--parameter_group cross-attn``) and its
README recipes; see docs/methods.md for what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from darkminer.config import check_choice, check_non_negative, check_positive, check_sampling_steps
from darkminer.erasers.base import Eraser, EraserConfig, register_eraser
from darkminer.erasers.training import (
    loss_summary,
    noised_batch,
    original_latents,
    train_parameters,
    trainable_unet_parameters,
)
from darkminer.models.adapters import TARGET_PRESETS
from darkminer.models.base import DiffusionModel, host_to_device
from darkminer.parallel.speed import gradient_scaler
from darkminer.targets import EraseTarget

# The authors' parameter groups: keys/values of cross-attention (default), or every attention projection
# (their later recipe for nudity and inappropriate content).
PARAMETER_GROUPS = {"cross-attn": TARGET_PRESETS["cross-attn-kv"], "attn": TARGET_PRESETS["attn"]}

# How the authors put the concept into an anchor caption (utils.py ``__getprompt__``).
STYLE_TEMPLATES = ("{anchor}, in the style of {word}", "in {word}'s style, {anchor}")
CONCEPT_TEMPLATES = ("{word}, {anchor}", "in {word} style, {anchor}", "{anchor}, {word}")


@dataclass
class CaConfig(EraserConfig):
    """Defaults of the README's single-GPU recipe: 200 steps, batch 4, lr 2e-6 scaled by the batch
    (``--scale_lr``) to 8e-6, AdamW with decay 1e-2 and gradient clipping at 1, 1000 anchor images."""

    iterations: int = 200
    lr: float = 8e-6
    batch_size: int = 4
    anchor_images: int = 1000
    parameter_group: str = "cross-attn"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # Sampling steps of the generated images; None: the model's default (50 for SD).
    image_steps: int | None = None
    checkpoint_every: int = 50

    def validate(self) -> None:
        check_positive(
            self, iterations=self.iterations, lr=self.lr, batch_size=self.batch_size,
            anchor_images=self.anchor_images, max_grad_norm=self.max_grad_norm,
            checkpoint_every=self.checkpoint_every,
        )
        check_non_negative(self, weight_decay=self.weight_decay)
        check_sampling_steps(self, image_steps=self.image_steps)
        check_choice(self, "parameter_group", self.parameter_group, tuple(PARAMETER_GROUPS))


def concept_prompts(target: EraseTarget) -> list[str]:
    """The anchor prompt with the concept's word put in, the authors' way for the target's kind."""
    templates = STYLE_TEMPLATES if target.kind == "style" else CONCEPT_TEMPLATES
    if not target.anchor:
        return [target.word]
    return [t.format(word=target.word, anchor=target.anchor) for t in templates]


@register_eraser("ca", kind="unet")
class ConceptAblation(Eraser):
    config_class = CaConfig
    # The authors' rate x100, as ESD's testbed budget; one anchor prompt needs no 1000 images (docs/methods.md).
    testbed_config: ClassVar[dict[str, Any]] = {"lr": 8e-4, "anchor_images": 128}

    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        cfg: CaConfig = self.config  # type: ignore[assignment]
        # first: it refuses half-precision weights before any image is drawn
        params = trainable_unet_parameters(model, PARAMETER_GROUPS[cfg.parameter_group])
        anchor_latents = original_latents(model, [target.anchor], cfg.anchor_images, cfg.seed, cfg.image_steps)
        prompts = concept_prompts(target)
        with torch.no_grad():
            concept_states = model.encode(prompts)
            anchor_states = model.encode([target.anchor])

        def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
            x_t, t = noised_batch(model, anchor_latents, cfg.batch_size, generator)
            which = torch.randint(len(prompts), (cfg.batch_size,), generator=generator)
            with torch.no_grad():
                teacher = model.eps(x_t, t, anchor_states.expand(cfg.batch_size, -1, -1), adapter=False)
            return F.mse_loss(model.eps(x_t, t, concept_states[host_to_device(which, concept_states.device)]), teacher)

        losses = train_parameters(
            params, loss_fn, iterations=cfg.iterations, lr=cfg.lr, seed=cfg.seed, work_dir=work_dir,
            checkpoint_every=cfg.checkpoint_every, desc=self.name, scaler=gradient_scaler(model), weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
        )
        return {**loss_summary(losses), "trained_parameters": len(params), "concept_prompts": prompts}
