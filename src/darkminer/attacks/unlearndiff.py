"""UnlearnDiffAtk (Zhang et al., ECCV 2024): the erased model as its own classifier.

White-box, per prompt: ``k`` real tokens put before the prompt are chosen so that the *erased* model's
denoising loss on the target image -- the *original* model's image of the prompt, drawn with the
prompt's seed -- is minimal, i.e. the erased model thinks the adversarial prompt explains the image.

The search follows the authors' code (OPTML-Group/Diffusion-MU-Attack, ``src/attackers/text_grad_.py``,
``src/tasks/classifier_.py``, ``configs/nudity/text_grad_esd_nudity_classifier.json``): each slot holds a
distribution over the vocabulary, started uniform; every step draws one token per slot from it
(straight-through, the gradient clipped to [-1, 1]), takes an Adam step (lr 0.01, L2 weight decay 0.1)
and projects the distribution back onto the probability simplex. The timesteps are attacked in
sequence, t = 10, 30, ..., 990 (50 rounds of 40 iterations, fresh noise each iteration); after each round
the prompt of the most likely tokens (argmax) is generated with the prompt's seed and judged, and the
attack stops at the first success. A prompt that already succeeds unattacked is not attacked.
We exclude special and unused tokens from the vocabulary (the authors do not); the simplex projection
is the exact sort-based one, equal to the authors' bisection (the upper bound 1 never binds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from darkminer.attacks.base import AttackPrompt, AttackResult, SuccessFn, register_attack
from darkminer.attacks.soft_prompt import PromptwiseAttack, PromptwiseConfig, original_images, still_failing
from darkminer.config import MAX_SAMPLING_STEPS, check_choice, check_non_negative, check_positive
from darkminer.errors import ConfigError
from darkminer.models.base import DiffusionModel, host_to_device
from darkminer.models.objectives import denoising_losses
from darkminer.models.slots import (
    SLOT,
    allowed_token_ids,
    build_slotted,
    check_token_room,
    encode_slotted,
    prompt_token_ids,
)
from darkminer.parallel.speed import gradient_scaler


@dataclass
class UnlearnDiffConfig(PromptwiseConfig):
    k: int = 5  # adversarial tokens
    iterations: int = 40  # optimiser steps per round (authors' `iteration`)
    rounds: int = 50  # timesteps attacked in sequence, each followed by a judged generation (authors' n_samples)
    learning_rate: float = 0.01
    weight_decay: float = 0.1
    insertion: str = "prefix"  # prefix (authors' prefix_k) or suffix (suffix_k)

    def validate(self) -> None:
        super().validate()
        check_positive(self, k=self.k, iterations=self.iterations, rounds=self.rounds, learning_rate=self.learning_rate)
        if self.rounds > MAX_SAMPLING_STEPS:  # one distinct training timestep per round (attack_timesteps)
            raise ConfigError(f"UnlearnDiffConfig.rounds must be at most {MAX_SAMPLING_STEPS}, the models' training "
                              f"timesteps (one per round), got {self.rounds}")
        check_non_negative(self, weight_decay=self.weight_decay)
        check_choice(self, "insertion", self.insertion, ("prefix", "suffix"))


def project_to_simplex(values: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto {p >= 0, sum p = 1} (sort-based, exact)."""
    ordered, _ = values.sort(dim=-1, descending=True)
    excess = ordered.cumsum(dim=-1) - 1
    ranks = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=values.dtype)
    support = (ordered - excess / ranks > 0).sum(dim=-1, keepdim=True)
    threshold = excess.gather(-1, support - 1) / support
    return (values - threshold).clamp(min=0)


class _SampleStraightThrough(torch.autograd.Function):
    """One-hot token draws from each row of each search's distributions (B, k, V), search ``b`` drawing
    from ``generators[b]`` on the host (one transfer for the batch); the gradient passes through clipped to
    [-1, 1] (to [-scale, scale] under a loss scale, so that the clip acts on the true gradient; an inf/NaN
    passes as it is, for the scaler to skip the step)."""

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, generators: list[torch.Generator], scale: float) -> torch.Tensor:
        ctx.scale = scale
        host = probs.detach().cpu()
        draws = torch.stack([torch.multinomial(rows, 1, generator=generator).squeeze(-1)
                             for rows, generator in zip(host, generators, strict=True)])
        return torch.nn.functional.one_hot(draws.to(probs.device), probs.shape[-1]).to(probs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        clipped = torch.nn.functional.hardtanh(grad, -ctx.scale, ctx.scale)
        return torch.where(grad.isfinite(), clipped, grad), None, None


def attack_timesteps(num_train_timesteps: int, rounds: int) -> list[int]:
    """The authors' evenly spaced timesteps, from low noise to high (10, 30, ..., 990 for 50 of 1000)."""
    stride = max(num_train_timesteps // rounds, 1)
    return list(range(stride // 2, num_train_timesteps, stride))[:rounds]


@register_attack("unlearndiff")
class UnlearnDiffAtk(PromptwiseAttack):
    config_class = UnlearnDiffConfig

    def check_model(self, model: DiffusionModel) -> None:
        check_token_room(model, self.config.k, "searched tokens (UnlearnDiffConfig.k)")
    unattacked_extra: ClassVar[dict[str, int]] = {"rounds": 0}

    def target_latents(
        self, model: DiffusionModel, original: DiffusionModel | None, prompts: Sequence[AttackPrompt], success: SuccessFn
    ) -> Sequence[torch.Tensor]:
        """Each prompt's image by the original model, with the prompt's seed (all in one batch)."""
        return model.images_to_latents(original_images(model, original, prompts)).split(1)

    def search(
        self, model: DiffusionModel, original: DiffusionModel | None, prompts: Sequence[AttackPrompt],
        x0s: Sequence[torch.Tensor], success: SuccessFn,
    ) -> list[AttackResult]:
        cfg: UnlearnDiffConfig = self.config  # type: ignore[assignment]
        slotted = [build_slotted(model, [self._row(prompt_token_ids(model, p.text))]) for p in prompts]
        vocabulary = allowed_token_ids(model)
        table = model.token_embedding.weight.detach()[vocabulary]
        generators = [self.generator(p) for p in prompts]
        # One distribution per prompt, each its own parameter: Adam's state and weight decay are per element,
        # and a finished search (no gradient) is left as it is.
        probs = [torch.full((cfg.k, len(vocabulary)), 1.0 / len(vocabulary), device=table.device, requires_grad=True)
                 for _ in prompts]
        optimizer = torch.optim.Adam(probs, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scaler = gradient_scaler(model)
        rounds, after, ids = [0] * len(prompts), [False] * len(prompts), [rows.input_ids for rows in slotted]
        searching = list(range(len(prompts)))
        for t in attack_timesteps(model.num_train_timesteps, cfg.rounds):
            timestep = host_to_device(torch.tensor([t] * len(searching)), model.device)
            x0 = torch.cat([x0s[i] for i in searching])
            for _ in range(cfg.iterations):
                optimizer.zero_grad()
                one_hots = _SampleStraightThrough.apply(torch.stack([probs[i] for i in searching]),
                                                        [generators[i] for i in searching], scaler.get_scale())
                noise = torch.cat([host_to_device(torch.randn(x0s[i].shape, generator=generators[i]), x0.device, x0.dtype)
                                   for i in searching])
                cond = encode_slotted(model, [slotted[i] for i in searching], (one_hots.to(table.dtype) @ table).unbind())
                loss = denoising_losses(model, x0, cond, timestep, noise).sum()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    for i in searching:
                        probs[i].copy_(project_to_simplex(probs[i]))
            for i in searching:
                rounds[i] += 1
                ids[i] = slotted[i].with_tokens(vocabulary[probs[i].detach().argmax(dim=-1)])
            searching = still_failing(model, searching, ids, prompts, success, after)
            if not searching:
                break
        return [
            AttackResult(prompt=prompt, adversarial_text=model.decode_ids(ids[i])[0], success_before=False,
                         success_after=after[i], input_ids=ids[i][0].tolist(),
                         extra={"rounds": rounds[i], "iterations": rounds[i] * cfg.iterations})
            for i, prompt in enumerate(prompts)
        ]

    def _row(self, content: list[int]) -> list[int | None]:
        """The prompt's tokens with ``k`` slots before or after them."""
        cfg: UnlearnDiffConfig = self.config  # type: ignore[assignment]
        slots: list[int | None] = [SLOT] * cfg.k
        return slots + content if cfg.insertion == "prefix" else content + slots
