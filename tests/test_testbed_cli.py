"""`darkminer testbed concepts` and `darkminer testbed check` (small)."""

from __future__ import annotations

import json

import pytest
import torch

from darkminer.cli import main
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.evaluation.detectors import JudgeDetector
from darkminer.io import load_tensors
from darkminer.testbed.check import CheckConfig, neutral_prompts, run_check
from darkminer.testbed.concepts import CONCEPTS


def test_concepts_lists_inappropriate_first(capsys):
    assert main(["testbed", "concepts"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    kinds = [line.split()[1] for line in lines]
    assert kinds == ["inappropriate", "inappropriate", "object", "object", "style", "style"]
    assert {line.split()[0] for line in lines} == set(CONCEPTS)


def test_neutral_prompts_never_ask_for_a_target_concept():
    targets = {(c.head, c.value) for c in CONCEPTS.values()}
    for prompt in neutral_prompts(50, seed=3):
        assert not any((head, value) in targets for head, value in prompt.expected.items())
        assert set(prompt.expected) == {"shape", "colour", "style"}


def test_check_reports_every_gate(tmp_path):
    # Run small from the command line: a config file sets what has no flag, and a flag overrides the file.
    (tmp_path / "small.yaml").write_text("n_images: 3\nconcepts: [blood]\nresidual: false\njudge_images: 512\n"
                                         "timing_images: 4\nsteps: 2\n")
    assert main(["testbed", "check", "--config", str(tmp_path / "small.yaml"), "-n", "4",
                 "--out", str(tmp_path / "check.json")]) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert set(report["judge_accuracy"]) == {"shape", "colour", "style", "overlay", "background"}
    assert min(report["judge_accuracy"].values()) >= 0.98
    assert set(report["concept_rate"]) == {"blood"}
    assert 0.0 <= report["concept_rate"]["blood"]["direct"] <= 1.0
    assert 0.0 <= report["negative_rate"] <= 1.0 and 0.0 <= report["attribute_accuracy"] <= 1.0
    assert set(report["anchor_rate"]) == {"blood"} and 0.0 <= report["anchor_rate"]["blood"] <= 1.0
    by_concept = report["negative_by_concept"]
    assert set(by_concept) == set(CONCEPTS)  # every concept, not only those whose rates were asked for
    # An image counts once however many concepts it shows: the rate lies between the largest share and the sum.
    assert max(by_concept.values()) <= report["negative_rate"] <= sum(by_concept.values()) + 1e-9
    assert report["seconds_4_images"] > 0 and report["n_images_per_cell"] == 4
    assert report["judge"] == JudgeDetector("blood").describe()["weights"]  # the grader is pinned in the report


def test_check_residual_runs_esd_x_then_cce_on_direct_and_word_prompts():
    config = CheckConfig(n_images=2, concepts=["fire"], judge_images=64, timing_images=2, steps=2,
                         esd_iterations=1, cce_steps=1)
    report = run_check(config)
    assert report["residual_setting"] == {"esd_iterations": 1, "esd_lr": 1e-3, "cce_steps": 1}
    residual = report["residual"]["fire"]
    assert set(residual) == {"esd_direct", "cce_attack", "esd_word", "cce_attack_word"}
    # Two prompts per set: each rate is a share of two verdicts.
    assert all(value in (0.0, 0.5, 1.0) for value in residual.values()), residual


def test_check_rejects_an_unknown_concept(tmp_path, capsys):
    assert main(["testbed", "check", "--out", str(tmp_path / "c.json"), "--concepts", "unicorn"]) == 2
    assert "unknown testbed concept" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
    assert main(["testbed", "check", "--out", str(tmp_path / "c.json"), "--judge", "v9"]) == 2
    assert "neither a shipped judge (v1, v2)" in capsys.readouterr().err
    assert main(["testbed", "check", "--out", str(tmp_path / "c.json"), "--cce-steps", "0"]) == 2
    assert "cce_steps" in capsys.readouterr().err


def test_anchor_prompts_ask_for_the_anchor_in_the_direct_prompts_scenes():
    """The anchor rate's prompts: drawn as the direct prompts are, the anchor's value in the concept's place."""
    for name in ("heart", "sketch"):
        concept = CONCEPTS[name]
        direct = concept.direct_prompts(50, seed=1)
        anchor = concept.anchor_prompts(50, seed=1)
        assert all(p.expected[concept.head] == concept.anchor and p.expected["overlay"] == "none" for p in anchor)
        assert set(anchor[0].expected) == set(direct[0].expected)
        # The same stream of scenes until the first phrase draw that differs.
        assert anchor[0].seed == direct[0].seed and anchor[0].text != direct[0].text


def _train(tmp_path, name: str, steps: int, condition=None) -> dict:
    from darkminer.testbed.train_unet import UNetTrainConfig, train_unet

    config = UNetTrainConfig(seed=5, steps=steps, batch_size=2, caption_bank=8, checkpoint_every=2, warmup_steps=1)
    train_unet(config, tmp_path / f"{name}-work", tmp_path / name, condition=condition)
    return load_tensors(tmp_path / name / "diffusion_pytorch_model.safetensors")


def test_unet_training_is_seeded_and_resumes_from_its_checkpoint(tmp_path):
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def spy(cond, empty, rng):
        seen.append((tuple(cond.shape), tuple(empty.shape)))
        return cond

    first, again = _train(tmp_path, "a", 2, spy), _train(tmp_path, "b", 2)
    assert seen == [((2, 24, 384), (24, 384))] * 2  # the hook sees every batch's states after caption dropout
    assert all(torch.equal(first[k], again[k]) for k in first)  # one seed, one result

    steps_run: list[int] = []

    def crash_at_third_step(cond, empty, rng):
        steps_run.append(1)
        if len(steps_run) == 3:
            raise KeyboardInterrupt
        return cond

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "c", 4, crash_at_third_step)
    assert torch.equal(first["conv_in.weight"], _read_checkpoint_ema(tmp_path / "c-work")["conv_in.weight"])
    steps_run.clear()
    resumed = _train(tmp_path, "c", 4, crash_at_third_step)  # picks up at step 2: two steps left, no crash
    assert len(steps_run) == 2 and not torch.equal(resumed["conv_in.weight"], first["conv_in.weight"])
    uninterrupted = _train(tmp_path, "d", 4)  # the same batches, noise and weights as if never stopped
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_work_dir_resumes_only_the_recipe_that_made_it(tmp_path):
    from darkminer.testbed.train_unet import UNetTrainConfig, train_unet

    _train(tmp_path, "s1", 2)
    stage2 = UNetTrainConfig(seed=5, steps=2, batch_size=2, caption_bank=8, checkpoint_every=2, warmup_steps=1,
                             learning_rate=5e-4, init_from=str(tmp_path / "s1"))
    with pytest.raises(ConfigError, match="holds a run of another recipe .*init_from, learning_rate.* own --work-dir"):
        train_unet(stage2, tmp_path / "s1-work", tmp_path / "s2")
    assert not (tmp_path / "s2").exists()
    old = tmp_path / "old-work"
    old.mkdir()
    (old / "checkpoint.pt").write_bytes(b"a pickle")
    with pytest.raises(ConfigError, match="pickled checkpoint from an older darkminer, which is not loaded"):
        train_unet(stage2, old, tmp_path / "s2")
    # The thread count is how fast, not what: a resume may change it (the run is finished, so nothing trains).
    threads = torch.get_num_threads()
    try:
        train_unet(UNetTrainConfig(seed=5, steps=2, batch_size=2, caption_bank=8, checkpoint_every=2, warmup_steps=1,
                                   threads=2), tmp_path / "s1-work", tmp_path / "s1")
    finally:
        torch.set_num_threads(threads)


def test_bad_training_folders_are_one_line_and_leave_nothing_behind(tmp_path, capsys):
    from darkminer.testbed.train_unet import UNetTrainConfig, train_unet

    config = dict(seed=5, steps=1, batch_size=2, caption_bank=8, warmup_steps=0)
    a_file = tmp_path / "p.csv"
    a_file.write_text("prompt\n")
    for work, message in ((a_file, "--work-dir .*p.csv exists and is not a testbed training work folder"),
                          (a_file / "sub", "--work-dir .*sub: .*p.csv is a file, not a folder")):
        with pytest.raises(DarkMinerError, match=message):
            train_unet(UNetTrainConfig(**config), work, tmp_path / "unet")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(DarkMinerError, match="--init-from .*no-weights is not a loadable diffusers UNet folder"):
        train_unet(UNetTrainConfig(**config, init_from=str(no_weights)), tmp_path / "work", tmp_path / "unet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-weights", "p.csv"]  # no work folder claimed
    # The whole command checks its outputs before the judge trains (minutes), not after.
    for out in (a_file, tmp_path / "mine"):
        (tmp_path / "mine" / "unet").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mine" / "unet" / "notes.txt").write_text("a user's own folder")
        assert main(["testbed", "train", "--out", str(out), "--work-dir", str(tmp_path / "w")]) == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and list((tmp_path / "mine").iterdir()) == [tmp_path / "mine" / "unet"]
    assert main(["testbed", "check", "--out", str(tmp_path / "c.json"), "--concepts", ""]) == 2
    assert "concepts (--concepts) is empty" in capsys.readouterr().err
    assert main(["testbed", "check", "--out", str(tmp_path / "c.json"), "--concepts", "blood,blood"]) == 2
    assert "names blood more than once" in capsys.readouterr().err


def _read_checkpoint_ema(work_dir):
    from darkminer.io import load_state
    from darkminer.testbed.train_unet import CHECKPOINT

    state = load_state(work_dir / CHECKPOINT)  # safetensors and JSON: nothing is unpickled
    assert state["step"] == 2
    return {k.removeprefix("module."): v for k, v in state["ema"].items()}
