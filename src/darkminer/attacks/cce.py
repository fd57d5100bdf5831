"""CCE -- Circumventing Concept Erasure (Pham et al., ICLR 2024): textual inversion against the erased model.

A new token (``num_vectors`` input embeddings) is learned so that the *erased* model, conditioned on
captions that hold the token, best denoises images of the concept drawn by the *original* model. The
token then stands in for the concept's words in every attacked prompt. One embedding serves all
prompts (a universal attack), so it replays on any model with the same text encoder.

Defaults follow the authors' ESD script (NYU-DICE-Lab/circumventing-concept-erasure, ``esd/train.sh``
and ``esd/concept_inversion.py``, itself diffusers' textual-inversion example): 25 training images,
batch 4 x 4 accumulated, 5000 steps, AdamW at 5e-3 scaled by the effective batch (0.08), weight decay
1e-2, constant rate, random horizontal flips, one vector initialised from a real token. Captions are our
choice: the generating prompt with its concept phrase replaced by the token (the token in front when the
prompt does not name the concept), so that training captions are the prompts the attack then uses. The
authors' ESD script puts the token into fixed style templates instead, and their I2P mode puts it in front
of the whole, unchanged prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from darkminer.attacks.base import (
    Attack,
    AttackConfig,
    AttackPrompt,
    AttackResult,
    SuccessFn,
    register_attack,
    unattacked,
)
from darkminer.attacks.journal import attack_work_directory
from darkminer.attacks.prompts import concept_phrases
from darkminer.attacks.soft_prompt import judge_conditions, judge_texts, original_images
from darkminer.config import check_non_negative, check_positive
from darkminer.errors import DamagedStateError, DarkMinerError
from darkminer.io import load_state, save_state
from darkminer.models.base import DiffusionModel, host_to_device
from darkminer.models.objectives import curve_ends, denoising_loss, draw_noise_and_timesteps
from darkminer.models.slots import (
    SLOT,
    SlottedPrompts,
    build_slotted,
    check_token_room,
    prompt_token_ids,
)
from darkminer.parallel import init_processes
from darkminer.parallel.speed import gradient_scaler
from darkminer.prompts import split_at_concept
from darkminer.targets import EraseTarget

CHECKPOINT_NAME = "cce_training.safetensors"  # in the attack's work directory


@dataclass
class CCEConfig(AttackConfig):
    num_vectors: int = 1  # input embeddings the new token spans
    num_images: int = 25  # concept images drawn by the original model (authors: --num_train_images=25)
    steps: int = 5000  # optimiser steps (authors: --max_train_steps=5000)
    batch_size: int = 4
    gradient_accumulation: int = 4
    learning_rate: float = 5e-3
    scale_lr: bool = True  # multiply the rate by batch_size * gradient_accumulation, as --scale_lr does
    weight_decay: float = 1e-2
    flip: bool = True  # random horizontal flips of the training images (textual-inversion default)
    # The real token whose embedding starts the search; empty: the first token of the concept's word.
    initializer: str = ""
    checkpoint_every: int = 100  # ours: steps between the training states a killed run resumes from

    def validate(self) -> None:
        check_positive(self, num_vectors=self.num_vectors, num_images=self.num_images, steps=self.steps,
                       batch_size=self.batch_size, gradient_accumulation=self.gradient_accumulation,
                       learning_rate=self.learning_rate, checkpoint_every=self.checkpoint_every)
        check_non_negative(self, weight_decay=self.weight_decay)

    @property
    def effective_learning_rate(self) -> float:
        scale = self.batch_size * self.gradient_accumulation if self.scale_lr else 1
        return self.learning_rate * scale


def slotted_captions(model: DiffusionModel, target: EraseTarget, texts: Sequence[str], n_vectors: int) -> SlottedPrompts:
    """Each text with its concept phrase replaced by the learned token (or the token put in front)."""
    phrases = concept_phrases(target)
    rows = []
    for text in texts:
        before, after = split_at_concept(text, phrases)
        head = prompt_token_ids(model, before) if before else []
        rows.append(head + [SLOT] * n_vectors + prompt_token_ids(model, after))
    return build_slotted(model, rows)


class TrainingCheckpoint:
    """The token's training state (the token, AdamW's moments, the loss scale, the generator's state, the
    losses so far) in the running attack's work directory, so that a killed run resumes at its last checkpoint
    and ends with the token of an uninterrupted one. All processes hold the same state (their gradients are
    summed, their generators kept in step): the main one writes it and reads it for all."""

    def __init__(self, token: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 generator: torch.Generator) -> None:
        work_dir = attack_work_directory()
        self.path = None if work_dir is None else work_dir / CHECKPOINT_NAME
        self.token, self.optimizer, self.scaler, self.generator = token, optimizer, scaler, generator

    def resume(self) -> tuple[int, list[float]]:
        """The step to go on from and the losses of the steps before it (0 and none: from the start)."""
        path = self.path
        state = None if path is None else init_processes().on_main(lambda: load_state(path) if path.is_file() else None)
        if state is None:
            return 0, []
        try:
            if state["token"].shape != self.token.shape:  # copy_ would broadcast a (1, dim) token silently
                raise ValueError(f"a token of shape {tuple(state['token'].shape)}")
            with torch.no_grad():
                self.token.copy_(state["token"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.generator.set_state(state["generator"])
            return int(state["step"]), [float(loss) for loss in state["losses"]]
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # Runtime: a token's shape
            raise DamagedStateError(path, repr(exc)) from None

    def save(self, step: int, losses: list[float]) -> None:
        if self.path is None:  # no work directory: nothing to resume into
            return
        state = {"step": step, "losses": losses, "token": self.token, "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "generator": self.generator.get_state()}
        path = self.path
        init_processes().on_main(lambda: save_state(path, state))


@register_attack("cce")
class ConceptInversion(Attack):
    config_class = CCEConfig

    def check_model(self, model: DiffusionModel) -> None:
        check_token_room(model, self.config.num_vectors, "learned token's vectors (CCEConfig.num_vectors)")

    def learn_token(
        self, model: DiffusionModel, target: EraseTarget, original: DiffusionModel | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The learned token's input embeddings (num_vectors, E) and a training summary."""
        cfg: CCEConfig = self.config  # type: ignore[assignment]
        if not target.prompts:
            raise DarkMinerError(f"target {target.name!r} has no prompts to draw concept images from")
        generator = torch.Generator().manual_seed(cfg.seed)
        pool = [AttackPrompt(target.prompts[i % len(target.prompts)], cfg.seed + i) for i in range(cfg.num_images)]
        images = original_images(model, original, pool)
        with torch.no_grad():
            latents = model.images_to_latents(images)
        captions = slotted_captions(model, target, [p.text for p in pool], cfg.num_vectors)
        token = self._initial_embedding(model, target).repeat(cfg.num_vectors, 1).requires_grad_(True)
        optimizer = torch.optim.AdamW([token], lr=cfg.effective_learning_rate, weight_decay=cfg.weight_decay)
        scaler = gradient_scaler(model)
        # Under a launcher each process takes its block of the accumulated batches and the gradients are summed:
        # every process draws every batch's randomness, so all keep one generator and learn the same token.
        processes = init_processes()
        mine = processes.share(cfg.gradient_accumulation)
        # Each process's part of each step's loss, read (and summed over the processes) only at checkpoints and at
        # the end: no per-step host sync, so a diverged loss stops the run after the last step.
        step_losses = torch.zeros(cfg.steps, device=latents.device)
        checkpoint = TrainingCheckpoint(token, optimizer, scaler, generator)
        start, losses = checkpoint.resume()
        for step in tqdm(range(start, cfg.steps), desc="CCE", unit="step", initial=start, total=cfg.steps, leave=False):
            optimizer.zero_grad()
            for batch in range(cfg.gradient_accumulation):
                rows = host_to_device(torch.randint(len(pool), (cfg.batch_size,), generator=generator), latents.device)
                flips = torch.rand(cfg.batch_size, generator=generator) < 0.5 if cfg.flip else None
                x0 = latents[rows]
                noise, t = draw_noise_and_timesteps(model, x0, generator)
                if batch not in mine:
                    continue
                if flips is not None:
                    x0 = torch.where(host_to_device(flips.view(-1, 1, 1, 1), x0.device), x0.flip(-1), x0)
                cond = captions.select(rows).encode(model, token)
                loss = denoising_loss(model, x0, cond, t, noise) / cfg.gradient_accumulation
                scaler.scale(loss).backward()
                step_losses[step] += loss.detach()
            if processes.distributed:
                if not mine:  # more processes than accumulated batches: a zero gradient, through the scaler
                    scaler.scale(token.sum() * 0).backward()  # (which must have scaled something to step)
                processes.sum_(token.grad)
            scaler.step(optimizer)
            scaler.update()
            if checkpoint.path is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                losses += processes.sum_(step_losses[len(losses) : step + 1].clone()).tolist()
                checkpoint.save(step + 1, losses)
        losses += processes.sum_(step_losses[len(losses) :].clone()).tolist()
        # The token too: a NaN gradient behind a finite loss (e.g. a half-precision overflow) spoils it silently.
        if not all(math.isfinite(value) for value in losses) or not torch.isfinite(token).all():
            raise DarkMinerError("CCE: the loss became NaN/inf; lower learning_rate")
        first, last = curve_ends(losses, 10)
        summary = {"loss_first": first, "loss_last": last, "steps": cfg.steps}
        return token.detach(), summary

    def _initial_embedding(self, model: DiffusionModel, target: EraseTarget) -> torch.Tensor:
        word = self.config.initializer or target.word
        ids = prompt_token_ids(model, word)
        if not ids:
            raise DarkMinerError(f"CCE initializer {word!r} has no tokens; set `initializer` to a real word")
        return model.token_embedding.weight.detach()[ids[0]].to(torch.float32, copy=True).unsqueeze(0)

    def run(
        self,
        model: DiffusionModel,
        target: EraseTarget,
        prompts: Sequence[AttackPrompt],
        success: SuccessFn,
        original: DiffusionModel | None = None,
    ) -> list[AttackResult]:
        started = time.time()
        before = judge_texts(model, prompts, success)
        if all(before):  # the token is shared by all prompts; none needs it
            seconds = (time.time() - started) / len(prompts)
            return [unattacked(model, p, True, seconds, steps=0) for p in prompts]
        token, summary = self.learn_token(model, target, original)
        slotted = slotted_captions(model, target, [p.text for p in prompts], self.config.num_vectors)
        with torch.no_grad():
            embeddings = slotted.embeddings(model, token)
            cond = model.encode_embeddings(embeddings, slotted.input_ids)
        after = judge_conditions(model, cond, prompts, success)
        seconds = (time.time() - started) / len(prompts)
        marker = "<cce>" * self.config.num_vectors
        results = []
        for i, prompt in enumerate(prompts):
            before_text, after_text = split_at_concept(prompt.text, concept_phrases(target))
            results.append(AttackResult(
                prompt=prompt,
                adversarial_text=" ".join(f"{before_text} {marker} {after_text}".split()),
                success_before=before[i],
                success_after=after[i],
                input_ids=slotted.input_ids[i].tolist(),
                embeddings=embeddings[i].detach().cpu(),
                seconds=seconds,
                extra={"slots": slotted.slots[i].tolist(), **summary},
            ))
        return results
