"""The linear algebra of closed-form cross-attention edits, shared by UCE and RECE.

A cross-attention key or value projection W maps text states c to k = W c. UCE (Gandikota et al.,
WACV 2024) rewrites W so that chosen text states c_i map to chosen outputs v_i* while the rest of W is
kept, by solving

    min_W'  λ ||W' - W||² + Σ_i s_i ||W' c_i - v_i*||²
    =>  W' = (λ W + Σ_i s_i v_i* c_iᵀ) (λ I + Σ_i s_i c_i c_iᵀ)⁻¹

RECE (Gong et al., ECCV 2024) alternates that edit with the closed-form text states c' that make the
edited projections reproduce what the original ones gave for the concept:

    min_c'  Σ_l ||W_l c' - W⁰_l c||² + γ ||c'||²   =>   c' = (Σ W_lᵀ W_l + γ I)⁻¹ (Σ W_lᵀ W⁰_l) c
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from darkminer.errors import ConfigError
from darkminer.models.adapters import TARGET_PRESETS, target_module_names
from darkminer.models.base import DiffusionModel
from darkminer.targets import EraseTarget


@dataclass(frozen=True)
class EditTerm:
    """Rows ``keys`` (N, D) that the edited projection must map to ``values`` (N, O), with a weight."""

    keys: torch.Tensor
    values: torch.Tensor
    scale: float


def kv_projection_weights(model: DiffusionModel) -> dict[str, torch.nn.Parameter]:
    """The weight of every cross-attention key and value projection, by parameter name."""
    params = dict(model.unet.named_parameters())
    return {f"{name}.weight": params[f"{name}.weight"] for name in target_module_names(model, TARGET_PRESETS["cross-attn-kv"])}


def closed_form_edit(weight: torch.Tensor, terms: Sequence[EditTerm], lamb: float) -> torch.Tensor:
    """W' = (λW + Σ s VᵀK)(λI + Σ s KᵀK)⁻¹, computed in float64 (the Gram matrix can be ill-conditioned)."""
    w = weight.detach().double()
    lhs = lamb * w
    gram = lamb * torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    for term in terms:
        keys, values = term.keys.detach().double(), term.values.detach().double()
        lhs = lhs + term.scale * values.T @ keys
        gram = gram + term.scale * keys.T @ keys
    # gram is symmetric, so lhs @ gram⁻¹ = solve(gram, lhsᵀ)ᵀ.
    return torch.linalg.solve(gram, lhs.T).T.to(weight.dtype)


def adversarial_states(
    current: Sequence[torch.Tensor], original: Sequence[torch.Tensor], states: torch.Tensor, regularisation: float
) -> torch.Tensor:
    """RECE's c' (L, D) for text states ``states`` (L, D), given the edited and original projections."""
    dim = states.shape[-1]
    gram = regularisation * torch.eye(dim, dtype=torch.float64, device=states.device)
    cross = torch.zeros(dim, dim, dtype=torch.float64, device=states.device)
    for w, w0 in zip(current, original, strict=True):
        w, w0 = w.detach().double(), w0.detach().double()
        gram = gram + w.T @ w
        cross = cross + w.T @ w0
    coefficients = torch.linalg.solve(gram, cross)
    return (states.detach().double() @ coefficients.T).to(states.dtype)


def token_count(model: DiffusionModel, prompt: str) -> int:
    """Tokens of ``prompt`` with its start and end tokens, as the encoder sees it (truncated)."""
    return min(len(model.tokenizer(prompt, truncation=True, max_length=model.max_length).input_ids), model.max_length)


@torch.no_grad()
def aligned_tails(model: DiffusionModel, source: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper-era UCE's keys and targets: the states of each prompt from its last word onwards (last
    word, end token, padding), cut to the same length so that position i of one pairs with position i
    of the other."""
    states = model.encode([source, guide])
    # An empty prompt has no word: its "last word" index is 0, the start token, as in the authors' code.
    starts = [token_count(model, p) - 2 for p in (source, guide)]
    length = model.max_length - max(starts)
    return states[0, starts[0] : starts[0] + length], states[1, starts[1] : starts[1] + length]


@torch.no_grad()
def edit_projections(
    weights: dict[str, torch.nn.Parameter],
    erase: Sequence[tuple[torch.Tensor, torch.Tensor]],
    preserve: Sequence[torch.Tensor],
    *,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> None:
    """One UCE edit of every projection in place: the text states of each erase pair (keys, guide states)
    map to what the projection gave for the guide, and preserved states keep their current outputs.
    Targets use each projection's current weight, as both UCE's and RECE's code do."""
    for weight in weights.values():
        terms = [EditTerm(keys, guide @ weight.T, erase_scale) for keys, guide in erase]
        terms += [EditTerm(states, states @ weight.T, preserve_scale) for states in preserve]
        weight.copy_(closed_form_edit(weight, terms, lamb))


def preserve_scale_for(scale: float | None, n_preserved: int) -> float:
    """``scale``, or, when unset, the UCE authors' rule: max(0.1, 1 / #preserved prompts)."""
    return max(0.1, 1.0 / n_preserved) if scale is None else scale


@dataclass(frozen=True)
class UceEdit:
    """What ``uce_edit`` did, for the erasers built on it: the edited weights and the preserved states."""

    weights: dict[str, torch.nn.Parameter]
    preserve: list[torch.Tensor]
    preserve_scale: float


def uce_edit(
    model: DiffusionModel, target: EraseTarget, *, erase_scale: float, preserve_scale: float | None, lamb: float,
    preserve_prompts: int,
) -> UceEdit:
    """UCE's erasure of ``target`` (train_erase.py, "replace"): the concept's aligned text states map to the
    anchor's, the empty prompt and the target's first ``preserve_prompts`` ordinary prompts are preserved.
    The projections' originals are remembered first, so ``model.original()`` stays the model before it."""
    if preserve_prompts > len(target.preserve):
        raise ConfigError(f"preserve_prompts {preserve_prompts} is more than the {len(target.preserve)} ordinary "
                          f"prompts the target has; use at most {len(target.preserve)}")
    weights = kv_projection_weights(model)
    model.remember_originals(list(weights))
    preserve = list(model.encode([""] + list(target.preserve[:preserve_prompts])).detach())
    scale = preserve_scale_for(preserve_scale, len(preserve))
    edit_projections(weights, [aligned_tails(model, target.word, target.anchor)], preserve,
                     erase_scale=erase_scale, preserve_scale=scale, lamb=lamb)
    return UceEdit(weights, preserve, scale)
