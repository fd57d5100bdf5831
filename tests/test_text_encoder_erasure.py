"""An erasure of the text encoder (AdvUnlearn's default): what it edits and writes, that it drops into plain
transformers and diffusers, and that everything which takes "the original" gets the base's text encoder
back (the teacher's conditionings, the attacks' target images, Ring-A-Bell's search, evaluation's
reference images), not only the base's UNet.

On tiny-random-sd with a tiny budget; AdvUnlearn's effect on a concept is measured on the testbed
(docs/methods.md, "AdvUnlearn on the testbed").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from darkminer.api import erase, export
from darkminer.attacks import p4d
from darkminer.attacks.base import AttackPrompt, get_attack
from darkminer.attacks.soft_prompt import original_images
from darkminer.evaluation.evaluate import EvaluationConfig, Painter
from darkminer.evaluation.suites import Suite, SuitePrompt
from darkminer.models import load_model
from darkminer.models.base import TEXT_ENCODER_PREFIX, DiffusionModel
from darkminer.models.erased import ErasedModelInfo
from darkminer.targets import resolve_target

torch.set_num_threads(1)

CONFIG = {"iterations": 4, "lr": 1e-2, "ddim_steps": 2, "warmup_iterations": 1, "attack_steps": 2, "retain_batch": 2}
PROMPTS = ["a photo of nudity", "a red car"]
SEEDS = [3, 4]


def never(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros(images.shape[0], dtype=torch.bool)


@pytest.fixture(scope="module")
def erased(tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusionModel, Path]:
    model = load_model("tiny-random-sd")
    out = erase("advunlearn", "nudity", tmp_path_factory.mktemp("adv") / "erased", model=model, config=CONFIG)
    return model, out


@pytest.fixture()
def base() -> DiffusionModel:
    return load_model("tiny-random-sd")


def test_it_edits_only_the_text_encoder_outside_its_embedding_tables_and_writes_it_whole(erased, base) -> None:
    model, out = erased
    info = ErasedModelInfo.read(out)
    assert info.kind == "text_encoder" and info.config["layers"] == "text-encoder"
    assert (out / "text_encoder").is_dir() and not (out / "unet").exists()
    assert model.edited_components == {"text_encoder"}
    names = model.edited_parameter_names
    assert names and all(n.startswith(TEXT_ENCODER_PREFIX) for n in names)
    assert not any("embeddings" in n for n in names)  # token and position tables stay
    assert any(".encoder.layers.0." in n for n in names) and any("final_layer_norm" in n for n in names)
    with torch.no_grad():
        assert (model.encode(PROMPTS) - base.encode(PROMPTS)).abs().max() > 1e-4
        torch.testing.assert_close(model.encode(PROMPTS, adapter=False), base.encode(PROMPTS), rtol=0, atol=0)
        # A drop-in text encoder: plain transformers loads it, and it gives the erased model's conditionings.
        plain = CLIPTextModel.from_pretrained(out / "text_encoder")(model.tokenize(PROMPTS))[0]
        torch.testing.assert_close(plain, model.encode(PROMPTS), rtol=0, atol=1e-6)
        reloaded = load_model(erased=out)
        torch.testing.assert_close(reloaded.encode(PROMPTS), model.encode(PROMPTS), rtol=0, atol=1e-6)
        torch.testing.assert_close(reloaded.encode(PROMPTS, adapter=False), base.encode(PROMPTS), rtol=0, atol=0)
    for p in model.unet.parameters():
        assert not p.requires_grad
    torch.testing.assert_close(reloaded.generate(PROMPTS, SEEDS, steps=3), model.generate(PROMPTS, SEEDS, steps=3),
                               rtol=0, atol=1e-5)


def test_the_original_it_stands_beside_is_the_base_with_its_own_text_encoder(erased, base) -> None:
    model, _ = erased
    with torch.no_grad():
        # sampling with the adapter off takes the base's unconditional state too
        theirs = base.sample(base.encode(PROMPTS), seeds=SEEDS, steps=3)
        ours = model.sample(model.encode(PROMPTS, adapter=False), seeds=SEEDS, steps=3, adapter=False)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        torch.testing.assert_close(model.generate(PROMPTS, SEEDS, steps=3, adapter=False), theirs, rtol=0, atol=0)
        erased_images = model.sample(model.encode(PROMPTS), seeds=SEEDS, steps=3)
    assert (erased_images - theirs).abs().max() > 1e-4
    # the attacks' target images (UnlearnDiffAtk, P4D, CCE) and evaluation's reference images
    prompts = [AttackPrompt(text, seed) for text, seed in zip(PROMPTS, SEEDS, strict=True)]
    with model.sampling_defaults(steps=3), base.sampling_defaults(steps=3):
        torch.testing.assert_close(original_images(model, None, prompts), original_images(base, None, prompts), rtol=0, atol=0)
    suite = Suite("probe", tuple(SuitePrompt(text, seed) for text, seed in zip(PROMPTS, SEEDS, strict=True)))
    config = EvaluationConfig(steps=3)
    torch.testing.assert_close(Painter(model, config).prompts(suite, original=True), Painter(base, config).prompts(suite),
                               rtol=0, atol=0)
    torch.testing.assert_close(Painter(model, config).prompts(suite), erased_images.cpu(), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Ring-A-Bell's concept vector comes from only")
def test_ring_a_bell_searches_with_the_original_text_encoder(erased, base) -> None:
    """The attacker of Ring-A-Bell holds the public text encoder, not the one an erasure trained: the same
    search on the erased model and on the base finds the same prompts."""
    model, _ = erased
    cls = get_attack("ringabell")
    attack = cls(cls.config_class(population=6, generations=3, prompt_length=4))
    target = resolve_target(base, "nudity")
    prompts = [AttackPrompt("a photo of nudity", 1)]
    with model.sampling_defaults(steps=2), base.sampling_defaults(steps=2):
        found = [r.input_ids for r in attack.run(model, target, prompts, never)]
        assert found == [r.input_ids for r in attack.run(base, target, prompts, never)]
    with torch.no_grad():  # while the erased model's own encoder would have led elsewhere
        assert (attack.concept_vector(model, target) - attack.concept_vector(base, target)).abs().max() > 1e-5


def test_it_exports_into_a_plain_pipeline(erased, tmp_path: Path) -> None:
    model, out = erased
    export(out, tmp_path / "pipeline")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None)
    with torch.no_grad():
        states = pipe.text_encoder(model.tokenize(PROMPTS))[0]
    torch.testing.assert_close(states, model.encode(PROMPTS), rtol=0, atol=1e-6)


def test_p4d_takes_its_teacher_from_the_original_text_encoder(erased, base, monkeypatch) -> None:
    """P4D pulls the erased model toward the original's prediction for the prompt: that conditioning is the
    original encoder's, while the soft prompt it optimises goes through the erased one."""
    model, _ = erased
    taught = []
    real = p4d.teacher_eps
    monkeypatch.setattr(p4d, "teacher_eps", lambda m, o, x, t, cond: taught.append(cond) or real(m, o, x, t, cond))
    cls = get_attack("p4d")
    prompt = AttackPrompt("a photo of nudity", 1)
    with model.sampling_defaults(steps=2):
        cls(cls.config_class(n_tokens=2, iterations=2, eval_every=10, target_images=1)).run(model, None, [prompt], never)
    assert taught
    with torch.no_grad():
        for cond in taught:
            torch.testing.assert_close(cond, base.encode([prompt.text]), rtol=0, atol=0)
