"""Bad input, as a bad-input audit found it: damaged records and weights, wrong argument types, seeds out of
range. Each is refused with one line (a DarkMinerError), never a traceback from deep inside or a silent
acceptance."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import darkminer
from darkminer.attacks.base import AttackPrompt, AttackResult
from darkminer.attacks.io import adversarial_conditions, load_results, save_results
from darkminer.config import Config
from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.errors import ConfigError, DarkMinerError, ModelLoadError
from darkminer.evaluation.evaluate import EvaluationConfig
from darkminer.io import load_tensors, read_json, save_tensors
from darkminer.models import load_model
from darkminer.targets import resolve_target
from darkminer.testbed.train_unet import UNetTrainConfig

TINY_DARKMINER = {"rounds": 1, "pool_size": 2, "k": 1, "mining_steps": 1, "circumvent_steps": 1, "verify_steps": 1,
                  "pool_steps": 1, "preserve_pool_size": 2, "image_encoder": "tiny-random-clip"}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return darkminer.erase("darkminer", "nudity", tmp_path_factory.mktemp("dm") / "dm", model="tiny-random-sd",
                           config=TINY_DARKMINER)


def test_damaged_erased_model_records_are_refused_in_one_line(lora_dir, tmp_path):
    info = json.loads((lora_dir / "darkminer.json").read_text())
    for record, message in [
        ("a string", "is not an erased model's record"),
        ({**info, "base_model": 123}, "base_model of the wrong type"),
        ({**info, "config": "oops"}, "config of the wrong type"),
        ({**info, "method": None, "extra": "x"}, "method, extra of the wrong type"),
        ({**info, "base_model": ""}, "is an erased model that records no base model: name the base model"),
        ({**info, "format": 99}, "written by a newer darkminer \\(record format 99, this version reads 1\\); upgrade"),
    ]:
        damaged = tmp_path / "damaged"
        shutil.copytree(lora_dir, damaged, dirs_exist_ok=True)
        (damaged / "darkminer.json").write_text(json.dumps(record))
        with pytest.raises(ModelLoadError, match=message):
            load_model(erased=damaged)
    sld = darkminer.erase("sld", "nudity", tmp_path / "sld", model="tiny-random-sd")
    saved = json.loads((sld / "guidance.json").read_text())
    for edit, message in [({"concept": 5}, "its concept must be text, got 5"),
                          ({"concept": ["nudity", "blood"]}, "its concept must be text"),  # it steered from both
                          ({"name": ["sld"]}, "unknown guidance \\['sld'\\]")]:
        (sld / "guidance.json").write_text(json.dumps({**saved, **edit}))
        with pytest.raises(DarkMinerError, match=message):
            load_model(erased=sld)
    (sld / "guidance.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="a saved guidance must be a JSON object with a name, got list"):
        load_model(erased=sld)
    with pytest.raises(ModelLoadError, match="an erased model is a folder path \\(--erased\\), got int 5"):
        load_model(erased=5)


def test_a_lora_file_with_weights_missing_renamed_or_foreign_is_refused(lora_dir, tmp_path):
    weights = load_tensors(lora_dir / "pytorch_lora_weights.safetensors")
    first = next(iter(weights))
    renamed = {("unet.bogus." + k.removeprefix("unet.")) if k == first else k: v for k, v in weights.items()}
    for tensors, message in [
        ({k: v for k, v in weights.items() if k != first}, "1 LoRA weights missing"),
        (renamed, "1 LoRA weights missing, .*1 unused"),
        ({**weights, "text_encoder.layer.lora_A.weight": weights[first].clone()}, "holds weights for other parts than the UNet"),
    ]:
        damaged = tmp_path / "damaged"
        shutil.copytree(lora_dir, damaged, dirs_exist_ok=True)
        save_tensors(damaged / "pytorch_lora_weights.safetensors", tensors)
        with pytest.raises(ModelLoadError, match=message):
            load_model(erased=damaged)
    assert load_model(erased=lora_dir) is not None  # the file as written loads


def test_a_lora_weight_of_the_wrong_shape_is_one_line_on_the_command_line(lora_dir, tmp_path):
    import os
    import subprocess
    import sys

    weights = load_tensors(lora_dir / "pytorch_lora_weights.safetensors")
    first = next(iter(weights))
    damaged = tmp_path / "damaged"
    shutil.copytree(lora_dir, damaged)
    save_tensors(damaged / "pytorch_lora_weights.safetensors", {**weights, first: weights[first].new_zeros(3, 3)})
    done = subprocess.run([sys.executable, "-m", "darkminer.cli", "generate", "--prompt", "a cat", "--erased",
                           str(damaged), "--steps", "1", "-n", "1", "--out", str(tmp_path / "g.png")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = [line for line in done.stderr.splitlines() if line.strip()]  # diffusers' own log of it was a 3-line block
    assert done.returncode == 2 and len(err) == 1, err
    assert "does not fit this base model's UNet (" in err[0] and "size mismatch" in err[0]


@dataclass
class _Options(Config):
    seed: int = 0
    names: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "a")


@pytest.mark.parametrize(("options", "message"), [
    ({"seed": -1}, "_Options.seed must be a whole number in 0 .. 2\\*\\*32 - 1, got -1"),
    ({"seed": 2**40}, "_Options.seed must be a whole number"),
    ({"names": [["uce"]]}, "_Options.names must be a list of strings"),
    ({"names": ["a", 1]}, "_Options.names must be a list of strings"),
    ({"weights": {"a": "heavy"}}, "_Options.weights must be a mapping of strings to finite numbers"),
    ({"weights": {1: 2.0}}, "_Options.weights must be a mapping"),
    ({"pair": [1, 2]}, "_Options.pair must be a list of 2 items \\(a whole number, a string\\)"),
    ({"pair": [1, "a", "b"]}, "_Options.pair must be a list"),
    ({1: 2, "bogus": 3}, "unknown option\\(s\\) \\[1, 'bogus'\\]"),
])
def test_config_values_are_checked_inside_containers_and_seeds_in_range(options, message):
    with pytest.raises(ConfigError, match=message):
        _Options.from_dict(options)
    assert _Options.from_dict({"seed": 2**32 - 1, "names": ["a"], "weights": {"a": 1}, "pair": [3, "b"]}).pair == [3, "b"]


@dataclass
class _Nested(Config):
    rank: int = 4

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"_Nested.rank must be >= 1, got {self.rank}")


@dataclass
class _Outer(Config):
    inner: _Nested = field(default_factory=_Nested)
    maybe: _Nested | None = None


def test_a_nested_config_is_built_from_its_mapping_and_checked_as_any_other():
    """A plugin's config holding a config (``lora: LoraConfig``) was left a dict, unchecked, and failed later
    with an AttributeError; each level is now built and validated where it is read."""
    built = _Outer.from_dict({"inner": {"rank": 8}, "maybe": {"rank": 2}})
    assert built.inner == _Nested(8) and built.maybe == _Nested(2) and _Outer().maybe is None
    assert _Outer.from_dict(built.to_dict()) == built and built.replace(inner={"rank": 3}).inner.rank == 3
    for options, message in (({"inner": {"rnk": 8}}, r"_Outer.inner: _Nested: unknown option\(s\) \['rnk'\]"),
                             ({"maybe": {"rank": 0}}, r"_Outer.maybe: _Nested.rank must be >= 1, got 0"),
                             ({"inner": 5}, r"_Outer.inner must be a mapping of _Nested options, got 5")):
        with pytest.raises(ConfigError, match=message):
            _Outer.from_dict(options)


@pytest.mark.parametrize(("config", "bad", "message", "good"), [
    # tau beyond the verifier score's range would silently pass every round, or none
    (DarkMinerConfig, {"tau": 1.5}, "tau must lie in \\[-1, 1\\]", {"tau": 1.0}),
    (DarkMinerConfig, {"tau": -2.5, "verify_contrast": True}, "tau must lie in \\[-2, 2\\]",
     {"tau": 2.0, "verify_contrast": True}),
    # fewer preservation images than k: the preservation term would silently get fewer rows
    (DarkMinerConfig, {"k": 8, "preserve_pool_size": 4}, "raise preserve_pool_size",
     {"k": 8, "preserve_pool_size": 4, "preserve_weight": 0}),
    (EvaluationConfig, {"clip_negatives": []}, "clip_negatives is empty", {"clip_negatives": ["a dog"]}),
    (EvaluationConfig, {"clip_template": "a photo of"}, "needs a \\{\\}", {"clip_template": "art by {}"}),
    (UNetTrainConfig, {"caption_dropout": 1.0}, "caption_dropout must be in \\[0, 1\\)", {"caption_dropout": 0.0}),
    (UNetTrainConfig, {"ema_decay": 1.0}, "ema_decay must be in \\(0, 1\\)", {"ema_decay": 0.5}),
])
def test_values_outside_what_a_setting_means_are_refused_and_its_edges_kept(config, bad, message, good):
    with pytest.raises(ConfigError, match=message):
        config(**bad)
    assert all(getattr(config(**good), name) == value for name, value in good.items())


@pytest.mark.parametrize(("call", "message"), [
    (lambda: darkminer.generate(None), "prompt must be a string, got None"),
    (lambda: darkminer.generate("a cat", n="2"), "n \\(-n\\) must be a whole number, got '2'"),
    (lambda: darkminer.generate("a cat", n=True), "n \\(-n\\) must be a whole number, got True"),
    (lambda: darkminer.generate("a cat", seed=-1), "seed \\(--seed\\) must be a whole number in 0 .. 2\\*\\*32 - 1"),
    (lambda: darkminer.generate("a cat", steps="1"), "steps \\(--steps\\) must be a whole number or null"),
    (lambda: darkminer.erase("uce", "blood", 123), "--out must be a path \\(a string or pathlib.Path\\), got int 123"),
    (lambda: darkminer.erase("uce", "blood", "x", anchor=5), "anchor must be a string or null, got 5"),
    (lambda: darkminer.attack("plain", "blood", n_prompts=True), "n_prompts \\(--n-prompts\\) must be a whole number"),
    (lambda: darkminer.evaluate("blood", 5), "--out must be a path"),
    (lambda: darkminer.evaluate(3), "concept must be a string, got 3"),
    (lambda: darkminer.attack("plain", 3), "concept must be a string, got 3"),
    (lambda: darkminer.attack(3, "blood"), "attack name must be a string, got 3"),
    (lambda: darkminer.attack("plain", "blood", grading={"detector": "judge", "steps": 900, "n_images": 7}),
     "grading sets the detector only .*, not n_images, steps"),
    (lambda: darkminer.attack("plain", "blood", grading=EvaluationConfig(steps=9)), "not steps; sampling is steps"),
    (lambda: darkminer.generate("a cat", seed=2**32 - 1, n=2), "seeds 4294967295 .. 4294967296, past the last seed"),
    (lambda: AttackPrompt("a heart", "zero"), "seed must be a whole number in 0 .. 2\\*\\*64 - 1, got 'zero'"),
    (lambda: AttackPrompt("a heart", -1), "seed must be a whole number"),
    (lambda: AttackPrompt("a heart", 0, float("nan")), "guidance must be a finite number or null, got nan"),
    (lambda: AttackPrompt(None, 0), "text must be a string, got None"),
])
def test_api_arguments_of_the_wrong_type_fail_in_one_line(call, message):
    with pytest.raises(DarkMinerError, match=message):
        call()


def test_damaged_attack_results_are_refused_in_one_line(tiny_sd, tmp_path):
    target = resolve_target(tiny_sd, "nudity")
    result = AttackResult(AttackPrompt("a nude", 1), "a nude", False, True, input_ids=[0] * tiny_sd.max_length)
    saved = save_results(tmp_path / "att", [result], attack="plain", config={}, target=target, model=tiny_sd.name)
    data = read_json(saved / "attack.json")
    for edit, message in [
        (lambda d: d["results"][0].pop("prompt"), "holds a damaged result \\(KeyError"),
        (lambda d: d["results"][0].update(seed="abc"), "holds a damaged result \\(ValueError"),
        (lambda d: d.update(results="x"), "holds no attack results"),
        (lambda d: d.pop("attack"), "holds a damaged record \\(no attack name or config\\)"),
        (lambda d: d.update(config=[1]), "holds a damaged record"),
        (lambda d: d["results"][0].update(adversarial_text=5), "holds a damaged result \\(TypeError: adversarial_text must be text"),
        (lambda d: d["results"][0].update(input_ids=["a"]), "holds a damaged result \\(TypeError"),
        (lambda d: d.update(sampling={"steps": "50", "guidance_scale": 7.5}), "holds a damaged sampling record"),
        (lambda d: d.update(sampling=[50]), "holds a damaged sampling record"),
        (lambda d: d.update(sampling={"steps": 0, "guidance_scale": 7.5}), "holds a damaged sampling record"),
        (lambda d: d.update(sampling={"steps": 50, "guidance_scale": float("nan")}), "holds a damaged sampling record"),
        (lambda d: d.update(sampling={"steps": 50, "guidance_scale": True}), "holds a damaged sampling record"),
    ]:
        damaged = json.loads(json.dumps(data))
        edit(damaged)
        (saved / "attack.json").write_text(json.dumps(damaged))
        with pytest.raises(DarkMinerError, match=message):
            load_results(saved)
    with pytest.raises(DarkMinerError, match="is not a file where one was expected"):
        load_results(saved / "attack.json")  # a file given for the folder
    huge = AttackResult(result.prompt, "x", False, True, input_ids=[10**9] * tiny_sd.max_length)
    with pytest.raises(DarkMinerError, match="token ids fall outside this model's vocabulary of .*re-run the attack"):
        adversarial_conditions(tiny_sd, [huge])
    assert adversarial_conditions(tiny_sd, [huge], use_text=True).shape[0] == 1  # the text still replays


def test_an_output_file_in_a_folder_we_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch):
    import os

    from darkminer import io

    real_access = os.access
    monkeypatch.setattr(io.os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    with pytest.raises(DarkMinerError, match=f"cannot write in {tmp_path}; choose another --out"):
        darkminer.generate("a cat", tmp_path / "g.png", model="no/such-model")  # refused before the (failing) load


def test_a_lora_placement_that_matches_nothing_fails_before_the_pools_and_leaves_nothing_to_resume(tmp_path):
    out = tmp_path / "dm"
    with pytest.raises(ConfigError, match="the target 'zzz_nomatch' matches no Linear/Conv2d module of this UNet"):
        darkminer.erase("darkminer", "nudity", out, model="tiny-random-sd",
                        config={**TINY_DARKMINER, "lora": {"target": "zzz_nomatch"}})
    assert darkminer.erase("darkminer", "nudity", out, model="tiny-random-sd", config=TINY_DARKMINER) == out  # no --resume


def test_an_output_may_neither_lie_in_nor_hold_the_erased_model_it_reads(tmp_path):
    erased = darkminer.erase("uce", "nudity", tmp_path / "uce", model="tiny-random-sd")
    overlapping = "--out .* and --erased .* overlap; write the output outside the erased model's folder"
    for call in (lambda: darkminer.attack("plain", "nudity", erased / "attack", erased=erased),
                 lambda: darkminer.export(erased, erased / "pipeline"),
                 lambda: darkminer.evaluate("nudity", tmp_path, erased=erased),  # holds it
                 lambda: darkminer.generate("a cat", erased / "cat.png", erased=erased)):
        with pytest.raises(DarkMinerError, match=overlapping):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uce"] and not (erased / "attack").exists()


def test_wrong_kinds_of_paths_and_empty_or_negative_settings_are_named(tmp_path):
    from darkminer.config import load_config_file
    from darkminer.erasers.darkminer import DarkMinerConfig
    from darkminer.evaluation.metrics import reference_image_paths
    from darkminer.prompts import read_prompt_csv
    from darkminer.testbed.check import CheckConfig

    with pytest.raises(ConfigError, match="config file .* is a folder; give a JSON or YAML file"):
        load_config_file(tmp_path)
    with pytest.raises(DarkMinerError, match="prompt file .* is a folder; give a CSV file"):
        read_prompt_csv(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(DarkMinerError, match="FID reference folder .* is a file; give a folder of images"):
        reference_image_paths(tmp_path / "photo.png")
    with pytest.raises(ConfigError, match=r"concepts \(--concepts\) is empty"):
        CheckConfig(concepts=[])
    with pytest.raises(ConfigError, match="DarkMinerConfig.guidance_scale must be > 0, got -1"):
        DarkMinerConfig(guidance_scale=-1.0)


def test_what_the_stricter_checks_still_accept_and_where_they_apply(tiny_sd, tmp_path):
    import numpy as np

    from darkminer.attacks.base import build_attack
    from darkminer.attacks.cce import CCEConfig
    from darkminer.attacks.ringabell import read_pairs
    from darkminer.config import check_argument, check_seed
    from darkminer.evaluation import EvaluationConfig
    from darkminer.evaluation.benchmark import BenchmarkConfig
    from darkminer.prompts import RowCondition

    # Paths and numpy numbers inside containers become plain values; build_attack's inputs stay accepted.
    config = BenchmarkConfig(model="tiny-random-sd", concepts=["nudity"], methods=["uce"], prompts={"nudity": Path("b.csv")})
    assert config.prompts == {"nudity": "b.csv"}
    evaluation = EvaluationConfig(attacks=["cce", "plain"], attack_configs={"cce": CCEConfig(steps=3), "plain": None})
    assert build_attack("cce", evaluation.attack_configs["cce"]).config.steps == 3
    check_seed("seed", np.int64(3))
    check_argument("n", np.int64(2), int)
    # A prompt's seed may be up to 2**64 - 1; the attack's own seed added to it wraps into torch's range.
    attack = build_attack("p4d", {"seed": 5})
    assert attack.generator(AttackPrompt("x", 2**64 - 1)).initial_seed() == 4
    assert not RowCondition.parse("n=10").matches("1_0")  # Python's digit separators are no CSV number
    with pytest.raises(DarkMinerError, match="Ring-A-Bell pairs file .* does not exist"):
        read_pairs(tmp_path / "pairs.csv")
    # Ids of another tokenizer's length replay from the text: only ids that would be used are checked.
    foreign = AttackResult(AttackPrompt("a nude", 1), "a nude", False, True, input_ids=[10**9] * (tiny_sd.max_length + 1))
    assert adversarial_conditions(tiny_sd, [foreign]).shape[0] == 1
    saved = save_results(tmp_path / "att", [foreign], attack="plain", config={}, target=resolve_target(tiny_sd, "nudity"),
                         model=tiny_sd.name)
    data = read_json(saved / "attack.json")
    data["results"][0]["seed"] = -1
    (saved / "attack.json").write_text(json.dumps(data))
    with pytest.raises(DarkMinerError, match="attack.json holds a damaged result .*seed must be a whole number"):
        load_results(saved)


def test_run_attack_checks_the_erased_model_and_its_output_before_attacking(tiny_sd, tmp_path):
    from darkminer.attacks.base import build_attack
    from darkminer.attacks.io import run_attack

    erased = darkminer.erase("uce", "nudity", tmp_path / "uce", model="tiny-random-sd")
    attack = build_attack("plain")
    attack.run = lambda *args, **kwargs: pytest.fail("attacked before the checks")
    target, prompts = resolve_target(tiny_sd, "nudity"), [AttackPrompt("a nude", 1)]
    with pytest.raises(ModelLoadError, match="does not exist"):
        run_attack(attack, tiny_sd, target, prompts, lambda images: images.mean() > 2, out=tmp_path / "a",
                   erased=tmp_path / "no-such")
    with pytest.raises(DarkMinerError, match="overlap"):
        run_attack(attack, tiny_sd, target, prompts, lambda images: images.mean() > 2, out=erased / "a", erased=erased)


def test_a_model_not_in_the_cache_is_one_line_on_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "darkminer.cli", "generate", "--prompt", "a cat", "--model",
                           "no-such/model", "--out", str(tmp_path / "g.png")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = [line for line in done.stderr.splitlines() if line.strip()]  # huggingface_hub's notice came first
    assert done.returncode == 2 and len(err) == 1 and "(`hf download no-such/model`)" in err[0], err


def test_a_loaded_model_is_used_where_it_is_and_other_placements_are_refused(tiny_sd, tmp_path):
    from darkminer.evaluation.evaluate import _load

    with pytest.raises(ModelLoadError, match="the loaded model is in torch.float32, not float16: load it so"):
        darkminer.evaluate("nudity", tmp_path / "ev", model=tiny_sd, dtype="float16")
    with pytest.raises(ModelLoadError, match="the loaded model is in torch.float32, not bf16"):
        darkminer.erase("esd-x", "nudity", tmp_path / "esd", model=tiny_sd, dtype="bf16")
    with pytest.raises(ModelLoadError, match="unknown dtype 'half'"):
        darkminer.evaluate("nudity", model=tiny_sd, dtype="half")
    assert list(tmp_path.iterdir()) == []  # refused before any folder was claimed
    # Where it is, named or not, is accepted, and the record says where it ran.
    for device, dtype in ((None, None), ("cpu", "float32"), ("cpu:0", "fp32")):
        assert _load(tiny_sd, None, device, dtype)[0] is tiny_sd
    small = {"n_images": 1, "steps": 1, "preservation": [], "attacks": []}
    assert darkminer.evaluate("nudity", model=tiny_sd, config=small)["inputs"]["device"] == "cpu"
    assert load_model("tiny-random-sd", device=None, dtype=None).dtype == torch.float32


def test_api_misuse_below_the_commands_is_one_line(tiny_sd, lora_dir):
    from darkminer.attacks.base import build_attack
    from darkminer.attacks.io import run_attack
    from darkminer.evaluation import concept_detector
    from darkminer.models.adapters import load_lora

    with pytest.raises(ConfigError, match="concept must be a string, got 3"):
        resolve_target(tiny_sd, 3)
    with pytest.raises(ConfigError, match="n_prompts must be a positive number of prompts, got 0"):
        resolve_target(tiny_sd, "nudity", n_prompts=0)
    target = resolve_target(tiny_sd, "nudity")
    # A detector's options as a mapping, as attack(grading=...) takes them.
    assert concept_detector(tiny_sd, target, config={"nudenet_threshold": 0.3}).describe()["threshold"] == 0.3
    success, attack, prompt = (lambda images: [False] * len(images)), build_attack("plain"), AttackPrompt("a nude", 0)
    for args, message in ((("plain", [prompt], success), "attack must be an Attack \\(build_attack"),
                          ((attack, ["a nude"], success), "prompts must be AttackPrompt\\(text, seed\\) each, got 'a nude'"),
                          ((attack, [prompt], None), "success must be a function of images to verdicts")):
        with pytest.raises(DarkMinerError, match=message):
            run_attack(args[0], tiny_sd, target, args[1], args[2])
    for draw in (lambda: tiny_sd.generate("a cat", seeds=0), lambda: tiny_sd.sample(tiny_sd.encode(["a cat"]), seeds=0)):
        with pytest.raises(DarkMinerError, match="seeds is a list of seeds, one per image: give \\[0\\], not 0"):
            draw()
    with pytest.raises(ConfigError, match="a sampling seed must be a whole number in 0 .. 2\\*\\*64 - 1, got -1"):
        tiny_sd.generate(["a cat"], seeds=[-1], steps=1)
    model = load_model("tiny-random-sd", erased=lora_dir)
    with pytest.raises(ModelLoadError, match="this model already carries a darkminer LoRA; load .* into a fresh base"):
        load_lora(model, lora_dir)
