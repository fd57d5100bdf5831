"""Mining: the embedding that makes the *current* model most likely to produce the concept's images.

Minimise over c the denoising loss E ||eps - eps_theta(x_t | c, t)||^2 on pool images, the model frozen.
In ``token`` space c is n input-token embeddings passed through the frozen text encoder (what a prompt
can reach; with ``mine_in_context`` the tokens sit inside each pool image's own prompt, which is denoised
under it); in ``condition`` space c is the encoder's output states themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from darkminer.erasers.base import check_finite
from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.erasers.darkminer.pool import ImagePool
from darkminer.erasers.training import embedding_step
from darkminer.models.base import DiffusionModel, host_to_device
from darkminer.models.objectives import curve_ends, denoising_loss, draw_noise_and_timesteps
from darkminer.models.slots import SLOT, SlottedPrompts, build_slotted, prompt_token_ids, random_token_ids
from darkminer.parallel.speed import gradient_scaler


@dataclass
class MinedEmbedding:
    space: str
    values: torch.Tensor  # token: (n, E) input embeddings; condition: (L, D) states
    # Token space: the token sequences the n tokens sit in: one row (the tokens alone), or one per pool
    # prompt (mine_in_context).
    prompts: SlottedPrompts | None = None
    in_context: bool = False

    @classmethod
    def of_tokens(cls, values: torch.Tensor, input_ids: torch.Tensor, slots: list[int]) -> MinedEmbedding:
        """From stored ids, (L,) for the tokens alone or (P, L) in P prompts, and the slot positions every row shares."""
        in_context = input_ids.dim() == 2
        ids = input_ids if in_context else input_ids[None]
        positions = torch.tensor(slots, dtype=torch.long, device=ids.device).repeat(ids.shape[0], 1)
        return cls("token", values, SlottedPrompts(ids, positions), in_context)

    def stored_ids(self) -> tuple[torch.Tensor, list[int]]:
        """The ids and slot positions ``of_tokens`` takes back (token space)."""
        assert self.prompts is not None
        return (self.prompts.input_ids if self.in_context else self.prompts.input_ids[0]), self.prompts.slots[0].tolist()

    def condition(self, model: DiffusionModel, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(1, L, D) conditioning states, or (P, L, D) for tokens mined in P prompts (only ``rows`` of them if given)."""
        if self.prompts is None:
            return self.values[None]
        return (self.prompts if rows is None else self.prompts.select(rows)).encode(model, self.values)

    def detached(self) -> MinedEmbedding:
        """A copy to optimise, in float32 whatever the model's dtype: Adam's steps vanish in half precision."""
        return MinedEmbedding(self.space, self.values.detach().to(torch.float32, copy=True), self.prompts, self.in_context)


def initial_embedding(model: DiffusionModel, word: str, config: DarkMinerConfig, generator: torch.Generator,
                      previous: MinedEmbedding | None, contexts: list[str] | None = None) -> MinedEmbedding:
    """The start of a round's mining; token space puts the slots in ``contexts`` (the pool's prompts) when
    given, else in the empty prompt."""
    if previous is not None and config.init == "previous":
        return previous.detached()
    if config.space == "condition":
        if config.init == "random":
            values = torch.randn(model.max_length, model.encode([""]).shape[-1], generator=generator).to(model.device)
        else:
            values = model.encode([word])[0]
        return MinedEmbedding("condition", values.detach().clone())
    prompts = build_slotted(model, [[SLOT] * config.n_tokens + prompt_token_ids(model, c) for c in contexts or [""]])
    table = model.token_embedding.weight.detach()
    if config.init == "random":
        pick = random_token_ids(model, (config.n_tokens,), generator)
    else:
        word_ids = [i for i in model.tokenize([word])[0].tolist() if i not in model.special_token_ids]
        pick = torch.tensor([word_ids[i % len(word_ids)] for i in range(config.n_tokens)])
    return MinedEmbedding("token", table[pick.to(table.device)].clone(), prompts, in_context=bool(contexts))


def mine(model: DiffusionModel, pool: ImagePool, start: MinedEmbedding, config: DarkMinerConfig,
         generator: torch.Generator) -> tuple[MinedEmbedding, dict]:
    """Optimise ``start`` against the current model (adapter on, weights frozen)."""
    mined = start.detached()
    values = mined.values.requires_grad_(True)
    optimizer = torch.optim.Adam([values], lr=config.mining_lr)
    scaler = gradient_scaler(model)
    # Read once at the end (no per-step host sync), so a diverged loss stops the run after the last step.
    step_losses = torch.zeros(config.mining_steps, device=model.device)
    for step in range(config.mining_steps):
        index = host_to_device(pool.pick(config.k, generator), pool.latents.device)
        latents = pool.latents[index]
        noise, t = draw_noise_and_timesteps(model, latents, generator)
        # In context each image is denoised under its own prompt with the tokens; alone, under the tokens.
        cond = mined.condition(model, index if config.mine_in_context else None)
        loss = denoising_loss(model, latents, cond.expand(len(latents), -1, -1), t, noise)
        embedding_step(values, loss, optimizer, scaler)  # the adapter's parameters must not accumulate any here
        step_losses[step] = loss.detach()
    losses = [check_finite(value, "mining", "lower mining_lr") for value in step_losses.tolist()]
    mined = mined.detached()
    start, end = curve_ends(losses, 5)
    return mined, {"loss_start": start, "loss_end": end}
