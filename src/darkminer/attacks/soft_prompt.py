"""What the optimisation attacks share: token sequences with free slots, projection to real tokens,
the denoising loss, the frozen original as a teacher, and generating + judging images.

One piece of code for all of them, so that CCE, UnlearnDiffAtk and P4D differ only in what they
optimise and against which target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from darkminer.attacks.base import AttackPrompt, SuccessFn
from darkminer.errors import DarkMinerError
from darkminer.models.base import DiffusionModel, per_guidance_scale

# Marks a free slot in a row of token ids given to :func:`build_slotted`.
SLOT = None


@dataclass
class SlottedPrompts:
    """Token ids (B, L) with ``n`` free slots per row whose input embeddings an attack chooses.

    The slots hold the model's placeholder id, so padding masks see a real token there.
    """

    input_ids: torch.LongTensor
    slots: torch.LongTensor  # (B, n) positions of the free slots in each row

    @property
    def n_slots(self) -> int:
        return int(self.slots.shape[1])

    def embeddings(self, model: DiffusionModel, values: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, L, E): the token embeddings with ``values`` ((n, E) shared by all rows,
        or (B, n, E)) written into the slots; differentiable in ``values``."""
        base = model.embed_ids(self.input_ids)
        values = values.to(base)
        if values.ndim == 2:
            values = values.expand(base.shape[0], -1, -1)
        index = self.slots.to(base.device).unsqueeze(-1).expand(-1, -1, base.shape[-1])
        return base.scatter(1, index, values)

    def encode(self, model: DiffusionModel, values: torch.Tensor) -> torch.Tensor:
        """Conditioning states (B, L, D) with ``values`` in the slots."""
        return model.encode_embeddings(self.embeddings(model, values), self.input_ids)

    def with_tokens(self, token_ids: torch.LongTensor) -> torch.LongTensor:
        """The ids with real tokens ((n,) shared or (B, n)) in the slots: a replayable hard prompt."""
        token_ids = token_ids.to(self.input_ids)
        if token_ids.ndim == 1:
            token_ids = token_ids.expand(self.input_ids.shape[0], -1)
        return self.input_ids.scatter(1, self.slots.to(self.input_ids.device), token_ids)


def bos_id(model: DiffusionModel) -> int:
    return int(model.tokenize([""])[0, 0])


def prompt_token_ids(model: DiffusionModel, text: str) -> list[int]:
    """The tokens of ``text`` between the opening and closing special tokens."""
    ids = model.tokenize([text])[0].tolist()
    end = ids.index(model.eos_id, 1) if model.eos_id in ids[1:] else len(ids)
    return ids[1:end]


def build_slotted(model: DiffusionModel, rows: Sequence[Sequence[int | None]]) -> SlottedPrompts:
    """Full token sequences from rows of content ids where :data:`SLOT` marks a free slot.

    Each row gets the opening token, its content, the closing token and padding. Every row must have
    the same number of slots; prompt tokens past the model's length are dropped from the end, slots never.
    """
    if not rows:
        raise DarkMinerError("no prompts to build token sequences for")
    counts = {sum(token is SLOT for token in row) for row in rows}
    if len(counts) != 1:
        raise DarkMinerError(f"rows have different numbers of slots: {sorted(counts)}")
    n_slots = counts.pop()
    room = model.max_length - 2
    if n_slots > room:
        raise DarkMinerError(f"{n_slots} attack tokens do not fit in {model.max_length} token positions; use fewer")
    start, placeholder = bos_id(model), model.placeholder_id
    all_ids, all_slots = [], []
    for row in rows:
        content = list(row)
        while len(content) > room:  # drop the last prompt token (never a slot)
            last_token = max(i for i, token in enumerate(content) if token is not SLOT)
            del content[last_token]
        ids = [start] + [placeholder if token is SLOT else int(token) for token in content] + [model.eos_id]
        ids += [model.pad_id] * (model.max_length - len(ids))
        all_ids.append(ids)
        all_slots.append([1 + i for i, token in enumerate(content) if token is SLOT])
    device = model.token_embedding.weight.device
    return SlottedPrompts(torch.tensor(all_ids, device=device), torch.tensor(all_slots, device=device))


# ------------------------------------------------------------------------------------ vocabulary
def allowed_token_ids(model: DiffusionModel) -> torch.LongTensor:
    """Ids an attack may propose: the whole vocabulary but special/unused tokens."""
    banned = model.special_token_ids
    size = model.token_embedding.weight.shape[0]
    return torch.tensor([i for i in range(size) if i not in banned], device=model.token_embedding.weight.device)


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


def random_token_ids(model: DiffusionModel, shape: tuple[int, ...], generator: torch.Generator) -> torch.LongTensor:
    allowed = allowed_token_ids(model).cpu()
    return allowed[torch.randint(len(allowed), shape, generator=generator)].to(model.token_embedding.weight.device)


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
    """The unattacked verdicts: each prompt's own text on the attacked model."""
    with torch.no_grad():
        cond = model.encode([p.text for p in prompts])
    return judge_conditions(model, cond, prompts, success)
