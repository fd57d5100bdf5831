"""Guidances that live in the sampling loop rather than the weights, saved with an erased model and
rebuilt from its record (``models.base.guidance_from_dict``): Safe Latent Diffusion's (SLD; Schramowski et
al., CVPR 2023), following ml-research/safe-latent-diffusion, src/sld/sld_pipeline.py, with the presets of
diffusers' SafetyConfig. ``erasers.sld`` builds one for a target."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from darkminer.config import Config, check_non_negative
from darkminer.errors import ConfigError, DarkMinerError, DarkMinerWarning
from darkminer.models.base import DiffusionModel, Guidance, register_guidance


@dataclass
class SldSettings(Config):
    """One SLD hyper-parameter set (the paper's eq. 3-8); validated, as it is read back from guidance.json."""

    warmup_steps: int  # sampling steps before the safety guidance is applied (momentum builds from step 0)
    guidance_scale: float  # s_S: scale of the element-wise safety term, clipped to 1
    threshold: float  # λ: where eps_prompt - eps_concept >= λ the element is left alone
    momentum_scale: float  # s_m
    momentum_beta: float  # β_m

    def validate(self) -> None:
        check_non_negative(self, warmup_steps=self.warmup_steps, guidance_scale=self.guidance_scale,
                           momentum_scale=self.momentum_scale, momentum_beta=self.momentum_beta)
        if self.momentum_beta > 1:
            raise ConfigError(f"SldSettings.momentum_beta must be in [0, 1], got {self.momentum_beta}")


# diffusers' SafetyConfig (the values of the SLD paper's hyper-parameter study).
PRESETS: dict[str, SldSettings] = {
    "weak": SldSettings(warmup_steps=15, guidance_scale=20, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": SldSettings(warmup_steps=10, guidance_scale=1000, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": SldSettings(warmup_steps=7, guidance_scale=2000, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": SldSettings(warmup_steps=0, guidance_scale=5000, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


@register_guidance("sld")
class SafeLatentGuidance(Guidance):
    """Classifier-free guidance with SLD's safety term, steering away from ``concept``."""

    def __init__(self, concept: str, concept_states: torch.Tensor, settings: SldSettings) -> None:
        self.concept = concept
        self.concept_states = concept_states
        self.settings = settings
        self._momentum: torch.Tensor | None = None
        self._warned = False

    def check_sampling(self, steps: int, guidance_scale: float) -> None:
        if self._warned:
            return
        if guidance_scale == 1.0 or steps <= self.settings.warmup_steps:
            self._warned = True
            warnings.warn(
                f"SLD steers only under classifier-free guidance (scale != 1), from step {self.settings.warmup_steps} "
                f"on; at {steps} steps and guidance {guidance_scale} it leaves the images as the original draws them",
                DarkMinerWarning, stacklevel=3,
            )

    def predict(
        self, model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
        scale: float, step_index: int, adapter: bool,
    ) -> torch.Tensor:
        if scale == 1.0:  # as in the authors' pipeline, no safety guidance without classifier-free guidance
            return model.eps(x, t, cond, adapter=adapter)
        s = self.settings
        safety_states = self.concept_states.expand(x.shape[0], -1, -1)
        eps_u, eps_c, eps_s = model.eps(
            torch.cat([x, x, x]), t, torch.cat([uncond, cond, safety_states]), adapter=adapter
        ).chunk(3)
        if step_index == 0 or self._momentum is None:  # a new image batch: its momentum starts from zero
            self._momentum = torch.zeros_like(eps_u)
        momentum = self._momentum
        difference = eps_c - eps_s
        element_scale = torch.clamp(difference.abs() * s.guidance_scale, max=1.0)
        element_scale = torch.where(difference >= s.threshold, torch.zeros_like(element_scale), element_scale)
        safety = (eps_s - eps_u) * element_scale + s.momentum_scale * momentum
        self._momentum = s.momentum_beta * momentum + (1 - s.momentum_beta) * safety
        guidance = eps_c - eps_u
        if step_index >= s.warmup_steps:
            guidance = guidance - safety
        return eps_u + scale * guidance

    def to_dict(self) -> dict:
        return {"name": self.registry_name, "concept": self.concept, **self.settings.to_dict()}

    @classmethod
    def from_dict(cls, model: DiffusionModel, data: dict) -> SafeLatentGuidance:
        try:
            settings = SldSettings.from_dict({k: v for k, v in data.items() if k not in ("name", "concept")})
            concept = data["concept"]
            if not isinstance(concept, str):
                raise ConfigError(f"its concept must be text, got {concept!r}")
        except (ConfigError, KeyError) as exc:
            raise DarkMinerError(f"SLD settings are incomplete or wrong ({exc}); re-create the erased model") from None
        with torch.no_grad():
            return cls(concept, model.encode([concept]), settings)
