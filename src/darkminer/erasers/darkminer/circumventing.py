"""Circumventing: train the adapter so the model conditioned on a mined embedding predicts what the
*original* model predicts for the anchor, while ordinary prompts keep the original's predictions.

L = E ||eps_{theta0+A}(x_t | c) - eps_theta0(x_t | c0)||^2 + w E ||eps_{theta0+A}(x_t | c_reg) - eps_theta0(x_t | c_reg)||^2
(+ w_traj times the first term on x_t from the adapted model's own trajectories, with ``trajectory_weight``).
With ``erase_guidance`` eta > 0 the erase target is eps_theta0(x_t | c0) - eta (eps_theta0(x_t | c) - eps_theta0(x_t | c0)),
ESD's negative guidance with the anchor in place of the unconditional prediction.
The teacher is the same UNet with the adapter switched off. All rows of a step (erase, trajectory,
preservation) go through one teacher and one student UNet call. Under several processes
(``darkminer.parallel``) each process trains on its slice of the step's rows and DDP averages the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darkminer.erasers.base import check_finite
from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.erasers.darkminer.pool import ImagePool
from darkminer.erasers.training import ddim_path
from darkminer.models.base import DiffusionModel, host_to_device
from darkminer.models.objectives import curve_ends, draw_noise_and_timesteps
from darkminer.parallel import Processes, data_parallel, init_processes
from darkminer.parallel.speed import gradient_scaler


def _noised(model: DiffusionModel, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    noise, t = draw_noise_and_timesteps(model, latents, generator)
    return model.add_noise(latents, noise, t), t


def circumvent(model: DiffusionModel, params: list[torch.nn.Parameter], erase_conds: torch.Tensor, anchor: torch.Tensor,
               pool: ImagePool, preserve: ImagePool, config: DarkMinerConfig, generator: torch.Generator,
               processes: Processes | None = None, replay_conds: torch.Tensor | None = None) -> dict:
    """Train ``params`` (the adapter) for ``config.circumvent_steps``; ``erase_conds`` (M, L, D) are detached.

    ``replay_conds`` (earlier rounds' embeddings) fill half of every batch when ``erase_conds`` is not
    empty, all of it otherwise. ``anchor`` is the teacher's condition for those rows: one (1, L, D) for all,
    or one per row of ``erase_conds`` followed by ``replay_conds``.

    Every process draws the full batch of ``config.k`` rows from ``generator`` and uses its slice, so
    the result equals one process's with the same ``k`` (to rounding). A share
    ``config.trajectory_share`` of the erase rows (rounded to whole rows, at random positions each step)
    instead takes its x_t, t and condition from ``config.k`` trajectories of the model, drawn once at the
    start (``_trajectory_bank``) under conditions drawn uniformly from the bank; every process draws the
    whole bank.
    ``config.trajectory_weight`` > 0 adds a term with that weight on ``config.k`` further rows drawn from
    the trajectory states; unlike ``trajectory_share`` it keeps all ``k`` pool rows. A loss that went NaN
    stops the run at the end of the stage, when the losses are read.
    """
    processes = processes or init_processes()
    rows = processes.rows(config.k)
    student = data_parallel(model, processes)
    replay_conds = erase_conds[:0] if replay_conds is None else replay_conds
    # Rows of a batch for the new embeddings: all without a replay set, none without new ones, else half.
    n_new = ((config.k + 1) // 2 if len(replay_conds) else config.k) if len(erase_conds) else 0
    # One bank of conditions; the first n_new rows of a batch come from erase_conds, the rest from the replay.
    bank = processes.broadcast_(torch.cat([erase_conds, replay_conds]).contiguous())
    if len(anchor) not in (1, len(bank)):
        raise ValueError(f"circumvent: {len(anchor)} anchor conditions for {len(bank)} erase and replay conditions")
    anchors = anchor.expand(len(bank), -1, -1) if len(anchor) == 1 else processes.broadcast_(anchor.contiguous())
    k, preserving = config.k, config.preserve_weight > 0
    optimizer = torch.optim.Adam(params, lr=config.circumvent_lr)
    scaler = gradient_scaler(model)
    n_path = int(config.trajectory_share * k + 0.5)  # whole rows, half up
    adding = config.trajectory_weight > 0
    if n_path or adding:
        path_picks = torch.randint(len(bank), (k,), generator=generator)
        path_picks = host_to_device(path_picks, bank.device)
        path_x, path_t, path_c = _trajectory_bank(model, bank[path_picks], config, generator)
        path_a = anchors[path_picks].repeat(len(path_x) // k, 1, 1)  # path_c's rows' teachers
    weights = {"erase": 1.0, "trajectory": config.trajectory_weight, "preserve": config.preserve_weight}
    terms = [term for term, on in (("erase", True), ("trajectory", adding), ("preserve", preserving)) if on]
    # The terms that map to the anchor come first in ``terms``; those are the rows erase_guidance acts on.
    n_guided = len([term for term in terms if term != "preserve"]) if config.erase_guidance else 0

    def trajectory_rows(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = host_to_device(torch.randint(len(path_x), (n,), generator=generator), model.device)
        return path_x[picks], path_t[picks], path_c[picks], path_a[picks]

    # Losses stay on the device during the loop (no host sync per step); they are read once at the end.
    losses = torch.zeros(len(terms), config.circumvent_steps, device=model.device)
    for step in range(config.circumvent_steps):
        latents, _ = pool.batch(k, generator)
        x_t, t = _noised(model, latents, generator)
        picks = torch.cat([torch.randint(max(1, len(erase_conds)), (n_new,), generator=generator),
                           len(erase_conds) + torch.randint(max(1, len(replay_conds)), (k - n_new,), generator=generator)])
        picks = host_to_device(picks, bank.device)
        student_conds, erase_teachers = bank[picks], anchors[picks]
        if n_path:
            rows_p = host_to_device(torch.randperm(k, generator=generator)[:n_path], model.device)
            x_s, t[rows_p], student_conds[rows_p], erase_teachers[rows_p] = trajectory_rows(n_path)
            x_t[rows_p] = x_s.to(x_t.dtype)
        # One part per term of ``terms``, k rows each: (x_t, t, student cond, teacher cond).
        parts = {"erase": (x_t, t, student_conds, erase_teachers)}
        if adding:
            x_a, t_a, c_a, a_a = trajectory_rows(k)
            parts["trajectory"] = (x_a.to(x_t.dtype), t_a, c_a, a_a)
        if preserving:
            kept, kept_conds = preserve.batch(k, generator)
            x_p, t_p = _noised(model, kept, generator)
            parts["preserve"] = (x_p, t_p, kept_conds, kept_conds)
        # This process's rows of every part, through one teacher and one student UNet call.
        x, ts, conds, teacher_conds = (torch.cat([parts[term][i][rows] for term in terms]) for i in range(4))
        n = rows.stop - rows.start
        with torch.no_grad():
            target = _teacher(model, x, ts, conds, teacher_conds, n * n_guided, config.erase_guidance)
        prediction = student(x, ts, conds).float()
        values = [F.mse_loss(p, q) for p, q in zip(prediction.split(n), target.split(n), strict=True)]
        loss = sum(weights[term] * value for term, value in zip(terms, values, strict=True))
        losses[:, step] = torch.stack(values).detach()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    curves = dict(zip(terms, processes.average_(losses).tolist(), strict=True))
    for curve in curves.values():
        for value in curve:
            check_finite(value, "circumventing", "lower circumvent_lr")
    ends = {term: curve_ends(curve, 5) for term, curve in curves.items()}
    return {
        "erase_loss_start": ends["erase"][0],
        **{f"{term}_loss_end": ends[term][1] if term in ends else None for term in ("erase", "trajectory", "preserve")},
    }


def _teacher(model: DiffusionModel, x: torch.Tensor, ts: torch.Tensor, conds: torch.Tensor, teacher_conds: torch.Tensor,
             n_guided: int, guidance: float) -> torch.Tensor:
    """The original model's targets for the rows ``x``; on the first ``n_guided`` rows (those mapped to the
    anchor) moved away from the student's condition: eps0(c0) - guidance * (eps0(c) - eps0(c0)).

    The guided rows' eps0(c) goes through the same teacher call as the rest.
    """
    if not n_guided:  # no copies of the batch on the default path
        return model.eps(x, ts, teacher_conds, adapter=False).float()
    eps = model.eps(torch.cat([x, x[:n_guided]]), torch.cat([ts, ts[:n_guided]]),
                    torch.cat([teacher_conds, conds[:n_guided]]), adapter=False).float()
    target, concept = eps[: len(x)], eps[len(x):]
    target[:n_guided] -= guidance * (concept - target[:n_guided])
    return target


@torch.no_grad()
def _trajectory_bank(model: DiffusionModel, conds: torch.Tensor, config: DarkMinerConfig,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (x_t, t, condition) on the DDIM trajectories of the adapted model, one per condition in
    ``conds`` (the caller draws them from the round's bank).

    These are the states the erased model passes through when a prompt asks for the concept; noised
    pool images alone never show it the half-erased images its own sampling makes.
    """
    n = len(conds)
    noise = torch.randn((n, *model.latent_shape), generator=generator)
    guidance = model.default_sampling.guidance_scale if config.guidance_scale is None else config.guidance_scale
    steps = model.default_sampling.steps if config.pool_steps is None else config.pool_steps
    path = list(ddim_path(model, conds, model.encode([""]).expand(n, -1, -1), noise, steps=steps,
                          guidance_scale=guidance))
    xs = torch.cat([x for x, _ in path])
    ts = torch.cat([t.reshape(1).expand(n) for _, t in path]).to(device=model.device, dtype=torch.long)
    return xs, ts, conds.repeat(len(path), 1, 1)
