"""AdvUnlearn (Zhang et al., NeurIPS 2024): ESD trained against an adversary, with a retain term.

Each iteration (after a warm-up of ESD on the bare word) first attacks the model as it is now:
``adversarial_tokens`` free token embeddings put before the concept's word are optimised with Adam for
``attack_steps`` steps, so that the model conditioned on them predicts what the frozen original predicts
for the concept (each step at a fresh ESD x_t). The model is then trained with ESD's loss on that
adversarial prompt instead of the bare word, plus ``retain_weight`` times a term that keeps its prediction
on ``retain_batch`` ordinary prompts equal to the original's (at an ESD x_t reached from those prompts).

As the authors' code (OPTML-Group/AdvUnlearn, ``train-scripts/AdvUnlearn.py``, ``utils/attack_util.py``,
``utils/get_loss.py``) with the options of its README's commands: continuous prefix embeddings never
projected to real tokens, started from random vocabulary tokens at each attack (their ``attack_init
random``), one adversarial token, 30 Adam steps at lr 1e-3, the retain term added to the loss with weight
0.3 (their ``retain_train reg``), 5 retain prompts an iteration, 200 warm-up iterations of 1000, and the
text encoder trained (their default ``text_encoder_full``: every layer but the embedding tables), which
makes the erased model a text encoder that drops into any pipeline of the base. ``layers`` may instead
name an ESD variant, whose UNet weights are then trained (their UNet ``train_method`` options). The other
differences (retain prompts, the attack loop's quirks) are listed in docs/methods.md.

With the text encoder trained, the student's conditioning goes through it (with gradients) at every step,
while the teacher, ESD's x_t and the retain term's targets take the original encoder's: the UNet is the
original's throughout, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from darkminer.config import check_choice, check_non_negative, check_positive
from darkminer.erasers.base import Eraser, register_eraser
from darkminer.erasers.esd import EsdConfig, EsdU, EsdX, EsdXStrict, esd_state, esd_teacher
from darkminer.erasers.training import (
    embedding_step,
    loss_summary,
    train_parameters,
    trainable_text_encoder_parameters,
    trainable_unet_parameters,
)
from darkminer.errors import ConfigError
from darkminer.models.base import DiffusionModel
from darkminer.models.slots import SLOT, SlottedPrompts, build_slotted, prompt_token_ids, random_token_ids
from darkminer.parallel.speed import gradient_scaler
from darkminer.targets import EraseTarget

TEXT_ENCODER = "text-encoder"  # the authors' default (text_encoder_full)
# Or UNet weights trained in place: those of an ESD variant (the authors' UNet options xattn, noxattn).
UNET_VARIANTS = {variant.name: variant for variant in (EsdX, EsdXStrict, EsdU)}
LAYERS = (TEXT_ENCODER, *UNET_VARIANTS)


@dataclass
class AdvUnlearnConfig(EsdConfig):
    """ESD's options (the authors': 1000 iterations at lr 1e-5, guidance 3 to reach x_t, negative guidance 1)
    and the adversarial training's."""

    layers: str = TEXT_ENCODER  # the text encoder's weights, or the UNet weights of this ESD variant
    adversarial_tokens: int = 1  # free embeddings before the concept's word (authors' adv_prompt_num)
    attack_steps: int = 30  # Adam steps of each attack (authors' attack_step)
    attack_lr: float = 1e-3
    warmup_iterations: int = 200  # ESD on the bare word (with the retain term) first (authors' warmup_iter)
    retain_weight: float = 0.3  # of the retain term (authors' retain_loss_w, README); 0 leaves it out
    retain_batch: int = 5  # ordinary prompts per iteration (authors' retain_batch)

    def validate(self) -> None:
        super().validate()
        check_choice(self, "layers", self.layers, LAYERS)
        check_positive(self, adversarial_tokens=self.adversarial_tokens, attack_steps=self.attack_steps,
                       attack_lr=self.attack_lr, retain_batch=self.retain_batch)
        check_non_negative(self, warmup_iterations=self.warmup_iterations, retain_weight=self.retain_weight)


def adversarial_prompt(
    model: DiffusionModel, slotted: SlottedPrompts, concept: torch.Tensor, empty: torch.Tensor, cfg: AdvUnlearnConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """The adversarial prompt found against the model as it is now, as input embeddings (1, L, E) and the
    ids they stand in for (1, L): the slots' embeddings that make the model predict, at ESD's x_t, what the
    frozen original predicts for the concept (``concept``, ``empty``: the original's conditionings)."""
    ids = random_token_ids(model, (slotted.n_slots,), generator)
    values = model.token_embedding.weight.detach()[ids].to(torch.float32, copy=True).requires_grad_(True)
    # A fresh scale each attack (nothing carried between iterations, so a resume is exact); under fp16 its
    # first steps may overflow and be skipped while it settles.
    optimizer, scaler = torch.optim.Adam([values], lr=cfg.attack_lr), gradient_scaler(model)
    for _ in range(cfg.attack_steps):
        x_t, t = esd_state(model, concept[:1], empty[:1], cfg, generator)
        with torch.no_grad():
            aim = model.eps(x_t, t, concept[:1], adapter=False)
        loss = F.mse_loss(model.eps(x_t, t, slotted.encode(model, values)), aim)
        embedding_step(values, loss, optimizer, scaler)  # the UNet weights being trained collect nothing
    return slotted.embeddings(model, values.detach()), slotted.input_ids


@register_eraser("advunlearn", kind="text_encoder")
class AdvUnlearn(Eraser):
    config_class = AdvUnlearnConfig
    # ESD-x's testbed budget (200 iterations of x_t from 25 DDIM steps), with the warm-up at the authors'
    # share of it (a fifth) and fewer attack steps, at the rate for the text encoder: 1e-3 destroys the
    # testbed's images (preservation 0.23 against 0.92), 3e-4 erases no more than 1e-4 (blood 0.48 and 0.42
    # after 100 warm-up iterations). UNet layers take their ESD variant's (docs/methods.md, "Testbed budgets").
    testbed_config: ClassVar[dict[str, Any]] = {"iterations": 200, "ddim_steps": 25, "lr": 1e-4,
                                                "warmup_iterations": 40, "attack_steps": 10}

    @classmethod
    def testbed_defaults(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        variant = UNET_VARIANTS.get(options.get("layers", TEXT_ENCODER))
        if variant is None:  # the text encoder (or a bad name, which the config refuses)
            return dict(cls.testbed_config)
        return {**cls.testbed_config, "lr": variant.testbed_config["lr"]}

    @property
    def output_kind(self) -> str:
        return "text_encoder" if self.config.layers == TEXT_ENCODER else "unet"  # type: ignore[attr-defined]

    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        cfg: AdvUnlearnConfig = self.config  # type: ignore[assignment]
        if cfg.retain_weight and len(target.preserve) < cfg.retain_batch:
            raise ConfigError(f"retain_batch {cfg.retain_batch} is more than the {len(target.preserve)} ordinary "
                              f"prompts the target has; use at most {len(target.preserve)}")
        slotted = build_slotted(model, [[SLOT] * cfg.adversarial_tokens + prompt_token_ids(model, target.word)])
        params = (trainable_text_encoder_parameters(model) if cfg.layers == TEXT_ENCODER
                  else trainable_unet_parameters(model, UNET_VARIANTS[cfg.layers].module_pattern))
        word_ids = model.tokenize([target.word])
        with torch.no_grad():  # the original's conditionings: the teacher's, and those ESD's x_t are drawn from
            concept = model.encode([target.word], adapter=False).expand(cfg.batch_size, -1, -1)
            empty = model.encode([""], adapter=False)
            blank = empty.expand(cfg.batch_size, -1, -1)
            retain = model.encode(list(target.preserve), adapter=False) if cfg.retain_weight else None
        retain_ids = model.tokenize(list(target.preserve)) if cfg.retain_weight else None

        def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
            # The student's conditioning goes through the text encoder as it is now (trained, or not).
            if iteration < cfg.warmup_iterations:
                cond = model.encode_ids(word_ids)
            else:
                cond = model.encode_embeddings(*adversarial_prompt(model, slotted, concept, blank, cfg, generator))
            x_t, t = esd_state(model, concept, blank, cfg, generator)
            teacher = esd_teacher(model, x_t, t, concept, blank, cfg.negative_guidance)
            loss = F.mse_loss(model.eps(x_t, t, cond.expand_as(concept)), teacher)
            if retain is not None and retain_ids is not None:
                chosen = torch.randperm(len(retain), generator=generator)[: cfg.retain_batch].to(retain.device)
                x_r, t_r = esd_state(model, retain[chosen], empty.expand(cfg.retain_batch, -1, -1), cfg, generator)
                with torch.no_grad():
                    kept = model.eps(x_r, t_r, retain[chosen], adapter=False)
                ordinary = model.encode_ids(retain_ids[chosen.to(retain_ids.device)])
                loss = loss + cfg.retain_weight * F.mse_loss(model.eps(x_r, t_r, ordinary), kept)
            return loss

        losses = train_parameters(
            params, loss_fn, iterations=cfg.iterations, lr=cfg.lr, seed=cfg.seed, work_dir=work_dir,
            checkpoint_every=cfg.checkpoint_every, desc=self.name, scaler=gradient_scaler(model),
        )
        return {**loss_summary(losses), "trained_parameters": len(params)}
