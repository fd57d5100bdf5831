"""Training of the testbed's UNet on the procedural world (CPU-friendly, resumable, seeded).

A bank of (scene, caption) pairs is drawn once and its MiniLM token states cached (the encoder is frozen,
and encoding on the fly would cost more than the UNet step). Every step re-renders the bank's scenes with
fresh layout jitter, so the model sees new pixels for the same captions. The EMA of the weights is what
ships.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from darkminer.config import Config, check_choice, check_non_negative, check_positive
from darkminer.errors import ConfigError, DamagedStateError, ModelLoadError, logs_silenced
from darkminer.io import (
    check_output_directory,
    claim_record,
    load_state,
    output_directory,
    save_state,
    what_differs,
    write_json,
)
from darkminer.models.loading import bars_hidden
from darkminer.testbed import captions, world
from darkminer.testbed.model import UNET_DIR, TestbedModel

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
UNET_MARKER, UNET_OUTPUT = "config.json", "a diffusers UNet folder"  # what --out may replace
RUN_RECORD, WORK_KIND = "run.json", "a testbed training work folder"  # what --work-dir may be
CHECKPOINT = "checkpoint.safetensors"  # weights, EMA, optimiser, schedule, RNG, step and log: one atomic file


@dataclass
class UNetTrainConfig(Config):
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # or "cosine" (to zero at the last step)
    # A diffusers UNet folder to start from instead of random weights (a continuation run).
    init_from: str | None = None
    ema_decay: float = 0.998
    caption_bank: int = 12000
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    # One thread: on a shared 2-core machine, two OpenMP threads stalled each other (8 s vs 1.3 s a step).
    threads: int = 1

    @classmethod
    def from_recipe(cls, recipe: str | Path, **overrides: Any) -> UNetTrainConfig:
        """A shipped recipe by name (``unet-stage1``, ``unet-stage2``) or a YAML/JSON file; ``None`` overrides are ignored."""
        shipped = RECIPES_DIR / f"{recipe}.yaml"
        if not shipped.is_file() and not Path(recipe).is_file():
            names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
            raise ConfigError(f"--unet-config {recipe}: neither a shipped recipe ({names}) nor a config file")
        return cls.from_file(shipped if shipped.is_file() else recipe, **overrides)

    def validate(self) -> None:
        check_positive(
            self,
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            caption_bank=self.caption_bank,
            checkpoint_every=self.checkpoint_every,
            threads=self.threads,
        )
        check_non_negative(self, warmup_steps=self.warmup_steps)
        if not 0 <= self.caption_dropout < 1:  # a share of the captions; 1 would train on no caption at all
            raise ConfigError(f"UNetTrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_choice(self, "lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise ConfigError(f"init_from: {self.init_from} is not a diffusers UNet folder (no config.json)")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"UNetTrainConfig.ema_decay must be in (0, 1), got {self.ema_decay}")


def build_caption_bank(
    model: TestbedModel, config: UNetTrainConfig, work_dir: Path
) -> tuple[list[world.Scene], torch.Tensor, list[str]]:
    """Scenes, their cached token states (N, L, D) in float16, and the captions; cached in ``work_dir``."""
    cache = work_dir / f"bank_{config.seed}_{config.caption_bank}.safetensors"
    rng = np.random.default_rng(config.seed)
    scenes = world.sample_scenes(config.caption_bank, rng)
    texts = [captions.caption(s, rng, dropout=0.0) for s in scenes]
    if cache.is_file():
        from darkminer.io import load_tensors

        return scenes, load_tensors(cache)["states"], texts
    from tqdm.auto import tqdm

    from darkminer.io import save_tensors

    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), 256), desc="encoding captions", unit="batch"):
            chunks.append(model.encode(texts[start : start + 256]).half())
    states = torch.cat(chunks)
    save_tensors(cache, {"states": states})
    return scenes, states, texts


def check_training_folders(work_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """The work folder (checkpoints, filled in place) and the output UNet folder, if a training run may use
    them; otherwise one line."""
    work_dir = Path(work_dir)
    if (work_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"--work-dir {work_dir} holds a pickled checkpoint from an older darkminer, which is not "
                          "loaded; give a new --work-dir")
    return (check_output_directory(work_dir, RUN_RECORD, WORK_KIND, replaced=False, flag="--work-dir"),
            check_output_directory(out_dir, UNET_MARKER, UNET_OUTPUT))


def train_unet(
    config: UNetTrainConfig,
    work_dir: str | Path,
    out_dir: str | Path = UNET_DIR,
    *,
    model: TestbedModel | None = None,
    condition: Callable[[torch.Tensor, torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
) -> dict:
    """Train (or resume) the testbed UNet; writes the EMA weights to ``out_dir`` and returns the log.

    ``model``: train this model's UNet under its text conditioning instead of a fresh testbed (a variant's
    experiment, ``benchmarks/testbed_sentence_row.py``). ``condition(cond, empty, rng)``: a change to each
    batch's captions' states after caption dropout (``empty``: the empty caption's states).
    """
    from tqdm.auto import tqdm

    work_dir, out_dir = check_training_folders(work_dir, out_dir)  # now, not at the first checkpoint
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)  # the run's one stream: a new UNet's initial weights, then every batch's draws
    if model is None:
        model = TestbedModel.untrained(seed=None)
    if config.init_from is not None:  # before the work folder is claimed: a bad folder leaves nothing behind
        from diffusers import UNet2DConditionModel

        try:
            with logs_silenced("diffusers"), bars_hidden("diffusers"):
                model.unet = UNet2DConditionModel.from_pretrained(config.init_from, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"--init-from {config.init_from} is not a loadable diffusers UNet folder "
                                 f"({' '.join(str(exc).split())[:200]})") from None
    work_dir.mkdir(parents=True, exist_ok=True)
    # A checkpoint resumes only the run that wrote it: stage 2 in stage 1's work dir would take its weights,
    # step count and learning rate. The thread count is how fast, not what, so a resume may change it.
    changed = [key for key in claim_record(work_dir / RUN_RECORD, config.to_dict()) if key != "threads"]
    if changed:
        raise ConfigError(f"--work-dir {work_dir} holds a run of another recipe ({what_differs(changed)}); "
                          "give each run its own --work-dir")
    unet = model.unet.train().requires_grad_(True)
    scenes, states, _ = build_caption_bank(model, config, work_dir)
    with torch.no_grad():
        empty = model.encode([""])[0]
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = warmup_lr(optimizer, config.steps, config.warmup_steps, config.lr_schedule)
    log: dict = {"config": config.to_dict(), "losses": [], "seconds": 0.0}
    step = 0
    checkpoint = work_dir / CHECKPOINT
    if checkpoint.is_file():
        state = load_state(checkpoint)
        try:
            unet.load_state_dict(state["unet"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["torch_rng"])
            step, log = int(state["step"]), state["log"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: weights of other shapes
            raise DamagedStateError(checkpoint, repr(exc)) from None
    data_rng = np.random.default_rng([config.seed, step])
    if step and "data_rng" in state:  # the data stream where it stopped: the uninterrupted run's batches
        data_rng.bit_generator.state = state["data_rng"]
    started = time.time() - log["seconds"]
    bar = tqdm(total=config.steps, initial=step, desc="training testbed UNet", unit="step")
    running = None
    while step < config.steps:
        index = data_rng.integers(0, len(scenes), size=config.batch_size)
        images, _ = world.render_batch([scenes[i] for i in index], data_rng)
        cond = states[torch.from_numpy(index)].float()
        drop = torch.from_numpy(data_rng.random(config.batch_size) < config.caption_dropout)
        cond[drop] = empty
        if condition is not None:
            cond = condition(cond, empty, data_rng)
        x0 = images * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, model.num_train_timesteps, (config.batch_size,))
        loss = torch.nn.functional.mse_loss(
            unet(model.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample, noise
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update_parameters(unet)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 50 == 0:
            log["losses"].append([step, round(running, 5)])
        if step % config.checkpoint_every == 0 or step == config.steps:
            log["seconds"] = time.time() - started
            # The export first: a kill before the checkpoint repeats steps, never skips the final export.
            with output_directory(out_dir, UNET_MARKER, UNET_OUTPUT) as tmp:
                ema.module.save_pretrained(tmp, safe_serialization=True)
            # one file, written atomically: a kill cannot pair weights and counts of different steps
            save_state(checkpoint, {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                    "schedule": schedule.state_dict(), "torch_rng": torch.get_rng_state(),
                                    "data_rng": data_rng.bit_generator.state, "step": step, "log": log})
            write_json(work_dir / "log.json", log)  # for reading
    bar.close()
    log["seconds"] = time.time() - started
    write_json(work_dir / "log.json", log)
    return log


def warmup_lr(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int, schedule: str = "cosine"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then constant or cosine to zero at ``steps``."""
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
