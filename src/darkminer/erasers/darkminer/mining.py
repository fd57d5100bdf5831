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
from darkminer.models.base import DiffusionModel, host_to_device
from darkminer.models.objectives import denoising_loss, draw_noise_and_timesteps
from darkminer.parallel.speed import gradient_scaler


@dataclass
class MinedEmbedding:
    space: str
    values: torch.Tensor  # token: (n, E) input embeddings; condition: (L, D) states
    # Token space: the ids with slots, (L,) for the tokens alone or (P, L) for them in P prompts
    # (mine_in_context); for masks and positions.
    input_ids: torch.Tensor | None
    slots: list[int]

    @property
    def in_context(self) -> bool:
        """Whether the tokens were mined inside prompts (one row of ids per prompt)."""
        return self.input_ids is not None and self.input_ids.dim() == 2

    def condition(self, model: DiffusionModel, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(1, L, D) conditioning states, or (P, L, D) for tokens mined in P prompts (only ``rows`` of them if given)."""
        if self.space == "condition":
            return self.values[None]
        ids = self.input_ids if self.in_context else self.input_ids[None]
        ids = ids if rows is None else ids[rows.to(ids.device)]
        embeds = model.embed_ids(ids).detach().clone()
        embeds[:, self.slots] = self.values.to(embeds.dtype)
        return model.encode_embeddings(embeds, ids)

    def detached(self) -> MinedEmbedding:
        """A copy to optimise, in float32 whatever the model's dtype: Adam's steps vanish in half precision."""
        return MinedEmbedding(self.space, self.values.detach().to(torch.float32, copy=True), self.input_ids, self.slots)


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
        return MinedEmbedding("condition", values.detach().clone(), None, [])
    ids, slots = model.insert_slots(contexts or [""], config.n_tokens)
    table = model.token_embedding.weight.detach()
    if config.init == "random":
        allowed = [i for i in range(table.shape[0]) if i not in model.special_token_ids]
        pick = torch.tensor(allowed)[torch.randint(len(allowed), (config.n_tokens,), generator=generator)]
    else:
        word_ids = [i for i in model.tokenize([word])[0].tolist() if i not in model.special_token_ids]
        pick = torch.tensor([word_ids[i % len(word_ids)] for i in range(config.n_tokens)])
    return MinedEmbedding("token", table[pick.to(table.device)].clone(), ids if contexts else ids[0], slots)


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
        # Gradients for the embedding only: the adapter's parameters must not accumulate any here.
        (grad,) = torch.autograd.grad(scaler.scale(loss), [values])
        values.grad = grad
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step_losses[step] = loss.detach()
    losses = [check_finite(value, "mining", "lower mining_lr") for value in step_losses.tolist()]
    mined = mined.detached()
    head = max(1, len(losses) // 5)
    return mined, {"loss_start": sum(losses[:head]) / head, "loss_end": sum(losses[-head:]) / head}
