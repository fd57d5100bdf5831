"""What the fine-tuning erasers (ESD, Concept Ablation, Forget-Me-Not) share.

* choosing UNet (or text-encoder) weights to train in place, with their originals kept as the frozen teacher;
* partial DDIM sampling to reach an x_t the way the ESD authors do, and noised batches of images drawn
  from the frozen original (Concept Ablation's anchor images, Forget-Me-Not's concept images);
* one AdamW loop with NaN checks, progress, and checkpoints in the work directory so a killed erase
  resumes where it stopped. Every iteration draws its randomness from its own generator seeded by
  (seed, iteration), so a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from darkminer.erasers.base import damaged_checkpoint
from darkminer.errors import ConfigError, DamagedStateError, DarkMinerError, ModelLoadError
from darkminer.io import load_state, save_state
from darkminer.models.adapters import target_module_names
from darkminer.models.base import TEXT_ENCODER_PREFIX, ClassifierFreeGuidance, DiffusionModel, host_to_device
from darkminer.models.objectives import curve_ends
from darkminer.parallel import init_processes

# One file, written atomically: the weights and Adam's moments, with the iteration count, losses and Adam's
# step counts in its metadata, so a kill can never leave weights and counts from different iterations.
CHECKPOINT = "checkpoint.safetensors"


def _check_float32(dtype: torch.dtype, part: str) -> None:
    if dtype != torch.float32:
        raise ConfigError(f"this eraser trains the {part}'s own weights, which are {dtype}; load the model in float32 "
                          "(--dtype float32; on a GPU, --precision bf16 keeps the speed: on a CPU it is slower)")


def trainable_unet_parameters(model: DiffusionModel, module_pattern: str) -> dict[str, nn.Parameter]:
    """Weights and biases of the UNet's Linear/Conv2d modules matching ``module_pattern``, made trainable.

    Their originals are remembered first, so ``model.eps(..., adapter=False)`` stays the frozen teacher.
    Half-precision weights are refused: Adam's eps and small steps vanish there (updates round away, or
    divide by a second moment that underflowed to zero).
    """
    _check_float32(model.unet.dtype, "UNet")
    modules = set(target_module_names(model, module_pattern))
    params = {
        name: p for name, p in model.unet.named_parameters() if name.rsplit(".", 1)[0] in modules
    }
    model.remember_originals(list(params))
    for p in params.values():
        p.requires_grad_(True)
    return params


def trainable_text_encoder_parameters(model: DiffusionModel) -> dict[str, nn.Parameter]:
    """Every weight of the text encoder but its input embedding tables (tokens, positions), made trainable
    and keyed by ``TEXT_ENCODER_PREFIX`` + name: the transformer layers and final norm, as AdvUnlearn's
    ``text_encoder_full``. Originals remembered and half precision refused, as for the UNet's."""
    _check_float32(model.text_encoder.dtype, "text encoder")
    tables = {id(m.weight) for m in model.text_encoder.modules() if isinstance(m, nn.Embedding)}
    params = {TEXT_ENCODER_PREFIX + name: p for name, p in model.text_encoder.named_parameters() if id(p) not in tables}
    model.remember_originals(list(params))
    for p in params.values():
        p.requires_grad_(True)
    return params


def derived_seed(seed: int, index: int) -> int:
    """The seed of draw ``index`` of a run seeded ``seed``: distinct for every (seed, index) a run reaches."""
    return seed * 1_000_003 + index


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The random source of one iteration (or round); independent of what ran before, so resuming is exact."""
    return torch.Generator().manual_seed(derived_seed(seed, iteration))


@torch.no_grad()
def ddim_path(
    model: DiffusionModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    adapter: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (x_t, t) before each of ``steps`` DDIM steps with classifier-free guidance: the noise first,
    never the final sample.

    Lazy: a caller that stops early pays only for the steps it consumed.
    """
    for x, t in model.ddim_states(host_to_device(noise, model.device, model.dtype), cond, uncond, guidance_scale, steps,
                                  adapter, guidance=ClassifierFreeGuidance()):
        if t is None:  # the final sample: not a state before a step
            return
        yield x, t


@torch.no_grad()
def partial_ddim_sample(
    model: DiffusionModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    stop_index: int,
    guidance_scale: float,
    adapter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``stop_index`` of ``steps`` DDIM steps from ``noise``; returns x_t and its timestep t.

    ``stop_index`` 0 returns the noise itself at the first (noisiest) timestep of the schedule.
    """
    if not 0 <= stop_index < steps:
        raise DarkMinerError(f"stop_index must lie in [0, {steps}), got {stop_index}")
    path = ddim_path(model, cond, uncond, noise, steps=steps, guidance_scale=guidance_scale, adapter=adapter)
    return next(itertools.islice(path, stop_index, None))


@torch.no_grad()
def original_latents(
    model: DiffusionModel, prompts: Sequence[str], n: int, seed: int, steps: int | None = None
) -> torch.Tensor:
    """``n`` samples of the frozen original, cycling through ``prompts``, returned in the UNet's input
    space (latents for SD, pixels in [-1, 1] for the testbed). ``steps`` None: the model's default."""
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    seeds = [derived_seed(seed, i) for i in range(n)]
    return model.sample(model.encode(chosen, adapter=False), seeds=seeds, steps=steps, adapter=False,
                        return_latents=True)


def noised_batch(
    model: DiffusionModel, latents: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of ``latents`` noised at uniform random training timesteps: (x_t, t)."""
    index = torch.randint(latents.shape[0], (batch_size,), generator=generator)
    t = torch.randint(model.num_train_timesteps, (batch_size,), generator=generator)
    noise = host_to_device(torch.randn((batch_size, *latents.shape[1:]), generator=generator), latents.device, latents.dtype)
    t = host_to_device(t, model.device)
    return model.add_noise(latents[host_to_device(index, latents.device)], noise, t), t


def embedding_step(
    values: torch.Tensor, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> None:
    """One step of ``optimizer`` on the embedding ``values`` alone, from ``loss`` through the loss scale: the
    weights of a model being trained, which the loss also depends on, collect no gradient from it."""
    (values.grad,) = torch.autograd.grad(scaler.scale(loss), [values])
    scaler.step(optimizer)  # skipped where the scaled gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_parameters(
    params: dict[str, nn.Parameter],
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    *,
    iterations: int,
    lr: float,
    seed: int,
    work_dir: Path | None,
    checkpoint_every: int,
    desc: str,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> list[float]:
    """AdamW on ``params`` for ``iterations`` steps of ``loss_fn(iteration, generator)``; returns the losses.

    ``weight_decay`` 0 is plain Adam (ESD); the diffusers-based authors' scripts (Concept Ablation,
    Forget-Me-Not) use AdamW with decay 1e-2 and gradients clipped to norm 1. ``scaler``: loss scaling
    (``gradient_scaler(model)``; on under float16). With a ``work_dir``, parameters, moments and the loss
    scale are saved (by the main process) every ``checkpoint_every`` iterations and a run that finds a
    checkpoint there continues from it. The losses stay on the device and are read at each checkpoint and
    at the end (no host sync per iteration); a NaN/inf loss or weight stops the run there, before it is saved.
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    losses: list[float] = []
    start = 0
    if work_dir is not None and (work_dir / CHECKPOINT).is_file():
        start, losses = _load_checkpoint(work_dir, params, optimizer, scaler)
    pending: list[torch.Tensor] = []  # losses of the iterations after ``losses``, not read yet
    is_main = init_processes().is_main  # under a launcher every process trains the same; one writes

    def read_pending() -> None:
        """Move the pending losses to ``losses``; stop on a NaN/inf loss, or on weights a NaN/inf gradient
        spoilt behind a finite loss."""
        for value in torch.stack(pending).tolist() if pending else []:
            if not math.isfinite(value):
                raise DarkMinerError(f"{desc}: loss became {value} at iteration {len(losses)}; lower the learning rate (lr)")
            losses.append(value)
        pending.clear()
        if not torch.stack([p.isfinite().all() for p in params.values()]).all():
            raise DarkMinerError(f"{desc}: the weights became NaN/inf by iteration {len(losses)}; lower the learning rate (lr)")

    try:
        # Shown in a log file too, as the sampling and Dark Miner bars are: a batch job's only sign of life.
        for iteration in tqdm(range(start, iterations), desc=desc, initial=start, total=iterations, leave=False):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(iteration, iteration_generator(seed, iteration))
            scaler.scale(loss).backward()
            if max_grad_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(params.values(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            pending.append(loss.detach().reshape(()))
            done = iteration + 1
            if work_dir is not None and done < iterations and done % checkpoint_every == 0:
                read_pending()
                if is_main:
                    _save_checkpoint(work_dir, params, optimizer, scaler, done, losses)
        read_pending()
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return losses


def _save_checkpoint(
    work_dir: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    done: int,
    losses: list[float],
) -> None:
    save_state(work_dir / CHECKPOINT, {
        "iterations_done": done, "losses": losses, "params": {name: p.detach() for name, p in params.items()},
        "optimizer": optimizer.state_dict(), "loss_scale": scaler.state_dict(),
    })


def _load_checkpoint(
    work_dir: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[int, list[float]]:
    try:
        state = load_state(work_dir / CHECKPOINT)
    except DamagedStateError as exc:
        raise damaged_checkpoint(work_dir, exc.problem) from None
    except ModelLoadError as exc:  # another format: written by an older darkminer (or not by darkminer)
        raise DarkMinerError(f"the checkpoint in {work_dir} is from an older darkminer ({exc}); delete that folder "
                             "to start over") from None
    if not isinstance(state, dict) or "optimizer" not in state:
        raise DarkMinerError(f"the checkpoint in {work_dir} is from an older darkminer; delete that folder to start over")
    if not isinstance(state.get("params"), dict):
        raise damaged_checkpoint(work_dir, "no weights")
    missing = [name for name in params if name not in state["params"]]
    if missing:
        raise DarkMinerError(
            f"the checkpoint in {work_dir} is from another method or model (no {missing[0]}); delete that folder to start over"
        )
    try:
        optimizer.load_state_dict(state["optimizer"])
        if state["loss_scale"]:  # {} when scaling is off
            scaler.load_state_dict(state["loss_scale"])
        done, losses = int(state["iterations_done"]), [float(loss) for loss in state["losses"]]
        with torch.no_grad():
            for name, p in params.items():
                if state["params"][name].shape != p.shape:  # copy_ would broadcast a weight of shape (1,)
                    raise ValueError(f"{name} of shape {tuple(state['params'][name].shape)}")
                p.copy_(state["params"][name])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise damaged_checkpoint(work_dir, repr(exc)) from None
    return done, losses


def loss_summary(losses: list[float]) -> dict[str, float | int]:
    """What darkminer.json records of a training run."""
    if not losses:
        return {"iterations": 0}
    return {"iterations": len(losses), "first_loss": round(losses[0], 6),
            "final_loss": round(curve_ends(losses, 10)[1], 6)}
