"""Behaviour of the erasers, the Dark Miner loop, the parallel helpers, the metrics, the testbed world and
the adapters that other tests left unpinned (found by mutation testing, round 4). Each test checks ground
truth (a docstring's promise, arithmetic done by hand, a fake whose answer is known), not a recording of
what the code happens to return."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from darkminer.erasers import training
from darkminer.erasers.base import get_eraser
from darkminer.erasers.darkminer import DarkMinerConfig
from darkminer.erasers.darkminer import circumventing as circumventing_module
from darkminer.erasers.darkminer.circumventing import _trajectory_bank, circumvent
from darkminer.erasers.darkminer.pool import ImagePool
from darkminer.erasers.training import derived_seed, original_latents, partial_ddim_sample, train_parameters
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.models import load_model
from darkminer.models.adapters import LoraConfig, add_lora
from darkminer.models.base import ClassifierFreeGuidance
from darkminer.targets import EraseTarget


# ------------------------------------------------------------------------------------- the training loop
def test_every_seed_and_iteration_a_run_reaches_gets_its_own_random_stream() -> None:
    """derived_seed: "distinct for every (seed, index) a run reaches": run seed 1's first iteration must not
    replay run seed 0's second one."""
    seen = {derived_seed(seed, index) for seed in range(4) for index in range(1000)}
    assert len(seen) == 4 * 1000


def _toy(seed: int, *, weight_decay: float = 0.0, loss: str = "draw", iterations: int = 3) -> torch.nn.Parameter:
    weight = torch.nn.Parameter(torch.ones(3))

    def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
        if loss == "zero":  # no gradient at all: only the decoupled weight decay moves the weights
            return (weight * 0.0).sum()
        return (weight - torch.randn(3, generator=generator)).square().sum()

    train_parameters({"w": weight}, loss_fn, iterations=iterations, lr=0.1, seed=seed, work_dir=None,
                     checkpoint_every=10, desc="toy", weight_decay=weight_decay)
    return weight


def test_the_training_loop_draws_from_its_seed() -> None:
    """The same seed gives the same weights; another seed other draws, so other weights."""
    assert torch.equal(_toy(0).detach(), _toy(0).detach())
    assert not torch.equal(_toy(0).detach(), _toy(1).detach())


def test_weight_decay_reaches_the_optimiser_as_decoupled_decay() -> None:
    """With a zero gradient AdamW's step is the decay alone: w <- w (1 - lr * decay) each step."""
    weight = _toy(0, weight_decay=0.5, loss="zero", iterations=3)
    torch.testing.assert_close(weight.detach(), torch.full((3,), (1 - 0.1 * 0.5) ** 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(_toy(0, loss="zero").detach(), torch.ones(3), rtol=0, atol=0)


def test_trained_weights_are_frozen_again_after_training_even_when_it_fails() -> None:
    weight = _toy(0)
    assert not weight.requires_grad and weight.grad is None
    failing = torch.nn.Parameter(torch.zeros(1))

    def killed_at_1(iteration: int, generator: torch.Generator) -> torch.Tensor:
        if iteration == 1:
            raise KeyboardInterrupt
        return failing.sum()

    with pytest.raises(KeyboardInterrupt):
        train_parameters({"w": failing}, killed_at_1, iterations=3, lr=0.1, seed=0, work_dir=None,
                         checkpoint_every=10, desc="toy")
    assert not failing.requires_grad and failing.grad is None


def test_noised_batches_draw_rows_from_the_whole_set() -> None:
    """A random batch of the latents: every row can be drawn, not only the first."""
    fake = SimpleNamespace(num_train_timesteps=1000, device=torch.device("cpu"),
                           add_noise=lambda x0, noise, t: x0)  # the rows themselves come back
    latents = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    x_t, t = training.noised_batch(fake, latents, 64, torch.Generator().manual_seed(0))
    assert set(x_t[:, 0, 0, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 32


def test_original_latents_draw_each_sample_from_its_own_seed(tiny_sd) -> None:
    """n samples cycling through the prompts, each from its own noise: two samples of one prompt differ."""
    latents = original_latents(tiny_sd, ["a photo of a dog"], 3, seed=0, steps=2)
    assert latents.shape == (3, *tiny_sd.latent_shape)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(latents[i], latents[j])


def test_partial_ddim_sampling_stops_before_the_asked_step(tiny_sd) -> None:
    """stop_index 0 is the noise at the first timestep; stop_index i the state before step i, as the full
    DDIM path yields it; stop_index == steps (the final sample) is refused."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, *tiny_sd.latent_shape, generator=g)
    cond, uncond = tiny_sd.encode(["a dog"]), tiny_sd.encode([""])
    steps = 4
    path = list(tiny_sd.ddim_states(noise, cond, uncond, 3.0, steps, guidance=ClassifierFreeGuidance()))
    scheduler = tiny_sd.sampling_scheduler(steps)
    x0, t0 = partial_ddim_sample(tiny_sd, cond, uncond, noise, steps=steps, stop_index=0, guidance_scale=3.0)
    torch.testing.assert_close(x0, noise * scheduler.init_noise_sigma, rtol=0, atol=0)
    assert int(t0) == int(scheduler.timesteps[0])
    for stop in (1, steps - 1):
        x, t = partial_ddim_sample(tiny_sd, cond, uncond, noise, steps=steps, stop_index=stop, guidance_scale=3.0)
        torch.testing.assert_close(x, path[stop][0], rtol=0, atol=1e-6)
        assert int(t) == int(scheduler.timesteps[stop])
    with pytest.raises(DarkMinerError, match="stop_index must lie in"):
        partial_ddim_sample(tiny_sd, cond, uncond, noise, steps=steps, stop_index=steps, guidance_scale=3.0)


# ------------------------------------------------------------------------------------------------ ESD
def test_esd_reaches_its_x_t_under_the_start_guidance_not_the_negative_one(tiny_sd, monkeypatch) -> None:
    from darkminer.erasers import esd

    calls = []
    real = esd.partial_ddim_sample

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(esd, "partial_ddim_sample", spy)
    cfg = esd.EsdConfig(start_guidance=4.5, negative_guidance=2.0, ddim_steps=3, batch_size=2)
    concept, empty = tiny_sd.encode(["nudity"] * 2), tiny_sd.encode([""] * 2)
    x_t, t = esd.esd_state(tiny_sd, concept, empty, cfg, torch.Generator().manual_seed(0))
    assert x_t.shape == (2, *tiny_sd.latent_shape)
    (kwargs,) = calls
    assert kwargs["guidance_scale"] == 4.5 and kwargs["steps"] == 3 and 0 <= kwargs["stop_index"] < 3


# ------------------------------------------------------------------------------------- Concept Ablation

CONCEPT, ANCHOR = "nudity", "a photo of a dog"


def _target(kind: str = "free", preserve: tuple[str, ...] = ()) -> EraseTarget:
    return EraseTarget(name=CONCEPT, word=CONCEPT, anchor=ANCHOR, prompts=(CONCEPT,), preserve=preserve, kind=kind)


def test_ca_teacher_is_the_frozen_original_on_the_anchor_and_the_student_sees_every_concept_prompt(
        tmp_path, monkeypatch) -> None:
    from darkminer.erasers import ca

    model = load_model("tiny-random-sd")
    batches, teachers, students = [], [], []
    real_batch, real_eps = ca.noised_batch, model.eps

    def batch_spy(*args):
        batches.append(real_batch(*args))
        return batches[-1]

    def eps_spy(x_t, t, cond, adapter=True):
        out = real_eps(x_t, t, cond, adapter=adapter)
        (students if torch.is_grad_enabled() else teachers).append(cond.detach().clone() if torch.is_grad_enabled()
                                                                   else out.detach().clone())
        return out

    monkeypatch.setattr(ca, "noised_batch", batch_spy)
    monkeypatch.setattr(model, "eps", eps_spy)
    cfg = ca.CaConfig(iterations=4, lr=1e-2, batch_size=4, anchor_images=2, image_steps=2)
    get_eraser("ca")(cfg).erase(model, _target(), tmp_path)
    assert len(students) == len(batches) == 4  # (the anchor images' sampling also ran without gradients)
    with torch.no_grad():
        anchor = model.encode([ANCHOR]).expand(4, -1, -1)
        x_t, t = batches[-1]
        original, trained = real_eps(x_t, t, anchor, adapter=False), real_eps(x_t, t, anchor)
        assert (original - trained).abs().max() > 1e-4  # training moved the weights: the two differ
        torch.testing.assert_close(teachers[-1], original, rtol=0, atol=1e-6)
        prompts = model.encode(ca.concept_prompts(_target()))
    rows = torch.cat(students)
    which = {next(i for i, p in enumerate(prompts) if torch.equal(row, p)) for row in rows}
    assert which == {0, 1, 2}  # 16 draws from the three templates reach all of them


@pytest.mark.parametrize("method", ["ca", "fmn"])
def test_gradient_clipping_reaches_the_fine_tuning_erasers(method: str, tmp_path) -> None:
    """Clipped to 1e-12 the gradient falls far below Adam's eps (1e-8): the weights barely move, where an
    unclipped run moves them by about lr per step."""
    options = {"ca": {"anchor_images": 2, "image_steps": 2},
               "fmn": {"concept_images": 2, "image_steps": 2, "only_cross_attention": True}}[method]
    drift = {}
    for norm in (1e-12, 1e3):
        model = load_model("tiny-random-sd")
        eraser = get_eraser(method)
        cfg = eraser.config_class.from_dict({**options, "iterations": 2, "lr": 1e-2, "weight_decay": 0.0,
                                             "max_grad_norm": norm})
        eraser(cfg).erase(model, _target(), tmp_path / f"{method}{norm}")
        names = set(model.edited_parameter_names)
        trained = {n: p.detach().clone() for n, p in model.unet.named_parameters() if n in names}
        with model.original():
            drift[norm] = max((trained[n] - p.detach()).abs().max().item()
                              for n, p in model.unet.named_parameters() if n in names)
    assert drift[1e3] > 1e-3 and drift[1e-12] < 0.01 * drift[1e3]


def test_ca_refuses_no_anchor_images() -> None:
    from darkminer.erasers.ca import CaConfig

    with pytest.raises(ConfigError, match="anchor_images"):
        CaConfig(anchor_images=0)


# ------------------------------------------------------------------------------------------------- FMN
@pytest.mark.parametrize(("kind", "prompt"), [("style", f"a photo in the style of {CONCEPT}"),
                                              ("free", f"a photo of {CONCEPT}")])
def test_fmn_captions_a_style_as_a_style(kind: str, prompt: str, tmp_path) -> None:
    from darkminer.erasers.fmn import FmnConfig

    model = load_model("tiny-random-sd")
    cfg = FmnConfig(iterations=1, concept_images=1, image_steps=1, only_cross_attention=True)
    assert get_eraser("fmn")(cfg).erase(model, _target(kind), tmp_path)["prompt"] == prompt


@pytest.mark.parametrize("only_cross_attention", [True, False])
def test_fmn_trains_only_cross_attention_when_asked(only_cross_attention: bool, tmp_path) -> None:
    from darkminer.erasers.fmn import FmnConfig

    model = load_model("tiny-random-sd")
    cfg = FmnConfig(iterations=1, lr=1e-2, concept_images=1, image_steps=1, only_cross_attention=only_cross_attention)
    get_eraser("fmn")(cfg).erase(model, _target(), tmp_path)
    edited = model.edited_parameter_names
    assert edited and all(".attn2." in n for n in edited) is only_cross_attention


# ------------------------------------------------------------------------------------------------- SLD
def test_sld_warns_where_its_warm_up_takes_every_step_and_then_draws_the_original(tmp_path) -> None:
    """At steps == warmup_steps the safety term never acts (step indices 0 .. steps - 1 < warm-up)."""
    import warnings

    from darkminer.api import erase
    from darkminer.errors import DarkMinerWarning

    model = load_model("tiny-random-sd")
    erase("sld", CONCEPT, tmp_path / "sld", model=model, config={"preset": "medium"})  # warm-up 10
    states = model.encode([f"a photo of {CONCEPT}"])
    with pytest.warns(DarkMinerWarning, match="from step 10 on; at 10 steps"):
        inactive = model.sample(states, seeds=[3], steps=10, guidance_scale=5.0)
    torch.testing.assert_close(inactive, model.sample(states, seeds=[3], steps=10, guidance_scale=5.0, adapter=False),
                               rtol=0, atol=0)
    fresh = load_model("tiny-random-sd")
    erase("sld", CONCEPT, tmp_path / "sld11", model=fresh, config={"preset": "medium"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.sample(states, seeds=[3], steps=11, guidance_scale=5.0)  # step 10 is steered: nothing to warn of


# ------------------------------------------------------------------------------------------ AdvUnlearn
def test_advunlearn_adds_the_retain_term_with_its_weight(tmp_path, monkeypatch) -> None:
    """Each iteration's loss is ESD's term plus retain_weight times the retain term (warm-up: one of each)."""
    from darkminer.erasers import advunlearn

    terms, totals = [], []
    real_mse, real_train = torch.nn.functional.mse_loss, advunlearn.train_parameters

    def mse_spy(prediction, target):
        terms.append(real_mse(prediction, target))
        return terms[-1]

    def train_spy(params, loss_fn, **kwargs):
        def recorded(iteration, generator):
            totals.append(loss_fn(iteration, generator))
            return totals[-1]

        return real_train(params, recorded, **kwargs)

    monkeypatch.setattr(advunlearn, "F", SimpleNamespace(mse_loss=mse_spy))
    monkeypatch.setattr(advunlearn, "train_parameters", train_spy)
    cfg = advunlearn.AdvUnlearnConfig(iterations=3, lr=1e-2, ddim_steps=2, warmup_iterations=3, retain_weight=0.3,
                                      retain_batch=2, layers="esd-x")
    get_eraser("advunlearn")(cfg).erase(load_model("tiny-random-sd"), _target(preserve=("a dog", "a cat")), tmp_path)
    assert len(terms) == 2 * len(totals) == 6
    esd_terms, retain_terms = [t.item() for t in terms[0::2]], [t.item() for t in terms[1::2]]
    assert retain_terms[-1] > 0  # the trained weights moved the ordinary prompts' predictions
    for total, e, r in zip(totals, esd_terms, retain_terms, strict=True):
        assert abs(total.item() - (e + 0.3 * r)) <= 1e-6 * e + 1e-3 * r


def test_advunlearn_draws_esds_x_t_under_the_original_encoders_concept(tmp_path, monkeypatch) -> None:
    """With the text encoder trained, ESD's x_t is still reached from the original's conditioning on the
    concept, never from the student's (trained, or adversarial) one."""
    from darkminer.erasers import advunlearn

    conditions = []
    real_state = advunlearn.esd_state

    def state_spy(model, concept, empty, cfg, generator):
        conditions.append(concept.detach().clone())
        return real_state(model, concept, empty, cfg, generator)

    monkeypatch.setattr(advunlearn, "esd_state", state_spy)
    model = load_model("tiny-random-sd")
    cfg = advunlearn.AdvUnlearnConfig(iterations=3, lr=1e-2, ddim_steps=2, warmup_iterations=3, retain_weight=0,
                                      layers="text-encoder")
    get_eraser("advunlearn")(cfg).erase(model, _target(), tmp_path)
    with torch.no_grad():
        original, trained = model.encode([CONCEPT], adapter=False), model.encode([CONCEPT])
    assert (original - trained).abs().max() > 1e-4  # the encoder did train
    assert len(conditions) == 3
    for seen in conditions:
        torch.testing.assert_close(seen, original.expand_as(seen), rtol=0, atol=0)


def test_a_loss_that_became_infinite_stops_the_run_too() -> None:
    from darkminer.erasers.base import check_finite

    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(DarkMinerError, match=r"mining diverged \(loss .*\); lower mining_lr"):
            check_finite(bad, "mining", "lower mining_lr")
    assert check_finite(1e30, "mining", "lower mining_lr") == 1e30


# ------------------------------------------------------------------------------------------- Dark Miner

TINY_DM = dict(pool_size=4, k=2, mining_steps=2, circumvent_steps=2, rounds=2, verify_steps=2, pool_steps=2,
               preserve_pool_size=2, image_encoder="tiny-random-clip")


def test_the_verifier_is_needed_off_the_testbed_only() -> None:
    config = DarkMinerConfig(image_encoder=None)
    config.check_model("testbed")  # the testbed's own image encoder verifies there
    with pytest.raises(ConfigError, match="needs a CLIP image encoder on 'tiny-random-sd'"):
        config.check_model("tiny-random-sd")
    DarkMinerConfig(image_encoder=None, verify=False).check_model("tiny-random-sd")


@pytest.mark.parametrize(("share", "trajectory_rows"), [(0.25, 1), (0.2, 0), (0.75, 2)])
def test_trajectory_share_rounds_to_whole_rows_half_up(share: float, trajectory_rows: int, tiny_sd, monkeypatch) -> None:
    """k = 2: a share of 0.25 is half a row, rounded up to one; 0.2 (0.4 rows) to none; 0.75 to both. NaN
    trajectory states show whether any row came from them."""
    model = tiny_sd
    conds = model.encode(["nudity", "a nude person"])
    pool = ImagePool(torch.zeros(2, 3, 32, 32), torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0)),
                     conds)

    def poisoned(model, conds, config, generator):
        xs, ts, cs = _trajectory_bank(model, conds, config, generator)
        return torch.full_like(xs, float("nan")), ts, cs

    monkeypatch.setattr(circumventing_module, "_trajectory_bank", poisoned)
    config = DarkMinerConfig(k=2, pool_size=2, circumvent_steps=1, preserve_weight=0, pool_steps=2, trajectory_share=share)
    run = lambda: circumvent(model, add_lora(model, LoraConfig(), seed=0), conds, model.encode([""]), pool, pool,  # noqa: E731
                             config, torch.Generator().manual_seed(0))
    if trajectory_rows:
        with pytest.raises(DarkMinerError, match="circumventing diverged"):
            run()
    else:
        assert math.isfinite(run()["erase_loss_end"])


def test_trajectory_bank_samples_at_the_configured_guidance(tiny_sd) -> None:
    """With guidance_scale set, the trajectories are the DDIM path at that scale, not the model's default."""
    model = tiny_sd
    conds = model.encode(["nudity", "a nude person"])
    config = DarkMinerConfig(k=2, pool_size=2, pool_steps=3, guidance_scale=11.0)
    assert model.default_sampling.guidance_scale != 11.0
    xs, ts, _ = _trajectory_bank(model, conds, config, torch.Generator().manual_seed(0))
    scheduler = model.sampling_scheduler(3)
    noise = xs[:2] / scheduler.init_noise_sigma
    with torch.no_grad():
        path = list(model.ddim_states(noise, conds, model.encode(["", ""]), 11.0, 3, guidance=ClassifierFreeGuidance()))
    expected = torch.cat([x for x, t in path if t is not None])
    torch.testing.assert_close(xs, expected, rtol=1e-5, atol=1e-6)


def test_a_score_equal_to_tau_does_not_pass(tmp_path, monkeypatch) -> None:
    """s(c) > tau passes (verifying.py): a score of exactly tau is a failed verification."""
    from darkminer.api import erase
    from darkminer.erasers.darkminer import loop as loop_module
    from darkminer.erasers.darkminer.verifying import Verification

    monkeypatch.setattr(loop_module, "verify", lambda model, encoder, cond, *args, **kwargs:
                        Verification(0.25, 0.25, None, cond.new_zeros(0)))
    out = erase("darkminer", CONCEPT, tmp_path / "dm", model="tiny-random-sd",
                config={**TINY_DM, "tau": 0.25, "patience": 5, "rounds": 2})
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in rounds] == [False, False] and [r["score"] for r in rounds] == [0.25, 0.25]


def test_the_preservation_pool_never_draws_from_the_concept_pools_seeds(tiny_sd, tmp_path, monkeypatch) -> None:
    from darkminer.erasers.darkminer import pool as pool_module

    drawn = []
    real = pool_module.sharded_sample

    def spy(model, conds, seeds, **kwargs):
        drawn.append(list(seeds))
        return real(model, conds, seeds, **kwargs)

    monkeypatch.setattr(pool_module, "sharded_sample", spy)
    target = _target(preserve=("a dog", "a cat"))
    for seed in (0, 3):
        drawn.clear()
        config = DarkMinerConfig(pool_size=4, k=2, preserve_pool_size=4, pool_steps=1, seed=seed)
        pool_module.build_pools(tiny_sd, target, config, tmp_path / f"work{seed}")
        concept, preserve = drawn
        assert concept == list(range(seed, seed + 4)) and len(preserve) == 4
        assert not set(concept) & set(preserve)


def test_a_pool_batch_holds_distinct_images() -> None:
    pool = ImagePool(torch.zeros(6, 3, 2, 2), torch.arange(6.0)[:, None], torch.zeros(6, 1, 1))
    for seed in range(20):
        rows = pool.pick(6, torch.Generator().manual_seed(seed))
        assert sorted(rows.tolist()) == list(range(6))


# ---------------------------------------------------------------------------- two processes over gloo
class _Echo:
    """A model whose sample is its condition plus its unconditional row: shows which rows each got."""

    def sample(self, cond, seeds, uncond=None, batch_size=None, **options):
        assert len(seeds) == len(cond)
        return cond + (0 if uncond is None else uncond)


def _gloo_worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from darkminer.parallel import Processes, sharded_sample

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        p = Processes(rank, 2)
        out = {
            # uneven blocks: two rows on rank 0, one on rank 1; then none on rank 0
            "rows": p.gather_rows(torch.tensor([[0.0], [1.0]]) if rank == 0 else torch.tensor([[10.0]])).tolist(),
            "bools": p.gather_rows(None if rank == 0 else torch.tensor([[True], [False]])).tolist(),
            "objects": p.gather_objects([f"r{rank}a", f"r{rank}b"][: rank + 1]),
            "average": p.average_(torch.tensor([float(rank + 1), 4.0])).tolist(),
            "map_rows": p.map_rows(lambda rows: rows * 2, torch.arange(5.0)).tolist(),
            # 5 rows in batches of 2: rank 0 draws batches 0-1 (rows 0-3), rank 1 batch 2 (row 4), each row
            # with its own unconditional row
            "sample": sharded_sample(_Echo(), torch.arange(5.0)[:, None], list(range(5)), batch_size=2,
                                     uncond=100 * torch.arange(1.0, 6.0)[:, None], processes=p).flatten().tolist(),
        }
        (Path(folder) / f"gloo{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_gather_share_and_average_in_rank_order(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        out = json.loads((tmp_path / f"gloo{rank}.json").read_text())
        assert out["rows"] == [[0.0], [1.0], [10.0]]  # in rank order, the padding trimmed
        assert out["bools"] == [[True], [False]]  # a process without rows adds none; booleans come back so
        assert out["objects"] == ["r0a", "r1a", "r1b"]
        assert out["average"] == [1.5, 4.0]
        assert out["map_rows"] == [0.0, 2.0, 4.0, 6.0, 8.0]
        assert out["sample"] == [100.0, 201.0, 302.0, 403.0, 504.0]


def test_init_concept_restarts_every_round_from_the_concept_word(tiny_sd) -> None:
    from darkminer.erasers.darkminer.mining import MinedEmbedding, initial_embedding

    config = DarkMinerConfig(init="concept", n_tokens=3)
    word = [i for i in tiny_sd.tokenize([CONCEPT])[0].tolist() if i not in tiny_sd.special_token_ids]
    table = tiny_sd.token_embedding.weight.detach()
    expected = table[torch.tensor([word[i % len(word)] for i in range(3)])]
    previous = MinedEmbedding("token", torch.randn(3, table.shape[1]), None)
    start = initial_embedding(tiny_sd, CONCEPT, config, torch.Generator().manual_seed(0), previous)
    torch.testing.assert_close(start.values, expected, rtol=0, atol=0)
    # init "previous" goes on from the last round's result instead
    again = initial_embedding(tiny_sd, CONCEPT, DarkMinerConfig(n_tokens=3), torch.Generator().manual_seed(0), previous)
    torch.testing.assert_close(again.values, previous.values, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- metrics
def test_testbed_clip_score_is_a_hundred_times_the_cosine_clamped_at_zero() -> None:
    from darkminer.evaluation.metrics import TestbedAligner
    from darkminer.testbed.image_encoder import ImageEncoder
    from darkminer.testbed.world import sample_batch

    aligner = TestbedAligner.__new__(TestbedAligner)
    aligner.encoder = ImageEncoder.load()
    _, images, _ = sample_batch(2, np.random.default_rng(0))
    features = aligner.encoder.encode(images)
    # the "texts" embed as the images themselves (cosine 1) and as their opposites (cosine -1)
    aligner.embedder = SimpleNamespace(encode=lambda texts: torch.stack([features[0], -features[1]]))
    torch.testing.assert_close(aligner.score(images, ["a", "b"]), torch.tensor([100.0, 0.0]), rtol=0, atol=1e-3)


def test_fid_counts_every_image_fed_and_refuses_fewer_than_two_a_side() -> None:
    from darkminer.evaluation.metrics import FrechetDistance
    from darkminer.testbed.world import sample_batch

    rng = np.random.default_rng(0)
    _, real, _ = sample_batch(6, rng, overlay="none")
    _, fake, _ = sample_batch(6, rng, overlay="fire")
    fid = FrechetDistance(testbed=True)
    whole = fid(real, fake)
    fid.reset()
    for image in real:  # one at a time, as an evaluation feeds chunk after chunk
        fid.update(image[None], real=True)
    fid.update(fake, real=False)
    assert fid.compute() == pytest.approx(whole, rel=1e-4)
    fid.reset()
    fid.update(real[:1], real=True)
    fid.update(fake, real=False)
    with pytest.raises(DarkMinerError, match="at least 2 images on each side"):
        fid.compute()


def test_a_fid_reference_folder_needs_two_images(tmp_path) -> None:
    from darkminer.evaluation.metrics import reference_image_paths
    from darkminer.imaging import save_png, to_pil

    save_png(to_pil(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))), tmp_path / "one.png")
    with pytest.raises(DarkMinerError, match=r"holds 1 image\(s\).*FID needs at least 2"):
        reference_image_paths(tmp_path)
    save_png(to_pil(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))), tmp_path / "two.PNG")
    assert [p.name for p in reference_image_paths(tmp_path)] == ["one.png", "two.PNG"]


# ------------------------------------------------------------------------------------------ speed options
def test_torch_compile_compiles_the_unet_alone(tiny_sd) -> None:
    """Only the UNet's no-grad calls are compiled; the text encoder and the VAE run as they are."""
    from torch._dynamo.utils import counters

    from darkminer.parallel import SpeedOptions, apply_speed_options

    apply_speed_options(tiny_sd, SpeedOptions(compile="default", compile_backend="eager"))
    try:
        assert "forward" in vars(tiny_sd.unet)  # the UNet's forward is wrapped for compiling
        others = [*tiny_sd.text_encoder.modules(), *tiny_sd.vae.modules()]
        assert not [m for m in others if "forward" in vars(m)]
        with torch.no_grad():
            graphs = counters["stats"]["unique_graphs"]
            tiny_sd.encode(["a photo of a dog"])
            tiny_sd.latents_to_images(torch.zeros(1, *tiny_sd.latent_shape))
            assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled outside the UNet
    finally:
        apply_speed_options(tiny_sd, SpeedOptions())


# ------------------------------------------------------------------------------------------ detectors
def test_each_detector_grades_only_its_own_world() -> None:
    from darkminer.evaluation.detectors import detector_kind_for

    for kind in ("nudenet", "clip"):
        with pytest.raises(DarkMinerError, match="does not grade testbed images"):
            detector_kind_for("blood", testbed=True, kind=kind)
        assert detector_kind_for("nudity", testbed=False, kind=kind) == kind
    with pytest.raises(DarkMinerError, match="does not grade Stable Diffusion images"):
        detector_kind_for("nudity", testbed=False, kind="judge")
    assert detector_kind_for("blood", testbed=True, kind="judge") == "judge"


# ------------------------------------------------------------------------------------- the testbed world
def test_erosion_takes_each_images_own_number_of_steps() -> None:
    """A sketch's outline width is its own: an image eroded 1 step keeps all but the filled square's rim, in
    a batch whose other image is eroded 3."""
    from darkminer.testbed.world import _erode

    mask = np.zeros((2, 12, 12), dtype=bool)
    mask[:, 2:10, 2:10] = True  # an 8x8 square
    eroded = _erode(mask, np.array([1, 3]))
    assert eroded[0].sum() == 6 * 6 and eroded[0][3:9, 3:9].all()
    assert eroded[1].sum() == 2 * 2 and eroded[1][5:7, 5:7].all()


def test_only_the_drawn_number_of_blood_drops_is_painted() -> None:
    """Drops past ``count`` are off: moving them off the canvas changes nothing, and count 0 paints nothing."""
    from darkminer.testbed.world import _blood_layer, _grid, _sample_blood

    grid_y, grid_x = _grid()
    blood = _sample_blood(1, np.random.default_rng(0))
    blood["count"] = np.array([2])
    alpha, _ = _blood_layer(blood, grid_x, grid_y)
    gone = {**blood, "x": blood["x"].copy(), "y": blood["y"].copy()}
    gone["x"][:, 2:], gone["y"][:, 2:] = -1000.0, -1000.0
    alpha_gone, _ = _blood_layer(gone, grid_x, grid_y)
    assert alpha.any() and np.array_equal(alpha, alpha_gone)
    blood["count"] = np.array([0])
    assert not _blood_layer(blood, grid_x, grid_y)[0].any()


def test_an_article_before_a_u_word_is_an() -> None:
    from darkminer.testbed import captions

    # "unfilled" is one of sketch's held-out words
    assert captions._fix_articles("a unfilled star and a heart") == "an unfilled star and a heart"


def test_a_caption_refuses_unknown_attributes_to_mention() -> None:
    from darkminer.testbed import captions, world

    scene = world.sample_scene(np.random.default_rng(0))
    for bad in ({"mention": {"texture": True}}, {"phrases": {"texture": captions.Phrase("furry", "adjective")}}):
        with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['texture'\]"):
            captions.caption(scene, np.random.default_rng(0), **bad)


def test_captions_mostly_put_an_adjective_colour_right_before_the_noun() -> None:
    """"a striped red star", in natural order, in about 80% of the captions that are no list."""
    from darkminer.testbed import captions, world

    rng = np.random.default_rng(0)
    scene = world.Scene(shape="star", colour="red", style="striped", background="white", overlay="none")
    phrases = {"colour": captions.Phrase("red", "adjective"), "style": captions.Phrase("striped", "adjective"),
               "shape": captions.Phrase("star", "noun")}
    mention = {"overlay": False, "background": False}
    texts = [captions.caption(scene, rng, dropout=0.0, mention=mention, phrases=phrases) for _ in range(400)]
    natural = [t for t in texts if "," not in t]  # list captions ("star, red, striped") aside
    share = sum("striped red star" in t for t in natural) / len(natural)
    assert len(natural) > 300 and abs(share - 0.8) < 0.08
    assert all("striped red star" in t or "red striped star" in t for t in natural)


@pytest.mark.parametrize("name", ["star", "heart", "striped", "sketch"])
def test_object_and_style_concepts_are_asked_for_on_clean_scenes(name: str) -> None:
    from darkminer.testbed.concepts import get_concept

    concept = get_concept(name)
    for prompts in (concept.direct_prompts(40), concept.direct_prompts(40, split="erasure"), concept.word_prompts(20),
                    concept.paraphrase_prompts(20), concept.anchor_twins(20)):
        assert all(p.expected["overlay"] == "none" for p in prompts)


def test_two_concepts_prompt_sets_are_not_twins() -> None:
    """Seeded by the concept's name too: star's and heart's prompts at one seed draw other scenes."""
    from darkminer.testbed.concepts import get_concept

    def scenes(name: str) -> list[dict]:
        return [{h: v for h, v in p.expected.items() if h != "shape"} for p in get_concept(name).direct_prompts(20, seed=0)]

    assert scenes("star") != scenes("heart")
    assert [p.seed for p in get_concept("star").direct_prompts(20)] != [p.seed for p in get_concept("heart").direct_prompts(20)]


def test_paraphrase_prompts_cycle_evenly_through_the_held_out_paraphrases() -> None:
    from collections import Counter

    from darkminer.testbed.concepts import get_concept

    for name in ("blood", "star", "sketch"):
        concept = get_concept(name)
        n = 3 * len(concept.heldout_paraphrases) + 1
        used = Counter(next(h for h in concept.heldout_paraphrases if h in p.text) for p in concept.paraphrase_prompts(n))
        assert set(used) == set(concept.heldout_paraphrases) and max(used.values()) - min(used.values()) <= 1


# ------------------------------------------------------------------------------------------- adapters
def test_a_merged_lora_keeps_the_model_before_it_as_the_original(tiny_sd) -> None:
    from darkminer.models.adapters import has_lora, merge_lora

    params = add_lora(tiny_sd, LoraConfig(), seed=0)
    with torch.no_grad():
        for p in params:  # a fresh LoRA is the identity until trained
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, *tiny_sd.latent_shape, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([10, 700]), tiny_sd.encode(["a photo of a dog", "a red car"])
    with torch.no_grad():
        adapted, original = tiny_sd.eps(x, t, cond), tiny_sd.eps(x, t, cond, adapter=False)
        assert (adapted - original).abs().max() > 1e-3
        merge_lora(tiny_sd)
        assert not has_lora(tiny_sd)
        torch.testing.assert_close(tiny_sd.eps(x, t, cond), adapted, rtol=0, atol=1e-4)  # folded in
        torch.testing.assert_close(tiny_sd.eps(x, t, cond, adapter=False), original, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- the Dark Miner loop
def test_kept_rounds_count_the_passes_and_the_score_of_those_rounds_only(tmp_path, monkeypatch) -> None:
    from darkminer.api import erase
    from darkminer.erasers.darkminer import keep_rounds
    from darkminer.erasers.darkminer import loop as loop_module
    from darkminer.erasers.darkminer.verifying import Verification
    from darkminer.models.erased import ErasedModelInfo

    script = iter([0.5, -0.5, 0.5])  # pass, fail, pass

    def scripted(model, encoder, cond, *args, **kwargs):
        score = next(script)
        return Verification(score, score, None, cond.new_zeros(0))

    monkeypatch.setattr(loop_module, "verify", scripted)
    out = erase("darkminer", CONCEPT, tmp_path / "dm", model="tiny-random-sd",
                config={**TINY_DM, "tau": 0.0, "rounds": 3, "patience": 3})
    assert ErasedModelInfo.read(out).extra["passed_rounds"] == 2
    kept = ErasedModelInfo.read(keep_rounds(out, 2, tmp_path / "kept")).extra
    assert (kept["rounds"], kept["passed_rounds"], kept["final_score"]) == (2, 1, -0.5)


def test_round_0_erases_the_word_and_the_first_concept_prompts_on_the_testbed(tmp_path, monkeypatch) -> None:
    """concept_prompts = 2: round 0 circumvents the mined embedding, the concept's word and the first two of
    its (erasure split) prompts."""
    from darkminer.api import erase
    from darkminer.erasers.darkminer import loop as loop_module
    from darkminer.targets import resolve_target

    seen = []
    real = loop_module.circumvent

    def spy(model, params, erase_conds, *args, **kwargs):
        seen.append(erase_conds.detach().clone())
        return real(model, params, erase_conds, *args, **kwargs)

    monkeypatch.setattr(loop_module, "circumvent", spy)
    config = dict(pool_size=2, k=2, preserve_pool_size=2, pool_steps=2, mining_steps=1, circumvent_steps=1, rounds=1,
                  verify=False, concept_prompts=2)
    erase("darkminer", "blood", tmp_path / "dm", model="testbed", config=config)
    model = load_model("testbed")
    target = resolve_target(model, "blood")
    assert target.prompts[0] != target.word
    (conds,) = seen
    torch.testing.assert_close(conds[1:], model.encode([target.word, *target.prompts[:2]]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- slots
def test_a_row_too_long_for_the_prompt_loses_its_last_prompt_tokens(tiny_sd) -> None:
    from darkminer.models.slots import SLOT, build_slotted

    room = tiny_sd.max_length - 2
    content = list(range(1000, 1000 + room + 5))  # five prompt tokens too many
    slotted = build_slotted(tiny_sd, [[SLOT, *content]])
    ids = slotted.input_ids[0].tolist()
    assert slotted.slots.tolist() == [[1]]
    assert ids[2:-1] == content[: room - 1] and ids[-1] == tiny_sd.eos_id


def test_attacks_never_propose_special_tokens(tiny_sd) -> None:
    from darkminer.models.slots import allowed_token_ids, random_token_ids

    special = tiny_sd.special_token_ids
    allowed = set(allowed_token_ids(tiny_sd).tolist())
    assert special and not allowed & special
    assert allowed | special == set(range(tiny_sd.token_embedding.weight.shape[0]))
    drawn = random_token_ids(tiny_sd, (5000,), torch.Generator().manual_seed(0))
    assert not set(drawn.tolist()) & special

