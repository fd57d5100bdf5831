"""What the optimisation attacks share: projection to real tokens, the frozen original as a teacher,
generating + judging images, and the per-prompt skeleton of UnlearnDiffAtk and P4D (token sequences with
free slots are ``models.slots``, the denoising loss ``models.objectives``, which Dark Miner's mining shares).

One piece of code for all of them, so that CCE, UnlearnDiffAtk and P4D differ only in what they
optimise and against which target.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import torch

from darkminer.attacks.base import Attack, AttackPrompt, AttackResult, SuccessFn, unattacked
from darkminer.attacks.journal import search_journal
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
    source, adapter = teacher(model, original)
    with torch.no_grad():
        return sample_prompts(source, source.encode([p.text for p in prompts]), prompts, adapter=adapter)


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


def judge_texts(model: DiffusionModel, prompts: Sequence[AttackPrompt], success: SuccessFn) -> list[bool]:
    """The unattacked verdicts: each prompt's own text on the attacked model. Under a launcher every process
    calls it and gets the main process's verdicts: what the attacks then search (and share out) must be the
    same everywhere, and GPUs need not round a borderline image alike."""
    with torch.no_grad():
        cond = model.encode([p.text for p in prompts])
    return init_processes().broadcast_object(judge_conditions(model, cond, prompts, success))


def search_each(search: Callable[[int], R], indices: Sequence[int]) -> list[tuple[R, float]]:
    """``search`` of every prompt (by its index in the attacked list), with its seconds. The searches are
    independent (each seeded by its prompt), so under a launcher each process runs a block of them and all
    get every result (``Processes.map_items``). Within ``journal.resumable`` (``run_attack`` into a folder),
    each search is written to the journal as it ends, and the prompts the journal holds are read back, not
    searched again: a killed attack resumes where it stopped."""
    journal = search_journal()
    processes = init_processes()
    # The main process's reading on every process: all must search the same prompts.
    done = {} if journal is None else processes.on_main(lambda: journal.read(indices))

    def timed(index: int) -> tuple[R, float]:
        started = time.time()
        found = search(index)
        seconds = time.time() - started
        if journal is not None:  # by the process that searched it: its work survives a kill of the others
            journal.write(index, found, seconds)
        return found, seconds

    todo = [i for i in indices if i not in done]
    fresh = dict(zip(todo, processes.map_items(timed, todo), strict=True))
    return [done[i] if i in done else fresh[i] for i in indices]


# ------------------------------------------------------------------------------ per-prompt attacks
class PromptwiseAttack(Attack):
    """An attack that searches each prompt on its own, toward a target image of it, once the goal is checked:
    a prompt whose own text already makes the attacked model draw the concept is not attacked (it counts as
    broken either way, as the UnlearnDiffAtk authors count). Each result's ``seconds`` is its share of the
    unattacked judging and of the target drawing, plus its own search."""

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
            searched = search_each(lambda i: self.search(model, original, prompts[i], aim[i], success), todo)
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
        self, model: DiffusionModel, original: DiffusionModel | None, prompt: AttackPrompt, x0: torch.Tensor,
        success: SuccessFn,
    ) -> AttackResult:
        """Search one prompt that the attacked model does not draw the concept for."""
