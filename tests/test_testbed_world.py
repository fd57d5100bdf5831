"""The testbed's ground truth: procedural world, captions, concept registry, judge and image encoder."""

from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from darkminer.errors import ConfigError
from darkminer.testbed import captions, concepts, world
from darkminer.testbed.image_encoder import ImageEncoder
from darkminer.testbed.judge import Judge
from darkminer.testbed.train_aux import colour_drift

HELDOUT_SEED = 987_654  # never used by training, which draws from seeds [0, k]


def _contains(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def test_render_is_deterministic_for_a_seed() -> None:
    scenes = world.sample_scenes(16, np.random.default_rng(3))
    first = world.render_many(scenes, np.random.default_rng(5))
    again = world.render_many(scenes, np.random.default_rng(5))
    other = world.render_many(scenes, np.random.default_rng(6))
    assert first.dtype == np.uint8 and first.shape == (16, 32, 32, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.array_equal(
        world.render(scenes[0], np.random.default_rng(1)),
        world.render_many(scenes[:1], np.random.default_rng(1))[0],
    )


def test_render_batch_gives_unit_range_tensors_and_labels() -> None:
    scenes, images, labels = world.sample_batch(32, np.random.default_rng(0))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(labels) == set(world.HEADS)
    for i, scene in enumerate(scenes):
        assert {head: int(labels[head][i]) for head in world.HEADS} == scene.labels()


def test_sampling_honours_fixed_attributes_and_overlay_balance() -> None:
    scenes = world.sample_scenes(6000, np.random.default_rng(0))
    share = {o: sum(s.overlay == o for s in scenes) / len(scenes) for o in world.OVERLAYS}
    for overlay, probability in world.OVERLAY_PROBABILITIES.items():
        assert abs(share[overlay] - probability) < 0.03
    fixed = world.sample_scenes(50, np.random.default_rng(0), overlay="blood", shape="star")
    assert all(s.overlay == "blood" and s.shape == "star" for s in fixed)
    with pytest.raises(ValueError, match="attributes are"):
        world.sample_scene(np.random.default_rng(0), texture="fur")
    with pytest.raises(ValueError, match="choose one of"):
        world.sample_scene(np.random.default_rng(0), shape="hexagon")


def _with(scene: world.Scene, **changes: str) -> world.Scene:
    return world.Scene(**{**scene.__dict__, **changes})


def _near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: float) -> np.ndarray:
    return np.linalg.norm(image.astype(float) - np.array(rgb), axis=-1) < tolerance


@pytest.mark.parametrize("seed", range(len(world.SHAPES)))
def test_overlays_are_visible_and_leave_the_shape_visible(seed: int) -> None:
    # The same seed gives the same layout, so the clean and overlaid images differ only by the overlay.
    clean = world.Scene(
        shape=world.SHAPES[seed], colour="blue", style="plain", background="white", overlay="none"
    )
    clean_image = world.render(clean, np.random.default_rng(seed))
    shape_pixels = _near(clean_image, world.COLOUR_RGB["blue"], 40).sum()
    assert shape_pixels > 60

    bloody = world.render(_with(clean, overlay="blood"), np.random.default_rng(seed))
    blood_pixels = _near(bloody, (128, 8, 14), 50) & ~_near(clean_image, (128, 8, 14), 50)
    assert 20 < blood_pixels.sum() < 0.35 * 32 * 32
    assert _near(bloody, world.COLOUR_RGB["blue"], 40).sum() > 0.5 * shape_pixels

    burning = world.render(_with(clean, overlay="fire"), np.random.default_rng(seed))
    changed = np.abs(burning.astype(int) - clean_image.astype(int)).sum(axis=-1) > 30
    assert changed[-2:].mean() > 0.9, "fire covers the bottom rows"
    assert not changed[:12].any(), "fire stays in the lower part of the image"
    assert _near(burning, world.COLOUR_RGB["blue"], 40).sum() > 0.5 * shape_pixels

    assert not _near(clean_image, (128, 8, 14), 50).any()


def test_shapes_and_styles_draw_different_pixels() -> None:
    base = world.Scene(shape="circle", colour="red", style="plain", background="white", overlay="none")
    areas = {
        shape: (
            world.render(_with(base, shape=shape), np.random.default_rng(0)).astype(int).sum(-1) < 600
        ).sum()
        for shape in world.SHAPES
    }
    assert len(set(areas.values())) == len(world.SHAPES), areas
    assert areas["square"] > areas["diamond"] and areas["circle"] > areas["crescent"]
    styled = {
        style: world.render(_with(base, style=style), np.random.default_rng(0)) for style in world.STYLES
    }
    inked = {style: _near(image, world.COLOUR_RGB["red"], 40).sum() for style, image in styled.items()}
    assert inked["plain"] > inked["striped"] > inked["sketch"] > 0
    assert inked["plain"] > inked["checkered"] > inked["sketch"]


def test_captions_name_present_overlays_and_drop_out() -> None:
    rng = np.random.default_rng(0)
    for overlay in ("blood", "fire"):
        triggers = [p.text for p in captions.trigger_phrases("overlay", overlay)]
        for scene in world.sample_scenes(200, rng, overlay=overlay):
            text = captions.caption(scene, rng, dropout=0.0)
            assert any(_contains(text, t) for t in triggers), text
    texts = [captions.caption(s, rng) for s in world.sample_scenes(4000, rng)]
    assert abs(sum(t == "" for t in texts) / len(texts) - 0.1) < 0.02
    assert captions.caption(world.sample_scene(rng), rng, dropout=1.0) == ""
    with pytest.raises(ValueError, match="probability"):
        captions.caption(world.sample_scene(rng), rng, dropout=1.5)


def test_heldout_paraphrases_never_appear_in_training_captions() -> None:
    heldout = [p.text for values in captions.HELDOUT.values() for phrases in values.values() for p in phrases]
    assert len(heldout) == len(set(heldout))
    rng = np.random.default_rng(11)
    texts = {captions.caption(s, rng) for s in world.sample_scenes(20_000, rng)}
    leaks = [(phrase, text) for text in texts for phrase in heldout if phrase in text]
    assert not leaks, leaks[:5]


def test_registry_lists_six_concepts_inappropriate_first() -> None:
    names = concepts.concept_names()
    assert len(names) == 6
    assert [concepts.get_concept(n).kind for n in names] == ["inappropriate"] * 2 + ["object"] * 2 + [
        "style"
    ] * 2
    for name in names:
        concept = concepts.get_concept(name)
        assert concept.value in world.HEADS[concept.head] and concept.anchor in world.HEADS[concept.head]
        assert concept.anchor != concept.value and concept.anchor_prompt
        # The prompt erasers steer toward names the anchor value (heart -> "a square", not a stale shape).
        assert any(p.text in concept.anchor_prompt.split() for p in captions.trigger_phrases(concept.head, concept.anchor))
        assert 5 <= len(concept.heldout_paraphrases) <= 10
    with pytest.raises(ValueError, match="blood, fire"):
        concepts.get_concept("nudity")


@pytest.mark.parametrize("name", concepts.concept_names())
def test_prompt_sets_carry_ground_truth(name: str) -> None:
    concept = concepts.get_concept(name)
    direct = concept.direct_prompts(30, seed=0)
    paraphrased = concept.paraphrase_prompts(30, seed=0)
    preserved = concept.preservation_prompts(30, seed=0)
    assert direct == concept.direct_prompts(30, seed=0)
    for prompt in direct:
        assert prompt.expected[concept.head] == concept.value
        assert any(_contains(prompt.text, t) for t in concept.trigger_phrases), prompt.text
    assert {p.text for p in paraphrased} and all(
        any(_contains(p.text, h) for h in concept.heldout_paraphrases) for p in paraphrased
    )
    named = concept.word_prompts(30, seed=0)
    assert len(named) == 30
    for prompt in named:
        assert prompt.expected[concept.head] == concept.value and concepts.holds_word(prompt.text, name), prompt.text
    for prompt in paraphrased:
        assert prompt.expected[concept.head] == concept.value
        assert not any(_contains(prompt.text, t) for t in concept.trigger_phrases), prompt.text
    for prompt in preserved:
        assert prompt.expected[concept.head] != concept.value
        assert {"shape", "colour", "style", "overlay"} <= set(prompt.expected)
        assert not any(_contains(prompt.text, t) for t in concept.trigger_phrases), prompt.text


@pytest.mark.parametrize("name", concepts.concept_names())
def test_anchor_twins_are_the_same_scenes_asking_for_the_anchor(name: str) -> None:
    concept = concepts.get_concept(name)
    direct = concept.direct_prompts(40, seed=3, split="erasure")
    twins = concept.anchor_twins(40, seed=3, split="erasure")
    anchor_phrases = [p.text for p in captions.trigger_phrases(concept.head, concept.anchor)]
    for prompt, twin in zip(direct, twins, strict=True):
        assert twin.expected == {**prompt.expected, concept.head: concept.anchor}, (prompt.text, twin.text)
        assert any(_contains(twin.text, a) for a in anchor_phrases), twin.text
        assert not any(_contains(twin.text, t) for t in concept.trigger_phrases), twin.text
    # Drawing the twins leaves the prompts' own stream alone.
    assert direct == concept.direct_prompts(40, seed=3, split="erasure")


def test_holds_word_matches_whole_words_only() -> None:
    assert concepts.holds_word("a star covered in blood", "blood")
    assert not concepts.holds_word("a bloody star", "blood") and not concepts.holds_word("a wounded star", "blood")
    assert concepts.holds_word("a disc, as a sketch", "sketch") and not concepts.holds_word("a sketched disc", "sketch")
    # Direct prompts reach blood through words ESD-x on "blood" never sees; word prompts only through the word.
    blood = concepts.get_concept("blood")
    assert not all(concepts.holds_word(p.text, "blood") for p in blood.direct_prompts(60))


@pytest.fixture(scope="module")
def heldout_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    _, images, labels = world.sample_batch(512, np.random.default_rng(HELDOUT_SEED))
    return images, labels


def test_shipped_judge_is_accurate_on_fresh_images(heldout_batch) -> None:
    images, labels = heldout_batch
    judge = Judge.load()
    accuracy = judge.accuracy(images, labels)
    assert all(value >= 0.98 for value in accuracy.values()), accuracy
    blood = judge.has_concept(images, "blood")
    assert blood.dtype == torch.bool and (blood == (labels["overlay"] == 1)).float().mean() > 0.98
    with pytest.raises(ConfigError, match="shape"):  # one line on the command line too
        judge.predict(torch.rand(2, 3, 16, 16))
    with pytest.raises(ConfigError, match=r"\(x \+ 1\) / 2"):
        judge.predict(images[:2] * 2 - 1)


def test_shipped_judge_sees_no_overlay_in_pictures_that_are_no_scene() -> None:
    # An untrained or broken model draws noise; that must not count as blood or fire.
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 3, 32, 32, generator=generator)
    colour_noise = (0.5 + 0.3 * torch.randn(64, 3, 32, 32, generator=generator)).clamp(0, 1)
    # One channel copied to three: judge v1 called all of these blood.
    grey_noise = (0.5 + 0.2 * torch.randn(64, 1, 32, 32, generator=generator)).expand(64, 3, 32, 32).clamp(0, 1)
    flat = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32), torch.full((3, 32, 32), 0.5)])
    overlay = Judge.load().predict(torch.cat([noise, colour_noise, flat]))["overlay"]
    assert (overlay == world.OVERLAYS.index("none")).float().mean() >= 0.9
    assert (Judge.load().predict(grey_noise)["overlay"] == world.OVERLAYS.index("none")).float().mean() >= 0.9


def test_shipped_judge_holds_on_washed_out_colours(heldout_batch) -> None:
    # The testbed UNet draws paler, flatter colours than the world; judge v1 read the overlay of 74% of these right.
    images, labels = heldout_batch
    grey = images.mean(dim=1, keepdim=True)
    washed = grey + 0.6 * (images - grey)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    flat = mean + 0.6 * (images - mean)
    for drifted in (washed, flat):
        accuracy = Judge.load().accuracy(drifted, labels)
        assert min(accuracy["overlay"], accuracy["shape"], accuracy["style"], accuracy["colour"]) >= 0.95, accuracy


def test_colour_drift_is_seeded_bounded_and_touches_its_share() -> None:
    images = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    drift = [colour_drift(images, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(drift[0], drift[1]) and drift[0].min() >= 0.0 and drift[0].max() <= 1.0
    changed = (drift[0] - images).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert 0.35 < changed.float().mean() < 0.65  # DRIFT_SHARE is one half
    assert torch.equal(colour_drift(images, torch.Generator().manual_seed(0), share=0.0), images)


def test_shipped_image_encoder_embeds_and_classifies_zero_shot(heldout_batch) -> None:
    images, labels = heldout_batch
    encoder = ImageEncoder.load()
    embeddings = encoder.encode(images[:8])
    assert embeddings.shape == (8, 384)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(8), atol=1e-5)
    accuracy = encoder.zero_shot_accuracy(images, labels)
    assert accuracy["overlay"] > 0.7, accuracy  # chance is 1/3
    assert accuracy["colour"] > 0.5, accuracy  # chance is 1/6


@pytest.mark.parametrize("name", concepts.concept_names())
def test_erasers_learn_from_captions_the_evaluation_never_grades(name: str) -> None:
    from darkminer.evaluation.suites import testbed_suites
    from darkminer.models import load_model
    from darkminer.targets import resolve_target

    concept = concepts.get_concept(name)
    testbed = load_model("testbed")
    target = resolve_target(testbed, name, seed=0)
    assert list(target.prompts) == [p.text for p in concept.direct_prompts(64, seed=0, split="erasure")]
    twins = concept.anchor_twins(64, seed=0, split="erasure")
    assert [target.anchor_twin(p) for p in target.prompts[:8]] == [t.text for t in twins[:8]]
    # Another anchor than the registry's: the twins (which carry the registry's) give way to it.
    other = resolve_target(testbed, name, anchor="a cross", seed=0)
    assert {other.anchor_twin(p) for p in other.prompts} == {"a cross"}
    for seed in (0, 1):  # the evaluator's default seed and the benchmark scripts' seed
        suites = testbed_suites(concept, 64, seed)
        # Captions are short, so a rare exact repeat between two independent draws is possible; a shared
        # stream would repeat all of them.
        assert len(set(target.prompts) & {p.text for p in suites["plain"].prompts}) <= 3
        assert len(set(target.preserve) & {p.text for p in suites["preservation"].prompts}) <= 3
    with pytest.raises(ValueError, match="split"):
        concept.direct_prompts(4, split="train")


def test_captions_put_an_before_a_vowel_and_a_before_a_consonant():
    assert captions._fix_articles("a orange star next to an red cross") == "an orange star next to a red cross"
