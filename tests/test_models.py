"""The model interface on the real diffusers code path (tiny-random-sd) and the testbed backend."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from darkminer.cli import main
from darkminer.errors import DarkMinerError, DarkMinerWarning, ModelLoadError
from darkminer.models import adapters, base_id, load_model, model_id
from darkminer.models.erased import ErasedModelInfo, apply_erased, save_erased

STEPS = 4


def _train_one_lora_step(model, prompt: str, target: str = "cross-attn") -> None:
    params = adapters.add_lora(model, adapters.LoraConfig(rank=4, target=target), seed=0)
    # peft initialises B = 0, so the adapter is a no-op until trained; a large step makes the change visible.
    optimizer = torch.optim.SGD(params, lr=1000.0)
    x0 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    t = torch.tensor([300, 700])
    cond = model.encode([prompt, prompt])
    loss = (model.eps(model.add_noise(x0, noise, t), t, cond) - 3.0).pow(2).mean()
    loss.backward()
    optimizer.step()


def test_encode_from_token_embeddings_equals_text_encoding(tiny_sd):
    ids = tiny_sd.tokenize(["a photo of a cat", "van gogh starry night"])
    from_text = tiny_sd.encode(["a photo of a cat", "van gogh starry night"])
    from_embeds = tiny_sd.encode_embeddings(tiny_sd.embed_ids(ids), ids)
    assert from_text.shape == (2, 77, 32)
    torch.testing.assert_close(from_embeds, from_text, atol=1e-6, rtol=0)


def test_a_prompt_cut_to_the_text_encoders_length_is_reported_once_per_model(tiny_sd):
    length = tiny_sd.max_length
    fits = " ".join(["cat"] * (length - 2))  # with its start and end tokens exactly max_length
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = tiny_sd.tokenize([fits])
    with pytest.warns(DarkMinerWarning, match=f"longer than the text encoder's {length} tokens, so its end is cut off: 'cat cat"):
        ids = tiny_sd.tokenize(["a dog", fits + " dog"])
    assert ids.shape == (2, length) and torch.equal(ids[1], exact[0])  # "dog" is what was cut; the end token stays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_sd.tokenize([fits + " dog"])


def test_slots_and_nearest_tokens_project_back_to_the_vocabulary(tiny_sd):
    from darkminer.models.slots import SLOT, build_slotted, prompt_token_ids

    slotted = build_slotted(tiny_sd, [[SLOT] * 3 + prompt_token_ids(tiny_sd, "a cat")])
    ids = slotted.input_ids
    assert slotted.slots.tolist() == [[1, 2, 3]] and ids.shape == (1, 77)
    assert torch.equal(ids[0, 4:], tiny_sd.tokenize(["a cat"])[0, 1:74])  # the prompt follows the slots
    assert tiny_sd.decode_ids(ids[:, :1]) == [""]  # BOS is special
    table = tiny_sd.token_embedding.weight
    wanted = tiny_sd.tokenize(["dog"])[0, 1]
    nearest, words = tiny_sd.nearest_tokens(table[wanted][None] + 1e-4, k=1)
    assert nearest[0, 0].item() == wanted.item()
    assert words[0][0] == "dog</w>"


def test_same_seed_same_images_different_seed_different(tiny_sd):
    a = tiny_sd.generate(["a cat", "a dog"], seeds=[1, 2], steps=STEPS)
    b = tiny_sd.generate(["a dog"], seeds=[2], steps=STEPS)  # batch composition must not matter
    c = tiny_sd.generate(["a dog"], seeds=[3], steps=STEPS)
    assert a.shape == (2, 3, 32, 32)
    assert a.min() >= 0.0 and a.max() <= 1.0
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)
    assert (b - c).abs().mean() > 1e-3


def test_sampling_matches_plain_diffusers_pipeline(tiny_sd_dir):
    model = load_model(str(tiny_sd_dir))
    noise = model.initial_noise([7])
    ours = model.sample(model.encode(["a red car"]), noise=noise, steps=STEPS, guidance_scale=7.5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe("a red car", latents=noise, num_inference_steps=STEPS, guidance_scale=7.5, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# non-cross-attn puts LoRA on self-attention projections *and* convolutions: a file mixing diffusers' two
# key formats once lost the self-attention half on reload.
@pytest.mark.parametrize("target", ["cross-attn", "non-cross-attn"])
def test_lora_train_save_reload_in_plain_diffusers_and_merge(tiny_sd_dir, tmp_path, target):
    prompt = "a photo of a dog"
    model = load_model(str(tiny_sd_dir))
    noise = model.initial_noise([0, 1])
    cond = model.encode([prompt, prompt])
    before = model.sample(cond, noise=noise, steps=STEPS)
    _train_one_lora_step(model, prompt, target)
    after = model.sample(cond, noise=noise, steps=STEPS)
    assert (after - before).abs().mean() > 1e-2, "one LoRA step must change the trained prompt's images"
    # The frozen original is the same object with the adapter off.
    teacher = model.sample(cond, noise=noise, steps=STEPS, adapter=False)
    torch.testing.assert_close(teacher, before, atol=1e-6, rtol=0)

    out = save_erased(model, tmp_path / "erased", ErasedModelInfo(method="test", concept="dog", base_model=str(tiny_sd_dir), kind="lora"))
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "darkminer.json").is_file()

    reloaded = load_model(erased=out)  # base model read from darkminer.json
    assert adapters.lora_state_dict(reloaded).keys() == adapters.lora_state_dict(model).keys()
    torch.testing.assert_close(reloaded.sample(cond, noise=noise, steps=STEPS), after, atol=1e-5, rtol=0)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(out))
    plain = pipe([prompt] * 2, latents=noise, num_inference_steps=STEPS, guidance_scale=7.5, output_type="pt").images
    torch.testing.assert_close(plain, after, atol=1e-4, rtol=0)

    # `darkminer export`: a plain pipeline folder with the adapter folded in, loaded by diffusers alone.
    assert main(["export", "--erased", str(out), "--out", str(tmp_path / "pipeline")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None, requires_safety_checker=False)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and not any("lora" in n for n, _ in pipe.unet.named_parameters())
    merged = pipe([prompt] * 2, latents=noise, num_inference_steps=STEPS, guidance_scale=7.5, output_type="pt").images
    torch.testing.assert_close(merged, after, atol=1e-4, rtol=0)
    record = json.loads((tmp_path / "pipeline" / "darkminer_export.json").read_text())
    assert record["erasure"]["method"] == "test" and record["erased"] == str(out.resolve())


def test_switching_the_adapter_off_and_on_keeps_which_weights_train(tiny_sd, tmp_path):
    trained = adapters.add_lora(tiny_sd, adapters.LoraConfig(rank=4))
    with tiny_sd.original():
        pass
    assert all(p.requires_grad for p in trained)  # the erasers' LoRA still trains after a teacher call
    adapters.save_lora(tiny_sd, tmp_path / "lora")
    loaded = load_model("tiny-random-sd")
    adapters.load_lora(loaded, tmp_path / "lora")
    with loaded.original():  # e.g. an attack drawing the original's images
        pass
    # peft's enable_adapters would make the loaded adapter trainable: attacks would then compute and
    # accumulate its gradients on every backward
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_in_place_edits_keep_the_original_reachable_and_round_trip(tiny_sd, tmp_path):
    name = adapters.target_module_names(tiny_sd, adapters.TARGET_PRESETS["cross-attn-kv"])[0] + ".weight"
    noise = tiny_sd.initial_noise([5])
    cond = tiny_sd.encode(["a cat"])
    before = tiny_sd.sample(cond, noise=noise, steps=STEPS)
    tiny_sd.remember_originals([name])
    with torch.no_grad():
        dict(tiny_sd.unet.named_parameters())[name].mul_(-3.0)
    edited = tiny_sd.sample(cond, noise=noise, steps=STEPS)
    assert (edited - before).abs().mean() > 1e-3
    torch.testing.assert_close(tiny_sd.sample(cond, noise=noise, steps=STEPS, adapter=False), before, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny_sd.sample(cond, noise=noise, steps=STEPS), edited)  # swapped back after

    out = save_erased(tiny_sd, tmp_path / "e", ErasedModelInfo(method="test", concept="cat", base_model="tiny-random-sd", kind="unet"))
    fresh = load_model("tiny-random-sd")
    info = apply_erased(fresh, out)
    assert info.kind == "unet" and fresh.edited_parameter_names == [name]
    torch.testing.assert_close(fresh.sample(cond, noise=noise, steps=STEPS), edited, atol=1e-6, rtol=0)


def test_lora_targets_select_the_named_modules(tiny_sd):
    kv = adapters.target_module_names(tiny_sd, adapters.LoraConfig(target="cross-attn-kv").pattern)
    assert kv and all("attn2" in n and n.endswith(("to_k", "to_v")) for n in kv)
    non_cross = adapters.target_module_names(tiny_sd, adapters.LoraConfig(target="non-cross-attn").pattern)
    assert non_cross and not any("attn2" in n for n in non_cross)
    assert any(n.endswith("attn1.to_q") for n in non_cross)


def test_testbed_encodes_embeddings_like_text():
    model = load_model("testbed")
    ids = model.tokenize(["a bloody red star", "a sketch of a heart"])
    torch.testing.assert_close(model.encode_embeddings(model.embed_ids(ids), ids), model.encode_ids(ids), atol=1e-5, rtol=0)
    assert model.vocabulary[model.tokenize(["star"])[0, 1]] == "star"
    images = model.generate(["a red star"], seeds=[0], steps=3)
    assert images.shape == (1, 3, 32, 32)


def test_testbed_loads_in_the_asked_dtype_without_library_warnings():
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    libraries = [(transformers_logging, logging.getLogger("transformers")), (diffusers_logging, logging.getLogger("diffusers"))]
    saved = [library.get_verbosity() for library, _ in libraries]
    for library, logger in libraries:  # the CLI silences them; a library user sees everything from WARNING up
        library.set_verbosity_warning()
        logger.addHandler(handler)
    try:
        model = load_model("testbed", dtype="bf16")
    finally:
        for (library, logger), verbosity in zip(libraries, saved, strict=True):
            logger.removeHandler(handler)
            library.set_verbosity(verbosity)
    assert [r.getMessage()[:80] for r in records] == []
    assert model.unet.dtype == torch.bfloat16 and model.text_encoder.pooler is None


@pytest.mark.parametrize("name", ["testbed", "saved tiny SD"])
def test_loading_draws_no_library_bar_and_leaves_the_libraries_settings(name, tiny_sd_dir, capfd):
    """transformers 5 draws "Loading weights" and diffusers "Loading pipeline components..." bars, which sat
    among ours, in the Python API too (the CLI hid them only by importing both libraries first)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.enable_progress_bar()
    try:
        load_model("testbed" if name == "testbed" else str(tiny_sd_dir))
        assert [library.is_progress_bar_enabled() for library in libraries] == [True, True]
    finally:
        for library, enabled in zip(libraries, saved, strict=True):
            (library.enable_progress_bar if enabled else library.disable_progress_bar)()
    assert "Loading" not in capfd.readouterr().err


def test_tiny_random_sd_loads_on_the_asked_device():
    # "meta" stands in for a GPU here: every weight must move, not stay on the CPU where it was built
    model = load_model("tiny-random-sd", device="meta")
    modules = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    assert {name: {p.device.type for p in m.parameters()} for name, m in modules.items()} == {
        name: {"meta"} for name in modules
    }


def test_lora_on_a_bf16_model_trains_in_float32(tmp_path):
    model = load_model("tiny-random-sd", dtype="bf16")
    params = adapters.add_lora(model, adapters.LoraConfig(rank=4))
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = [p for n, p in model.unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    latents = torch.randn(1, *model.latent_shape, dtype=torch.bfloat16)
    loss = model.eps(latents, torch.tensor([500]), model.encode(["a dog"])).float().square().mean()
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # Loaded back into a bf16 base, the adapter is the float32 one trained (diffusers would build it in bf16,
    # rounding the weights): the loaded model's predictions are the trained model's, exactly.
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param) * 0.05)  # as if trained, with more than bf16's 8 mantissa bits
        adapters.save_lora(model, tmp_path / "lora")
        loaded = load_model("tiny-random-sd", dtype="bf16")
        adapters.load_lora(loaded, tmp_path / "lora")
        assert {p.dtype for n, p in loaded.unet.named_parameters() if "lora_" in n} == {torch.float32}
        cond = model.encode(["a dog"])
        assert torch.equal(loaded.eps(latents, torch.tensor([500]), cond), model.eps(latents, torch.tensor([500]), cond))


def test_a_lora_file_missing_layers_or_its_description_is_refused(tiny_sd, tmp_path):
    """peft wraps only the layers a file has weights for: an emptied file loaded as the base model, one
    without some layers as a weaker erasure, both without a word."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapters.add_lora(tiny_sd, adapters.LoraConfig(rank=4))
    path = adapters.save_lora(tiny_sd, tmp_path / "lora")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    layer = "down_blocks.0"
    assert any(layer in k for k in tensors)
    for name, kept, meta, message in [
        ("empty", {}, metadata, "holds no LoRA weights"),
        ("subset", {k: v for k, v in tensors.items() if layer not in k}, metadata,
         rf"described layers without weights, e\.g\. \['{layer}\."),
        ("not-json", tensors, {**metadata, "lora_adapter_metadata": "{broken"}, "damaged adapter description"),
        ("a-list", tensors, {**metadata, "lora_adapter_metadata": "[1, 2]"}, "damaged adapter description"),
        ("bad-rank", tensors, {**metadata, "lora_adapter_metadata": metadata["lora_adapter_metadata"].replace(
            '"unet.r": 4', '"unet.r": "x"')}, "does not fit this base model's UNet"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        save_file(kept, str(folder / adapters.LORA_WEIGHT_NAME), metadata=meta)
        with pytest.raises(ModelLoadError, match=message):
            adapters.load_lora(load_model("tiny-random-sd"), folder)
    # Whole files load however their layers are described: a regex matching past the layer's own name (after
    # wrapping, its children match too), peft's names with layers_to_transform (another tool's file).
    from peft import LoraConfig as PeftLoraConfig

    for name, attach in [
        ("regex", lambda m: adapters.add_lora(m, adapters.LoraConfig(rank=4, target=r".*to_[qk].*"))),
        ("layers", lambda m: m.unet.add_adapter(PeftLoraConfig(r=4, target_modules=["to_q", "to_k"], layers_to_transform=[0],
                                                               layers_pattern="attentions"), adapter_name=adapters.ADAPTER_NAME)),
    ]:
        model = load_model("tiny-random-sd")
        attach(model)
        adapters.save_lora(model, tmp_path / name)
        loaded = load_model("tiny-random-sd")
        adapters.load_lora(loaded, tmp_path / name)
        assert adapters.lora_state_dict(loaded).keys() == adapters.lora_state_dict(model).keys()


# -------------------------------------------------------------------------------------------------- CLIP
def test_tiny_random_clip_gives_normalised_deterministic_image_and_text_features():
    from darkminer.models.clip import TINY_CLIP_ID, Clip

    clip = Clip.load(TINY_CLIP_ID)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))  # not square, not 32: resize + crop
    features = clip.image_features(images)
    assert features.shape == (3, 16) and bool(torch.isfinite(features).all())
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(clip.encode(images), features)  # the verifier's ImageEmbedder
    torch.testing.assert_close(Clip.load(TINY_CLIP_ID).image_features(images), features)  # same seed, same model
    texts = clip.text_features(["a photo of a cat", "van gogh starry night"])
    assert texts.shape == (2, 16) and bool(torch.isfinite(texts).all())
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(texts[0], texts[1])
    assert clip.describe()["model"] == TINY_CLIP_ID


def test_clip_preprocessing_matches_the_clip_image_processor():
    """Shortest side to the model's size (bicubic), centre crop, CLIP mean/std: as transformers' processor,
    up to its round trip through 8-bit PIL images."""
    from transformers import CLIPImageProcessor

    from darkminer.imaging import to_pil
    from darkminer.models.clip import TINY_CLIP_ID, Clip

    clip = Clip.load(TINY_CLIP_ID)
    image = torch.rand(1, 3, 7, 5, generator=torch.Generator().manual_seed(0))
    image = torch.nn.functional.interpolate(image, size=(120, 90), mode="bilinear")  # smooth, portrait
    processor = CLIPImageProcessor(size={"shortest_edge": clip.size}, crop_size={"height": clip.size, "width": clip.size})
    expected = processor(images=[to_pil(image[0])], return_tensors="pt")["pixel_values"]
    ours = clip.preprocess(image)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    assert (ours - expected).abs().mean() < 0.02


def test_clip_missing_or_pickled_fails_with_one_line_naming_both_options(tmp_path):
    from darkminer.errors import ModelLoadError
    from darkminer.models.clip import Clip

    with pytest.raises(ModelLoadError) as missing:
        Clip.load(str(tmp_path / "no-clip-here"))
    pickled = tmp_path / "pickled-clip"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pickled") as refused:
        Clip.load(str(pickled))
    for error in (missing, refused):
        message = str(error.value)
        assert "\n" not in message and "`image_encoder`" in message and "`--clip-model`" in message
        assert "local CLIP folder" in message


def _damaged_copy(tiny_sd_dir: Path, tmp_path: Path, name: str) -> Path:
    """tiny_sd_dir with one thing wrong in it, the way downloads and conversions go wrong."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / name
    shutil.copytree(tiny_sd_dir, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    tokenizer_json = folder / "tokenizer" / "tokenizer.json"
    if name == "missing-weight":
        tensors = load_file(weights)
        del tensors["embeddings.token_embedding.weight"]
        save_file(tensors, weights)
    elif name == "unused-weight":
        save_file({**load_file(weights), "extra.weight": torch.zeros(2)}, weights)
    elif name == "no-merges":
        data = json.loads(tokenizer_json.read_text())
        data["model"]["merges"] = []
        tokenizer_json.write_text(json.dumps(data))
    elif name == "inpainting":
        config = dict(UNet2DConditionModel.load_config(folder / "unet"), in_channels=9)
        UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    elif name == "no-max-length":
        config_file = folder / "tokenizer" / "tokenizer_config.json"
        config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                           if k != "model_max_length"}))
    elif name == "no-unet-config":
        (folder / "unet" / "config.json").unlink()
    elif name == "listed-feature-extractor":  # a hub snapshot whose model_index names parts we never use
        index = json.loads((folder / "model_index.json").read_text())
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [("missing-weight", "text_encoder lacks embeddings.token_embedding.weight"),
     ("unused-weight", "text_encoder has weights the config does not use: extra.weight"),
     ("no-merges", "merges did not load"),
     ("inpainting", "inpainting and other conditioned UNets are not supported"),
     ("no-unet-config", "the folder must hold a whole diffusers pipeline: model_index.json, and each component's config")],
)
def test_a_damaged_model_folder_is_refused_in_one_line(damage, message, tiny_sd_dir, tmp_path):
    """Each of these used to load and draw garbage (random or dropped weights, a character-level tokenizer)
    or fail with a traceback while sampling."""
    with pytest.raises(ModelLoadError, match=re.escape(message)) as refused:
        load_model(str(_damaged_copy(tiny_sd_dir, tmp_path, damage)))
    assert "\n" not in str(refused.value) and "hf download" not in str(refused.value)  # a folder: nothing to fetch


def test_parts_the_model_does_not_need_may_be_missing(tiny_sd_dir, tmp_path):
    reference = load_model(str(tiny_sd_dir))
    for damage in ("no-max-length", "listed-feature-extractor"):
        model = load_model(str(_damaged_copy(tiny_sd_dir, tmp_path, damage)))
        assert model.max_length == reference.max_length == 77  # the text encoder's length, not "unlimited"
        assert torch.equal(model.tokenize(["a photo of a dog"]), reference.tokenize(["a photo of a dog"]))


def test_a_clip_folder_without_its_tokenizer_is_refused(tmp_path):
    from darkminer.models.clip import Clip, build_tiny_clip

    model, _ = build_tiny_clip()
    model.save_pretrained(tmp_path / "clip")  # weights and config, no tokenizer files
    with pytest.raises(ModelLoadError, match="the tokenizer has only"):
        Clip.load(str(tmp_path / "clip"))


def test_a_guidance_erasure_loads_in_a_process_that_never_imported_its_eraser(tmp_path):
    import os
    import subprocess
    import sys

    from darkminer.api import erase

    out = erase("sld", "nudity", tmp_path / "sld", model="tiny-random-sd")
    # A fresh interpreter: `darkminer generate --erased DIR` imports the models, not the erasers that register SLD.
    code = ("from darkminer.models import load_model; "
            f"print(type(load_model('tiny-random-sd', erased={str(out)!r}).guidance).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["SafeLatentGuidance"]
    # The Python API, without the CLI's quieting: no advice to install torchvision, left out on purpose
    assert "torchvision" not in done.stderr


def test_an_erasure_from_a_cached_hub_id_is_refused_on_another_base(tiny_sd_dir, tmp_path, monkeypatch):
    """A hub id in the cache is here: another base is refused, its own snapshot folder is the same model."""
    import warnings

    import huggingface_hub

    from darkminer.api import erase

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = erase("sld", "nudity", tmp_path / "sld", model="tiny-random-sd", config={"preset": "max"})
    info = json.loads((out / "darkminer.json").read_text())
    (out / "darkminer.json").write_text(json.dumps({**info, "base_model": "someorg/tiny-sd"}))
    with pytest.raises(ModelLoadError, match="was erased from 'someorg/tiny-sd', not 'tiny-random-sd'"):
        load_model("tiny-random-sd", erased=out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not here" warning: it is the same model
        assert load_model(snapshot, erased=out).guidance.registry_name == "sld"


def test_the_python_api_takes_paths_and_refuses_what_would_silently_mislead(tiny_sd_dir, tmp_path):
    from pathlib import Path

    from darkminer.api import erase
    from darkminer.attacks.base import get_attack
    from darkminer.errors import ConfigError, DarkMinerError, ModelLoadError
    from darkminer.evaluation import evaluate

    sld = {"preset": "max"}  # no warm-up: it acts from the first step
    out = erase("sld", "nudity", tmp_path / "sld", model=Path(tiny_sd_dir), config=sld)  # a Path, not the testbed
    recorded = ErasedModelInfo.read(out).base_model
    assert recorded == str(Path(tiny_sd_dir).resolve())
    assert load_model(Path(tiny_sd_dir), erased=out).guidance.registry_name == "sld"
    with pytest.raises(ModelLoadError, match="was erased from .*leave the model out to load its own base"):
        load_model("tiny-random-sd", erased=out)  # same architecture, other weights
    moved = tmp_path / "from-another-machine"  # its recorded base is not here to compare with
    shutil.copytree(out, moved)
    info = json.loads((moved / "darkminer.json").read_text())
    (moved / "darkminer.json").write_text(json.dumps({**info, "base_model": "/data/elsewhere/sd14"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert base_id(Path(tiny_sd_dir), moved) == model_id(tiny_sd_dir)  # as erase, attack and evaluate call them
        assert load_model(Path(tiny_sd_dir), erased=moved).guidance.registry_name == "sld"
    assert [str(w.message) for w in caught if issubclass(w.category, DarkMinerWarning)] == [
        f"{moved} was erased from '/data/elsewhere/sd14', which is not here; applying it to {str(tiny_sd_dir)!r}, "
        "taken to be the same model"]  # once
    with pytest.raises(ModelLoadError, match="from the folder /data/elsewhere/sd14, which is not there any more: name "
                                             "where that base model is now with --model"):
        load_model(erased=moved)  # its own base, which has moved: the error says how to name it
    with pytest.raises(ModelLoadError, match="is an erased model, not a base: load it with --erased"):
        load_model(out)
    with pytest.raises(ModelLoadError, match="a model is a name or a folder path, got int"):
        erase("sld", "nudity", tmp_path / "x", model=5)
    with pytest.raises(ConfigError, match="expected a SldConfig, a mapping of its options or a config file's path, got list"):
        erase("sld", "nudity", tmp_path / "x", model="tiny-random-sd", config=[1, 2])
    with pytest.raises(ConfigError, match="concept must be a string, got"):
        erase("sld", 3, tmp_path / "x", model="tiny-random-sd")
    from darkminer.erasers.esd import EsdConfig

    with pytest.raises(ConfigError, match="expected a UceConfig, .* got EsdConfig"):  # before the model loads
        erase("uce", "nudity", tmp_path / "x", model="no/such-model", config=EsdConfig())

    # An erased model given to erase would stack a second erasure on the first.
    erased = load_model(erased=out)
    with pytest.raises(ConfigError, match="already carries an erasure"):
        erase("sld", "violence", tmp_path / "y", model=erased, config=sld)
    # Its original is the base, guidance included (SLD acts at sampling time).
    base = load_model(Path(tiny_sd_dir))
    noise, cond = base.initial_noise([3]), base.encode(["a nude woman"])
    with erased.original():
        torch.testing.assert_close(erased.sample(cond, noise=noise, steps=STEPS), base.sample(cond, noise=noise, steps=STEPS))
    torch.testing.assert_close(erased.sample(cond, noise=noise, steps=STEPS, adapter=False),  # the teachers' way
                               base.sample(cond, noise=noise, steps=STEPS))
    assert not torch.allclose(erased.sample(cond, noise=noise, steps=STEPS), base.sample(cond, noise=noise, steps=STEPS))

    with pytest.raises(DarkMinerError, match="takes a CCEConfig"):
        get_attack("cce")({"steps": 3})
    with pytest.raises(ConfigError, match="unknown option"):  # before any image is drawn
        evaluate("nudity", tmp_path / "e", model="no/such-model",  # before the model loads
                 config={"n_images": 2, "attacks": ["plain"], "attack_configs": {"plain": {"foo": 1}}})
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_package_exports_resolve_and_one_prompt_is_drawn_once_per_seed(tiny_sd):
    import darkminer

    assert set(darkminer.__all__) <= set(dir(darkminer))
    assert all(getattr(darkminer, name) is not None for name in darkminer.__all__)
    one = tiny_sd.generate("a cat", seeds=[0, 1], steps=2)
    torch.testing.assert_close(one, tiny_sd.generate(["a cat", "a cat"], seeds=[0, 1], steps=2), rtol=0, atol=0)


def test_a_unet_folder_from_another_tool_loads_as_an_erasure_of_the_named_base(tmp_path, capsys, tiny_sd_dir):
    """A published unlearned UNet (diffusers format) is attacked and evaluated against the base it came from."""
    from darkminer.cli import main
    from darkminer.models.tiny import build_tiny_sd_pipeline

    unet = build_tiny_sd_pipeline().unet
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # what "unlearning" changed
    unet.save_pretrained(tmp_path / "their-unet", safe_serialization=True)
    model = load_model("tiny-random-sd", erased=tmp_path / "their-unet")
    assert model.edited_parameter_names == ["conv_out.bias"]
    with model.original():
        torch.testing.assert_close(model.unet.conv_out.bias + 0.5, unet.conv_out.bias)
    with pytest.raises(ModelLoadError, match="UNet folder from another tool: name the base model"):
        load_model(erased=tmp_path / "their-unet")
    with pytest.raises(ModelLoadError, match="is a whole pipeline folder, not an erased model: give its UNet"):
        load_model("tiny-random-sd", erased=tiny_sd_dir)
    assert main(["generate", "--prompt", "a cat", "--model", "tiny-random-sd", "--erased", str(tmp_path / "their-unet"),
                 "--steps", "1", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["generate", "--prompt", "a cat", "--model", "testbed", "--erased", str(tmp_path / "their-unet"),
                 "--steps", "1", "--out", str(tmp_path / "g.png")]) == 2
    assert "another architecture than the base model 'testbed'" in capsys.readouterr().err


def test_a_folder_with_only_fp16_variant_weights_loads(tmp_path, tiny_sd_dir):
    """Some hub snapshots hold `*.fp16.safetensors` only (diffusers' variant files)."""
    from darkminer.models.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline().save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
    assert not list((tmp_path / "fp16" / "unet").glob("diffusion_pytorch_model.safetensors"))
    model, reference = load_model(str(tmp_path / "fp16")), load_model(str(tiny_sd_dir))
    for name, weight in reference.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], weight), name


def test_export_refuses_what_no_plain_pipeline_can_carry(tmp_path, capsys):
    from darkminer.api import erase

    sld = erase("sld", "nudity", tmp_path / "sld", model="tiny-random-sd")
    assert main(["export", "--erased", str(sld), "--out", str(tmp_path / "p1")]) == 2
    assert "inference-time erasure (sld)" in capsys.readouterr().err and not (tmp_path / "p1").exists()
    # A pipeline folder darkminer did not export (a user's base model) is never replaced.
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    (base / "weights.safetensors").write_text("mine")
    lora = erase("uce", "nudity", tmp_path / "uce-sd", model="tiny-random-sd")
    assert main(["export", "--erased", str(lora), "--out", str(base)]) == 2
    assert "is not an exported pipeline" in capsys.readouterr().err and (base / "weights.safetensors").read_text() == "mine"
    assert main(["export", "--erased", str(lora), "--out", str(tmp_path / "p3")]) == 0
    assert main(["export", "--erased", str(lora), "--out", str(tmp_path / "p3")]) == 0  # its own export: replaced
    uce = erase("uce", "blood", tmp_path / "uce", model="testbed")
    assert main(["export", "--erased", str(uce), "--out", str(tmp_path / "p2")]) == 2
    assert "'testbed' is not one" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_weights_built_from_a_seed_leave_the_callers_generator_alone():
    """add_lora, the tiny models and the untrained testbed seed what they build, never the user's program: a
    caller's torch.rand after them draws as it would have without them."""
    from darkminer.models.adapters import LoraConfig, add_lora
    from darkminer.models.clip import build_tiny_clip
    from darkminer.models.tiny import build_tiny_sd_pipeline
    from darkminer.testbed.model import TestbedModel

    def lora_a(seed: int) -> torch.Tensor:
        model = load_model("tiny-random-sd")
        add_lora(model, LoraConfig(), seed=seed)
        return next(p for n, p in model.unet.named_parameters() if "lora_A" in n).detach().clone()

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = lora_a(0)
    build_tiny_sd_pipeline(1)
    build_tiny_clip(2)
    TestbedModel.untrained(3)
    assert torch.equal(torch.rand(4), expected)
    assert torch.equal(lora_a(0), first) and not torch.equal(lora_a(1), first)  # still the seed's weights
    unet = lambda seed: next(TestbedModel.untrained(seed).unet.parameters()).detach()  # noqa: E731
    assert torch.equal(unet(3), unet(3)) and not torch.equal(unet(3), unet(4))


def test_weight_fingerprints_tell_any_edit_apart_and_nothing_else():
    """What erase checks a plugin's unregistered edits by: a changed or moved value or a NaN changes a weight's
    fingerprint; the same values in another memory layout do not."""
    model = load_model("tiny-random-sd")
    before = model.weight_fingerprints()
    assert before == model.weight_fingerprints() and len(before) == len(list(model.unet.parameters())) + len(
        list(model.text_encoder.parameters()))
    weight = model.unet.conv_in.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        for edit in (lambda w: w.copy_(w.flip(0)), lambda w: w.view(-1)[0].fill_(float("nan")),
                     lambda w: w.view(-1)[0].add_(1e-7)):
            edit(weight)
            changed = [name for name, fp in model.weight_fingerprints().items() if fp != before[name]]
            assert changed == ["conv_in.weight"]
            weight.copy_(kept)
    assert model.weight_fingerprints() == before
    model.unet.to(memory_format=torch.channels_last)  # the layout is no edit: the same values, the same sums
    assert model.weight_fingerprints() == before
    half = load_model("tiny-random-sd", dtype="bfloat16").weight_fingerprints()  # 2-byte weights read as int16
    assert half.keys() == before.keys() and half != before


def test_lora_alpha_sets_the_adapters_scale():
    for alpha, scale in ((8.0, 2.0), (None, 1.0)):  # None: alpha = rank, scale 1
        model = load_model("tiny-random-sd")
        adapters.add_lora(model, adapters.LoraConfig(rank=4, alpha=alpha), seed=0)
        scales = {m.scaling[adapters.ADAPTER_NAME] for m in model.unet.modules() if hasattr(m, "scaling")}
        assert scales == {scale}


def test_a_hand_edited_sld_record_is_refused_in_one_line(tmp_path):
    from darkminer.api import erase

    out = erase("sld", "nudity", tmp_path / "sld", model="tiny-random-sd")
    record = json.loads((out / "guidance.json").read_text())
    for key, value, problem in (("warmup_steps", "ten", "must be a whole number"), ("momentum_beta", 1.5, r"in \[0, 1\]"),
                                ("threshold", None, "must be")):
        (out / "guidance.json").write_text(json.dumps({**record, key: value}))
        with pytest.raises(DarkMinerError, match=f"SLD settings are incomplete or wrong .*{problem}.*re-create"):
            load_model(erased=out)
    (out / "guidance.json").write_text(json.dumps(record))
    assert load_model(erased=out).guidance.settings.warmup_steps == record["warmup_steps"]


def test_export_checks_its_output_before_loading_records_where_the_erasure_was_and_takes_the_flags(tmp_path, monkeypatch):
    import darkminer.api as api

    erased = api.erase("uce", "nudity", tmp_path / "lora", model="tiny-random-sd")
    foreign = tmp_path / "pipeline"
    foreign.mkdir()
    (foreign / "model_index.json").write_text("{}")
    real_load = api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded before refusing the output"))
    with pytest.raises(DarkMinerError, match="is not an exported pipeline"):
        api.export(erased, foreign)
    monkeypatch.setattr(api, "load_model", real_load)
    monkeypatch.chdir(tmp_path)
    api.export("lora", "exported")  # relative paths: the record names the folder itself
    assert json.loads((tmp_path / "exported" / api.EXPORT_INFO).read_text())["erased"] == str(erased.resolve())
    # Evaluated as a model of its own, the pipeline is graded under the erasure it carries, not as "original".
    from darkminer.evaluation import evaluate

    metrics = evaluate("nudity", model="exported", config={"n_images": 1, "steps": 1, "preservation": []})
    assert metrics["method"] == "uce" and metrics["inputs"]["erased"] is None
    # No preservation metric asked for: only the plain set is drawn, not the preservation sets.
    assert metrics["suites"] == {"plain": 1} and metrics["n_images"] == 1 and metrics["preservation"]["clip"] is None
    assert metrics["inputs"]["base_model"]["exported"]["erasure"]["method"] == "uce"
    assert evaluate("nudity", model="tiny-random-sd", config={"n_images": 1, "steps": 1, "preservation": []}
                    )["inputs"]["base_model"]["exported"] is None
    seen = {}
    monkeypatch.setattr(api, "export", lambda erased, out, **kwargs: seen.update(kwargs) or Path(out))
    assert main(["export", "--erased", "lora", "--out", "x", "--model", "m", "--dtype", "float16"]) == 0
    assert seen == {"model": "m", "dtype": "float16"}


# ---------------------------------------------------------------------------------- sampling and originals
def test_guidance_zero_draws_the_unconditional_image():
    """eps_u + 0 * (eps_c - eps_u): what the empty prompt draws without guidance, not the prompt's image."""
    model = load_model("tiny-random-sd")
    zero = model.sample(model.encode(["a red car"]), seeds=[1], steps=2, guidance_scale=0.0)
    torch.testing.assert_close(zero, model.sample(model.encode([""]), seeds=[1], steps=2, guidance_scale=1.0),
                               rtol=0, atol=1e-5)


def test_rows_drawn_in_groups_of_one_guidance_scale_come_back_in_row_order():
    from darkminer.models.base import per_guidance_scale

    def rows_drawn(rows: list[int], scale: float | None) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float32)[:, None]

    assert per_guidance_scale([2.0, None, 2.0, None], rows_drawn).flatten().tolist() == [0, 1, 2, 3]


def test_initial_noise_is_in_the_models_dtype():
    assert load_model("tiny-random-sd", dtype="bfloat16").initial_noise([1]).dtype == torch.bfloat16


def _sld_model(tmp_path: Path):
    from darkminer.api import erase

    sld = erase("sld", "nudity", tmp_path / "sld", model="tiny-random-sd", config={"preset": "max"})
    return load_model(erased=sld), load_model("tiny-random-sd")


def test_an_sld_models_original_draws_the_base_models_images(tmp_path):
    """The reference images of preservation and the attacks' targets come from the original: with SLD's guidance
    left on they would be the erased model's."""
    model, base = _sld_model(tmp_path)
    assert not model.is_original
    cond = base.encode(["a nude person"])
    plain = base.sample(cond, seeds=[1], steps=3, guidance_scale=5.0)
    assert not torch.allclose(model.sample(cond, seeds=[1], steps=3, guidance_scale=5.0), plain, atol=1e-4)
    torch.testing.assert_close(model.sample(cond, seeds=[1], steps=3, guidance_scale=5.0, adapter=False), plain,
                               rtol=0, atol=1e-6)
    with model.original():  # as the attacks draw their target images
        torch.testing.assert_close(model.sample(cond, seeds=[1], steps=3, guidance_scale=5.0), plain, rtol=0, atol=1e-6)


def test_a_nested_original_leaves_the_outer_block_original():
    model, base = load_model("tiny-random-sd"), load_model("tiny-random-sd")
    adapters.add_lora(model, adapters.LoraConfig(rank=4))
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    x, t = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor(600)
    with torch.no_grad():
        cond = base.encode(["a cat"])
        want = base.eps(x, t, cond)
        assert not torch.allclose(model.eps(x, t, cond), want, atol=1e-4)  # the adapter acts
        with model.original():
            model.encode(["a dog"], adapter=False)  # an original() of its own inside, entered and left
            torch.testing.assert_close(model.eps(x, t, cond), want, rtol=0, atol=1e-6)


def test_export_writes_the_dtype_asked_for(tmp_path, capsys):
    from safetensors import safe_open

    from darkminer.api import erase, export

    erased = erase("uce", "nudity", tmp_path / "uce", model="tiny-random-sd")
    assert main(["export", "--erased", str(erased), "--out", str(tmp_path / "p16")]) == 0
    assert capsys.readouterr().out == f"wrote diffusers pipeline {tmp_path / 'p16'}\n"
    out = export(erased, tmp_path / "p16", dtype="float16")
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}  # noqa: SIM118 (not a dict)
    record = json.loads((out / "darkminer_export.json").read_text())
    assert (record["dtype"], record["base_model"]) == ("torch.float16", "tiny-random-sd")
    with pytest.raises(ModelLoadError, match=f"is a pipeline darkminer exported.*load it as the model, --model {out}"):
        load_model("tiny-random-sd", erased=out)
    assert main(["export", "--erased", str(erased), "--dtype", "float16", "--out", str(out)]) == 0  # says what it replaces
    assert capsys.readouterr().out == f"wrote diffusers pipeline {out}, replacing the one that was there (uce on nudity)\n"
    # Loaded as the README says, by plain diffusers: float32 throughout by default (a half text encoder beside a
    # float32 UNet failed on the first image), half throughout with torch_dtype; both draw.
    for asked, dtype in ((None, torch.float32), (torch.float16, torch.float16)):
        pipe = StableDiffusionPipeline.from_pretrained(out, **({"torch_dtype": asked} if asked else {}))
        assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {dtype}
        if asked is None:  # half matmuls on the CPU need a newer torch than some users have: drawn in float32
            image = pipe("a cat", num_inference_steps=1, output_type="pt").images
            assert image.shape[0] == 1 and torch.isfinite(image).all()
