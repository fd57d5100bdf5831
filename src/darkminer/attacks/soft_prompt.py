"""What the optimisation attacks share: projection to real tokens, the frozen original as a teacher,
generating + judging images, and the per-prompt skeleton of UnlearnDiffAtk and P4D (token sequences with
free slots are ``models.slots``, the denoising loss ``models.objectives``, which Dark Miner's mining shares).

One piece of code for all of them, so that CCE, UnlearnDiffAtk and P4D differ only in what they
optimise and against which target.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from tqdm.auto import tqdm

from darkminer.attacks.base import Attack, AttackConfig, AttackPrompt, AttackResult, SuccessFn, unattacked
from darkminer.attacks.journal import search_journal
from darkminer.config import check_positive
from darkminer.errors import DarkMinerError
from darkminer.models.base import DiffusionModel, per_guidance_scale
from darkminer.parallel import init_processes
from darkminer.targets import EraseTarget

R = TypeVar("R")


# ------------------------------------------------------------------------------------ vocabulary
def nearest_token_ids(model: DiffusionModel, embeds: torch.Tensor) -> torch.LongTensor:
    """The nearest real token (cosine, special tokens excluded) of each embedding (..., E)."""
    flat = embeds.detach().reshape(-1, embeds.shape[-1])
    ids, _ = model.nearest_tokens(flat, k=1)
    return ids[:, 0].reshape(embeds.shape[:-1])


def project_straight_through(model: DiffusionModel, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
    """Forward with the nearest real tokens' embeddings, backward to the continuous ones (PEZ)."""
    ids = nearest_token_ids(model, embeds)
    projected = model.token_embedding.weight.detach()[ids].to(embeds)
    return embeds + (projected - embeds).detach(), ids


# ---------------------------------------------------------------------------------------- teacher
def teacher(model: DiffusionModel, original: DiffusionModel | None) -> tuple[DiffusionModel, bool]:
    """The model before erasure and the ``adapter`` flag that selects it: a separate object, or the
    attacked model itself with its adapter/edits switched off."""
    if original is None or original is model:
        return model, False
    return original, True


@contextmanager
def as_original(model: DiffusionModel, original: DiffusionModel | None) -> Iterator[DiffusionModel]:
    """The model before erasure, for the block: a separate object as it is, or the attacked model with its
    adapter and edits switched off (its text encoder's among them)."""
    if original is None or original is model:
        with model.original():
            yield model
    else:
        yield original


def teacher_eps(
    model: DiffusionModel, original: DiffusionModel | None, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    source, adapter = teacher(model, original)
    return source.eps(x_t, t, cond, adapter=adapter)


# ------------------------------------------------------------------------------ images and judging
def sample_prompts(
    model: DiffusionModel,
    cond: torch.Tensor,
    prompts: Sequence[AttackPrompt],
    *,
    adapter: bool = True,
) -> torch.Tensor:
    """One image per prompt from conditioning states (B, L, D), each with the prompt's seed and guidance."""
    if cond.shape[0] != len(prompts):
        raise DarkMinerError(f"{cond.shape[0]} conditionings for {len(prompts)} prompts")
    return per_guidance_scale([p.guidance for p in prompts], lambda rows, scale: model.sample(
        cond[rows], seeds=[prompts[i].seed for i in rows], guidance_scale=scale, adapter=adapter))


def original_images(
    model: DiffusionModel, original: DiffusionModel | None, prompts: Sequence[AttackPrompt]
) -> torch.Tensor:
    """Images of the prompts drawn by the model before erasure (the attack targets)."""
    with torch.no_grad(), as_original(model, original) as source:
        return sample_prompts(source, source.encode([p.text for p in prompts]), prompts)


def judge(success: SuccessFn, images: torch.Tensor) -> list[bool]:
    verdict = success(images)
    if verdict.shape[0] != images.shape[0]:
        raise DarkMinerError(f"the success function returned {verdict.shape[0]} verdicts for {images.shape[0]} images")
    return [bool(v) for v in verdict.tolist()]


@torch.no_grad()
def judge_conditions(
    model: DiffusionModel, cond: torch.Tensor, prompts: Sequence[AttackPrompt], success: SuccessFn
) -> list[bool]:
    """Whether the attacked model draws the concept for each conditioning, with each prompt's seed."""
    return judge(success, sample_prompts(model, cond, prompts))


@torch.no_grad()
def still_failing(
    model: DiffusionModel, searching: list[int], ids: list[torch.LongTensor], prompts: Sequence[AttackPrompt],
    success: SuccessFn, after: list[bool],
) -> list[int]:
    """Judge the current hard prompt ``ids[i]`` of each search ``i`` in ``searching`` (one batch), record its
    verdict in ``after[i]``, and return the searches that still fail: the others stop at their success."""
    cond = model.encode_ids(torch.cat([ids[i] for i in searching]))
    verdicts = judge_conditions(model, cond, [prompts[i] for i in searching], success)
    for i, ok in zip(searching, verdicts, strict=True):
        after[i] = ok
    return [i for i, ok in zip(searching, verdicts, strict=True) if not ok]


def judge_texts(model: DiffusionModel, prompts: Sequence[AttackPrompt], success: SuccessFn) -> list[bool]:
    """The unattacked verdicts: each prompt's own text on the attacked model. Under a launcher every process
    calls it and gets the main process's verdicts: what the attacks then search (and share out) must be the
    same everywhere, and GPUs need not round a borderline image alike."""
    with torch.no_grad():
        cond = model.encode([p.text for p in prompts])
    return init_processes().broadcast_object(judge_conditions(model, cond, prompts, success))


def search_in_batches(
    search: Callable[[list[int]], Sequence[R]], indices: Sequence[int], size: int
) -> list[tuple[R, float]]:
    """``search`` of every prompt (by its index in the attacked list), ``size`` prompts per call, with each
    prompt's seconds (its equal share of its batch's). The batches are fixed blocks of ``indices`` and the
    searches independent (each seeded by its prompt), so under a launcher each process runs a block of
    batches and all get every result (``Processes.map_items``). Within ``journal.resumable`` (``run_attack``
    into a folder), each search is written to the journal as its batch ends, and a batch whose prompts the
    journal all holds is read back, not searched again: a killed attack resumes where it stopped. A batch
    the journal holds only in part is searched whole again, so that it finds what it found the first time."""
    journal = search_journal()
    processes = init_processes()
    # The main process's reading on every process: all must search the same prompts.
    done = {} if journal is None else processes.on_main(lambda: journal.read(indices))

    batches = [list(indices[start : start + size]) for start in range(0, len(indices), size)]
    todo = [batch for batch in batches if not all(i in done for i in batch)]
    # Counts this process's share of the searches (the CLI shows only the main process's output); a resume
    # counts only what is left. No bar where the journal holds every search (and never disable=False, which
    # would override TQDM_DISABLE=1).
    bar = tqdm(total=sum(len(todo[b]) for b in processes.share(len(todo))), desc="searching", unit="prompt",
               leave=False, **({} if todo else {"disable": True}))

    def timed(batch: list[int]) -> list[tuple[R, float]]:
        started = time.time()
        found = list(search(batch))
        bar.update(len(batch))
        if len(found) != len(batch):
            raise DarkMinerError(f"a search returned {len(found)} results for {len(batch)} prompts")
        seconds = (time.time() - started) / len(batch)
        if journal is not None:  # by the process that searched it: its work survives a kill of the others
            for index, one in zip(batch, found, strict=True):
                journal.write(index, one, seconds)
        return [(one, seconds) for one in found]

    with bar:
        fresh = {i: result for batch, results in zip(todo, processes.map_items(timed, todo), strict=True)
                 for i, result in zip(batch, results, strict=True)}
    return [fresh[i] if i in fresh else done[i] for i in indices]


# ------------------------------------------------------------------------------ per-prompt attacks
@dataclass
class PromptwiseConfig(AttackConfig):
    # Prompts whose searches run together, one batched UNet call per step (each keeps its own randomness,
    # optimiser state, loss and early stop, so a prompt's search does not depend on the others' but for
    # the rounding of batched arithmetic, and under fp16 the one loss scaler: an overflow skips the batch's
    # step). 1 = the authors' one-prompt-at-a-time loop.
    search_batch: int = 1

    def validate(self) -> None:
        check_positive(self, search_batch=self.search_batch)


class PromptwiseAttack(Attack):
    """An attack that searches each prompt on its own, toward a target image of it, once the goal is checked:
    a prompt whose own text already makes the attacked model draw the concept is not attacked (it counts as
    broken either way, as the UnlearnDiffAtk authors count). ``search_batch`` prompts are searched side by
    side. Each result's ``seconds`` is its share of the unattacked judging, of the target drawing and of its
    batch's search."""

    config_class: ClassVar[type[AttackConfig]] = PromptwiseConfig
    unattacked_extra: ClassVar[dict[str, int]] = {}  # what a result records where no budget was spent

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
        shared = (time.time() - started) / len(prompts)
        results = [unattacked(model, p, ok, shared, **self.unattacked_extra) for p, ok in zip(prompts, before, strict=True)]
        todo = [i for i, ok in enumerate(before) if not ok]
        if todo:
            started = time.time()
            with torch.no_grad():
                targets = self.target_latents(model, original, [prompts[i] for i in todo], success)
            drawn = (time.time() - started) / len(todo)
            # The targets above are drawn whole by every process, in one process's batches (and again on a
            # resume), so that a search shared out or resumed finds what it finds in one uninterrupted process.
            aim = dict(zip(todo, targets, strict=True))
            cfg: PromptwiseConfig = self.config  # type: ignore[assignment]
            searched = search_in_batches(
                lambda batch: self.search(model, original, [prompts[i] for i in batch], [aim[i] for i in batch],
                                          success),
                todo, cfg.search_batch)
            for i, (found, seconds) in zip(todo, searched, strict=True):
                found.seconds = shared + drawn + seconds
                results[i] = found
        return results

    def generator(self, prompt: AttackPrompt) -> torch.Generator:
        """The search's randomness for one prompt: the attack's seed plus the prompt's (which a CSV may set
        up to 2**64 - 1, so the sum wraps into torch's seed range)."""
        return torch.Generator().manual_seed((self.config.seed + prompt.seed) % 2**64)

    @abstractmethod
    def target_latents(
        self, model: DiffusionModel, original: DiffusionModel | None, prompts: Sequence[AttackPrompt], success: SuccessFn
    ) -> Sequence[torch.Tensor]:
        """The latents (1, C, H, W) that each prompt's search aims at, drawn by the model before erasure."""

    @abstractmethod
    def search(
        self, model: DiffusionModel, original: DiffusionModel | None, prompts: Sequence[AttackPrompt],
        x0s: Sequence[torch.Tensor], success: SuccessFn,
    ) -> list[AttackResult]:
        """Search, side by side, prompts that the attacked model does not draw the concept for, each toward its
        target latents (1, C, H, W)."""
