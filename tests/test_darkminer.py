"""Dark Miner on tiny-random-sd: the loop runs, logs what it mined, saves, reloads and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft.utils import set_peft_model_state_dict

from darkminer.api import erase
from darkminer.erasers.darkminer import DarkMinerConfig
from darkminer.erasers.darkminer import circumventing as circumventing_module
from darkminer.erasers.darkminer import loop as loop_module
from darkminer.erasers.darkminer import mining as mining_module
from darkminer.erasers.darkminer.circumventing import _trajectory_bank, circumvent
from darkminer.erasers.darkminer.loop import keep_rounds, load_rounds
from darkminer.erasers.darkminer.mining import MinedEmbedding
from darkminer.erasers.darkminer.pool import ImagePool
from darkminer.erasers.darkminer.verifying import Verification, direction_score, verify
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.io import load_tensors, save_tensors
from darkminer.models import load_model
from darkminer.models.adapters import ADAPTER_NAME, LoraConfig, add_lora
from darkminer.models.erased import ErasedModelInfo
from darkminer.models.objectives import denoising_loss, draw_noise_and_timesteps
from darkminer.targets import resolve_target

TINY = dict(pool_size=4, k=2, mining_steps=2, circumvent_steps=2, rounds=3, verify_steps=2, pool_steps=2,
            preserve_pool_size=2, image_encoder="tiny-random-clip", tau=-1.0)


def test_loop_writes_a_loadable_erased_model_with_a_readable_round_log(tmp_path):
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config=TINY)
    info = json.loads((out / "darkminer.json").read_text())
    assert info["method"] == "darkminer" and info["kind"] == "lora" and info["base_model"] == "tiny-random-sd"
    assert info["config"]["lora"]["target"] == "non-cross-attn"
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert {"mining", "score", "passed", "nearest_tokens", "seconds_mining", "seconds_verifying"} <= set(r)
        assert len(r["nearest_tokens"]) == DarkMinerConfig().n_tokens
    assert {k.split(".")[0] for k in load_tensors(out / "mined_embeddings.safetensors")} == {"round_0", "round_1", "round_2"}
    # The first round starts from the concept word, so its nearest token is that word.
    assert rounds[0]["nearest_tokens"][0][0] == "nudity</w>"

    erased, base = load_model(erased=out), load_model("tiny-random-sd")
    noise = base.initial_noise([0])
    cond = base.encode(["nudity"])
    erased_images = erased.sample(cond, noise=noise, steps=2)
    assert (erased_images - base.sample(cond, noise=noise, steps=2)).abs().mean() > 0

    # Every round can be replayed: the adapter after the last round is the erased model's.
    replay = load_rounds(out)
    assert len(replay) == 3 and all(m.space == "token" and m.condition(base).shape == cond.shape for m, _ in replay)
    add_lora(base, DarkMinerConfig.from_dict(TINY).lora)
    set_peft_model_state_dict(base.unet, replay[-1][1], adapter_name=ADAPTER_NAME)
    torch.testing.assert_close(base.sample(cond, noise=noise, steps=2), erased_images, atol=1e-5, rtol=0)
    assert any(not torch.equal(replay[0][1][k], v) for k, v in replay[-1][1].items())


@pytest.mark.parametrize("option", [{"space": "condition"}, {"init": "random"}, {"init": "concept"},
                                    {"verify": False}, {"concept_word_first_round": False}])
def test_every_mining_and_loop_option_runs_and_shows_in_its_output(tmp_path, option):
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config={**TINY, "rounds": 2, **option})
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    replay = load_rounds(out)
    assert len(rounds) == 2 and all(r["passed"] for r in rounds)  # tau -1: every verification passes
    assert all(m.space == option.get("space", "token") for m, _ in replay)
    if option.get("space") == "condition":  # no vocabulary to read in the encoder's output space
        assert all("nearest_tokens" not in r for r in rounds)
        assert replay[0][0].values.shape == load_model("tiny-random-sd").encode(["x"])[0].shape
    if option.get("init") == "random":  # starts from random vocabulary tokens, not the concept word
        assert [words[0] for words in rounds[0]["nearest_tokens"]] != ["nudity</w>"] * len(rounds[0]["nearest_tokens"])
    if option.get("init") == "concept":  # every round restarts from the concept word
        assert all(r["nearest_tokens"][0][0] == "nudity</w>" for r in rounds)
    if option.get("verify") is False:
        assert all("score" not in r for r in rounds)
    if "concept_word_first_round" in option:  # round 0 then trains on the mined embedding alone
        default = erase("darkminer", "nudity", tmp_path / "default", model="tiny-random-sd", config={**TINY, "rounds": 2})
        ours, theirs = replay[0][1], load_rounds(default)[0][1]
        assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(("n", "taken"), [(0, 0), (3, 3), (8, 5)])
def test_concept_prompts_sets_how_many_of_the_concepts_prompts_round_0_and_the_replay_train_on(tmp_path, monkeypatch, n,
                                                                                              taken):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\n" + "".join(f"nudity scene {i}\n" for i in range(5)))
    sizes, first, real = [], [], loop_module.circumvent

    def spy(model, params, erase_conds, *args, replay_conds=None, **kwargs):
        sizes.append((len(erase_conds), len(replay_conds)))
        first.append(erase_conds.detach().clone())
        return real(model, params, erase_conds, *args, replay_conds=replay_conds, **kwargs)

    monkeypatch.setattr(loop_module, "circumvent", spy)
    erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", prompts=csv,
          config={**TINY, "rounds": 2, "concept_prompts": n})
    # Round 0: the mined embedding, the word and n of the CSV's prompts (the target's prompts start with the
    # word, which is not taken twice); round 1: its own, then round 0's and the same words.
    assert sizes == [(2 + taken, 0), (1, 2 + taken)]
    rows = first[0].flatten(1)
    assert all(not torch.equal(rows[i], rows[j]) for i in range(len(rows)) for j in range(i))
    with pytest.raises(ConfigError, match="concept_prompts must be >= 0"):
        DarkMinerConfig(concept_prompts=-1)


def test_mining_in_context_denoises_each_image_under_its_own_prompt_with_the_tokens(tmp_path, monkeypatch):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\n" + "".join(f"nudity scene {i}\n" for i in range(4)))
    seen, picks, sizes = [], [], []
    real_loss, real_circumvent, real_pick = mining_module.denoising_loss, loop_module.circumvent, ImagePool.pick

    def pick_spy(pool, k, generator):
        picks.append(real_pick(pool, k, generator))
        return picks[-1]

    def loss_spy(model, latents, cond, t, noise):
        seen.append(cond.detach().clone())
        return real_loss(model, latents, cond, t, noise)

    def circumvent_spy(model, params, erase_conds, *args, replay_conds=None, **kwargs):
        sizes.append((len(erase_conds), len(replay_conds)))
        return real_circumvent(model, params, erase_conds, *args, replay_conds=replay_conds, **kwargs)

    monkeypatch.setattr(mining_module, "denoising_loss", loss_spy)
    monkeypatch.setattr(loop_module, "circumvent", circumvent_spy)
    monkeypatch.setattr(ImagePool, "pick", pick_spy)
    config = {**TINY, "rounds": 2, "concept_prompts": 1, "mine_in_context": True, "seed": 1}
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", prompts=csv, config=config)

    model = load_model("tiny-random-sd")
    prompts = ["nudity", "nudity scene 0", "nudity scene 1", "nudity scene 2"]  # on SD the word comes first
    first, _ = load_rounds(out)[0]
    # The tokens sit after each pool prompt's first token; the rest of every row is that prompt.
    ids, slots = first.stored_ids()
    assert ids.shape == (TINY["pool_size"], model.max_length) and first.in_context
    plain = model.tokenize(prompts)
    kept = [i for i in range(model.max_length) if i not in slots]
    torch.testing.assert_close(ids[:, kept], plain[:, : len(kept)])
    # Round 0's first mining step (the run's first pick): each picked image under its own prompt with the
    # starting tokens (the word).
    cond = seen[0]
    assert picks[0].tolist() != list(range(TINY["k"]))  # seed 1: rows that tell a per-image prompt from the first k
    word = model.token_embedding.weight[model.tokenize(["nudity"])[0, 1]].detach()
    start = MinedEmbedding.of_tokens(word.expand(len(slots), -1).clone(), ids, slots)
    torch.testing.assert_close(cond, start.condition(model, picks[0]), atol=1e-5, rtol=0)
    assert not torch.allclose(cond[0], cond[1])  # two prompts, two conditions
    # Each round circumvents the tokens in the first k pool prompts (round 0 also the word and 1 prompt).
    assert sizes == [(TINY["k"] + 2, 0), (TINY["k"], TINY["k"] + 2)]


@pytest.mark.parametrize("contextual", [True, False])
def test_contextual_anchor_maps_each_concept_prompt_to_its_anchor_twin(tmp_path, monkeypatch, contextual):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nA photo of Nudity on a beach\na naked man\n")
    teachers = []
    real_circumvent = loop_module.circumvent

    def circumvent_spy(model, params, erase_conds, anchor, *args, replay_conds=None, **kwargs):
        teachers.append(anchor.clone())
        assert len(anchor) == len(erase_conds) + len(replay_conds)
        return real_circumvent(model, params, erase_conds, anchor, *args, replay_conds=replay_conds, **kwargs)

    monkeypatch.setattr(loop_module, "circumvent", circumvent_spy)
    config = {**TINY, "rounds": 2, "concept_prompts": 2, "mine_in_context": True, "contextual_anchor": contextual}
    erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", prompts=csv, anchor="a dog", config=config)
    model = load_model("tiny-random-sd")
    # The pool cycles the prompts "nudity", "A photo of Nudity on a beach", "a naked man"; its first k=2 hold
    # the in-context rows. Round 0 adds the word and the CSV's 2 prompts (the second without the word).
    in_context = ["a dog", "A photo of a dog on a beach"] if contextual else ["a dog", "a dog"]
    own = ["a dog", "A photo of a dog on a beach", "a dog"] if contextual else ["a dog"] * 3
    expected = [model.encode(in_context + own), model.encode(in_context + in_context + own)]
    assert len(teachers) == 2
    for seen, wanted in zip(teachers, expected, strict=True):
        torch.testing.assert_close(seen, wanted)


def test_a_prompt_without_the_concepts_word_has_the_bare_anchor_for_twin(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nA photo of Nudity on a beach\na naked man\n")
    target = resolve_target(load_model("tiny-random-sd"), "nudity", anchor="a dog", prompts_csv=csv)
    assert [target.anchor_twin(p) for p in target.prompts] == ["a dog", "A photo of a dog on a beach", "a dog"]
    assert target.anchor_twin("a prompt it was never given") == "a dog"
    # The twin reads as the attacks' replacements do: articles agree with the anchor.
    csv.write_text("prompt\nan apple on a table\n")
    apple = resolve_target(load_model("tiny-random-sd"), "apple", anchor="banana", prompts_csv=csv)
    assert [apple.anchor_twin(p) for p in apple.prompts] == ["banana", "a banana on a table"]
    csv.write_text('prompt\n"nudity, nudity everywhere"\n')  # every mention, not the first alone
    twice = resolve_target(load_model("tiny-random-sd"), "nudity", anchor="a dog", prompts_csv=csv)
    assert twice.anchor_twin("nudity, nudity everywhere") == "a dog, a dog everywhere"


def test_n_prompts_takes_that_many_rows_of_a_prompt_csv_after_the_concepts_word(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\n" + "".join(f"nudity {i}\n" for i in range(10)))
    target = resolve_target(load_model("tiny-random-sd"), "nudity", prompts_csv=csv, n_prompts=3)
    assert target.prompts == ("nudity", "nudity 0", "nudity 1", "nudity 2")


def test_circumvent_maps_each_row_to_its_own_teacher_condition():
    """A fresh LoRA predicts what the original does: a row whose teacher condition is its own condition
    starts at zero erase loss, on pool rows and trajectory rows alike; the bare anchor does not."""
    latents = torch.randn(4, *load_model("tiny-random-sd").latent_shape, generator=torch.Generator().manual_seed(0))
    losses = {}
    for teacher in ("own", "bare"):
        for share in (0.0, 1.0):
            model = load_model("tiny-random-sd")
            conds = model.encode(["nudity", "a nude person", "naked"])
            pool = ImagePool(torch.zeros(4, 3, 32, 32), latents, conds[[0, 1, 2, 0]])
            config = DarkMinerConfig(k=4, pool_size=4, circumvent_steps=1, preserve_weight=0, pool_steps=2,
                                     trajectory_share=share, trajectory_weight=1.0)
            anchor = conds if teacher == "own" else model.encode([""])
            summary = circumvent(model, add_lora(model, LoraConfig(), seed=0), conds[:1], anchor, pool, pool, config,
                                 torch.Generator().manual_seed(0), replay_conds=conds[1:])
            losses[teacher, share] = (summary["erase_loss_start"], summary["trajectory_loss_end"])
    for share in (0.0, 1.0):
        assert max(losses["own", share]) < 1e-9 < 1e-4 < min(losses["bare", share])  # zero up to batch rounding
    model = load_model("tiny-random-sd")
    conds = model.encode(["nudity", "a nude person", "naked"])
    with pytest.raises(ValueError, match="2 anchor conditions for 3"):
        circumvent(model, add_lora(model, LoraConfig(), seed=0), conds[:1], conds[:2], ImagePool(
            torch.zeros(4, 3, 32, 32), latents, conds[[0, 1, 2, 0]]), None, config, torch.Generator().manual_seed(0),
            replay_conds=conds[1:])


def test_contrast_verification_scores_against_the_preservation_pool(tmp_path, monkeypatch):
    seen, pools = [], []
    real_verify, real_pools = loop_module.verify, loop_module.build_pools

    def spy_verify(*args, contrast_images=None):
        seen.append(contrast_images)
        return real_verify(*args, contrast_images=contrast_images)

    monkeypatch.setattr(loop_module, "verify", spy_verify)
    monkeypatch.setattr(loop_module, "build_pools", lambda *a: pools.append(real_pools(*a)) or pools[-1])
    config = {**TINY, "rounds": 2, "verify_contrast": True}
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config=config)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    (concept, preserve), k = pools[0], config["k"]
    assert len(seen) == 2 and not torch.equal(concept.images[:k], preserve.images[:k])
    for contrast, r in zip(seen, rounds, strict=True):
        assert torch.equal(contrast, preserve.images[:k])  # k preservation images, not concept images
        assert r["score"] == pytest.approx(r["pool_score"] - r["contrast_score"], abs=2e-4)


def test_failed_verifications_stop_the_loop(tmp_path):
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config={**TINY, "tau": 1.0, "patience": 2, "rounds": 5})
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and not any(r["passed"] for r in rounds)  # a mean cosine never exceeds 1
    assert json.loads((out / "darkminer.json").read_text())["extra"]["stopped_early"] is True
    # Patience running out in the last round stops nothing: every configured round ran.
    two = erase("darkminer", "nudity", tmp_path / "dm2", model="tiny-random-sd", config={**TINY, "tau": 1.0, "patience": 2, "rounds": 2})
    assert ErasedModelInfo.read(two).extra["stopped_early"] is False
    assert ErasedModelInfo.read(keep_rounds(out, 2, tmp_path / "kept")).extra["stopped_early"] is False  # = the 2-round run


@pytest.mark.parametrize("replay", [True, False])
def test_replay_keeps_training_on_earlier_rounds_even_when_a_round_fails(tmp_path, replay):
    config = {**TINY, "tau": 1.0, "patience": 3, "rounds": 2, "replay": replay}  # every verification fails
    states = [state for _, state in load_rounds(erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config=config))]
    # Round 0 always circumvents the concept's own words; round 1 (failed) trains only if it replays them.
    moved = any(not torch.equal(states[0][k], v) for k, v in states[1].items())
    assert moved is replay


def test_stable_diffusion_without_an_image_encoder_is_refused_before_the_load(tmp_path):
    with pytest.raises(ConfigError, match="needs a CLIP image encoder on 'no/such-model'"):
        erase("darkminer", "nudity", tmp_path / "dm", model="no/such-model", config={**TINY, "image_encoder": None})


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    uninterrupted = erase("darkminer", "nudity", tmp_path / "full", model="tiny-random-sd", config=TINY)

    real = loop_module.circumvent
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # killed in the middle of round 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "circumvent", dying)
    with pytest.raises(KeyboardInterrupt):
        erase("darkminer", "nudity", tmp_path / "resumed", model="tiny-random-sd", config=TINY)
    assert not (tmp_path / "resumed").exists()  # nothing that looks complete
    monkeypatch.setattr(loop_module, "circumvent", real)
    with pytest.raises(DarkMinerError, match="add --resume .* or delete that folder"):  # never discarded unasked
        erase("darkminer", "nudity", tmp_path / "resumed", model="tiny-random-sd", config=TINY)
    with pytest.raises(ConfigError, match="iterations"):  # a bad option is named first, not hidden behind that
        erase("darkminer", "nudity", tmp_path / "resumed", model="tiny-random-sd", config={**TINY, "iterations": 3})
    checkpoint = tmp_path / ".resumed.work" / "checkpoint"
    # What a write killed mid-way leaves is swept by the resume (the work folder goes when the erase completes).
    (checkpoint / ".state.safetensors.k3x_9q2a.tmp").write_bytes(b"half a checkpoint")
    kept = {name: (checkpoint / name).read_bytes() for name in ("state.json", "state.safetensors")}
    (checkpoint / "state.json").write_text('{"log": [')  # cut short
    with pytest.raises(DarkMinerError, match="is damaged .*not valid JSON"):
        erase("darkminer", "nudity", tmp_path / "resumed", model="tiny-random-sd", config=TINY, resume=True)
    (checkpoint / "state.json").write_bytes(kept["state.json"])
    save_tensors(checkpoint / "state.safetensors", {k: v for k, v in load_tensors(checkpoint / "state.safetensors").items()
                                                    if not k.startswith("round_0.")})  # its adapter lost
    with pytest.raises(DarkMinerError, match="is damaged .*the adapter of round_0"):
        erase("darkminer", "nudity", tmp_path / "resumed", model="tiny-random-sd", config=TINY, resume=True)
    (checkpoint / "state.safetensors").write_bytes(kept["state.safetensors"])
    save_tensors(checkpoint / "state.safetensors", {k: v[:1] if k.startswith("round_0.") else v
                                                    for k, v in load_tensors(checkpoint / "state.safetensors").items()})
    with pytest.raises(DarkMinerError, match="is damaged .*the adapter of round_0"):  # of another shape
        erase("darkminer", "nudity", tmp_path / "resumed", model="tiny-random-sd", config=TINY, resume=True)
    (checkpoint / "state.safetensors").write_bytes(kept["state.safetensors"])
    for other in ({"concept": "violence"}, {"config": {**TINY, "k": 1}}):
        with pytest.raises(ConfigError, match=r"another run \(its (config|target)\.\w+.* differs?\)"):  # a checkpoint is never reused for another run
            erase("darkminer", other.get("concept", "nudity"), tmp_path / "resumed", model="tiny-random-sd",
                  config=other.get("config", TINY), resume=True)
    capsys.readouterr()
    swept = []
    monkeypatch.setattr(loop_module, "circumvent", lambda *a, **k: (
        swept.append(not (checkpoint / ".state.safetensors.k3x_9q2a.tmp").exists()), real(*a, **k))[1])
    resumed = erase("darkminer", "nudity", tmp_path / "resumed", model="tiny-random-sd", config=TINY, resume=True)
    assert swept and all(swept)
    assert "resuming Dark Miner on nudity: 1 of 3 rounds done" in capsys.readouterr().out
    # Its "seconds" timed only the resumed part, and it says so (a benchmark then reports no erase time).
    assert ErasedModelInfo.read(resumed).extra["resumed"] is True
    assert "resumed" not in ErasedModelInfo.read(uninterrupted).extra

    a = load_tensors(uninterrupted / "pytorch_lora_weights.safetensors")
    b = load_tensors(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_the_first_rounds_of_a_run_are_the_shorter_run(tmp_path):
    long = erase("darkminer", "nudity", tmp_path / "long", model="tiny-random-sd", config=TINY)
    short = erase("darkminer", "nudity", tmp_path / "short", model="tiny-random-sd", config={**TINY, "rounds": 2})
    kept = keep_rounds(long, 2, tmp_path / "kept")

    for name in ("pytorch_lora_weights.safetensors", "round_adapters.safetensors", "mined_embeddings.safetensors"):
        a, b = load_tensors(short / name), load_tensors(kept / name)
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    final, after_two = load_tensors(long / "pytorch_lora_weights.safetensors"), load_tensors(kept / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(final[k], after_two[k]) for k in final)  # round 2 did train: the cut is real
    info = ErasedModelInfo.read(kept)
    assert info.config["rounds"] == 2 and info.extra["rounds"] == 2 and info.extra["seconds"] is None
    assert (kept / "rounds.jsonl").read_text().splitlines() == (long / "rounds.jsonl").read_text().splitlines()[:2]
    load_model(erased=kept)  # loads as any erased model
    with pytest.raises(DarkMinerError, match="keep between 1 and 3"):
        keep_rounds(long, 4, tmp_path / "more")
    before = (long / "rounds.jsonl").read_text()
    for inside in (long, long / "sub"):  # the source is never overwritten nor written into
        with pytest.raises(DarkMinerError, match="overlap"):
            keep_rounds(long, 1, inside)
    assert (long / "rounds.jsonl").read_text() == before and not (long / "sub").exists()


def test_direction_score_is_one_when_mined_images_are_the_pool_and_minus_one_opposite():
    reference = torch.zeros(2, 3)
    pool = torch.ones(2, 3)
    assert direction_score(pool, reference, pool) == pytest.approx(1.0)
    assert direction_score(-pool, reference, pool) == pytest.approx(-1.0)


def test_a_diverging_miner_stops_the_run_with_what_to_change(tmp_path):
    with pytest.raises(DarkMinerError, match="mining diverged.*lower mining_lr"):
        erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config={**TINY, "mining_lr": 1e30})


def test_on_a_bf16_model_the_mined_embedding_is_optimised_in_float32(tmp_path, monkeypatch):
    mined: list[torch.dtype] = []
    real = torch.optim.Adam

    def recording(params, *args, **kwargs):
        params = list(params)
        mined.extend(p.dtype for p in params)
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", recording)  # mining and circumventing (its LoRA is float32)
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", dtype="bf16", config={**TINY, "rounds": 1})
    # In bf16, Adam's eps is zero and small second moments underflow: the steps would round away or be inf.
    assert mined and set(mined) == {torch.float32}
    assert load_tensors(out / "mined_embeddings.safetensors")["round_0.values"].dtype == torch.float32


def test_config_is_validated():
    with pytest.raises(ConfigError, match="space"):
        DarkMinerConfig(space="pixels")
    with pytest.raises(ConfigError, match="cannot exceed"):
        DarkMinerConfig(pool_size=4, k=8)
    with pytest.raises(ConfigError, match="verify_contrast needs verify"):
        DarkMinerConfig(verify=False, verify_contrast=True)
    with pytest.raises(ConfigError, match="raise preserve_pool_size"):
        DarkMinerConfig(k=8, preserve_pool_size=4, verify_contrast=True)
    with pytest.raises(ConfigError, match="trajectory_share must lie in"):
        DarkMinerConfig(trajectory_share=1.5)
    with pytest.raises(ConfigError, match="trajectory_weight must be >= 0"):
        DarkMinerConfig(trajectory_weight=-1)
    with pytest.raises(ConfigError, match="mine_in_context.*needs space: token"):
        DarkMinerConfig(space="condition", mine_in_context=True)
    with pytest.raises(ConfigError, match=r"pool_steps must be 1 \.\. 1000"):  # None is the model's default, not 0
        DarkMinerConfig(pool_steps=0)
    assert DarkMinerConfig.from_dict({"lora": {"rank": 8}}).lora.rank == 8


@pytest.mark.parametrize("share, diverges", [(1.0, False), (0.5, True), (0.0, True)])
def test_trajectory_share_takes_that_share_of_erase_rows_from_the_models_own_trajectories(share, diverges):
    model = load_model("tiny-random-sd")
    params = add_lora(model, LoraConfig(), seed=0)
    conds = model.encode(["nudity", "a nude person"])
    # Pool latents are NaN: a step that noises any erase row from the pool turns the loss NaN.
    pool = ImagePool(torch.zeros(2, 3, 32, 32), torch.full((2, *model.latent_shape), float("nan")), conds)
    config = DarkMinerConfig(k=2, pool_size=2, circumvent_steps=3, preserve_weight=0, pool_steps=3,
                             trajectory_share=share)
    run = lambda: circumvent(model, params, conds, model.encode([""]), pool, pool, config,  # noqa: E731
                             torch.Generator().manual_seed(0))
    if diverges:
        with pytest.raises(DarkMinerError, match="circumventing diverged"):
            run()
    else:
        summary = run()
        assert 0 < summary["erase_loss_end"] < float("inf")


def _circumvent_with_bank(monkeypatch, config, pool_latents, poison_bank=False):
    """Run ``circumvent`` on the tiny model with a bank of 1 new and 2 replayed conditions; returns the
    summary (or the raised error) and the conditions each trajectory bank was drawn under."""
    model = load_model("tiny-random-sd")
    params = add_lora(model, LoraConfig(), seed=0)
    conds = model.encode(["nudity", "a nude person", "naked"])
    pool = ImagePool(torch.zeros(len(pool_latents), 3, 32, 32), pool_latents, conds[[0] * len(pool_latents)])
    drawn = []

    def bank(model, conds, config, generator):
        drawn.append(conds)
        xs, ts, cs = _trajectory_bank(model, conds, config, generator)
        return (torch.full_like(xs, float("nan")) if poison_bank else xs), ts, cs

    monkeypatch.setattr("darkminer.erasers.darkminer.circumventing._trajectory_bank", bank)
    try:
        result = circumvent(model, params, conds[:1], model.encode([""]), pool, pool, config,
                            torch.Generator().manual_seed(0), replay_conds=conds[1:])
    except DarkMinerError as error:
        result = error
    return result, drawn, conds


def test_trajectory_weight_adds_a_term_on_rows_from_the_trajectories_and_keeps_the_pool_rows(monkeypatch):
    shape = load_model("tiny-random-sd").latent_shape
    config = DarkMinerConfig(k=2, pool_size=2, circumvent_steps=3, pool_steps=2, trajectory_weight=0.5)
    # NaN trajectory states: the added rows come from them.
    result, drawn, _ = _circumvent_with_bank(monkeypatch, config, torch.zeros(2, *shape), poison_bank=True)
    assert isinstance(result, DarkMinerError) and "circumventing diverged" in str(result) and len(drawn) == 1
    # NaN pool latents, no preservation term (it would read the same pool): the pool rows are still trained
    # on, where trajectory_share 1.0 would have replaced them.
    for share, diverges in ((0.0, True), (1.0, False)):
        config = DarkMinerConfig(k=2, pool_size=2, circumvent_steps=3, pool_steps=2, trajectory_weight=0.5,
                                 trajectory_share=share, preserve_weight=0)
        result, _, _ = _circumvent_with_bank(monkeypatch, config, torch.full((2, *shape), float("nan")))
        assert isinstance(result, DarkMinerError) == diverges
    # Clean inputs: every term is reported, and none of the preservation term without its weight.
    for preserve_weight in (4.0, 0.0):
        config = DarkMinerConfig(k=2, pool_size=2, circumvent_steps=3, pool_steps=2, trajectory_weight=0.5,
                                 preserve_weight=preserve_weight)
        summary, _, _ = _circumvent_with_bank(monkeypatch, config, torch.randn(2, *shape))
        assert 0 < summary["trajectory_loss_end"] < float("inf") and 0 < summary["erase_loss_end"] < float("inf")
        assert (summary["preserve_loss_end"] is None) == (preserve_weight == 0)


def test_no_trajectory_bank_is_drawn_without_share_or_weight(monkeypatch):
    config = DarkMinerConfig(k=2, pool_size=2, circumvent_steps=2, pool_steps=2)
    summary, drawn, _ = _circumvent_with_bank(monkeypatch, config, torch.randn(2, *load_model("tiny-random-sd").latent_shape))
    assert drawn == [] and summary["trajectory_loss_end"] is None


def test_trajectories_are_drawn_under_conditions_from_the_whole_bank(monkeypatch):
    """The new embedding and the replayed ones alike: uniformly over the 3-entry bank."""
    config = DarkMinerConfig(k=8, pool_size=8, circumvent_steps=1, pool_steps=2, trajectory_weight=1.0)
    _, drawn, conds = _circumvent_with_bank(monkeypatch, config, torch.randn(8, *load_model("tiny-random-sd").latent_shape))
    which = [next(i for i, c in enumerate(conds) if torch.equal(c, d)) for d in drawn[0]]
    assert len(which) == 8 and set(which) == {0, 1, 2}


def test_trajectory_bank_holds_the_states_the_model_samples_through():
    model = load_model("tiny-random-sd")
    conds = model.encode(["nudity", "a nude person"])
    config = DarkMinerConfig(k=2, pool_size=2, pool_steps=4)
    xs, ts, cs = _trajectory_bank(model, conds, config, torch.Generator().manual_seed(0))
    scheduler = model.sampling_scheduler(4)
    assert xs.shape == (8, *model.latent_shape) and torch.equal(ts, scheduler.timesteps.repeat_interleave(2))
    # Each trajectory keeps its own condition at every step.
    assert torch.equal(cs, conds.repeat(4, 1, 1))
    # One more guided step from the last state lands where the model's own sampler ends from the same noise.
    last_x, last_t, scale = xs[-2:], ts[-1], model.default_sampling.guidance_scale
    with torch.no_grad():
        uncond, cond = model.eps(torch.cat([last_x, last_x]), last_t.expand(4), torch.cat([model.encode(["", ""]), cs[-2:]])).chunk(2)
        final = scheduler.step(uncond + scale * (cond - uncond), last_t, last_x).prev_sample
        sampled = model.sample(cs[-2:], noise=xs[:2], steps=4, return_latents=True)
    torch.testing.assert_close(final, sampled, rtol=1e-4, atol=1e-5)


def test_erase_guidance_moves_the_target_past_the_anchor_by_eta_times_the_concept_direction():
    """A fresh LoRA predicts what the original does, so the first step's erase loss is
    ||eps0(c) - eps0(c0) + eta (eps0(c) - eps0(c0))||^2 = (1 + eta)^2 times the loss at eta 0."""
    latents = torch.randn(4, *load_model("tiny-random-sd").latent_shape, generator=torch.Generator().manual_seed(0))
    losses = {}
    for eta in (0.0, 1.0, 2.5):
        model = load_model("tiny-random-sd")
        conds = model.encode(["nudity", "a nude person"])
        pool = ImagePool(torch.zeros(2, 3, 32, 32), latents, conds)
        params = add_lora(model, LoraConfig(), seed=0)
        config = DarkMinerConfig(k=2, pool_size=2, circumvent_steps=1, preserve_weight=1.0, erase_guidance=eta)
        summary = circumvent(model, params, conds, model.encode([""]), pool, pool, config,
                             torch.Generator().manual_seed(0))
        losses[eta] = (summary["erase_loss_start"], summary["preserve_loss_end"])
    assert losses[0.0][0] > 0
    for eta in (1.0, 2.5):
        assert losses[eta][0] == pytest.approx((1 + eta) ** 2 * losses[0.0][0], rel=1e-4)
        # The preservation rows keep their own targets.
        assert losses[eta][1] == pytest.approx(losses[0.0][1], abs=1e-7)
    with pytest.raises(ConfigError, match="erase_guidance must be >= 0"):
        DarkMinerConfig(erase_guidance=-1)


# ------------------------------------------------------------------ the loop's pieces against ground truth


def _rounds(out):
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _spied_erase(tmp_path, monkeypatch, config, outcomes=None):
    """Erase nudity on the tiny model with spies on ``mine`` (its start, generator state and result per
    round) and ``circumvent`` (its erase and replay conditions); ``outcomes`` scripts ``verify``, one
    (score, pool_score) per round. Returns the output folder and the records."""
    seen = {"starts": [], "states": [], "mined": [], "erase": [], "replay": []}
    real_mine, real_circumvent = loop_module.mine, loop_module.circumvent

    def mine_spy(model, pool, start, cfg, generator):
        seen["starts"].append(start.values.detach().clone())
        seen["states"].append(generator.get_state().clone())
        mined, summary = real_mine(model, pool, start, cfg, generator)
        seen["mined"].append(mined.values.detach().clone())
        return mined, summary

    def circumvent_spy(model, params, erase_conds, *args, replay_conds=None, **kwargs):
        seen["erase"].append(erase_conds.detach().clone())
        seen["replay"].append(replay_conds.detach().clone())
        return real_circumvent(model, params, erase_conds, *args, replay_conds=replay_conds, **kwargs)

    monkeypatch.setattr(loop_module, "mine", mine_spy)
    monkeypatch.setattr(loop_module, "circumvent", circumvent_spy)
    if outcomes is not None:
        script = iter(outcomes)

        def scripted_verify(model, encoder, cond, reference, pool_images, seeds, steps, guidance_scale,
                            contrast_images=None):
            score, pool_score = next(script)
            return Verification(score, pool_score, pool_score - score, cond.new_zeros(0))

        monkeypatch.setattr(loop_module, "verify", scripted_verify)
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config={**TINY, **config})
    return out, seen


def test_verdict_reads_the_score_resets_failures_on_a_pass_and_replays_only_passed_rounds(tmp_path, monkeypatch):
    # score and pool_score disagree on every round, so a verdict read from pool_score flips.
    PASS, FAIL = (0.5, -0.5), (-0.5, 0.5)
    config = {"rounds": 6, "patience": 2, "tau": 0.1, "verify_contrast": True, "concept_prompts": 0}
    out, seen = _spied_erase(tmp_path, monkeypatch, config, outcomes=[PASS, FAIL, PASS, FAIL, FAIL, PASS])
    rounds = _rounds(out)
    # The pass at round 2 resets the count: round 3's failure is the first of a run, round 4's the second.
    assert [r["passed"] for r in rounds] == [True, False, True, False, False]
    assert [r["score"] for r in rounds] == [0.5, -0.5, 0.5, -0.5, -0.5]
    extra = ErasedModelInfo.read(out).extra
    assert extra["stopped_early"] is True and extra["rounds"] == 5 and extra["passed_rounds"] == 2

    model = load_model("tiny-random-sd")
    cond = [m.condition(model) for m, _ in load_rounds(out)]
    word, none = model.encode(["nudity"]), cond[0][:0]
    # A failed round trains only the replay set; the replay holds the passed rounds (0, 2) and the word.
    expected = [(torch.cat([cond[0], word]), none), (none, torch.cat([cond[0], word])),
                (cond[2], torch.cat([cond[0], word])), (none, torch.cat([cond[0], cond[2], word])),
                (none, torch.cat([cond[0], cond[2], word]))]
    assert len(seen["erase"]) == len(expected)
    for erase_conds, replay_conds, (want_erase, want_replay) in zip(seen["erase"], seen["replay"], expected, strict=True):
        torch.testing.assert_close(erase_conds, want_erase, atol=1e-5, rtol=0)
        torch.testing.assert_close(replay_conds, want_replay, atol=1e-5, rtol=0)


def test_with_init_previous_each_round_mines_on_from_the_last_rounds_result(tmp_path, monkeypatch):
    out, seen = _spied_erase(tmp_path, monkeypatch, {"rounds": 2})  # init "previous" is the default
    model = load_model("tiny-random-sd")
    word = model.token_embedding.weight[model.tokenize(["nudity"])[0, 1]].detach()
    torch.testing.assert_close(seen["starts"][0], word.expand(DarkMinerConfig().n_tokens, -1))  # round 0: the word
    assert not torch.equal(seen["mined"][0], seen["starts"][0])  # mining moved it, so the check below tells
    assert torch.equal(seen["starts"][1], seen["mined"][0])


def test_each_round_draws_from_its_own_generator(tmp_path, monkeypatch):
    """Rounds seeded alike would repeat the same pool picks, timesteps and noise every round."""
    _, seen = _spied_erase(tmp_path, monkeypatch, {"rounds": 2})
    first, second = (torch.Generator().set_state(state) for state in seen["states"])
    assert not torch.equal(seen["states"][0], seen["states"][1])
    assert not torch.equal(torch.randn(8, generator=first), torch.randn(8, generator=second))


class _SeededPainter:
    """A model whose image i is the condition's state plus a draw of seed i: the same seed, the same draw,
    so the mined and reference images of one seed differ by exactly cond - reference."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def draw(seeds):
        return torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def sample(self, cond, *, seeds, steps, guidance_scale):
        self.calls.append((tuple(cond[0, 0].tolist()), len(cond), list(seeds), steps, guidance_scale))
        return cond[:, 0, :] + self.draw(seeds)


class _Identity:
    def encode(self, images):
        return images.flatten(1)


def _expected_direction(mined, reference, pool):
    """mean over i, j of cos(x_c,i - x_r,i, x_e,j - x_r,i), written out pair by pair."""
    pairs = [F.cosine_similarity(m - r, p - r, dim=0) for m, r in zip(mined, reference, strict=True) for p in pool]
    return torch.stack(pairs).mean().item()


def test_verify_scores_mined_against_reference_images_of_the_same_seeds():
    g = torch.Generator().manual_seed(0)
    cond, reference = torch.randn(1, 1, 3, generator=g), torch.randn(1, 1, 3, generator=g)
    pool, contrast = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    seeds = [11, 22, 33]
    painter = _SeededPainter()
    result = verify(painter, _Identity(), cond, reference, pool, seeds, steps=5, guidance_scale=3.0)

    mined, ref = cond[0] + painter.draw(seeds), reference[0] + painter.draw(seeds)
    # Both drawn k at a time, from the same seeds and with the same sampler settings.
    assert sorted(painter.calls) == sorted([(tuple(c[0, 0].tolist()), 3, seeds, 5, 3.0) for c in (cond, reference)])
    assert torch.equal(result.images, mined)  # the mined images, not the reference's
    assert result.score == result.pool_score == pytest.approx(_expected_direction(mined, ref, pool), abs=1e-6)
    assert result.contrast_score is None
    # The mutants' scores differ from it: mined and reference swapped, or every pool direction from their mean.
    assert abs(_expected_direction(ref, mined, pool) - result.score) > 1e-2
    assert abs(_expected_direction(mined, ref.mean(0).expand_as(ref), pool) - result.score) > 1e-2

    with_contrast = verify(_SeededPainter(), _Identity(), cond, reference, pool, seeds, 5, 3.0, contrast_images=contrast)
    want_contrast = _expected_direction(mined, ref, contrast)
    assert with_contrast.contrast_score == pytest.approx(want_contrast, abs=1e-6)
    assert with_contrast.score == pytest.approx(result.pool_score - want_contrast, abs=1e-6)


def _distinct_conds_pool(model, n):
    conds = model.encode(["nudity", "a nude person", "naked", "bare skin"][:n])
    latents = torch.randn(4, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    return conds, ImagePool(torch.zeros(4, 3, 32, 32), latents, conds[[0, 1, 0, 1]])


@pytest.mark.parametrize(("k", "rows"), [(4, ["new", "new", "replay", "replay"]),
                                         (3, ["new", "new", "replay"])])  # odd: (k + 1) // 2 rows of new ones
def test_circumvent_fills_half_of_each_batch_from_the_new_conditions_and_half_from_the_replay(tiny_sd, k, rows):
    model = tiny_sd
    conds, pool = _distinct_conds_pool(model, 4)
    new, replay = conds[:2], conds[2:]
    students, real_eps = [], model.eps

    def eps_spy(x_t, t, cond, adapter=True):
        if adapter:  # the student's call: exactly the batch's erase rows (no preservation term here)
            students.append(cond.detach().clone())
        return real_eps(x_t, t, cond, adapter=adapter)

    model.eps = eps_spy
    config = DarkMinerConfig(k=k, pool_size=4, circumvent_steps=3, preserve_weight=0, erase_guidance=0)
    circumvent(model, add_lora(model, LoraConfig(), seed=0), new, model.encode([""]), pool, pool, config,
               torch.Generator().manual_seed(0), replay_conds=replay)

    def source(row):
        return next(name for name, bank in (("new", new), ("replay", replay)) if any(torch.equal(row, c) for c in bank))

    assert len(students) == 3
    for batch in students:
        assert [source(row) for row in batch] == rows


def _perturbed_lora(model):
    """A LoRA whose output differs from the original's (a fresh one is the identity until trained)."""
    params = add_lora(model, LoraConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return params


def test_circumvent_weighs_the_preservation_term_by_preserve_weight(tiny_sd, monkeypatch):
    class RecordingScaler:  # a pass-through scaler that keeps the loss each step backpropagates
        def __init__(self):
            self.losses = []

        def scale(self, loss):
            self.losses.append(loss.item())
            return loss

        def step(self, optimizer):
            optimizer.step()

        def update(self):
            pass

    model = tiny_sd
    conds, pool = _distinct_conds_pool(model, 2)
    _, preserve = _distinct_conds_pool(model, 2)
    params = _perturbed_lora(model)  # so the first step's preservation term is not zero
    for weight in (0.5, 3.0):
        scaler = RecordingScaler()
        monkeypatch.setattr(circumventing_module, "gradient_scaler", lambda model, scaler=scaler: scaler)
        config = DarkMinerConfig(k=2, pool_size=4, circumvent_steps=1, preserve_weight=weight)
        summary = circumvent(model, params, conds, model.encode([""]), pool, preserve, config,
                             torch.Generator().manual_seed(0))
        erase_term, preserve_term = summary["erase_loss_start"], summary["preserve_loss_end"]  # one step: both
        assert preserve_term > 1e-6
        assert scaler.losses == [pytest.approx(erase_term + weight * preserve_term, rel=1e-5)]


def test_denoising_loss_scores_the_adapted_model_not_the_original(tiny_sd):
    """Mining and the attacks search against the erased model: its adapter must be on in the loss."""
    model = tiny_sd
    _perturbed_lora(model)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, *model.latent_shape, generator=g)
    cond = model.encode(["nudity", "a dog"])
    noise, t = draw_noise_and_timesteps(model, x0, g)
    with torch.no_grad():
        loss = denoising_loss(model, x0, cond, t, noise).item()
        x_t = model.add_noise(x0, noise, t)
        on, off = (F.mse_loss(model.eps(x_t, t, cond, adapter=a).float(), noise.float()).item() for a in (True, False))
    assert loss == pytest.approx(on, rel=1e-6)
    assert abs(on - off) > 1e-3 * on  # the two models disagree, so the check above tells them apart


def test_the_verifier_never_draws_from_a_pool_images_noise(tmp_path, monkeypatch):
    """A verification image from a pool image's own seed shares its layout: at seed 0, round 0's seeds met the
    pool's, so that round was scored unlike the others."""
    from darkminer.models.base import DiffusionModel

    drawn = {"pools": set(), "verifier": set()}
    real_sample = DiffusionModel.sample

    def sample_spy(self, cond, *, seeds=None, return_latents=False, **kwargs):
        drawn["pools" if return_latents else "verifier"].update(seeds or [])
        return real_sample(self, cond, seeds=seeds, return_latents=return_latents, **kwargs)

    monkeypatch.setattr(DiffusionModel, "sample", sample_spy)
    erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config={**TINY, "seed": 0, "tau": -1.0})
    assert drawn["pools"] >= set(range(TINY["pool_size"])) and len(drawn["verifier"]) == TINY["k"] * TINY["rounds"]
    assert not drawn["pools"] & drawn["verifier"]


def test_mined_tokens_alone_are_stored_as_one_row_and_come_back_so(tmp_path):
    out = erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config={**TINY, "rounds": 1})
    (mined, _), = load_rounds(out)
    ids, slots = mined.stored_ids()
    assert ids.shape == (load_model("tiny-random-sd").max_length,) and not mined.in_context
    again = MinedEmbedding.of_tokens(mined.values, ids, slots)
    assert torch.equal(again.prompts.input_ids, mined.prompts.input_ids) and again.stored_ids()[1] == slots


def test_mining_lowers_the_denoising_loss_of_the_current_model(tiny_sd, monkeypatch):
    """On draws held fixed (the same images, noise and timesteps every step) the mined embedding must
    explain the concept's images better than where it started: a miner stepping the wrong way would not."""
    model = tiny_sd
    _perturbed_lora(model)  # mining runs against the adapted model
    _, pool = _distinct_conds_pool(model, 2)
    monkeypatch.setattr(pool, "pick", lambda k, generator: torch.arange(k))
    fixed = draw_noise_and_timesteps(model, pool.latents[:2], torch.Generator().manual_seed(3))
    monkeypatch.setattr(mining_module, "draw_noise_and_timesteps", lambda model, latents, generator: fixed)
    config = DarkMinerConfig(k=2, pool_size=4, mining_steps=12)
    start = mining_module.initial_embedding(model, "nudity", config, torch.Generator().manual_seed(0), None)
    mined, summary = mining_module.mine(model, pool, start, config, torch.Generator().manual_seed(0))

    def loss(embedding):
        with torch.no_grad():
            return denoising_loss(model, pool.latents[:2], embedding.condition(model).expand(2, -1, -1), fixed[1],
                                  fixed[0]).item()

    assert loss(mined) < loss(start) - 0.01  # 1.118 against 1.136: the random UNet heeds its condition little
    assert summary["loss_end"] < summary["loss_start"]


def test_condition_space_mining_starts_round_0_from_the_concept_words_states(tmp_path, monkeypatch):
    _, seen = _spied_erase(tmp_path, monkeypatch, {"rounds": 1, "space": "condition"})
    torch.testing.assert_close(seen["starts"][0], load_model("tiny-random-sd").encode(["nudity"])[0])


def test_verification_draws_its_reference_from_the_anchor_and_compares_with_the_concept_pool(tmp_path, monkeypatch):
    seen, pools = [], []
    real_verify, real_pools = loop_module.verify, loop_module.build_pools

    def spy_verify(model, encoder, cond, reference, pool_images, *args, **kwargs):
        seen.append((reference.detach().clone(), pool_images.clone()))
        return real_verify(model, encoder, cond, reference, pool_images, *args, **kwargs)

    monkeypatch.setattr(loop_module, "verify", spy_verify)
    monkeypatch.setattr(loop_module, "build_pools", lambda *a: pools.append(real_pools(*a)) or pools[-1])
    erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", anchor="a dog", config={**TINY, "rounds": 1})
    [(reference, pool_images)] = seen
    model, (concept, preserve) = load_model("tiny-random-sd"), pools[0]
    torch.testing.assert_close(reference, model.encode(["a dog"]))
    assert not torch.allclose(reference, model.encode([""]))  # so the check above tells the two apart
    assert torch.equal(pool_images, concept.images[: TINY["k"]])
    assert not torch.equal(pool_images, preserve.images[: TINY["k"]])


def test_a_resumed_run_keeps_counting_the_failed_verifications_it_had_before_it_was_killed(tmp_path, monkeypatch):
    config = {**TINY, "tau": 1.0, "patience": 2, "rounds": 4}  # every verification fails: two rounds, then a stop
    whole = erase("darkminer", "nudity", tmp_path / "whole", model="tiny-random-sd", config=config)
    real_mine = loop_module.mine

    def killed_in_round_1(model, pool, start, cfg, generator):
        if len(calls) == 1:  # round 0 (one failure) is checkpointed
            raise KeyboardInterrupt
        calls.append(1)
        return real_mine(model, pool, start, cfg, generator)

    calls: list[int] = []
    monkeypatch.setattr(loop_module, "mine", killed_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        erase("darkminer", "nudity", tmp_path / "cut", model="tiny-random-sd", config=config)
    monkeypatch.setattr(loop_module, "mine", real_mine)
    resumed = erase("darkminer", "nudity", tmp_path / "cut", model="tiny-random-sd", config=config, resume=True)
    assert [r["round"] for r in _rounds(resumed)] == [r["round"] for r in _rounds(whole)] == [0, 1]
    assert ErasedModelInfo.read(resumed).extra["stopped_early"] is ErasedModelInfo.read(whole).extra["stopped_early"] is True


def test_circumvent_holds_the_preservation_rows_on_the_preservation_pool(tiny_sd):
    model = tiny_sd
    conds, pool = _distinct_conds_pool(model, 2)
    kept = model.encode(["a dog", "a cat"])
    preserve = ImagePool(torch.zeros(2, 3, 32, 32), torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(2)),
                         kept)
    calls, real_eps = {True: [], False: []}, model.eps

    def eps_spy(x_t, t, cond, adapter=True):
        calls[adapter].append(cond.detach().clone())
        return real_eps(x_t, t, cond, adapter=adapter)

    model.eps = eps_spy
    config = DarkMinerConfig(k=2, pool_size=4, circumvent_steps=2, preserve_weight=1.0, erase_guidance=0)
    circumvent(model, _perturbed_lora(model), conds, model.encode([""]), pool, preserve, config,
               torch.Generator().manual_seed(0))

    def held(row):
        return any(torch.equal(row, c) for c in kept)

    assert len(calls[True]) == len(calls[False]) == 2
    for student, teacher in zip(calls[True], calls[False], strict=True):  # k erase rows, then k preservation rows
        assert [held(row) for row in student] == [held(row) for row in teacher] == [False, False, True, True]
        assert torch.equal(student[2:], teacher[2:])  # a preserved prompt's teacher is its own prompt


def test_the_progress_bars_say_what_is_drawn_and_which_stage_of_a_round_runs(tmp_path, monkeypatch, capsys):
    import functools

    from tqdm import auto

    shown = functools.partial(auto.tqdm, disable=False)  # also where TQDM_DISABLE=1 hides bars
    monkeypatch.setattr(auto, "tqdm", shown)  # the sampling bars (imported when sampling starts)
    monkeypatch.setattr(loop_module, "tqdm", shown)
    erase("darkminer", "nudity", tmp_path / "dm", model="tiny-random-sd", config={**TINY, "rounds": 1})
    bars = capsys.readouterr().err
    for label in ("nudity image pool", "preservation pool", "round 0: mining", "round 0: verifying",
                  "round 0: circumventing", "verified=yes"):
        assert label in bars, label
    erase("darkminer", "nudity", tmp_path / "unverified", model="tiny-random-sd",
          config={**TINY, "rounds": 1, "verify": False})
    assert "verif" not in capsys.readouterr().err  # no verification, none claimed
