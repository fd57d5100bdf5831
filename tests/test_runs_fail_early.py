"""Bad values that used to fail late (after drawing every image, or after an output folder was claimed, so
the fixed rerun was refused too) fail before any work; and what the benchmark compares on resume."""

from __future__ import annotations

import json

import pytest
import torch

from darkminer.cli import main
from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.erasers.esd import EsdConfig
from darkminer.errors import ConfigError, DarkMinerError, ModelLoadError
from darkminer.evaluation import evaluate
from darkminer.evaluation.benchmark import run_benchmark
from darkminer.evaluation.evaluate import EvaluationConfig
from darkminer.io import changed_keys, what_differs
from darkminer.models.base import SamplingOptions
from darkminer.testbed.check import CheckConfig


@pytest.mark.parametrize("build", [
    lambda steps: EvaluationConfig(steps=steps),
    lambda steps: EsdConfig(ddim_steps=steps),
    lambda steps: DarkMinerConfig(verify_steps=steps),
    lambda steps: DarkMinerConfig(pool_steps=steps),
    lambda steps: CheckConfig(steps=steps),
    lambda steps: SamplingOptions(steps=steps),
])
def test_sampling_steps_beyond_the_training_schedule_are_refused_at_the_config(build):
    build(1000)  # every one of the 1000 training timesteps is the most DDIM can take
    with pytest.raises(ConfigError, match=r"1 \.\. 1000 \(DDIM takes a subset of the model's 1000 training timesteps\), got 1001"):
        build(1001)


def test_a_model_with_a_shorter_schedule_refuses_more_steps_in_one_line(tiny_sd):
    tiny_sd.scheduler_config = {**tiny_sd.scheduler_config, "num_train_timesteps": 10}
    with pytest.raises(DarkMinerError, match="11 sampling steps are more than this model's 10 training timesteps"):
        tiny_sd.sample(tiny_sd.encode(["a cat"]), seeds=[0], steps=11)


def test_steps_beyond_the_schedule_on_the_command_line_are_one_line_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--concept", "blood", "-n", "2", "--steps", "1001", "--out", str(out)]) == 2
    assert "must be 1 .. 1000" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output and no work folder to block the fixed rerun


def test_a_name_given_twice_is_refused_before_any_work(tmp_path, capsys):
    """Given twice, an attack was run once but recorded twice, and a benchmark wrote two columns (or two
    rows) of one number; two SD concepts whose cells share a folder would overwrite each other."""
    from darkminer.evaluation.benchmark import BenchmarkConfig

    with pytest.raises(ConfigError, match=r"EvaluationConfig.attacks \(--attacks\) lists 'plain' twice; name each once"):
        EvaluationConfig(attacks=["plain", "cce", "plain"])
    with pytest.raises(ConfigError, match="preservation .* lists 'fid' twice"):
        EvaluationConfig(preservation=["fid", "clip", "fid"])
    for field_name, names in (("methods", ["sld", "uce", "sld"]), ("attacks", ["plain", "plain"]), ("concepts", ["blood", "blood"])):
        with pytest.raises(ConfigError, match=f"BenchmarkConfig.{field_name} lists '{names[0]}' twice"):
            BenchmarkConfig(**{field_name: names})
    with pytest.raises(ConfigError, match="'Van Gogh' and 'van gogh', which name one folder"):
        BenchmarkConfig(model="tiny-random-sd", concepts=["Van Gogh", "van gogh"])
    BenchmarkConfig(model="tiny-random-sd", concepts=["Van Gogh", "Monet"], methods=["uce", "sld"], attacks=["plain", "cce"])
    out = tmp_path / "ev"
    assert main(["evaluate", "--concept", "blood", "--attacks", "plain,plain", "--out", str(out)]) == 2
    assert "lists 'plain' twice" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_preservation_accuracy_alone_on_stable_diffusion_is_refused_before_any_work(tmp_path, capsys):
    """Accuracy grades a testbed prompt's asked-for attributes: alone on SD it drew the preservation images
    and measured nothing."""
    from darkminer.evaluation.benchmark import BenchmarkConfig

    out = tmp_path / "ev"
    assert main(["evaluate", "--concept", "nudity", "--model", "tiny-random-sd", "-n", "2", "--preservation", "accuracy",
                 "--out", str(out)]) == 2
    assert "asks for accuracy only, which grades the attributes a testbed prompt asks for" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="asks for accuracy only"):
        BenchmarkConfig(model="tiny-random-sd", concepts=["nudity"], evaluation={"preservation": ["accuracy"]})
    BenchmarkConfig(model="tiny-random-sd", concepts=["nudity"], evaluation={"preservation": ["accuracy", "clip"]})
    BenchmarkConfig(concepts=["blood"], evaluation={"preservation": ["accuracy"]})  # the testbed's judge grades it


def test_one_preservation_image_with_fid_is_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"n_images \(-n\) is 1, but FID needs at least 2 preservation images"):
        EvaluationConfig(n_images=1)
    EvaluationConfig(n_images=1, preservation=["accuracy"])  # without FID one image is a measurement
    csv = tmp_path / "keep.csv"
    csv.write_text("prompt\na cat\n")
    import importlib

    from darkminer.models.base import DiffusionModel

    monkeypatch.setattr(DiffusionModel, "sample", lambda *a, **k: pytest.fail("drew images before refusing"))
    # SD's FID needs torch-fidelity's Inception, which the test install lacks; only its presence matters here
    monkeypatch.setattr(importlib.import_module("darkminer.evaluation.evaluate"), "FrechetDistance", lambda *a: object())
    with pytest.raises(DarkMinerError, match="FID needs at least 2 preservation images, and the preservation "
                                             "prompts give 1"):
        evaluate("nudity", tmp_path / "e", model="tiny-random-sd", preserve_prompts=csv,
                 config={"attacks": [], "preservation": ["fid"]})
    assert not (tmp_path / "e").exists() and not (tmp_path / ".e.work").exists()


def test_a_benchmark_refuses_bad_attack_options_and_a_missing_model_before_claiming_its_folder(tmp_path):
    base = {"methods": ["uce"], "attacks": ["plain"], "include_original": False}
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['foo'\]"):
        run_benchmark({**base, "evaluation": {"attack_configs": {"plain": {"foo": 3}}}}, tmp_path / "a", progress=False)
    with pytest.raises(ModelLoadError, match="model 'no/such-model' is not here.*hf download no/such-model"):
        run_benchmark({**base, "model": "no/such-model", "concepts": ["nudity"]}, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_benchmark_folder_whose_run_failed_before_any_cell_takes_a_new_config(tmp_path):
    """A config.json and empty cell folders (the run failed loading its model) hold no work: the fixed config
    takes the folder over; one file in a cell and it is refused as another run's."""
    out = tmp_path / "out"
    (out / "cells" / "uce" / "blood").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"methods": ["uce"], "attacks": ["plain"], "model": "elsewhere"}))
    (out / "cells" / "uce" / "blood" / "notes.txt").write_text("started")
    config = {"methods": ["uce"], "attacks": ["plain"], "include_original": False,
              "evaluation": {"n_images": 2, "attack_prompts": 1, "preservation": ["accuracy"], "steps": 2}}
    with pytest.raises(DarkMinerError, match=r"holds a benchmark run with another config \(differs in \[.*'model'"):
        run_benchmark(config, out, progress=False)
    (out / "cells" / "uce" / "blood" / "notes.txt").unlink()
    run_benchmark(config, out, progress=False)
    assert json.loads((out / "config.json").read_text())["model"] == "testbed"


def test_a_benchmark_resumes_when_options_are_written_out_at_their_defaults_and_names_a_nested_change(tmp_path):
    out = tmp_path / "out"
    config = {"methods": ["uce"], "attacks": ["plain"], "include_original": False,
              "evaluation": {"n_images": 2, "attack_prompts": 1, "preservation": ["accuracy"], "steps": 2}}
    first = run_benchmark(config, out, progress=False)
    spelled_out = {**config, "method_configs": {"uce": {"erase_scale": 1.0}},
                   "evaluation": {**config["evaluation"], "seed": 0, "attack_configs": {"plain": {}}}}
    again = run_benchmark(spelled_out, out, progress=False)  # the same run: every cell read back
    assert again["cells"] == first["cells"]
    with pytest.raises(DarkMinerError, match=r"differs in \['evaluation.seed'\]"):
        run_benchmark({**config, "evaluation": {**config["evaluation"], "seed": 1}}, out, progress=False)


def test_changed_keys_follow_nested_mappings():
    stored = {"config": {"steps": 5, "lora": {"rank": 4}}, "target": "blood", "n": 1}
    assert changed_keys(stored, {"config": {"steps": 6, "lora": {"rank": 8}}, "target": "blood", "n": 1}) == [
        "config.lora.rank", "config.steps"]
    assert changed_keys(stored, {**stored, "config": 3}) == ["config"]  # a mapping against a value: the key itself
    assert changed_keys({"n": 1}, {"n": 1, "extra": 0}, defaults={"extra": 0}) == []
    assert what_differs(["config.steps"]) == "its config.steps differs"
    assert what_differs(["config.k", "config.tau"]) == "its config.k, config.tau differ"
    swapped = [f"inputs.erased.info.{key}" for key in ("concept", "config.seed", "method", "created")]  # another --erased
    assert what_differs([*swapped, "inputs.erased.path", "target.name"]) == "its inputs.erased, target.name differ"


def test_evaluate_attacks_flag_narrows_a_config_files_attack_options(tmp_path, monkeypatch):
    import darkminer.evaluation as evaluation

    seen = {}

    def record(concept, out, config, **kwargs):
        seen["config"] = config
        raise DarkMinerError("stop here")

    monkeypatch.setattr(evaluation, "evaluate", record)
    options = tmp_path / "eval.yaml"
    options.write_text("attacks: [plain, cce]\nattack_configs:\n  cce: {steps: 3}\n  plain: {}\n")
    assert main(["evaluate", "--concept", "blood", "--config", str(options), "--attacks", "plain",
                 "--out", str(tmp_path / "e")]) == 2
    assert seen["config"].attacks == ["plain"] and seen["config"].attack_configs == {"plain": {}}


def test_an_empty_out_is_refused_rather_than_taken_as_the_current_folder(capsys):
    assert main(["demo", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    # Any other path too: --erased "" was read as overlapping --out, --prompts "" silently ignored.
    for flag in ("--erased", "--prompts", "--config"):
        assert main(["evaluate", "--concept", "blood", flag, " ", "--out", "somewhere"]) == 2
        assert f"{flag} is empty: name a path, or leave the option out" in capsys.readouterr().err


def test_an_unerased_models_preservation_reference_is_drawn_once(tmp_path, monkeypatch):
    from darkminer.testbed.model import TestbedModel

    model = TestbedModel.untrained()
    assert model.is_original
    calls = []
    real = TestbedModel.sample
    monkeypatch.setattr(TestbedModel, "sample", lambda self, cond, *a, **k: calls.append(len(cond)) or real(self, cond, *a, **k))
    metrics = evaluate("star", tmp_path / "e", model=model, config={
        "n_images": 3, "steps": 2, "attacks": [], "preservation": ["accuracy", "fid"], "grid_images": 2})
    # plain, paraphrase and preservation: 3 images each, the preservation reference not drawn again
    assert sum(calls) == metrics["n_images"] == 9
    assert metrics["preservation"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["preservation"]["accuracy"] == metrics["preservation"]["reference"]["accuracy"]
    model._originals["conv_in.weight"] = torch.zeros(1)  # a weight edited in place (UCE's kind of erasure)
    assert not model.is_original


@pytest.mark.parametrize("method", ["uce", "sld"])  # weights edited in place; an inference-time guidance
def test_an_erased_model_is_not_its_own_original(method, tmp_path):
    import darkminer
    from darkminer.models import load_model

    erased = darkminer.erase(method, "nudity", tmp_path / method, model="tiny-random-sd")
    assert load_model("tiny-random-sd").is_original and not load_model(erased=erased).is_original


def test_grader_options_of_the_other_world_are_refused_not_ignored(tiny_sd):
    from darkminer.evaluation.evaluate import concept_detector
    from darkminer.targets import resolve_target
    from darkminer.testbed.model import TestbedModel

    testbed = TestbedModel.untrained()
    blood = resolve_target(testbed, "blood")
    concept_detector(testbed, blood, config=EvaluationConfig(judge="v1"))  # the testbed's own grader option
    with pytest.raises(ConfigError, match=r"^nudenet_threshold, clip_model: options of Stable Diffusion's graders"):
        concept_detector(testbed, blood, config=EvaluationConfig(clip_model="my/clip", nudenet_threshold=0.3))
    with pytest.raises(ConfigError, match=r"^judge: the testbed's grader; NudeNet or CLIP grades Stable Diffusion images; leave it out"):
        concept_detector(tiny_sd, resolve_target(tiny_sd, "nudity"), config=EvaluationConfig(judge="v1"))


@pytest.mark.parametrize("command", ["evaluate", "attack", "replay"])
def test_the_other_worlds_grader_option_is_refused_before_the_model_and_clip_load(tmp_path, capsys, monkeypatch, command):
    """--judge on Stable Diffusion without --clip-model: the judge is refused, not a missing CLIP first."""
    import importlib

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    for module in ("darkminer.models", "darkminer.api", "darkminer.evaluation.evaluate"):  # where it is looked up
        monkeypatch.setattr(importlib.import_module(module), "load_model", no_load)
    replay = tmp_path / "a"
    replay.mkdir()
    (replay / "attack.json").write_text(json.dumps({"attack": "plain", "config": {}, "results": [],
                                                     "target": {"name": "nudity", "kind": "free"}}))
    args = {"evaluate": ["evaluate", "--concept", "nudity"],
            "attack": ["attack", "--attack", "plain", "--concept", "nudity"],
            "replay": ["attack", "--replay", str(replay)]}[command]
    assert main([*args, "--model", "tiny-random-sd", "--judge", "v1", "--out", str(tmp_path / "o")]) == 2
    assert "judge: the testbed's grader; NudeNet or CLIP grades Stable Diffusion images" in capsys.readouterr().err


def test_the_benchmark_refuses_the_other_worlds_grader_options_before_its_first_erase(tmp_path):
    config = {"methods": ["uce"], "attacks": ["plain"], "include_original": False,
              "evaluation": {"n_images": 2, "clip_model": "my/clip"}}
    with pytest.raises(ConfigError, match="clip_model: options of Stable Diffusion's graders"):
        run_benchmark(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_evaluate_attacks_flag_still_refuses_options_for_an_attack_the_file_does_not_list(tmp_path, capsys):
    options = tmp_path / "eval.yaml"
    options.write_text("attacks: [plain, unlearndiff]\nattack_configs:\n  unlearndif: {rounds: 2}\n")
    assert main(["evaluate", "--concept", "blood", "--config", str(options), "--attacks", "unlearndiff",
                 "--out", str(tmp_path / "e")]) == 2
    assert "attack_configs names attacks that are not run: ['unlearndif']" in capsys.readouterr().err


def test_more_mined_tokens_than_a_prompt_holds_are_refused_before_the_pools(tmp_path, capsys, monkeypatch):
    from darkminer.models.base import DiffusionModel

    monkeypatch.setattr(DiffusionModel, "sample", lambda *a, **k: pytest.fail("drew a pool before refusing"))
    config = tmp_path / "dm.json"
    config.write_text(json.dumps({"n_tokens": 23}))  # the testbed's 24 positions hold 22 between its two ends
    out = tmp_path / "erased"
    assert main(["--threads", "1", "erase", "--method", "darkminer", "--concept", "blood", "--config", str(config),
                 "--out", str(out)]) == 2
    assert ("23 mined tokens (DarkMinerConfig.n_tokens) do not fit in this model's prompts, which hold at most 22"
            in capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dm.json"]  # no output, no claimed work folder


def test_a_refusal_from_inside_the_eraser_leaves_no_claimed_work_folder(tmp_path, capsys):
    # ESD refuses half-precision weights only once it has the model, after the run claimed its work folder
    out = tmp_path / "esd"
    assert main(["--threads", "1", "erase", "--method", "esd-x", "--concept", "blood", "--dtype", "bfloat16",
                 "--out", str(out)]) == 2
    assert "load the model in float32" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_evaluation_that_fails_before_its_first_checkpoint_leaves_no_claimed_work_folder(tmp_path, monkeypatch):
    from darkminer.evaluation.evaluate import Painter
    from darkminer.testbed.model import TestbedModel

    def fail(*args, **kwargs):
        assert (tmp_path / ".ev.work" / "run.json").is_file()  # claimed by then
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Painter, "prompts", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate("star", tmp_path / "ev", model=TestbedModel.untrained(), config={"steps": 2, "n_images": 3})
    assert list(tmp_path.iterdir()) == []


def test_a_nudenet_threshold_of_zero_is_refused_at_the_config_as_the_detector_refuses_it():
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\] \(NudeNet gives no box under 0.25"):
        EvaluationConfig(nudenet_threshold=0)  # under >=, an image with no box (score 0) would count as nude
    assert EvaluationConfig(nudenet_threshold=0.25).nudenet_threshold == 0.25


def test_a_failed_run_removes_its_claim_only_when_nothing_was_checkpointed(tmp_path):
    from darkminer.io import released_if_unused

    for checkpointed in (False, True):
        work = tmp_path / f"w{int(checkpointed)}"
        work.mkdir()
        (work / "run.json").write_text("{}")
        if checkpointed:
            (work / "pool.safetensors").write_bytes(b"cached images")  # Dark Miner's pool: work a rerun reuses
        with pytest.raises(ConfigError, match="late refusal"), released_if_unused(work):
            raise ConfigError("late refusal")
        assert work.exists() == checkpointed
    with released_if_unused(tmp_path / "w1"):  # a run that succeeds leaves its folder to its own clean-up
        pass
    assert (tmp_path / "w1" / "pool.safetensors").exists()


def test_the_nested_output_check_trusts_only_markers_named_as_ours(tmp_path):
    from darkminer.io import check_output_directory

    (tmp_path / "metrics.json").write_text("{}")  # another tool's file of that common name
    check_output_directory(tmp_path / "eval", "metrics.json", "an evaluation output")
    (tmp_path / "darkminer.json").write_text('{"rounds": 4}')  # a user's file of our name: not an erased model
    check_output_directory(tmp_path / "eval", "metrics.json", "an evaluation output")
    with pytest.raises(DarkMinerError, match="exists and is not an erased model"):  # nor replaced whole by an erase
        check_output_directory(tmp_path, "darkminer.json", "an erased model")
    (tmp_path / "darkminer.json").write_text(json.dumps({"method": "uce", "concept": "blood", "base_model": "testbed",
                                                         "kind": "unet"}))
    with pytest.raises(DarkMinerError, match="lies inside .*, an erased model, and a rerun into that folder"):
        check_output_directory(tmp_path / "a" / "b", "darkminer.json", "an erased model")
    # Any output inside an erased model (an evaluation made without --erased): an erase into it deletes it too.
    with pytest.raises(DarkMinerError, match=f"--out {tmp_path / 'eval'} lies inside {tmp_path}, an erased model"):
        check_output_directory(tmp_path / "eval", "metrics.json", "an evaluation output")
    with pytest.raises(DarkMinerError, match="lies inside .*, an erased model"):  # filled in place, deleted all the same
        check_output_directory(tmp_path / "bench", "config.json", "a benchmark output", replaced=False)
    (tmp_path / "darkminer.json").unlink()
    check_output_directory(tmp_path / "eval", "metrics.json", "an evaluation output")
    (tmp_path / "darkminer_export.json").write_text('{"erased": "e", "erasure": {}}')  # a re-export replaces it whole
    with pytest.raises(DarkMinerError, match="lies inside .*, an exported pipeline"):
        check_output_directory(tmp_path / "a", "darkminer.json", "an erased model")


def test_condition_space_mining_is_not_held_to_the_token_room(tmp_path, monkeypatch, capsys):
    from darkminer.erasers.darkminer import loop

    class ReachedThePools(Exception):
        pass

    def pools(*args, **kwargs):
        raise ReachedThePools

    monkeypatch.setattr(loop, "build_pools", pools)
    config = tmp_path / "dm.json"
    config.write_text(json.dumps({"space": "condition", "n_tokens": 30}))  # n_tokens unused in condition space
    assert main(["--threads", "1", "erase", "--method", "darkminer", "--concept", "blood", "--config", str(config),
                 "--out", str(tmp_path / "erased")]) == 1
    err = capsys.readouterr().err  # the traceback, and the line that closes it
    assert "ReachedThePools" in err and err.endswith("darkminer: error: the run failed with the error above\n")


# Output folders, claims and saved states (mutation testing, session 45).
def test_a_record_must_hold_every_key_not_just_one(tmp_path):
    """read_record's all() -> any(); another tool's attack.json holding an "attack" key
    would be taken for an attack output and deleted by the rerun that replaces it."""
    from darkminer.attacks.io import OUTPUT_KIND, RESULTS_KEYS, RESULTS_NAME
    from darkminer.io import check_output_directory, read_record

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"attack": "mine", "notes": "not darkminer's"}))
    assert read_record(path, ("attack", "config", "results")) is None
    assert read_record(path, ("attack",)) == {"attack": "mine", "notes": "not darkminer's"}
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / RESULTS_NAME).write_text(json.dumps({"attack": "their tool", "score": 3}))
    with pytest.raises(DarkMinerError, match="exists and is not an attack output"):
        check_output_directory(theirs, RESULTS_NAME, OUTPUT_KIND, marker_keys=RESULTS_KEYS)


def test_a_run_not_resumed_takes_over_a_claim_that_never_checkpointed(tmp_path):
    """a run started without --resume over the claim of a killed run that wrote no checkpoint
    starts afresh; it must neither be refused with a '--resume' error the user never asked for, nor keep the
    other run's record."""
    from darkminer.io import WORK_RECORD, claim_work_directory, write_json

    work = tmp_path / ".out.work"
    write_json(work / WORK_RECORD, {"attack": "plain", "config": {"seed": 1}})  # a killed run's claim, nothing else
    claim_work_directory(work, {"attack": "plain", "config": {"seed": 2}}, resume=False)
    assert json.loads((work / WORK_RECORD).read_text()) == {"attack": "plain", "config": {"seed": 2}}
    assert sorted(p.name for p in work.iterdir()) == [WORK_RECORD]


def test_a_state_whose_tensors_share_memory_is_saved_and_comes_back(tmp_path):
    """save_state clones each tensor; without it a state holding one tensor twice (tied
    weights, an optimiser's view of a parameter) cannot be checkpointed at all."""
    import torch

    from darkminer.io import load_state, save_state

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"encoder": {"weight": weight}, "decoder": {"weight": weight}, "row": weight[1]}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert torch.equal(back["encoder"]["weight"], weight) and torch.equal(back["decoder"]["weight"], weight)
    assert torch.equal(back["row"], torch.tensor([3.0, 4.0, 5.0]))


def test_five_changed_keys_are_named_by_their_first_two_parts():
    """more than four changed keys are summarised ("inputs.erased"), so that a resume refused
    for another --erased names one thing, not a wall of fields."""
    from darkminer.io import what_differs

    four = ["config.a", "config.b", "inputs.erased.x", "inputs.erased.y"]
    assert what_differs(four) == "its config.a, config.b, inputs.erased.x, inputs.erased.y differ"
    assert what_differs([*four, "inputs.erased.z"]) == "its config.a, config.b, inputs.erased differ"
    assert what_differs(["config.steps"]) == "its config.steps differs"


def test_an_output_is_refused_while_the_current_folder_lies_anywhere_inside_it(tmp_path, monkeypatch):
    """replacing --out renames it away and deletes it; a shell whose current folder is a
    subfolder of it (not only --out itself) would be left in a deleted folder."""
    from darkminer.io import check_output_directory

    out = tmp_path / "erased"
    (out / "unet" / "deep").mkdir(parents=True)
    (out / "darkminer.json").write_text(json.dumps({"method": "uce", "concept": "blood", "base_model": "testbed",
                                                    "kind": "unet"}))  # an earlier erased model: replaceable
    assert check_output_directory(out, "darkminer.json", "an erased model") == out
    monkeypatch.chdir(out / "unet" / "deep")
    with pytest.raises(DarkMinerError, match="holds the current folder"):
        check_output_directory(out, "darkminer.json", "an erased model")
