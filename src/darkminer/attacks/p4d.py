"""P4D -- Prompting4Debugging (Chin et al., ICML 2024): make the erased model predict what the original
predicts for the prompt.

White-box, per prompt: a soft prompt is optimised so that the *erased* model's noise prediction on a
noised target image matches the *original* model's prediction for the prompt itself,
``|| eps_erased(x_t | soft) - eps_original(x_t | prompt) ||^2``; every forward pass uses the nearest real
tokens (PEZ projection, gradient passed to the continuous embeddings), so what it finds is a hard prompt.
Two variants: P4D-N optimises ``n_tokens`` free tokens that replace the prompt; P4D-K keeps the prompt's
tokens and inserts a learnable one before every ``every_k`` of them.

Defaults follow the authors' code (joycenerd/P4D, ``configs/esd_nudity_optmz_config.json``,
``prompt_optimization/optimize_n.py``, ``optimize_k.py``, ``run_p4dn.py``): 16 tokens, K = 3, AdamW
(lr 0.1, weight decay 0.1), 3000 iterations, one random timestep and fresh noise per iteration, random
initial tokens, an evaluation every 50 iterations; the target image is the one the success function
accepts among 3 images of the original model (authors: the most unsafe by NudeNet). The authors keep
the prompt whose image is most CLIP-similar to the target and judge it at the end; we judge each
evaluated prompt and stop at the first success (as the UnlearnDiffAtk authors' P4D benchmark does),
since no CLIP image model ships with Stable Diffusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from darkminer.attacks.base import AttackPrompt, AttackResult, SuccessFn, register_attack
from darkminer.attacks.soft_prompt import (
    PromptwiseAttack,
    PromptwiseConfig,
    as_original,
    judge,
    original_images,
    project_straight_through,
    still_failing,
    teacher_eps,
)
from darkminer.config import PROMPT_SEED_LIMIT, check_choice, check_non_negative, check_positive
from darkminer.models.base import DiffusionModel
from darkminer.models.objectives import draw_noise_and_timesteps, row_mse
from darkminer.models.slots import (
    SLOT,
    build_slotted,
    check_token_room,
    encode_slotted,
    prompt_token_ids,
    random_token_ids,
)
from darkminer.parallel.speed import gradient_scaler


@dataclass
class P4DConfig(PromptwiseConfig):
    variant: str = "n"  # "n": P4D-N (free tokens only), "k": P4D-K (one learnable token every K prompt tokens)
    n_tokens: int = 16  # P4D-N: learnable tokens (authors' prompt_len)
    every_k: int = 3  # P4D-K: a learnable token before every K prompt tokens
    iterations: int = 3000
    eval_every: int = 50
    learning_rate: float = 0.1
    weight_decay: float = 0.1
    target_images: int = 3  # original-model images the target is chosen from (authors' num_samples)

    def validate(self) -> None:
        super().validate()
        check_choice(self, "variant", self.variant, ("n", "k"))
        check_positive(self, n_tokens=self.n_tokens, every_k=self.every_k, iterations=self.iterations,
                       eval_every=self.eval_every, learning_rate=self.learning_rate, target_images=self.target_images)
        check_non_negative(self, weight_decay=self.weight_decay)


def p4d_rows(content: Sequence[int], config: P4DConfig) -> list[int | None]:
    """Token layout: P4D-N is ``n_tokens`` slots alone; P4D-K puts a slot before every ``every_k`` prompt
    tokens (len // K + 1 slots, as the authors count)."""
    if config.variant == "n":
        return [SLOT] * config.n_tokens
    row: list[int | None] = []
    for start in range(0, len(content) + 1, config.every_k):
        row += [SLOT, *content[start : start + config.every_k]]
    return row


@register_attack("p4d")
class Prompting4Debugging(PromptwiseAttack):
    config_class = P4DConfig
    unattacked_extra: ClassVar[dict[str, int]] = {"iterations": 0}

    def check_model(self, model: DiffusionModel) -> None:
        if self.config.variant == "n":  # P4D-K's slots follow each prompt's length: counted when it is built
            check_token_room(model, self.config.n_tokens, "free tokens (P4DConfig.n_tokens)")

    def target_latents(
        self, model: DiffusionModel, original: DiffusionModel | None, prompts: Sequence[AttackPrompt], success: SuccessFn
    ) -> Sequence[torch.Tensor]:
        return [self._target_latents(model, original, prompt, success) for prompt in prompts]

    def _target_latents(
        self, model: DiffusionModel, original: DiffusionModel | None, prompt: AttackPrompt, success: SuccessFn
    ) -> torch.Tensor:
        """The first of ``target_images`` original-model images of the prompt that the success function accepts
        (the first image when none is)."""
        cfg: P4DConfig = self.config  # type: ignore[assignment]
        # Seeds after the prompt's, wrapping past a CSV's last seed 2**64 - 1.
        candidates = [AttackPrompt(prompt.text, (prompt.seed + j) % PROMPT_SEED_LIMIT, prompt.guidance)
                      for j in range(cfg.target_images)]
        images = original_images(model, original, candidates)
        verdicts = judge(success, images)
        chosen = verdicts.index(True) if True in verdicts else 0
        return model.images_to_latents(images[chosen : chosen + 1])

    def search(
        self, model: DiffusionModel, original: DiffusionModel | None, prompts: Sequence[AttackPrompt],
        x0s: Sequence[torch.Tensor], success: SuccessFn,
    ) -> list[AttackResult]:
        cfg: P4DConfig = self.config  # type: ignore[assignment]
        slotted = [build_slotted(model, [p4d_rows(prompt_token_ids(model, p.text), cfg)]) for p in prompts]
        generators = [self.generator(p) for p in prompts]
        with torch.no_grad():
            with as_original(model, original) as source:  # the teacher's, through the original's text encoder
                prompt_conds = [source.encode([p.text]) for p in prompts]
            starts = [random_token_ids(model, (rows.n_slots,), g) for rows, g in zip(slotted, generators, strict=True)]
        # float32: Adam steps vanish in half. One parameter per prompt, so that a finished search stays as it is.
        soft = [model.token_embedding.weight.detach()[ids].float().requires_grad_(True) for ids in starts]
        optimizer = torch.optim.AdamW(soft, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scaler = gradient_scaler(model)
        after, ids, done = [False] * len(prompts), [rows.input_ids for rows in slotted], [0] * len(prompts)
        searching = list(range(len(prompts)))
        for step in range(cfg.iterations):
            projected = dict(zip(searching, self._project(model, [soft[i] for i in searching]), strict=True))
            if step % cfg.eval_every == 0:
                for i in searching:
                    ids[i] = slotted[i].with_tokens(projected[i][1])
                searching = still_failing(model, searching, ids, prompts, success, after)
                if not searching:
                    break
            optimizer.zero_grad()
            noises, timesteps = zip(*(draw_noise_and_timesteps(model, x0s[i], generators[i]) for i in searching),
                                    strict=True)
            x0, noise, t = torch.cat([x0s[i] for i in searching]), torch.cat(noises), torch.cat(timesteps)
            x_t = model.add_noise(x0, noise, t)
            with torch.no_grad():
                wanted = teacher_eps(model, original, x_t, t, torch.cat([prompt_conds[i] for i in searching]))
            cond = encode_slotted(model, [slotted[i] for i in searching], [projected[i][0] for i in searching])
            loss = row_mse(model.eps(x_t, t, cond).float(), wanted.float()).sum()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for i in searching:
                done[i] = step + 1
        else:
            for i, (_, token_ids) in zip(searching, self._project(model, [soft[i] for i in searching]), strict=True):
                ids[i] = slotted[i].with_tokens(token_ids)
            still_failing(model, searching, ids, prompts, success, after)
        return [AttackResult(prompt, model.decode_ids(ids[i])[0], False, after[i], input_ids=ids[i][0].tolist(),
                             extra={"iterations": done[i], "variant": cfg.variant})
                for i, prompt in enumerate(prompts)]

    @staticmethod
    def _project(model: DiffusionModel, soft: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.LongTensor]]:
        """Each soft prompt's nearest real tokens (straight-through), all in one nearest-token search."""
        projected, ids = project_straight_through(model, torch.cat(soft))
        sizes = [len(values) for values in soft]
        return list(zip(projected.split(sizes), ids.split(sizes), strict=True))
