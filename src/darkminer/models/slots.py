"""Token sequences with free slots whose input embeddings an optimiser chooses: the attacks' adversarial
tokens and Dark Miner's mined ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from darkminer.errors import DarkMinerError
from darkminer.models.base import DiffusionModel

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

    def select(self, rows: torch.Tensor) -> SlottedPrompts:
        """Only the rows ``rows`` (indices)."""
        return SlottedPrompts(self.input_ids[rows.to(self.input_ids.device)], self.slots[rows.to(self.slots.device)])

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


def encode_slotted(
    model: DiffusionModel, slotted: Sequence[SlottedPrompts], values: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Conditioning states of several slotted prompts, each with its own values (and slot count), in one
    text-encoder call: the rows of each, in order."""
    embeds = torch.cat([rows.embeddings(model, v) for rows, v in zip(slotted, values, strict=True)])
    return model.encode_embeddings(embeds, torch.cat([rows.input_ids for rows in slotted]))


def bos_id(model: DiffusionModel) -> int:
    return int(model.tokenize([""])[0, 0])


def prompt_token_ids(model: DiffusionModel, text: str) -> list[int]:
    """The tokens of ``text`` between the opening and closing special tokens."""
    ids = model.tokenize([text])[0].tolist()
    end = ids.index(model.eos_id, 1) if model.eos_id in ids[1:] else len(ids)
    return ids[1:end]


def check_token_room(model: DiffusionModel, n_slots: int, what: str = "free tokens") -> int:
    """The prompt positions between the opening and closing tokens, refusing ``n_slots`` ``what`` past them."""
    room = model.max_length - 2
    if n_slots > room:
        raise DarkMinerError(f"{n_slots} {what} do not fit in this model's prompts, which hold at most {room} "
                             f"between their opening and closing tokens; use {room} or fewer")
    return room


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
    room = check_token_room(model, n_slots)
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


def allowed_token_ids(model: DiffusionModel) -> torch.LongTensor:
    """Ids an attack may propose: the whole vocabulary but special/unused tokens."""
    banned = model.special_token_ids
    size = model.token_embedding.weight.shape[0]
    return torch.tensor([i for i in range(size) if i not in banned], device=model.token_embedding.weight.device)


def random_token_ids(model: DiffusionModel, shape: tuple[int, ...], generator: torch.Generator) -> torch.LongTensor:
    allowed = allowed_token_ids(model).cpu()
    return allowed[torch.randint(len(allowed), shape, generator=generator)].to(model.token_embedding.weight.device)
