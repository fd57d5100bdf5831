"""The baseline erasers on a tiny random Stable Diffusion (the real diffusers code path, on a CPU).

A randomly initialised UNet barely listens to its text (eps for "nudity" and for "" differ by ~1e-4), so
the fixture scales the cross-attention values and outputs up. Its 32-d text states stay nearly collinear
(padding dominates them), so an edit of shared weights moves every prompt: "the unrelated prompt moves
less than the concept" is asserted only for the methods that act through the concept's own text states
(ESD-x, ESD-x-strict, and UCE/RECE with a preserve set). The others are checked against their own
objective here; their effect on other concepts is measured on the testbed (benchmarks/erasers_testbed.py).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipelineSafe,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import CLIPTextModel

from darkminer.api import erase
from darkminer.erasers import advunlearn, esd, training
from darkminer.erasers.advunlearn import AdvUnlearnConfig, adversarial_prompt
from darkminer.erasers.base import get_eraser
from darkminer.erasers.ca import concept_prompts
from darkminer.erasers.closed_form import (
    EditTerm,
    adversarial_states,
    aligned_tails,
    closed_form_edit,
    kv_projection_weights,
)
from darkminer.erasers.fmn import attention_on, concept_token_mask, recorded_cross_attention
from darkminer.erasers.sld import PRESETS
from darkminer.erasers.training import embedding_step, loss_summary, train_parameters
from darkminer.erasers.uce import UceConfig
from darkminer.errors import ConfigError, DamagedStateError, DarkMinerError, DarkMinerWarning
from darkminer.io import load_state, load_tensors, load_tensors_and_metadata, save_tensors
from darkminer.models import load_model
from darkminer.models.base import DiffusionModel
from darkminer.models.erased import ErasedModelInfo
from darkminer.models.slots import SLOT, build_slotted, prompt_token_ids, random_token_ids
from darkminer.models.tiny import build_tiny_sd_pipeline
from darkminer.parallel import SpeedOptions, apply_speed_options
from darkminer.parallel.speed import gradient_scaler
from darkminer.targets import DEFAULT_SD_PRESERVE, EraseTarget

torch.set_num_threads(1)

CONCEPT = "nudity"
ANCHOR = "a photo of a dog"  # a guide far from the concept, so that mapping onto it is a visible change
UNRELATED = "a painting of a red car and a church in a green landscape"  # in no preserve set
TEXT_GAIN = 4.0
SAMPLING = {"steps": 3, "guidance_scale": 3.0}

# Tiny budgets with learning rates large enough to move a random model in a few steps.
TINY_CONFIGS: dict[str, dict] = {
    "esd-x": {"iterations": 8, "lr": 1e-3, "ddim_steps": 3},
    "esd-x-strict": {"iterations": 8, "lr": 1e-3, "ddim_steps": 3},
    "esd-u": {"iterations": 4, "lr": 1e-3, "ddim_steps": 3},
    "uce": {"preserve_prompts": len(DEFAULT_SD_PRESERVE)},
    "rece": {"preserve_prompts": len(DEFAULT_SD_PRESERVE), "epochs": 2},
    "ca": {"iterations": 6, "lr": 1e-3, "anchor_images": 2, "image_steps": 2},
    "fmn": {"iterations": 6, "lr": 1e-3, "concept_images": 2, "image_steps": 2, "only_cross_attention": True},
    "sld": {"preset": "max"},
    "advunlearn": {"iterations": 4, "lr": 1e-3, "ddim_steps": 3, "warmup_iterations": 1, "attack_steps": 2,
                   "retain_batch": 2, "batch_size": 2},
}
TEXT_LOCAL_METHODS = ["esd-x", "esd-x-strict", "uce", "rece"]
WEIGHT_METHODS = [m for m in TINY_CONFIGS if m != "sld"]
# SLD steers by the difference between the prompt and the concept, so the bare concept word is left
# alone; a prompt that asks for the concept in other words is what it changes.
SLD_PROBE = "a photo of nudity"


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
def erased_model(base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """method -> (erased model in memory, its saved directory), each made once per module."""

    @functools.cache
    def make(method: str) -> tuple[DiffusionModel, Path]:
        model = load_model(str(base_dir))
        out = tmp_path_factory.mktemp(method) / "erased"
        erase(method, CONCEPT, out, model=model, anchor=ANCHOR, config=TINY_CONFIGS[method])
        return model, out

    return make


PROBE_X = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
PROBE_T = torch.tensor(500)


def eps_of(model: DiffusionModel, prompts: list[str], adapter: bool = True) -> torch.Tensor:
    """Predictions for ``prompts`` on one shared noisy input at a middle timestep."""
    with torch.no_grad():
        cond = model.encode(prompts, adapter=adapter)
        return model.eps(PROBE_X.expand(len(prompts), -1, -1, -1), PROBE_T, cond, adapter=adapter)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


# ------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method", list(TINY_CONFIGS))
def test_erasing_changes_the_concepts_images(method: str, erased_model, base_dir: Path) -> None:
    model, _ = erased_model(method)
    prompt = SLD_PROBE if method == "sld" else CONCEPT
    base = load_model(str(base_dir))
    before = base.generate([prompt], [5], **SAMPLING)
    after = model.generate([prompt], [5], **SAMPLING)
    assert mse(after, before) > 1e-6


@pytest.mark.parametrize("method", TEXT_LOCAL_METHODS)
def test_text_local_methods_leave_an_unrelated_prompt_closer_than_the_concept(method: str, erased_model) -> None:
    model, _ = erased_model(method)
    before = eps_of(model, [CONCEPT, UNRELATED], adapter=False)
    after = eps_of(model, [CONCEPT, UNRELATED])
    concept_change, unrelated_change = mse(after[0], before[0]), mse(after[1], before[1])
    assert concept_change > 1e-4
    assert unrelated_change < 0.6 * concept_change


@pytest.mark.parametrize("method", list(TINY_CONFIGS))
def test_saved_erasure_reloads_to_the_same_images(method: str, erased_model) -> None:
    model, out = erased_model(method)
    info = ErasedModelInfo.read(out)
    assert (info.method, info.concept, info.anchor, info.kind) == (method, CONCEPT, ANCHOR, get_eraser(method).kind)
    reloaded = load_model(erased=out)
    prompts, seeds = [SLD_PROBE, UNRELATED], [3, 4]
    expected = model.generate(prompts, seeds, **SAMPLING)
    torch.testing.assert_close(reloaded.generate(prompts, seeds, **SAMPLING), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_erased_weights_load_in_plain_diffusers(method: str, erased_model) -> None:
    model, out = erased_model(method)
    if ErasedModelInfo.read(out).kind == "text_encoder":  # AdvUnlearn's default: a drop-in text encoder
        assert not (out / "unet").exists()
        with torch.no_grad():
            plain = CLIPTextModel.from_pretrained(out / "text_encoder")(model.tokenize([CONCEPT]))[0]
        torch.testing.assert_close(plain, model.encode([CONCEPT]), rtol=0, atol=1e-6)
        return
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    cond = model.encode([CONCEPT])
    with torch.no_grad():
        plain = unet(PROBE_X, PROBE_T, encoder_hidden_states=cond).sample
    torch.testing.assert_close(plain, model.eps(PROBE_X, PROBE_T, cond), rtol=0, atol=1e-5)


def test_on_the_testbed_options_go_over_its_budget_and_elsewhere_over_the_authors(tmp_path):
    esd_x = get_eraser("esd-x")
    authors = esd.EsdConfig()
    assert (authors.lr, authors.iterations, authors.ddim_steps) == (1e-5, 1000, 50)
    on_testbed = esd_x.config_for(None, "testbed")
    assert (on_testbed.lr, on_testbed.iterations, on_testbed.ddim_steps) == (1e-3, 200, 25)
    assert esd_x.config_for({"lr": 3e-4}, "testbed").to_dict() == {**on_testbed.to_dict(), "lr": 3e-4}
    file = tmp_path / "esd.yaml"
    file.write_text("iterations: 40\n")
    assert esd_x.config_for(file, "testbed").to_dict() == {**on_testbed.to_dict(), "iterations": 40}
    assert esd_x.config_for("", "testbed") == on_testbed  # no file, as Config.from_file reads an empty path
    assert esd_x.config_for(authors, "testbed") is authors  # an object is complete: taken as it is
    assert esd_x.config_for({}, "tiny-random-sd").to_dict() == authors.to_dict()
    assert get_eraser("esd-u").config_for(None, "testbed").lr == 1e-4  # 1e-3 destroys the testbed's images
    assert get_eraser("ca").config_for(None, "testbed").lr == 8e-4
    assert get_eraser("uce").config_for(None, "testbed") == UceConfig()  # closed form: no rate to scale
    advunlearn = get_eraser("advunlearn").config_for(None, "testbed")
    assert (advunlearn.lr, advunlearn.iterations, advunlearn.warmup_iterations, advunlearn.attack_steps) == (1e-4, 200, 40, 10)
    adv = get_eraser("advunlearn")  # the rate follows what is trained: ESD's on UNet layers, unless given
    assert adv.config_for({"layers": "esd-x"}, "testbed").lr == 1e-3
    assert adv.config_for({"layers": "esd-u"}, "testbed").lr == 1e-4
    assert adv.config_for({"layers": "esd-x", "lr": 3e-4}, "testbed").lr == 3e-4
    assert adv.config_for({"layers": "text-encoder"}, "testbed").lr == 1e-4
    with pytest.raises(ConfigError, match="unknown option"):
        esd_x.config_for({"lrr": 1.0}, "testbed")
    with pytest.raises(ConfigError, match="expected a EsdConfig"):
        esd_x.config_for(UceConfig(), "testbed")
    # erase (and so the CLI) resolves its options so, and records what ran
    out = erase("esd-x", "blood", tmp_path / "esd", model="testbed", config={"iterations": 1})
    assert ErasedModelInfo.read(out).config == {**on_testbed.to_dict(), "iterations": 1}


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("esd-x", {"lr": 0}),
        ("esd-x", {"iterations": -1}),
        ("esd-u", {"negative_guidance": -1.0}),
        ("esd-x-strict", {"no_such_option": 1}),
        ("uce", {"lamb": 0.0}),
        ("uce", {"preserve_prompts": -2}),
        ("rece", {"epochs": 0}),
        ("rece", {"regularisation": -0.1}),
        ("ca", {"parameter_group": "everything"}),
        ("ca", {"image_steps": 0}),
        ("fmn", {"batch_size": 0}),
        ("sld", {"preset": "extreme"}),
        ("advunlearn", {"layers": "everything"}),
        ("advunlearn", {"attack_steps": 0}),
        ("advunlearn", {"retain_weight": -0.1}),
        ("advunlearn", {"warmup_iterations": -1}),
    ],
)
def test_bad_config_values_raise(method: str, options: dict) -> None:
    with pytest.raises(ConfigError):
        get_eraser(method).config_class.from_dict(options)


def test_unknown_method_raises() -> None:
    with pytest.raises(DarkMinerError, match="unknown method"):
        get_eraser("esd-z")


@pytest.mark.parametrize("method", ["esd-u", "ca", "fmn", "advunlearn"])
def test_full_weight_erasers_refuse_half_precision_weights_before_drawing_any_image(method: str, tmp_path: Path, monkeypatch) -> None:
    model = load_model("tiny-random-sd", dtype="bf16")
    monkeypatch.setattr(DiffusionModel, "sample", lambda *a, **k: pytest.fail("drew images before refusing"))
    with pytest.raises(ConfigError, match=r"torch.bfloat16; load the model in float32 \(--dtype float32; on a GPU, "
                                          r"--precision bf16 keeps the speed: on a CPU it is slower\)"):
        erase(method, CONCEPT, tmp_path / method, model=model, anchor=ANCHOR, config=TINY_CONFIGS[method])
    assert not any(p.requires_grad for p in model.unet.parameters())  # refused before anything was made trainable


# ------------------------------------------------------------------------------------ each objective
def _projections(names: list[str]) -> set[str]:
    return {n.split(".attn2.")[1].split(".")[0] for n in names}


def test_each_variant_edits_only_its_own_weights(erased_model) -> None:
    edited = {m: erased_model(m)[0].edited_parameter_names for m in ("esd-u", "esd-x", "esd-x-strict", "uce", "rece")}
    assert all(".attn2." in n for n in edited["esd-x"]) and _projections(edited["esd-x"]) == {"to_q", "to_k", "to_v", "to_out"}
    for method in ("esd-x-strict", "uce", "rece"):
        assert all(".attn2." in n for n in edited[method]) and _projections(edited[method]) == {"to_k", "to_v"}
    assert not any(".attn2." in n or n.startswith(("time_embedding.", "conv_out.")) for n in edited["esd-u"])
    assert any(".resnets." in n for n in edited["esd-u"]) and any(".attn1." in n for n in edited["esd-u"])


def test_esd_moves_the_concept_toward_negative_guidance(erased_model) -> None:
    model, _ = erased_model("esd-x")
    eps_concept, eps_empty = eps_of(model, [CONCEPT, ""], adapter=False)
    teacher = eps_empty - 1.0 * (eps_concept - eps_empty)  # η = 1, the default
    erased_concept = eps_of(model, [CONCEPT])[0]
    assert mse(erased_concept, teacher) < 0.5 * mse(eps_concept, teacher)


def test_esd_draws_x_t_from_the_model_being_trained(base_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Each iteration's partial DDIM runs the UNet with the weights trained so far (as the student's own
    forward of that iteration sees them), not the frozen original's."""
    model = load_model(str(base_dir))
    probe = next(iter(kv_projection_weights(model).values()))  # trained by esd-x-strict
    sampling = False
    students: list[torch.Tensor] = []  # the probe as the student's forward saw it, one per iteration
    sampled: list[tuple[int, torch.Tensor]] = []  # (iteration, the probe as a sampling step saw it)

    def record(module: torch.nn.Module, args: tuple) -> None:
        if sampling:
            sampled.append((len(students), probe.detach().clone()))
        elif torch.is_grad_enabled():  # the teacher runs without gradients
            students.append(probe.detach().clone())

    def spy(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal sampling
        sampling = True
        try:
            return real(*args, **kwargs)
        finally:
            sampling = False

    real = esd.partial_ddim_sample
    monkeypatch.setattr(esd, "partial_ddim_sample", spy)
    model.unet.register_forward_pre_hook(record)
    config = {"iterations": 3, "lr": 1e-3, "ddim_steps": 4}
    get_eraser("esd-x-strict")(esd.EsdConfig.from_dict(config)).erase(model, EraseTarget(
        name=CONCEPT, word=CONCEPT, anchor="", prompts=(), preserve=()), tmp_path)
    assert len(students) == 3 and not torch.equal(students[1], students[0])  # training moved the probe
    assert any(i > 0 for i, _ in sampled)  # sampling ran the UNet after a training step
    for i, w in sampled:
        torch.testing.assert_close(w, students[i], rtol=0, atol=0)


def test_closed_form_edit_solves_its_least_squares_problem() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64)
    terms = [EditTerm(torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g), 1.0),
             EditTerm(torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g), 0.1)]
    lamb = 0.5
    edited = closed_form_edit(weight, terms, lamb)
    # The gradient of λ||W'-W||² + Σ s||W'k - v||² vanishes at the solution.
    gradient = lamb * (edited - weight)
    for t in terms:
        gradient = gradient + t.scale * (t.keys.double() @ edited.T - t.values.double()).T @ t.keys.double()
    assert gradient.abs().max() < 1e-10
    torch.testing.assert_close(closed_form_edit(weight, [], lamb), weight)


def test_adversarial_states_solve_their_least_squares_problem() -> None:
    g = torch.Generator().manual_seed(1)
    current = [torch.randn(6, 4, generator=g) for _ in range(3)]
    original = [torch.randn(6, 4, generator=g) for _ in range(3)]
    states = torch.randn(7, 4, generator=g, dtype=torch.float64)
    found = adversarial_states(current, original, states, 0.1)
    gradient = 0.1 * found
    for w, w0 in zip(current, original, strict=True):
        gradient = gradient + (found @ w.double().T - states.double() @ w0.double().T) @ w.double()
    assert gradient.abs().max() < 1e-10
    # Unedited projections and no regularisation give back the concept's own states.
    torch.testing.assert_close(adversarial_states(original, original, states, 1e-9), states, rtol=0, atol=1e-6)


def test_uce_maps_the_concept_onto_the_guide(erased_model) -> None:
    model, _ = erased_model("uce")
    concept_tail, guide_tail = aligned_tails(model, CONCEPT, ANCHOR)
    weights = kv_projection_weights(model)
    with model.original():
        original = {name: w.detach().clone() for name, w in weights.items()}
    for name, w in weights.items():
        target = guide_tail @ original[name].T
        assert mse(concept_tail @ w.T, target) < 0.3 * mse(concept_tail @ original[name].T, target)


@pytest.mark.parametrize("preserve_prompts, rule", [(0, 1.0), (3, 0.25), (12, 0.1)])
def test_uce_preserve_scale_unset_follows_the_authors_rule(
    preserve_prompts: int, rule: float, base_dir: Path, tmp_path: Path
) -> None:
    """Unset, the preserve scale is train_erase.py's max(0.1, 1 / #preserved prompts), "" included."""

    def edited(name: str, **config) -> dict[str, torch.Tensor]:
        model = load_model(str(base_dir))
        target = EraseTarget(name=CONCEPT, word=CONCEPT, anchor=ANCHOR, prompts=(),
                             preserve=tuple(f"a photo of object {i}" for i in range(12)))
        info = get_eraser("uce")(UceConfig(preserve_prompts=preserve_prompts, **config)).erase(
            model, target, tmp_path / name)
        assert info["preserve_scale"] == (config.get("preserve_scale") or rule)
        return {k: w.detach().clone() for k, w in kv_projection_weights(model).items()}

    default, explicit = edited("default"), edited("explicit", preserve_scale=rule)
    other = edited("other", preserve_scale=rule * 3)
    assert default.keys() == explicit.keys()
    for name in default:
        torch.testing.assert_close(default[name], explicit[name], rtol=0, atol=0)
    assert any(not torch.equal(default[name], other[name]) for name in default)


def test_more_preserved_prompts_than_the_target_has_and_a_blank_sld_concept_are_refused(base_dir: Path, tmp_path):
    from darkminer.erasers.sld import SldConfig

    target = EraseTarget(name=CONCEPT, word=CONCEPT, anchor=ANCHOR, prompts=(),
                         preserve=tuple(f"a photo of object {i}" for i in range(12)))
    model = load_model(str(base_dir))
    with pytest.raises(ConfigError, match="preserve_prompts 13 is more than the 12 ordinary prompts the target has"):
        get_eraser("uce")(UceConfig(preserve_prompts=13)).erase(model, target, tmp_path / "uce")
    assert not model._originals  # refused before any weight was touched
    with pytest.raises(ConfigError, match="SldConfig.concept is blank"):
        SldConfig(concept="   ")


def test_advunlearn_refuses_more_retain_prompts_than_the_target_has(base_dir: Path, tmp_path: Path) -> None:
    target = EraseTarget(name=CONCEPT, word=CONCEPT, anchor=ANCHOR, prompts=(), preserve=("a dog", "a cat"))
    model = load_model(str(base_dir))
    with pytest.raises(ConfigError, match="retain_batch 3 is more than the 2 ordinary prompts the target has"):
        get_eraser("advunlearn")(AdvUnlearnConfig(retain_batch=3)).erase(model, target, tmp_path / "adv")
    assert not model._originals  # refused before any weight was touched
    get_eraser("advunlearn")(AdvUnlearnConfig(retain_batch=3, retain_weight=0, iterations=1, ddim_steps=2)).erase(
        model, target, tmp_path / "adv")  # without the retain term its prompts are not needed


def _uce_edit_by_hand(
    weights: dict[str, torch.Tensor], keys: torch.Tensor, guide: torch.Tensor, preserve: list[torch.Tensor], *,
    erase_scale: float, preserve_scale: float, lamb: float,
) -> dict[str, torch.Tensor]:
    """UCE's edit from closed_form_edit alone: keys map to what each projection gives for the guide, the
    preserved states keep what it gives them."""
    return {name: closed_form_edit(w, [EditTerm(keys, guide @ w.T, erase_scale)]
                                   + [EditTerm(p, p @ w.T, preserve_scale) for p in preserve], lamb)
            for name, w in weights.items()}


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_closed_form_erasers_match_their_edits_rebuilt_by_hand(method: str, base_dir: Path, tmp_path: Path) -> None:
    """UCE, and RECE's UCE start plus one epoch on the adversarial states, equal the closed forms composed
    here. Every scale and λ differs from the others (and erase_scale from 1), so a swapped one shows."""
    model = load_model(str(base_dir))
    target = EraseTarget(name=CONCEPT, word=CONCEPT, anchor=ANCHOR, prompts=(),
                         preserve=("a photo of a cat", "a red car"))
    original = {name: w.detach().clone() for name, w in kv_projection_weights(model).items()}
    with torch.no_grad():
        concept_tail, guide_tail = aligned_tails(model, CONCEPT, ANCHOR)
        preserve = list(model.encode(["", "a photo of a cat"]))  # "" always, then preserve_prompts=1 of the target's
        concept, guide = model.encode([CONCEPT, ANCHOR])
    # uce_preserve_scale unset: max(0.1, 1 / 2 preserved prompts) = 0.5
    start = _uce_edit_by_hand(original, concept_tail, guide_tail, preserve, erase_scale=2.0, preserve_scale=0.5, lamb=0.7)
    if method == "uce":
        config = {"erase_scale": 2.0, "lamb": 0.7, "preserve_prompts": 1}
        expected = start
    else:
        config = {"epochs": 1, "erase_scale": 2.0, "uce_lamb": 0.7, "lamb": 0.2, "preserve_scale": 0.3,
                  "regularisation": 0.05, "preserve_prompts": 1}
        adversarial = adversarial_states(list(start.values()), list(original.values()), concept, 0.05)
        expected = _uce_edit_by_hand(start, adversarial, guide, preserve, erase_scale=2.0, preserve_scale=0.3, lamb=0.2)
    eraser = get_eraser(method)
    eraser(eraser.config_class.from_dict(config)).erase(model, target, tmp_path)
    edited = kv_projection_weights(model)
    assert edited.keys() == expected.keys()
    for name, w in edited.items():
        torch.testing.assert_close(w.detach(), expected[name], rtol=0, atol=1e-6)
    if method == "rece":  # the states the epoch erased, as saved beside the model
        found = load_tensors(tmp_path / "artifacts" / "rece_adversarial_states.safetensors")
        torch.testing.assert_close(found["epoch_0"], adversarial, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("source", "guide"), [(CONCEPT, ANCHOR), (ANCHOR, ""), (UNRELATED, CONCEPT)])
def test_aligned_tails_start_at_each_prompts_last_word(source: str, guide: str, tiny_sd) -> None:
    ids = tiny_sd.tokenize([source, guide])
    states = tiny_sd.encode([source, guide])
    # The last word sits just before the first end token; the empty prompt's "last word" is the start token.
    starts = [int((row == tiny_sd.eos_id).nonzero()[0]) - 1 for row in ids]
    length = tiny_sd.max_length - max(starts)
    tails = aligned_tails(tiny_sd, source, guide)
    for i in range(2):
        torch.testing.assert_close(tails[i], states[i, starts[i] : starts[i] + length], rtol=0, atol=0)


def test_rece_leaves_less_reachable_than_uce(erased_model) -> None:
    """The text states that best reproduce the original's concept outputs reproduce them worse after RECE."""

    def reachability_gap(model: DiffusionModel) -> float:
        weights = list(kv_projection_weights(model).values())
        with model.original():
            original = [w.detach().clone() for w in weights]
        states = model.encode([CONCEPT])[0]
        best = adversarial_states(weights, original, states, 1e-3)
        return sum(mse(best @ w.T, states @ w0.T) for w, w0 in zip(weights, original, strict=True))

    rece, out = erased_model("rece")
    uce, _ = erased_model("uce")
    assert reachability_gap(rece) > reachability_gap(uce)
    found = load_tensors(out / "rece_adversarial_states.safetensors")
    assert sorted(found) == ["epoch_0", "epoch_1"]


def test_ca_draws_its_anchor_images_from_the_original_with_the_anchor_prompt(base_dir: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    model = load_model(str(base_dir))
    calls: list[tuple[torch.Tensor, dict]] = []
    real = model.sample

    def spy(cond: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append((cond.detach().clone(), kwargs))
        return real(cond, **kwargs)

    monkeypatch.setattr(model, "sample", spy)
    config = {**TINY_CONFIGS["ca"], "iterations": 1}
    target = EraseTarget(name=CONCEPT, word=CONCEPT, anchor=ANCHOR, prompts=(CONCEPT,), preserve=())
    get_eraser("ca")(get_eraser("ca").config_class.from_dict(config)).erase(model, target, tmp_path)
    ((cond, kwargs),) = calls  # the anchor images are the only images drawn
    torch.testing.assert_close(cond, model.encode([ANCHOR] * config["anchor_images"]), rtol=0, atol=0)
    assert kwargs["adapter"] is False


def test_ca_pulls_concept_prompts_toward_the_anchor(erased_model) -> None:
    model, _ = erased_model("ca")
    prompts = concept_prompts(EraseTarget(name=CONCEPT, word=CONCEPT, anchor=ANCHOR, prompts=(), preserve=()))
    assert prompts == [f"{CONCEPT}, {ANCHOR}", f"in {CONCEPT} style, {ANCHOR}", f"{ANCHOR}, {CONCEPT}"]
    anchor = eps_of(model, [ANCHOR], adapter=False)[0]
    before = eps_of(model, prompts, adapter=False)
    after = eps_of(model, prompts)
    assert mse(after, anchor.expand_as(after)) < mse(before, anchor.expand_as(before))


def test_fmn_lowers_attention_on_the_concept_tokens(erased_model) -> None:
    model, _ = erased_model("fmn")
    prompt = f"a photo of {CONCEPT}"
    mask = concept_token_mask(model, prompt, CONCEPT, use_end_token=True)
    ids = model.tokenize([prompt])[0]
    assert mask.sum() == 2 and ids[mask][-1] == model.eos_id
    attention = {}
    for adapter in (False, True):
        with recorded_cross_attention(model) as maps, torch.no_grad():
            model.eps(PROBE_X, PROBE_T, model.encode([prompt]), adapter=adapter)
        attention[adapter] = float(attention_on(maps, mask, batch_size=1))
    assert attention[True] < 0.9 * attention[False]
    # The recorder is gone afterwards: the UNet runs its own processors again.
    assert all(type(p).__name__ != "_RecordingAttnProcessor" for p in model.unet.attn_processors.values())


def test_fmn_masks_every_occurrence_of_the_concept_word(tiny_sd) -> None:
    prompt = f"{CONCEPT} and {CONCEPT}"
    word = len(tiny_sd.tokenizer(CONCEPT, add_special_tokens=False).input_ids)
    between = len(tiny_sd.tokenizer("and", add_special_tokens=False).input_ids)
    # <start> word "and" word <end>: the word's tokens at 1.. and again after "and"
    first = list(range(1, 1 + word))
    second = [p + word + between for p in first]
    end = second[-1] + 1
    assert tiny_sd.tokenize([prompt])[0][end] == tiny_sd.eos_id
    mask = concept_token_mask(tiny_sd, prompt, CONCEPT, use_end_token=False)
    assert mask.nonzero().flatten().tolist() == first + second
    mask = concept_token_mask(tiny_sd, prompt, CONCEPT, use_end_token=True)
    assert mask.nonzero().flatten().tolist() == first + second + [end]


def test_fmn_refuses_a_concept_that_is_not_in_the_prompt(erased_model) -> None:
    model, _ = erased_model("fmn")
    with pytest.raises(DarkMinerError, match="does not fit"):
        concept_token_mask(model, "a photo of a dog", CONCEPT, use_end_token=False)


def test_fmn_loss_is_the_norm_of_every_attention_probability_on_the_masked_tokens() -> None:
    """Over all layers, heads and queries together: the square root of the summed squares of the masked
    probabilities (not their sum of squares, nor a sum of per-layer norms)."""
    mask = torch.tensor([True, False, True])
    one_head = torch.tensor([[[0.6, 0.3, 0.1]]])  # (B·heads, queries, tokens): masked 0.6 and 0.1
    two_heads = torch.tensor([[[0.3, 0.3, 0.4]], [[0.1, 0.8, 0.1]]])  # masked 0.3, 0.4 and 0.1, 0.1
    # 0.36 + 0.01 + 0.09 + 0.16 + 0.01 + 0.01 = 0.64, whose square root is 0.8
    assert float(attention_on([one_head, two_heads], mask, batch_size=1)) == pytest.approx(0.8, abs=1e-6)
    assert float(attention_on([one_head], mask, batch_size=1)) == pytest.approx(math.sqrt(0.37), abs=1e-6)


# ------------------------------------------------------------------------------------------ AdvUnlearn
@pytest.mark.parametrize("layers", ["esd-x", "text-encoder"])
def test_advunlearn_is_esd_in_its_warm_up_and_after_it_trains_on_what_the_attack_found(
    layers: str, base_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    common = {"iterations": 3, "lr": 1e-3, "ddim_steps": 3}
    prompts = [CONCEPT, UNRELATED]

    def trained(warmup: int, found: str | None = None) -> torch.Tensor:
        """The erased model's predictions; ``found``: what a stand-in attack returns (drawing nothing)."""
        calls = []
        if found is not None:
            def stand_in(model, slotted, concept, empty, cfg, generator):
                calls.append(1)
                ids = model.tokenize([found])
                return model.embed_ids(ids), ids
            monkeypatch.setattr(advunlearn, "adversarial_prompt", stand_in)
        adv = load_model(str(base_dir))
        erase("advunlearn", CONCEPT, tmp_path / f"adv{warmup}{found}", model=adv,
              config={**common, "layers": layers, "warmup_iterations": warmup, "retain_weight": 0, "attack_steps": 2})
        assert len(calls) == (0 if found is None else common["iterations"] - warmup)
        return eps_of(adv, prompts)

    reference = trained(3)  # all warm-up: ESD on the word
    if layers == "esd-x":  # ESD-x itself, to the bit
        esd_x = load_model(str(base_dir))
        erase("esd-x", CONCEPT, tmp_path / "esd", model=esd_x, config=common)
        torch.testing.assert_close(reference, eps_of(esd_x, prompts), rtol=0, atol=0)
    # After the warm-up the attack's prompt replaces the word, and nothing else changes.
    torch.testing.assert_close(trained(2, found=CONCEPT), reference, rtol=0, atol=0)
    assert mse(trained(2, found=UNRELATED), reference) > 1e-10


@pytest.mark.parametrize("layers", ["esd-x", "text-encoder"])
def test_the_advunlearn_attack_lowers_its_objective_and_leaves_the_trained_weights_alone(layers: str, base_dir: Path) -> None:
    model = load_model(str(base_dir))
    # as while AdvUnlearn trains: with the text encoder trained, the attack's graph runs through those weights
    params = (training.trainable_text_encoder_parameters(model) if layers == "text-encoder"
              else training.trainable_unet_parameters(model, esd.ESD_X_MODULES))
    cfg = AdvUnlearnConfig(adversarial_tokens=2, attack_steps=20, attack_lr=1e-2, ddim_steps=3)
    slotted = build_slotted(model, [[SLOT, SLOT] + prompt_token_ids(model, CONCEPT)])
    with torch.no_grad():
        concept, empty = model.encode([CONCEPT]), model.encode([""])
        first = random_token_ids(model, (2,), torch.Generator().manual_seed(7))  # the attack's start
        start = slotted.encode(model, model.token_embedding.weight[first])
    prompt = adversarial_prompt(model, slotted, concept, empty, cfg, torch.Generator().manual_seed(7))
    with torch.no_grad():
        found = model.encode_embeddings(*prompt)

    def objective(cond: torch.Tensor) -> float:
        """The attack's loss over fixed ESD states: how far ``cond`` is from the original's concept."""
        draws = torch.Generator().manual_seed(99)
        states = [esd.esd_state(model, concept, empty, cfg, draws) for _ in range(6)]
        with torch.no_grad():
            return sum(mse(model.eps(x, t, cond), model.eps(x, t, concept, adapter=False)) for x, t in states)

    assert objective(found) < 0.5 * objective(start)
    assert all(p.grad is None for p in params.values())  # the trained weights collect nothing from the attack


def test_the_advunlearn_attack_aims_at_the_original_models_prediction(base_dir: Path, monkeypatch) -> None:
    """Its target is the frozen original's eps for the concept at each x_t, not the model being trained's:
    with the trained weights moved away from their originals, the two differ."""
    model = load_model(str(base_dir))
    params = training.trainable_unet_parameters(model, esd.ESD_X_MODULES)  # originals remembered here
    draws = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params.values():  # as training would have moved them
            p.add_(0.1 * torch.randn(p.shape, generator=draws))
        concept, empty = model.encode([CONCEPT], adapter=False), model.encode([""], adapter=False)
    states, aims = [], []
    real_state = advunlearn.esd_state

    def state_spy(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        states.append(real_state(*args))
        return states[-1]

    def mse_spy(prediction: torch.Tensor, aim: torch.Tensor) -> torch.Tensor:
        aims.append(aim.detach().clone())
        return torch.nn.functional.mse_loss(prediction, aim)

    monkeypatch.setattr(advunlearn, "esd_state", state_spy)
    monkeypatch.setattr(advunlearn, "F", type("F", (), {"mse_loss": staticmethod(mse_spy)}))
    cfg = AdvUnlearnConfig(attack_steps=2, ddim_steps=2)
    slotted = build_slotted(model, [[SLOT] + prompt_token_ids(model, CONCEPT)])
    adversarial_prompt(model, slotted, concept, empty, cfg, torch.Generator().manual_seed(7))
    assert len(states) == len(aims) == 2  # one x_t and one aim per attack step
    with torch.no_grad():
        for (x_t, t), aim in zip(states, aims, strict=True):
            original, trained = (model.eps(x_t, t, concept, adapter=on) for on in (False, True))
            assert mse(original, trained) > 1e-4  # the perturbation shows
            torch.testing.assert_close(aim, original, rtol=0, atol=1e-6)


# Six Adam steps of 1e-3 on the text encoder overshoot what the retain term pulls back on this model (drift
# 0.012 with the term, 0.008 without); at 1e-4 the term cuts it 20x.
@pytest.mark.parametrize(("layers", "lr"), [("esd-x", 1e-3), ("text-encoder", 1e-4)])
def test_the_retain_term_keeps_ordinary_prompts_nearer_the_original(layers: str, lr: float, base_dir: Path,
                                                                     tmp_path: Path) -> None:
    config = {"iterations": 6, "lr": lr, "ddim_steps": 3, "warmup_iterations": 6,
              "retain_batch": len(DEFAULT_SD_PRESERVE), "layers": layers}
    drift = {}
    for weight in (0.0, 5.0):
        model = load_model(str(base_dir))
        erase("advunlearn", CONCEPT, tmp_path / f"w{weight}", model=model, config={**config, "retain_weight": weight})
        ordinary = list(DEFAULT_SD_PRESERVE)
        drift[weight] = mse(eps_of(model, ordinary), eps_of(model, ordinary, adapter=False))
    assert drift[5.0] < 0.5 * drift[0.0]


def test_sld_presets_are_diffusers_safety_config() -> None:
    for name, settings in PRESETS.items():
        expected = getattr(SafetyConfig, name.upper())
        assert (settings.warmup_steps, settings.guidance_scale, settings.threshold, settings.momentum_scale,
                settings.momentum_beta) == tuple(expected[f"sld_{k}"] for k in
                                                  ("warmup_steps", "guidance_scale", "threshold", "momentum_scale", "mom_beta"))


@pytest.mark.parametrize("preset", ["medium", "max"])
def test_sld_matches_the_diffusers_safe_pipeline(preset: str, base_dir: Path) -> None:
    model = load_model(str(base_dir))
    erase("sld", CONCEPT, base_dir.parent / f"sld-{preset}", model=model, config={"preset": preset})
    steps, scale = 12, 5.0  # enough steps to pass the medium preset's warm-up
    noise = model.initial_noise([7])
    ours = model.sample(model.encode([SLD_PROBE]), noise=noise, steps=steps, guidance_scale=scale)
    pipe = StableDiffusionPipelineSafe(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.safety_concept = CONCEPT
    settings = getattr(SafetyConfig, preset.upper())
    theirs = pipe(SLD_PROBE, latents=noise, num_inference_steps=steps, guidance_scale=scale, output_type="np",
                  **settings).images
    torch.testing.assert_close(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2), rtol=0, atol=1e-4)


def test_sld_warns_once_where_it_cannot_act(base_dir: Path) -> None:
    """Within its warm-up, or without classifier-free guidance, SLD draws what the original draws."""
    import warnings

    model = load_model(str(base_dir))
    erase("sld", CONCEPT, base_dir.parent / "sld-warn", model=model, config={"preset": "medium"})  # warm-up 10
    states = model.encode([SLD_PROBE])
    with pytest.warns(DarkMinerWarning, match="SLD steers only .* from step 10 on; at 3 steps"):
        inactive = model.sample(states, seeds=[7], steps=3, guidance_scale=5.0)
    torch.testing.assert_close(inactive, model.sample(states, seeds=[7], steps=3, guidance_scale=5.0, adapter=False),
                               rtol=0, atol=0)  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.sample(states, seeds=[7], steps=3, guidance_scale=5.0)  # once per model, not once per call
        model.sample(states, seeds=[7], steps=3, guidance_scale=5.0, adapter=False)  # the original: no SLD


def test_sld_steers_away_from_its_configured_concept_instead_of_the_word(base_dir: Path, tmp_path: Path) -> None:
    model = load_model(str(base_dir))
    out = erase("sld", CONCEPT, tmp_path / "sld", model=model, config={"concept": "violence"})
    assert model.guidance.concept == "violence"
    torch.testing.assert_close(model.guidance.concept_states, model.encode(["violence"]), rtol=0, atol=0)
    info = ErasedModelInfo.read(out)
    assert info.concept == CONCEPT and info.extra["concept"] == "violence"  # the target is still the word
    assert json.loads((out / "guidance.json").read_text())["concept"] == "violence"
    assert load_model(erased=out).guidance.concept == "violence"


# ------------------------------------------------------------------------------------ shared training loop
def _toy_training(
    work_dir: Path | None,
    interrupt_at: int | None = None,
    float16: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    iterations: int = 6,
) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.zeros(3))

    def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
        if iteration == interrupt_at:
            raise KeyboardInterrupt
        target = torch.randn(3, generator=generator)
        # float16: the product runs in float16, as under --precision fp16; the gradient that reaches its output
        # (~1e-9) lies below float16's range, as an SD mean loss's ~1e-6 nearly does
        with torch.autocast("cpu", dtype=torch.float16, enabled=float16):
            prediction = torch.eye(3) @ weight
        return (prediction.float() - target).pow(2).sum() * 1e-9

    train_parameters({"w": weight}, loss_fn, iterations=iterations, lr=0.1, seed=1, work_dir=work_dir,
                     checkpoint_every=2, desc="toy", weight_decay=0.01, scaler=scaler)
    return weight.detach()


def test_loss_summary_reports_the_mean_of_the_last_tenth_as_the_final_loss() -> None:
    losses = [float(i) for i in range(1, 31)]  # the last tenth: 28, 29, 30
    assert loss_summary(losses) == {"iterations": 30, "first_loss": 1.0, "final_loss": 29.0}
    assert loss_summary([0.5, 0.25, 0.125])["final_loss"] == 0.125  # under ten losses: the last one
    assert loss_summary([]) == {"iterations": 0}


def test_curve_ends_average_the_first_and_last_share_of_a_curve() -> None:
    from darkminer.models.objectives import curve_ends

    assert curve_ends([float(i) for i in range(1, 11)], 5) == (1.5, 9.5)  # fifths of ten: 1, 2 and 9, 10
    assert curve_ends([4.0, 8.0, 16.0], 5) == (4.0, 16.0)  # under five values: the first and the last
    assert curve_ends([float(i) for i in range(1, 12)], 5) == (1.5, 10.5)  # 11 // 5 = 2 values each end
    with pytest.raises(ValueError, match="empty loss curve"):
        curve_ends([], 5)


def test_killed_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    uninterrupted = _toy_training(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _toy_training(tmp_path / "b", interrupt_at=5)
    resumed = _toy_training(tmp_path / "b")
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["state", "moment", "losses", "shape"])
def test_a_damaged_training_checkpoint_is_refused_in_one_line(damage: str, tmp_path: Path) -> None:
    from darkminer.io import load_state, save_state

    with pytest.raises(KeyboardInterrupt):
        _toy_training(tmp_path, interrupt_at=5)
    path = tmp_path / training.CHECKPOINT
    tensors, metadata = load_tensors_and_metadata(path)
    if damage == "state":
        metadata["state"] = metadata["state"][:20]  # cut short
    elif damage == "moment":
        del tensors[max(tensors, key=int)]  # a lost tensor (the last saved: one of Adam's moments)
    if damage in ("state", "moment"):
        save_tensors(path, tensors, metadata=metadata)
    else:  # edited, but still a readable state
        state = load_state(path)
        if damage == "losses":
            state["losses"] = "abc"
        else:
            name = next(iter(state["params"]))
            state["params"][name] = torch.zeros(1)  # of another shape, which copy_ would broadcast
        save_state(path, state)
    with pytest.raises(DarkMinerError, match="is damaged .*; delete that folder to start over"):
        _toy_training(tmp_path)


def test_a_float16_loss_trains_only_through_the_loss_scale() -> None:
    reference = _toy_training(None)
    assert reference.abs().max() > 0.05
    assert torch.equal(_toy_training(None, float16=True), torch.zeros(3))  # every gradient flushed to zero
    scaled = _toy_training(None, float16=True, scaler=torch.amp.GradScaler("cpu"))
    torch.testing.assert_close(scaled, reference, rtol=0, atol=1e-3)  # float16's rounding of the products


def test_max_grad_norm_clips_the_true_gradient_each_step_reaches_the_optimiser() -> None:
    """A loss whose gradient is (600, 0, 800) everywhere (norm 1000): clipped to norm 1 it is (0.6, 0, 0.8)
    at every step, with or without a loss scale (unscaled before the clip)."""
    seen: list[torch.Tensor] = []  # the gradient each optimiser step saw

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        seen.append(torch.cat([p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]))

    direction = torch.tensor([600.0, 0.0, 800.0])
    handle = register_optimizer_step_pre_hook(record)
    try:
        for max_grad_norm, scaler in ((None, None), (1.0, None), (1.0, torch.amp.GradScaler("cpu"))):
            seen.clear()
            weight = torch.nn.Parameter(torch.zeros(3))
            train_parameters({"w": weight}, lambda i, g, w=weight: (w * direction).sum(), iterations=3, lr=0.1, seed=0,
                             work_dir=None, checkpoint_every=1, desc="toy", max_grad_norm=max_grad_norm, scaler=scaler)
            expected = direction if max_grad_norm is None else direction / 1000
            assert len(seen) == 3
            for gradient in seen:
                torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()


def test_an_embedding_step_under_float16_moves_only_through_the_loss_scale_and_only_the_embedding() -> None:
    """The step Dark Miner's mining and AdvUnlearn's attack take: the gradient reaches the embedding alone,
    and under float16 it survives only scaled."""
    weight = torch.nn.Parameter(torch.ones(3))  # a weight being trained, which the loss also depends on

    def stepped(scaler: torch.amp.GradScaler, float16: bool = True) -> torch.Tensor:
        values = torch.zeros(3, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=float16):
            prediction = torch.eye(3) @ (values + weight)
        loss = (prediction.float() - 2).pow(2).sum() * 1e-9  # its gradient (~1e-9) lies below float16's range
        embedding_step(values, loss, torch.optim.Adam([values], lr=0.1), scaler)
        return values.detach()

    off = torch.amp.GradScaler("cpu", enabled=False)
    reference = stepped(off, float16=False)
    assert reference.abs().min() > 1e-3
    assert torch.equal(stepped(off), torch.zeros(3))  # every gradient flushed to zero
    torch.testing.assert_close(stepped(torch.amp.GradScaler("cpu")), reference, rtol=1e-2, atol=0)
    assert weight.grad is None


def test_the_loss_scale_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    def scaler() -> torch.amp.GradScaler:  # doubles every 2 steps: after 8, 2^4 times its start
        return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)

    straight = scaler()
    uninterrupted = _toy_training(tmp_path / "a", float16=True, scaler=straight, iterations=8)
    with pytest.raises(KeyboardInterrupt):
        _toy_training(tmp_path / "b", interrupt_at=5, float16=True, scaler=scaler(), iterations=8)
    resumed = scaler()
    weights = _toy_training(tmp_path / "b", float16=True, scaler=resumed, iterations=8)
    assert resumed.get_scale() == straight.get_scale() == 2.0**14  # a fresh scale would end at 2^12
    torch.testing.assert_close(weights, uninterrupted, rtol=0, atol=0)


def test_gradient_scaler_is_on_exactly_when_the_model_computes_in_float16(tiny_sd) -> None:
    assert not gradient_scaler(tiny_sd).is_enabled()
    for precision, on in (("bf16", False), ("fp16", True), ("fp32", False)):
        apply_speed_options(tiny_sd, SpeedOptions(precision=precision))
        assert gradient_scaler(tiny_sd).is_enabled() is on
    assert gradient_scaler(load_model("tiny-random-sd", dtype="fp16")).is_enabled()


def test_nan_loss_raises_naming_its_iteration_and_is_never_checkpointed(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(DarkMinerError, match="lower the learning rate"):
        train_parameters({"w": weight}, lambda i, g: weight.sum() * float("nan"), iterations=2, lr=0.1, seed=0,
                         work_dir=None, checkpoint_every=1, desc="toy")
    # Losses are read at checkpoints: the NaN of iteration 3 surfaces at the checkpoint after iteration 4,
    # which is not written; the one after iteration 2 stays, to resume from.
    weight = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(DarkMinerError, match="loss became nan at iteration 3"):
        train_parameters({"w": weight}, lambda i, g: (weight - 1).square().sum() * (float("nan") if i == 3 else 1.0),
                         iterations=6, lr=0.1, seed=0, work_dir=tmp_path, checkpoint_every=2, desc="toy")
    state = load_state(tmp_path / training.CHECKPOINT)
    assert state["iterations_done"] == 2 and len(state["losses"]) == 2 and all(math.isfinite(v) for v in state["losses"])
    # A NaN gradient behind a finite loss (sqrt at 0: value 0, gradient 0 * inf) spoils the weights: caught
    # before they are saved too.
    weight = torch.nn.Parameter(torch.zeros(1))

    def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
        if iteration == 1:
            return (weight - weight.detach()).abs().sqrt().sum()
        return (weight - 1).square().sum()

    with pytest.raises(DarkMinerError, match="weights became NaN/inf by iteration 2"):
        train_parameters({"w": weight}, loss_fn, iterations=4, lr=0.1, seed=0, work_dir=tmp_path / "grad",
                         checkpoint_every=2, desc="toy")
    assert not (tmp_path / "grad" / training.CHECKPOINT).exists()


def test_a_saved_state_comes_back_whole(tmp_path: Path) -> None:
    from darkminer.io import load_state, save_state

    layer = torch.nn.Linear(3, 2).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    optimizer.zero_grad()
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2, 3)
    optimizer.step()
    state = {"layer": layer.state_dict(), "optimizer": optimizer.state_dict(), "flag": torch.tensor(True),
             "rng": torch.get_rng_state(), "step": 7, "log": {"losses": [[50, 0.5]], "seconds": 1.5}, "none": None}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert list(back) == list(state) and back["step"] == 7 and back["log"] == state["log"] and back["none"] is None
    assert back["layer"]["weight"].dtype == torch.bfloat16 and torch.equal(back["layer"]["weight"], layer.weight)
    assert back["flag"].dtype == torch.bool and back["flag"].ndim == 0 and torch.equal(back["rng"], state["rng"])
    assert list(back["optimizer"]["state"]) == [0]  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]  # a tuple comes back as a list
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    save_tensors(tmp_path / "plain.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(DarkMinerError, match="holds no saved state"):
        load_state(tmp_path / "plain.safetensors")
    for damaged in ('{"dict": [["step", {"tensor": "99"}]]}', '{"dict": [["step"]]}', '{"dict": 3}', '{"list": [1'):
        save_tensors(tmp_path / "damaged.safetensors", {"0": torch.zeros(1)}, metadata={"state": damaged})
        with pytest.raises(DamagedStateError, match="damaged.safetensors is damaged .*; delete it to redo its work"):
            load_state(tmp_path / "damaged.safetensors")


def test_a_checkpoint_from_before_the_one_file_format_asks_to_start_over(tmp_path: Path) -> None:
    # The two earlier layouts: counts in a JSON beside the tensors, then in the metadata beside named tensors.
    earlier = ({}, {"state": json.dumps({"iterations_done": 1, "losses": [0.5], "adam_steps": {"w": 1.0}, "loss_scale": {}})})
    for metadata in earlier:
        tensors = {"param/w": torch.zeros(1), "exp_avg/w": torch.zeros(1), "exp_avg_sq/w": torch.zeros(1)}
        save_tensors(tmp_path / training.CHECKPOINT, tensors, metadata=metadata)
        with pytest.raises(DarkMinerError, match="from an older darkminer .*; delete that folder to start over"):
            train_parameters({"w": torch.nn.Parameter(torch.zeros(1))}, lambda i, g: torch.zeros(()), iterations=2,
                             lr=0.1, seed=0, work_dir=tmp_path, checkpoint_every=1, desc="toy")


@pytest.mark.parametrize(("method", "options"), [
    ("esd-x-strict", {}),
    ("advunlearn", {"warmup_iterations": 1, "attack_steps": 2, "retain_batch": 2}),  # its attack is drawn anew each iteration
])
def test_a_killed_training_eraser_resumes_from_its_checkpoint(method: str, options: dict, base_dir: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    config = {"iterations": 4, "lr": 1e-3, "ddim_steps": 2, "checkpoint_every": 2, **options}
    straight = load_model(str(base_dir))
    erase(method, CONCEPT, tmp_path / "straight", model=straight, config=config)

    real = training.iteration_generator

    def dying(seed: int, iteration: int) -> torch.Generator:
        if iteration == 3:
            raise KeyboardInterrupt
        return real(seed, iteration)

    monkeypatch.setattr(training, "iteration_generator", dying)
    with pytest.raises(KeyboardInterrupt):
        erase(method, CONCEPT, tmp_path / "resumed", model=load_model(str(base_dir)), config=config)
    monkeypatch.setattr(training, "iteration_generator", real)
    assert not (tmp_path / "resumed").exists()  # nothing that looks complete

    resumed = load_model(str(base_dir))
    erase(method, CONCEPT, tmp_path / "resumed", model=resumed, config=config, resume=True)
    torch.testing.assert_close(eps_of(resumed, [CONCEPT]), eps_of(straight, [CONCEPT]), rtol=0, atol=1e-6)


def test_a_stable_diffusion_concept_declared_a_style_gets_the_style_templates(base_dir: Path, tmp_path: Path) -> None:
    config = {**TINY_CONFIGS["ca"], "iterations": 1}
    out = erase("ca", "Van Gogh", tmp_path / "ca", model=str(base_dir), anchor="a painting", kind="style", config=config)
    info = ErasedModelInfo.read(out)
    assert info.extra["target"]["kind"] == "style"
    assert info.extra["concept_prompts"] == ["a painting, in the style of Van Gogh", "in Van Gogh's style, a painting"]
    with pytest.raises(DarkMinerError, match="unknown kind 'styel' \\(--kind\\): use one of"):  # before the (missing) model loads
        erase("ca", "Van Gogh", tmp_path / "x", model="no/such-model", kind="styel")
    with pytest.raises(DarkMinerError, match="a testbed concept's kind is the registry's"):
        erase("uce", "blood", tmp_path / "x", model="testbed", kind="style")


def test_a_saved_state_that_is_no_training_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    from darkminer.io import save_state

    save_state(tmp_path / training.CHECKPOINT, {"iterations_done": 1})  # save_state's format, not this loop's
    with pytest.raises(DarkMinerError, match="older darkminer; delete that folder to start over"):
        train_parameters({"w": torch.nn.Parameter(torch.zeros(1))}, lambda i, g: torch.zeros(()), iterations=2,
                         lr=0.1, seed=0, work_dir=tmp_path, checkpoint_every=1, desc="toy")
