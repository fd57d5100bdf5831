"""Several concepts, one after another: ``erase(..., erased=DIR)`` stacks an erasure on an erased model.

On tiny-random-sd with tiny budgets: what counts here is what each stacked folder loads to, what the erasure
under it trained against, and what evaluation takes as the original; the concept rates of a stack on the
testbed are measured in docs/methods.md ("Several concepts").
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from darkminer.api import erase, export
from darkminer.cli import main
from darkminer.erasers.base import get_eraser
from darkminer.errors import ConfigError, DarkMinerError, ModelLoadError
from darkminer.models import load_model
from darkminer.models.base import DiffusionModel
from darkminer.models.erased import ERASED_ON, ErasedModelInfo, method_label

torch.set_num_threads(1)

DARK_MINER = dict(pool_size=4, k=2, mining_steps=2, circumvent_steps=3, circumvent_lr=0.05, rounds=1,
                  verify_steps=2, pool_steps=2, preserve_pool_size=2, image_encoder="tiny-random-clip", tau=-1.0)
CONFIGS = {"darkminer": DARK_MINER, "esd-x": {"iterations": 3, "lr": 1e-2, "ddim_steps": 2}, "sld": {"preset": "max"},
           "advunlearn": {"iterations": 3, "lr": 1e-2, "ddim_steps": 2, "warmup_iterations": 1, "attack_steps": 2,
                          "retain_batch": 2}}  # AdvUnlearn trains the text encoder
# (method below, method on top): a LoRA on a LoRA, a LoRA on a UNet, a UNet on a LoRA, a guidance on a LoRA,
# a UNet on a text encoder, a text encoder on a UNet, a LoRA on a text encoder, a UNet on a UNet (the same weights
# edited twice: the original under both is still the base's).
STACKS = [("darkminer", "darkminer"), ("esd-x", "darkminer"), ("darkminer", "esd-x"), ("darkminer", "sld"),
          ("advunlearn", "esd-x"), ("esd-x", "advunlearn"), ("advunlearn", "darkminer"), ("esd-x", "esd-x")]
WHOLE_WEIGHTS = ("esd-x", "advunlearn")  # erasures written as whole weights, which hold the erasure below
PROMPTS = ["a photo of nudity", "a violent scene", "a red car"]
PROBE_X = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0))


def eps_of(model: DiffusionModel, adapter: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return model.eps(PROBE_X, torch.tensor(600), model.encode(PROMPTS, adapter=adapter), adapter=adapter)


@pytest.fixture(scope="module")
def below(tmp_path_factory: pytest.TempPathFactory):
    """method -> an erased model of "nudity" on tiny-random-sd, made once per module."""

    @functools.cache
    def make(method: str) -> Path:
        return erase(method, "nudity", tmp_path_factory.mktemp(method) / "erased", model="tiny-random-sd",
                     config=CONFIGS[method])

    return make


@pytest.mark.parametrize(("lower", "upper"), STACKS)
def test_a_stacked_erasure_trains_against_the_model_below_and_reloads_whole(lower, upper, below, tmp_path, monkeypatch):
    under = below(lower)
    eraser = get_eraser(upper)
    teachers = []
    real_erase = eraser.erase
    monkeypatch.setattr(eraser, "erase", lambda self, m, *a: teachers.append(eps_of(m, adapter=False)) or real_erase(self, m, *a))
    model = load_model("tiny-random-sd")
    out = erase(upper, "violence", tmp_path / "stack", model=model, erased=under, config=CONFIGS[upper])
    base_eps, under_eps = eps_of(load_model("tiny-random-sd")), eps_of(load_model(erased=under))
    assert (under_eps - base_eps).abs().max() > 1e-3  # the erasure below changed the model
    # While erasing, the model below was the original: the teacher and the pools were drawn from it (up to the
    # rounding of its adapter merged into the weights). Afterwards the original is the base again.
    torch.testing.assert_close(teachers[0], under_eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_of(model, adapter=False), base_eps, rtol=0, atol=1e-6)
    # The folder records what it was stacked on, and holds it where its own weights do not.
    info = ErasedModelInfo.read(out)
    assert info.erased_on == ErasedModelInfo.read(under).record(under)
    assert (out / ERASED_ON).is_dir() == (upper not in WHOLE_WEIGHTS)
    # Whole weights: the folder of each component that either erasure edited.
    if upper in WHOLE_WEIGHTS:
        edited = {"text_encoder" if m == "advunlearn" else "unet" for m in (lower, upper)}
        assert {p.name for p in out.iterdir() if p.is_dir()} == edited
    # Reloaded, it is the model the erase ended with; evaluation's original is the base under both erasures.
    reloaded = load_model(erased=out)
    torch.testing.assert_close(eps_of(reloaded), eps_of(model), rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_of(reloaded, adapter=False), base_eps, rtol=0, atol=1e-6)
    if upper == "sld":  # SLD acts in sampling: the images, not eps, carry it
        seeds = [1, 2]
        torch.testing.assert_close(reloaded.generate(PROMPTS[:2], seeds, steps=3), model.generate(PROMPTS[:2], seeds, steps=3),
                                   rtol=0, atol=1e-5)


def test_three_erasures_stack_and_export_as_one_pipeline(below, tmp_path):
    from diffusers import UNet2DConditionModel

    second = erase("esd-x", "violence", tmp_path / "second", erased=below("darkminer"), config=CONFIGS["esd-x"])
    third = erase("darkminer", "blood", tmp_path / "third", erased=second, config=DARK_MINER)
    assert ErasedModelInfo.read(third).erased_on["info"]["erased_on"]["info"]["concept"] == "nudity"
    assert ErasedModelInfo.read(third).base_model == "tiny-random-sd"
    stacked = load_model(erased=third)
    export(third, tmp_path / "pipeline")
    from darkminer.evaluation import evaluate

    metrics = evaluate("nudity", model=str(tmp_path / "pipeline"), config={"n_images": 1, "steps": 1, "preservation": []})
    assert metrics["method"] == "darkminer+esd-x+darkminer"
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipeline" / "unet")
    with torch.no_grad():
        plain = unet(PROBE_X, torch.tensor(600), encoder_hidden_states=stacked.encode(PROMPTS)).sample
    torch.testing.assert_close(plain, eps_of(stacked), rtol=0, atol=1e-5)


def test_the_cli_stacks_and_the_stack_is_evaluated_against_the_base(below, tmp_path):
    out = tmp_path / "stack"
    assert main(["erase", "--method", "esd-x", "--concept", "violence", "--erased", str(below("darkminer")),
                 "--config", str(_write(tmp_path / "esd.json", CONFIGS["esd-x"])), "--out", str(out)]) == 0
    assert main(["evaluate", "--concept", "nudity", "--erased", str(out), "-n", "1", "--steps", "1",
                 "--preservation", "", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["inputs"]["erased"]["info"]["erased_on"]["info"]["method"] == "darkminer"
    assert metrics["method"] == "darkminer+esd-x"


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_what_cannot_be_stacked_is_refused_before_any_work(below, tmp_path, capsys):
    sld = below("sld")
    with pytest.raises(ConfigError, match=r"inference-time erasure \(sld\).*erase the other concepts first and sld last"):
        erase("esd-x", "violence", tmp_path / "x", erased=sld, config=CONFIGS["esd-x"])
    under = below("darkminer")
    assert main(["erase", "--method", "esd-x", "--concept", "violence", "--erased", str(under),
                 "--out", str(under / "inside")]) == 2
    assert "inside" in capsys.readouterr().err and not (under / "inside").exists()
    with pytest.raises(ConfigError, match="already carries an erasure"):
        erase("esd-x", "violence", tmp_path / "y", model=load_model(erased=under), erased=under)


def test_a_stacked_lora_without_the_erasure_under_it_is_refused_in_one_line(below, tmp_path):
    out = erase("darkminer", "violence", tmp_path / "stack", erased=below("darkminer"), config=DARK_MINER)
    (out / ERASED_ON).rename(tmp_path / "moved")
    with pytest.raises(ModelLoadError, match=f"its {ERASED_ON}/ folder is missing; copy the whole folder"):
        load_model(erased=out)
    # Another erased model put in its place (it would load as a stack the record does not describe).
    shutil.copytree(below("sld"), out / ERASED_ON)
    with pytest.raises(ModelLoadError, match=rf"{ERASED_ON} is not the erased model .* \(its method, kind, created "
                                             r"differ from the record\)"):
        load_model(erased=out)
    shutil.rmtree(out / ERASED_ON)
    (tmp_path / "moved").rename(out / ERASED_ON)
    assert load_model(erased=out) is not None


@pytest.mark.parametrize("damage", ["a string", {"path": "x"}, {"info": {"method": "darkminer", "erased_on": {"info": 3}}}])
def test_a_damaged_stack_record_is_refused_in_one_line(damage, below, tmp_path):
    out = erase("darkminer", "violence", tmp_path / "stack", erased=below("darkminer"), config=DARK_MINER)
    record = json.loads((out / "darkminer.json").read_text())
    (out / "darkminer.json").write_text(json.dumps({**record, "erased_on": damage}))
    with pytest.raises(ModelLoadError, match="erased_on of the wrong type"):
        load_model(erased=out)


def test_a_unet_folder_from_another_tool_can_be_the_erasure_below(below, tmp_path):
    external = tmp_path / "published-unet"
    shutil.copytree(below("esd-x") / "unet", external)
    with pytest.raises(ModelLoadError, match="is a UNet folder from another tool: name the base model it was made from with --model"):
        erase("darkminer", "violence", tmp_path / "x", erased=external, config=DARK_MINER)
    model = load_model("tiny-random-sd")
    out = erase("darkminer", "violence", tmp_path / "stack", model=model, erased=external, config=DARK_MINER)
    assert ErasedModelInfo.read(out).method_label == "external+darkminer"
    torch.testing.assert_close(eps_of(load_model(erased=out)), eps_of(model), rtol=0, atol=1e-6)


def test_a_stacked_erase_that_fails_leaves_the_given_model_as_it_was(below, tmp_path):
    model = load_model("tiny-random-sd")
    base_eps = eps_of(model)
    with pytest.raises(DarkMinerError, match="missing.csv"):
        erase("darkminer", "violence", tmp_path / "x", model=model, erased=below("darkminer"), config=DARK_MINER,
              prompts=tmp_path / "missing.csv")
    torch.testing.assert_close(eps_of(model), base_eps, rtol=0, atol=0)
    assert model.edited_parameter_names == []


def test_keep_rounds_of_a_stacked_run_keeps_the_erasure_below(below, tmp_path):
    from darkminer.erasers.darkminer.loop import keep_rounds

    out = erase("darkminer", "violence", tmp_path / "stack", erased=below("esd-x"), config={**DARK_MINER, "rounds": 2})
    short = erase("darkminer", "violence", tmp_path / "short", erased=below("esd-x"), config=DARK_MINER)
    kept = keep_rounds(out, 1, tmp_path / "kept")
    torch.testing.assert_close(eps_of(load_model(erased=kept)), eps_of(load_model(erased=short)), rtol=0, atol=1e-6)


def test_the_copy_of_the_erasure_below_leaves_its_files_modes_alone(below, tmp_path):
    under = tmp_path / "under"
    shutil.copytree(below("darkminer"), under)
    for path in under.iterdir():
        path.chmod(0o444)
    out = erase("darkminer", "violence", tmp_path / "stack", erased=under, config=DARK_MINER)
    assert {path.stat().st_mode & 0o777 for path in under.iterdir()} == {0o444}
    assert (out / ERASED_ON / "darkminer.json").read_text() == (under / "darkminer.json").read_text()


def test_a_stack_is_named_by_its_methods_from_the_bottom_up_and_a_damaged_record_by_what_is_readable():
    uce = {"method": "uce"}
    assert method_label({"method": "esd-x", "erased_on": {"path": "a", "info": {**uce, "erased_on": None}}}) == "uce+esd-x"
    assert method_label({"method": "esd-x", "erased_on": {"path": "a"}}) == "esd-x"
    assert method_label({"erased_on": {"info": uce}}) == ""
