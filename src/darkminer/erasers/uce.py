"""Unified Concept Editing (UCE; Gandikota et al., WACV 2024): a closed-form edit of the cross-attention
keys and values so the concept's text states produce what the guide concept's states produce.

Follows the paper-era script rohitgandikota/unified-concept-editing, train-scripts/train_erase.py
("replace" technique): keys are the concept prompt's states from its last word onwards, aligned with the
guide prompt's; the empty prompt is always preserved. See docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from darkminer.config import check_non_negative, check_positive
from darkminer.erasers.base import Eraser, EraserConfig, register_eraser
from darkminer.erasers.closed_form import uce_edit
from darkminer.models.base import DiffusionModel
from darkminer.targets import EraseTarget


@dataclass
class UceConfig(EraserConfig):
    """Defaults of train_erase.py: erase scale 1, λ 0.5, and its preserve-scale rule."""

    erase_scale: float = 1.0
    # None: train_erase.py's rule when --preserve_scale is unset, max(0.1, 1 / #preserved prompts), which
    # is 1 for the empty prompt alone.
    preserve_scale: float | None = None
    lamb: float = 0.5
    # Ours: how many of the target's ordinary prompts join the empty prompt in the preserve set (the
    # authors preserve other artists' names when erasing an artist, nothing else for objects/nudity).
    preserve_prompts: int = 0

    def validate(self) -> None:
        check_positive(self, erase_scale=self.erase_scale, lamb=self.lamb)
        check_non_negative(self, preserve_prompts=self.preserve_prompts)
        if self.preserve_scale is not None:
            check_non_negative(self, preserve_scale=self.preserve_scale)


@register_eraser("uce", kind="unet")
class Uce(Eraser):
    config_class = UceConfig

    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        cfg: UceConfig = self.config  # type: ignore[assignment]
        done = uce_edit(model, target, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale, lamb=cfg.lamb,
                        preserve_prompts=cfg.preserve_prompts)
        return {"edited_projections": len(done.weights), "guide": target.anchor, "preserved_prompts": len(done.preserve),
                "preserve_scale": done.preserve_scale}
