"""The denoising objective shared by the attacks and Dark Miner: what the UNet is trained to predict, and
how well a conditioning explains an image under it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from darkminer.models.base import DiffusionModel, host_to_device


def noise_target(model: DiffusionModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models (SD 2)."""
    if model.noise_scheduler.config.prediction_type == "v_prediction":
        return model.noise_scheduler.get_velocity(x0, noise, t.to(x0.device))
    return noise


def denoising_loss(
    model: DiffusionModel, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """|| eps - eps_theta(x_t | cond, t) ||^2 (adapter on): low when ``cond`` explains ``x0``. What the
    attacks minimise over prompts and Dark Miner's mining over embeddings."""
    return F.mse_loss(*_prediction_and_target(model, x0, cond, t, noise))


def denoising_losses(
    model: DiffusionModel, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """:func:`denoising_loss` of each row (B,): for independent searches run as one batch."""
    return row_mse(*_prediction_and_target(model, x0, cond, t, noise))


def _prediction_and_target(
    model: DiffusionModel, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x_t = model.add_noise(x0, noise, t)
    return model.eps(x_t, t, cond).float(), noise_target(model, x0, noise, t).float()


def row_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean squared error of each row (B,). Row by row, so that a row's value (and its gradient) is the
    one it has alone, to the bit: the sum of the rows is the loss of a batch of independent searches."""
    return torch.stack([F.mse_loss(p, q) for p, q in zip(prediction, target, strict=True)])


def draw_noise_and_timesteps(
    model: DiffusionModel, x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.LongTensor]:
    """Noise like ``x0`` and one training timestep per row, drawn on the host from ``generator`` (the
    same draws on any device) and sent to ``x0``'s device without a sync."""
    noise = host_to_device(torch.randn(x0.shape, generator=generator), x0.device, x0.dtype)
    return noise, model.sample_timesteps(x0.shape[0], generator)


def curve_ends(losses: Sequence[float], share: int) -> tuple[float, float]:
    """The means of the first and of the last ``1/share`` of a loss curve (at least one value each): where
    it started and ended, steadier than single noisy steps."""
    if not losses:
        raise ValueError("an empty loss curve has no ends")
    n = max(1, len(losses) // share)
    return sum(losses[:n]) / n, sum(losses[-n:]) / n
