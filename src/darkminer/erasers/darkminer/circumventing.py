"""Circumventing: train the adapter so the model conditioned on a mined embedding predicts what the
*original* model predicts for the anchor, while ordinary prompts keep the original's predictions.

L = E ||eps_{theta0+A}(x_t | c) - eps_theta0(x_t | c0)||^2 + w E ||eps_{theta0+A}(x_t | c_reg) - eps_theta0(x_t | c_reg)||^2
The teacher is the same UNet with the adapter switched off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darkminer.attacks.soft_prompt import draw_noise_and_timesteps
from darkminer.erasers.base import check_finite
from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.erasers.darkminer.pool import ImagePool
from darkminer.models.base import DiffusionModel


def _noised(model: DiffusionModel, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    noise, t = draw_noise_and_timesteps(model, latents, generator)
    return model.add_noise(latents, noise, t), t


def circumvent(model: DiffusionModel, params: list[torch.nn.Parameter], erase_conds: torch.Tensor, anchor: torch.Tensor,
               pool: ImagePool, preserve: ImagePool, config: DarkMinerConfig, generator: torch.Generator) -> dict:
    """Train ``params`` (the adapter) for ``config.circumvent_steps``; ``erase_conds`` (M, L, D) are detached."""
    optimizer = torch.optim.Adam(params, lr=config.circumvent_lr)
    k = config.k
    erase_losses, preserve_losses = [], []
    for _ in range(config.circumvent_steps):
        latents, _ = pool.batch(k, generator)
        x_t, t = _noised(model, latents, generator)
        conds = erase_conds[torch.randint(len(erase_conds), (k,), generator=generator)]
        with torch.no_grad():
            target = model.eps(x_t, t, anchor.expand(k, -1, -1), adapter=False)
        loss_erase = F.mse_loss(model.eps(x_t, t, conds).float(), target.float())
        loss = loss_erase
        if config.preserve_weight > 0:
            kept, kept_conds = preserve.batch(k, generator)
            x_p, t_p = _noised(model, kept, generator)
            with torch.no_grad():
                target_p = model.eps(x_p, t_p, kept_conds, adapter=False)
            loss_preserve = F.mse_loss(model.eps(x_p, t_p, kept_conds).float(), target_p.float())
            loss = loss + config.preserve_weight * loss_preserve
            preserve_losses.append(loss_preserve.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        erase_losses.append(check_finite(loss_erase.item(), "circumventing", "lower circumvent_lr"))
    head = max(1, len(erase_losses) // 5)
    return {
        "erase_loss_start": sum(erase_losses[:head]) / head,
        "erase_loss_end": sum(erase_losses[-head:]) / head,
        "preserve_loss_end": (sum(preserve_losses[-head:]) / head) if preserve_losses else None,
    }
