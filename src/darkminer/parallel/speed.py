"""The GPU path as options: mixed precision, the attention kernel, gradient checkpointing, channels-last,
``torch.compile`` of the UNet.

``apply_speed_options(model, SpeedOptions(precision="bf16", ...))`` switches a loaded model in place and
can be called again to switch back. What is not an option because it always holds: classifier-free
guidance runs both branches in one batched UNet call (``ClassifierFreeGuidance``), the frozen teacher is
the same UNet with its adapter off (``DiffusionModel.eps(..., adapter=False)``), and the sampling and
circumventing loops keep their numbers on the device (see docs/performance.md).

Mixed precision follows accelerate's ``prepare_model``: the module's ``forward`` runs under
``torch.autocast`` and its floating outputs are cast back to the weights' dtype, so the weights (and an
adapter's Adam moments) stay in float32 while matrix products and convolutions run in bf16/fp16.
``torch.compile`` wraps the UNet's forward outside the autocast, so the cast is part of the compiled graph,
and serves only calls made without gradients (sampling, evaluation, the teachers of the training loops):
inductor's backward gave wrong LoRA gradients here (docs/performance.md), so calls that train run eager.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import wraps
from typing import Any

import torch
from torch import nn

from darkminer.config import Config, check_choice
from darkminer.models.base import DiffusionModel

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# "sdpa": torch's scaled_dot_product_attention (flash / memory-efficient kernels), diffusers' default
# AttnProcessor2_0. "classic": diffusers' AttnProcessor (explicit softmax(QK^T)V): faster on the CPU for the
# testbed's many tiny heads at small batches. "auto": classic below ``AUTO_SDPA_MIN_ROWS`` rows, SDPA from
# there (the testbed's default; docs/performance.md, "The testbed's kernels").
ATTENTIONS = ("sdpa", "classic", "auto")
# torch.compile's modes; "reduce-overhead" adds CUDA graphs (for the launch-bound UNet at small batches).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
AUTO_SDPA_MIN_ROWS = 64
# Where the plain forward of a module wrapped for autocast or torch.compile is kept, so options can be switched back.
_PLAIN_FORWARD = "_darkminer_plain_forward"


@dataclass
class SpeedOptions(Config):
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the UNet, text encoder and VAE forward passes
    attention: str = "sdpa"
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% more time
    channels_last: bool = False  # NHWC convolutions (UNet, VAE): faster with tensor cores in bf16/fp16, and for the testbed on the CPU
    compile: str = "off"  # torch.compile the UNet's no-grad calls (sampling, teachers) with this mode
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager" traces without generating kernels)

    def validate(self) -> None:
        check_choice(self, "precision", self.precision, tuple(PRECISIONS))
        check_choice(self, "attention", self.attention, ATTENTIONS)
        check_choice(self, "compile", self.compile, COMPILE_MODES)
        if self.compile_backend != "inductor":  # torch's own default; listing the others imports dynamo (seconds)
            check_choice(self, "compile_backend", self.compile_backend, tuple(torch.compiler.list_backends(exclude_tags=())))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


def as_speed_options(speed: SpeedOptions | dict[str, Any] | None) -> SpeedOptions | None:
    """``speed`` validated (a dict of options becomes ``SpeedOptions``); None stays None."""
    return None if speed is None else SpeedOptions.coerce(speed)


def resolve_speed_options(model: DiffusionModel, speed: SpeedOptions | dict[str, Any]) -> SpeedOptions:
    """``speed`` as complete options for ``model``: a ``SpeedOptions`` as it is, a dict over ``model.default_speed``."""
    return SpeedOptions.from_dict({**model.default_speed, **speed}) if isinstance(speed, dict) else speed


def speed_run_record(model: DiffusionModel, speed: SpeedOptions | None) -> dict[str, Any] | None:
    """What a resumed erase must share with the run it continues: the options ``model`` runs (``speed``,
    already resolved) where they differ from its defaults, else None. torch.compile's options are left out,
    as it changes rounding only, not the precision: a resume may switch it on or off, and the work
    directories of runs started before it was an option still match."""
    def record(options: SpeedOptions) -> dict[str, Any]:
        return {k: v for k, v in options.to_dict().items() if k not in ("compile", "compile_backend")}

    if speed is None or record(speed) == record(resolve_speed_options(model, {})):
        return None
    return record(speed)


def apply_speed_options(model: DiffusionModel, options: SpeedOptions | dict[str, Any]) -> None:
    """Switch ``model`` to ``options`` in place. A ``SpeedOptions`` replaces every earlier choice; a dict
    changes only the options it names, over the model's defaults (``DiffusionModel.default_speed``)."""
    options = resolve_speed_options(model, options)
    model.unet.set_attn_processor(_attention_processor(options.attention))
    if options.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    for module in _convolutional_modules(model):
        module.to(memory_format=memory_format)
    for module in _autocast_modules(model):
        compiled = options.compile != "off" and module is model.unet
        _wrap_forward(module, model.device.type, options.autocast_dtype, options if compiled else None)


def _attention_processor(attention: str) -> Any:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "auto":
        return RowSwitchedAttnProcessor()
    return AttnProcessor2_0() if attention == "sdpa" else AttnProcessor()


class RowSwitchedAttnProcessor:
    """Classic attention for calls of fewer than ``min_sdpa_rows`` rows, SDPA for larger ones: on the CPU,
    the testbed's 32 heads of width 3 run faster as explicit softmax(QK^T)V at a training step's 8-32 rows
    and faster through SDPA at sampling's 128 (``benchmarks/testbed_kernels.py``). Both compute the same
    attention, to rounding."""

    def __init__(self, min_sdpa_rows: int = AUTO_SDPA_MIN_ROWS) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.min_sdpa_rows = min_sdpa_rows
        self.classic, self.sdpa = AttnProcessor(), AttnProcessor2_0()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        processor = self.sdpa if hidden_states.shape[0] >= self.min_sdpa_rows else self.classic
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def attention_processors(model: DiffusionModel) -> set[str]:
    """Class names of the attention processors the UNet runs (``AttnProcessor2_0`` is SDPA)."""
    return {type(p).__name__ for p in model.unet.attn_processors.values()}


def autocast_dtype(model: DiffusionModel) -> torch.dtype | None:
    """The autocast dtype the UNet currently runs under (None: its weights' dtype)."""
    return getattr(model.unet, _PLAIN_FORWARD, (None, None))[1]


def gradient_scaler(model: DiffusionModel) -> torch.amp.GradScaler:
    """Loss scaling for a training loop on ``model``, on when it computes in float16 (autocast or weights).

    A mean loss over ~1e5 elements gives each element a gradient of ~1e-6, below float16's normal range
    (6e-5): without scaling it loses its digits or flushes to zero. Elsewhere a pass-through (bf16 has
    float32's range). When on, each step reads one flag from the device (whether it skips on inf/NaN);
    UnlearnDiffAtk also reads the scale, beside the sync its token draws already make.
    """
    enabled = torch.float16 in (autocast_dtype(model), model.dtype)
    return torch.amp.GradScaler(model.device.type, enabled=enabled)


def _convolutional_modules(model: DiffusionModel) -> list[nn.Module]:
    vae = getattr(model, "vae", None)
    return [model.unet] + ([vae] if vae is not None else [])


def _autocast_modules(model: DiffusionModel) -> Iterator[nn.Module]:
    """The modules whose forward runs under autocast.

    The UNet is entered through its forward. Text-encoder backends enter their encoder at different
    points (the whole model for prompts, its embeddings and layer stack for token embeddings), but every
    path runs the transformer layers, so those (the members of its ModuleLists) are wrapped. The VAE is
    entered through ``encode``/``decode``, which run its encoder and decoder modules.
    """
    yield model.unet
    for module in model.text_encoder.modules():
        if isinstance(module, nn.ModuleList):
            yield from module
    vae = getattr(model, "vae", None)
    if vae is not None:
        yield from (vae.encoder, vae.decoder)


def _wrap_forward(module: nn.Module, device_type: str, dtype: torch.dtype | None, compiled: SpeedOptions | None) -> None:
    """Put back ``module``'s plain forward, then wrap it in autocast to ``dtype`` (None: none) and in
    ``torch.compile`` with ``compiled``'s mode and backend (None: not compiled)."""
    plain, _ = module.__dict__.pop(_PLAIN_FORWARD, (module.__dict__.get("forward"), None))
    if plain is None:
        module.__dict__.pop("forward", None)  # back to the class's forward
    else:
        module.forward = plain
    if dtype is None and compiled is None:
        return
    forward = module.forward
    if dtype is not None:
        forward = _autocast(forward, device_type, dtype, next(module.parameters()).dtype)
    if compiled is not None:
        forward = _compiled_without_grad(forward, compiled)
    module.forward = forward
    module.__dict__[_PLAIN_FORWARD] = (plain, dtype)


def _compiled_without_grad(forward: Any, options: SpeedOptions) -> Any:
    """``forward`` compiled for calls without gradients; calls that build a graph run it as it is. With torch
    2.13's inductor on the CPU the compiled forward agreed with eager to 4e-6, but its backward gave wrong
    LoRA gradients (on the testbed with classic attention, on tiny-random-sd with SDPA too): a silently failed
    erase."""
    compiled = torch.compile(forward, mode=None if options.compile == "default" else options.compile,
                             backend=options.compile_backend)

    @wraps(forward)
    def forward_by_grad_mode(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs) if torch.is_grad_enabled() else compiled(*args, **kwargs)

    return forward_by_grad_mode


def _autocast(forward: Any, device_type: str, dtype: torch.dtype, weights_dtype: torch.dtype) -> Any:
    @wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            output = forward(*args, **kwargs)
        return _cast_floats(output, weights_dtype)

    return autocast_forward


def _cast_floats(output: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in a module's output (tensor, tuple, or diffusers/transformers output) cast to ``dtype``."""
    if isinstance(output, torch.Tensor):
        return output.to(dtype) if output.is_floating_point() else output
    if isinstance(output, tuple | list):
        return type(output)(_cast_floats(v, dtype) for v in output)
    if isinstance(output, dict):  # diffusers BaseOutput / transformers ModelOutput: set items in place
        for key, value in list(output.items()):
            output[key] = _cast_floats(value, dtype)
    return output
