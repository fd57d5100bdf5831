"""Safe Latent Diffusion (SLD; Schramowski et al., CVPR 2023): inference-time safety guidance.

No weight changes: at every sampling step a third prediction, conditioned on the concept to avoid, steers
the classifier-free guidance away from it, element-wise and with momentum. Follows
ml-research/safe-latent-diffusion, src/sld/sld_pipeline.py, and the presets of diffusers' SafetyConfig
(pipelines/stable_diffusion_safe). The erased model is a saved sampler configuration (kind ``guidance``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from darkminer.config import check_choice
from darkminer.erasers.base import Eraser, EraserConfig, register_eraser
from darkminer.errors import ConfigError
from darkminer.models.base import DiffusionModel
from darkminer.models.guidance import PRESETS, SafeLatentGuidance
from darkminer.targets import EraseTarget


@dataclass
class SldConfig(EraserConfig):
    """``preset`` picks one of diffusers' SafetyConfig sets; its pipeline's default is ``medium``.
    ``concept`` is the text to steer away from; empty means the target's word."""

    preset: str = "medium"
    concept: str = ""

    def validate(self) -> None:
        check_choice(self, "preset", self.preset, tuple(PRESETS))
        if self.concept and not self.concept.strip():  # blank text is not "the target's word"; it steers from nothing
            raise ConfigError(f"SldConfig.concept is blank ({self.concept!r}); leave it empty for the target's word")


@register_eraser("sld", kind="guidance")
class SafeLatentDiffusion(Eraser):
    config_class = SldConfig

    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        cfg: SldConfig = self.config  # type: ignore[assignment]
        model.guidance = SafeLatentGuidance.from_dict(
            model, {"concept": cfg.concept or target.word, **asdict(PRESETS[cfg.preset])}
        )
        return {"preset": cfg.preset, "concept": model.guidance.concept}
