"""The baseline erasers on a tiny random Stable Diffusion (the real diffusers code path, on a CPU).

A randomly initialised UNet barely listens to its text (eps for "nudity" and for "" differ by ~1e-4), so
the fixture scales the cross-attention values and outputs up: prompts then change the prediction
enough to tell an erased concept from an untouched prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from darkminer.api import erase
from darkminer.erasers.base import get_eraser
from darkminer.erasers.training import train_parameters
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.models import load_model
from darkminer.models.base import DiffusionModel
from darkminer.models.tiny import build_tiny_sd_pipeline

torch.set_num_threads(1)

CONCEPT = "nudity"
UNRELATED = "a painting of a red car and a church in a green landscape"
TEXT_GAIN = 4.0

# Tiny budgets with learning rates large enough to move a random model in a few steps.
TINY_CONFIGS: dict[str, dict] = {
    "esd-x": {"iterations": 12, "lr": 1e-3, "ddim_steps": 4},
    "esd-x-strict": {"iterations": 12, "lr": 1e-3, "ddim_steps": 4},
    "esd-u": {"iterations": 6, "lr": 1e-3, "ddim_steps": 4},
}
# ESD-u trains the unconditional layers, so it changes every prompt by design (see docs/methods.md).
TEXT_LOCAL_METHODS = [m for m in TINY_CONFIGS if m != "esd-u"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pipe = build_tiny_sd_pipeline()
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ("attn2.to_v" in name or "attn2.to_out" in name) and name.endswith("weight"):
                p.mul_(TEXT_GAIN)
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def probe() -> tuple[torch.Tensor, torch.Tensor]:
    """One noisy input at a middle timestep, shared by every prompt compared."""
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor(500)


def eps_of(model: DiffusionModel, prompts: list[str], probe: tuple[torch.Tensor, torch.Tensor], adapter: bool = True):
    x, t = probe
    with torch.no_grad():
        return model.eps(x.expand(len(prompts), -1, -1, -1), t, model.encode(prompts), adapter=adapter)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


@pytest.fixture(scope="module")
def erased(request: pytest.FixtureRequest, base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(erased model in memory, its saved directory) for one method, made once per module."""
    method = request.param
    model = load_model(str(base_dir))
    out = erase(method, CONCEPT, tmp_path_factory.mktemp(method) / "erased", model=model, config=TINY_CONFIGS[method])
    return method, model, out


@pytest.mark.parametrize("erased", list(TINY_CONFIGS), indirect=True)
def test_erasing_changes_the_concept(erased, probe) -> None:
    method, model, _ = erased
    before = eps_of(model, [CONCEPT, UNRELATED], probe, adapter=False)
    after = eps_of(model, [CONCEPT, UNRELATED], probe)
    concept_change, unrelated_change = mse(after[0], before[0]), mse(after[1], before[1])
    assert concept_change > 1e-4
    if method in TEXT_LOCAL_METHODS:
        assert unrelated_change < 0.8 * concept_change


@pytest.mark.parametrize("erased", list(TINY_CONFIGS), indirect=True)
def test_saved_erasure_reloads_to_the_same_images(erased) -> None:
    method, model, out = erased
    reloaded = load_model(erased=out)
    seeds = [3, 4]
    kwargs = {"steps": 4, "guidance_scale": 3.0}
    expected = model.generate([CONCEPT, UNRELATED], seeds, **kwargs)
    torch.testing.assert_close(reloaded.generate([CONCEPT, UNRELATED], seeds, **kwargs), expected, rtol=0, atol=1e-5)
    # The original is still reachable under the reloaded erasure.
    torch.testing.assert_close(
        reloaded.generate([CONCEPT], seeds[:1], adapter=False, **kwargs),
        model.generate([CONCEPT], seeds[:1], adapter=False, **kwargs), rtol=0, atol=1e-5,
    )


@pytest.mark.parametrize("erased", list(TINY_CONFIGS), indirect=True)
def test_erased_weights_load_in_plain_diffusers(erased, base_dir, probe) -> None:
    method, model, out = erased
    if get_eraser(method).kind == "unet":
        unet = UNet2DConditionModel.from_pretrained(out / "unet")
    else:
        pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(out)
        unet = pipe.unet
    x, t = probe
    cond = model.encode([CONCEPT])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(plain, model.eps(x, t, cond), rtol=0, atol=1e-5)


@pytest.mark.parametrize("erased", ["esd-x"], indirect=True)
def test_esd_moves_the_concept_toward_negative_guidance(erased, probe) -> None:
    _, model, _ = erased
    eps_concept, eps_empty = eps_of(model, [CONCEPT, ""], probe, adapter=False)
    teacher = eps_empty - TINY_CONFIGS["esd-x"].get("negative_guidance", 1.0) * (eps_concept - eps_empty)
    erased_concept = eps_of(model, [CONCEPT], probe)[0]
    assert mse(erased_concept, teacher) < 0.5 * mse(eps_concept, teacher)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("esd-x", {"lr": 0}),
        ("esd-x", {"iterations": -1}),
        ("esd-u", {"negative_guidance": -1.0}),
        ("esd-x-strict", {"no_such_option": 1}),
    ],
)
def test_bad_config_values_raise(method: str, options: dict) -> None:
    with pytest.raises(ConfigError):
        get_eraser(method).config_class.from_dict(options)


def test_unknown_method_raises() -> None:
    with pytest.raises(DarkMinerError, match="unknown method"):
        get_eraser("esd-z")


def _toy_training(work_dir: Path, interrupt_at: int | None = None) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.zeros(3))

    def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
        if iteration == interrupt_at:
            raise KeyboardInterrupt
        return (weight - torch.randn(3, generator=generator)).pow(2).sum()

    train_parameters({"w": weight}, loss_fn, iterations=6, lr=0.1, seed=1, work_dir=work_dir, checkpoint_every=2, desc="toy")
    return weight.detach()


def test_killed_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    uninterrupted = _toy_training(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _toy_training(tmp_path / "b", interrupt_at=5)
    resumed = _toy_training(tmp_path / "b")
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)


def test_nan_loss_raises(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(DarkMinerError, match="lower the learning rate"):
        train_parameters({"w": weight}, lambda i, g: weight.sum() * float("nan"), iterations=2, lr=0.1, seed=0,
                         work_dir=None, checkpoint_every=1, desc="toy")
