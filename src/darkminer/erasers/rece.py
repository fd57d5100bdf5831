"""RECE (Gong et al., ECCV 2024): reliable and efficient concept erasure by alternating closed forms.

Start from UCE; then, for a few epochs, derive in closed form the text states that make the edited
cross-attention reproduce the original's output for the concept (the embedding an attacker would look
for), and erase those with another UCE edit. Follows CharlesGong12/RECE, train.py with
``--emb_computing close_regzero`` (utils/embedding_calculation/close_form_emb.py,
erase_methods/uce.py ``edit_model_adversarial``). See docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from darkminer.config import check_non_negative, check_positive
from darkminer.erasers.base import Eraser, EraserConfig, register_eraser
from darkminer.erasers.closed_form import adversarial_states, edit_projections, uce_edit
from darkminer.io import save_tensors
from darkminer.models.base import DiffusionModel
from darkminer.targets import EraseTarget


@dataclass
class ReceConfig(EraserConfig):
    """Defaults of RECE's train.py / scripts/nudity.sh, and of its UCE starting point (train_uce.py)."""

    epochs: int = 3
    lamb: float = 0.1
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    regularisation: float = 0.1  # γ of the closed-form embedding ("regular_scale")
    # The UCE model RECE starts from (train_uce.py): λ 0.5, and None = UCE's preserve-scale rule,
    # max(0.1, 1 / #preserved prompts), 1 for the empty prompt alone.
    uce_lamb: float = 0.5
    uce_preserve_scale: float | None = None
    # As UceConfig.preserve_prompts (the authors' --preserve_concepts; none by default).
    preserve_prompts: int = 0

    def validate(self) -> None:
        check_positive(
            self, epochs=self.epochs, lamb=self.lamb, erase_scale=self.erase_scale,
            regularisation=self.regularisation, uce_lamb=self.uce_lamb,
        )
        check_non_negative(self, preserve_scale=self.preserve_scale, preserve_prompts=self.preserve_prompts)
        if self.uce_preserve_scale is not None:
            check_non_negative(self, uce_preserve_scale=self.uce_preserve_scale)


@register_eraser("rece", kind="unet")
class Rece(Eraser):
    config_class = ReceConfig

    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        cfg: ReceConfig = self.config  # type: ignore[assignment]
        start = uce_edit(model, target, erase_scale=cfg.erase_scale, preserve_scale=cfg.uce_preserve_scale,
                         lamb=cfg.uce_lamb, preserve_prompts=cfg.preserve_prompts)
        weights, preserve = start.weights, start.preserve
        with model.original():
            original = [w.detach().clone() for w in weights.values()]
        with torch.no_grad():
            concept, guide = model.encode([target.word, target.anchor]).detach()
        found: dict[str, torch.Tensor] = {}
        shifts = []
        for epoch in range(cfg.epochs):
            adversarial = adversarial_states(list(weights.values()), original, concept, cfg.regularisation)
            found[f"epoch_{epoch}"] = adversarial
            shifts.append(round(float((adversarial - concept).norm() / concept.norm()), 4))
            edit_projections(
                weights, [(adversarial, guide)], preserve,
                erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale, lamb=cfg.lamb,
            )
        # Kept beside the erased model: the text states each epoch erased (what an attack could start from).
        save_tensors(work_dir / "artifacts" / "rece_adversarial_states.safetensors", found)
        return {"edited_projections": len(weights), "epochs": cfg.epochs, "adversarial_shift": shifts}
