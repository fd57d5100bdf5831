"""LoRA adapters on the UNet through peft, saved in the format diffusers' ``load_lora_weights`` reads.

peft and diffusers are imported in the functions that use them: the commands refuse a bad argument before
those libraries load (seconds).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from darkminer.config import Config, check_positive
from darkminer.errors import ConfigError, ModelLoadError, logs_silenced
from darkminer.io import load_tensors_and_metadata
from darkminer.models.base import DiffusionModel, seeded
from darkminer.models.loading import pipeline_class

ADAPTER_NAME = "darkminer"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_ATTN_PROJ = r"(to_q|to_k|to_v|to_out\.0)"
# Named placements of the adapter (regular expressions over UNet module names, matched in full).
TARGET_PRESETS: dict[str, str] = {
    # ESD-x-strict, UCE's edit site: keys and values of cross-attention (what the text reaches).
    "cross-attn-kv": r".*attn2\.(to_k|to_v)",
    # ESD-x: all of cross-attention.
    "cross-attn": rf".*attn2\.{_ATTN_PROJ}",
    "attn": rf".*attn[12]\.{_ATTN_PROJ}",
    # ESD-u: everything but cross-attention.
    "non-cross-attn": rf"^(?!.*attn2).*(attn1\.{_ATTN_PROJ}|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2)",
}


@dataclass
class LoraConfig(Config):
    """LoRA on the UNet. ``target`` is a preset name (see ``TARGET_PRESETS``) or a regular expression."""

    rank: int = 4
    alpha: float | None = None  # None: equal to rank (scale 1)
    # Outside cross-attention, so the UNet loses the ability to draw the concept rather than one text route
    # to it: on the testbed CCE fell from 0.88/0.75 to 0.25/0.00 (blood/star) against "cross-attn"
    # (docs/darkminer.md).
    target: str = "non-cross-attn"
    # No dropout option: the UNet runs in eval mode throughout (frozen teacher shared with the adapter), so
    # it would be a no-op, and its RNG would break exact resume.

    def validate(self) -> None:
        check_positive(self, rank=self.rank)
        if self.alpha is not None:
            check_positive(self, alpha=self.alpha)
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"LoraConfig.target {self.target!r} is neither a preset {list(TARGET_PRESETS)} nor a regex: {exc}") from None

    @property
    def pattern(self) -> str:
        return TARGET_PRESETS.get(self.target, self.target)


def target_module_names(model: DiffusionModel, pattern: str) -> list[str]:
    """UNet modules with weights that ``pattern`` matches in full (what a placement will touch)."""
    regex = re.compile(pattern)
    names = [
        name
        for name, module in model.unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and regex.fullmatch(name)
    ]
    if not names:
        raise ConfigError(f"the target {pattern!r} matches no Linear/Conv2d module of this UNet")
    return names


def add_lora(model: DiffusionModel, config: LoraConfig, seed: int = 0) -> list[torch.nn.Parameter]:
    """Attach a fresh LoRA (output unchanged until trained) and return its trainable parameters."""
    if getattr(model.unet, "peft_config", None):
        raise ConfigError("the UNet already carries an adapter; erase from the base model, not an erased one")
    from peft import LoraConfig as PeftLoraConfig

    target_module_names(model, config.pattern)
    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or config.rank,
        target_modules=config.pattern,
        init_lora_weights=True,
    )
    with seeded(seed):  # peft draws the initial A on the CPU
        model.unet.add_adapter(peft_config, adapter_name=ADAPTER_NAME)
    params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    for p in params:
        # Trainable weights stay float32 on a half-precision model: bf16 keeps 8 mantissa bits, so small
        # optimiser updates would round away.
        # peft casts the input to the adapter's dtype and the result back, so the forward is unchanged.
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def has_lora(model: DiffusionModel) -> bool:
    return bool(getattr(model.unet, "peft_config", None))


def lora_state_dict(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's key format (``...lora_A.weight``, without the ``unet.`` prefix).

    Not diffusers' older ``lora.down`` format: its converter renames only attention projections, and a file
    mixing both formats loads in diffusers with every key of the other format silently dropped (LoRA on
    self-attention next to convolutions lost its self-attention part that way).
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model.unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().cpu() for k, v in state.items()}


def set_lora_state_dict(model: DiffusionModel, state: dict[str, torch.Tensor]) -> None:
    """Put ``lora_state_dict``'s weights (an earlier round's, a checkpoint's) into the attached adapter."""
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(model.unet, state, adapter_name=ADAPTER_NAME)


def save_lora(model: DiffusionModel, directory: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(directory)`` accepts."""
    peft_config = model.unet.peft_config[ADAPTER_NAME].to_dict()
    pipeline_class().save_lora_weights(
        str(directory),
        unet_lora_layers=lora_state_dict(model),
        safe_serialization=True,
        unet_lora_adapter_metadata=peft_config,
    )
    return Path(directory) / LORA_WEIGHT_NAME


def load_lora(model: DiffusionModel, directory: str | Path) -> None:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft.tuners.tuners_utils import check_target_module_exists

    path = Path(directory) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no {LORA_WEIGHT_NAME}")
    if has_lora(model):
        raise ModelLoadError(f"this model already carries a darkminer LoRA; load {directory} into a fresh base model "
                             "(load_model(erased=...) stacks erasures that were made on one another)")
    # one clear error for a truncated or foreign file, before diffusers parses it
    tensors, metadata = load_tensors_and_metadata(path)
    foreign = sorted(k for k in tensors if not k.startswith("unet."))
    if foreign:  # e.g. a text-encoder LoRA from another tool: applying the UNet part alone would be another model
        raise ModelLoadError(f"{path} holds weights for other parts than the UNet ({foreign[0]}, ...); only UNet "
                             "LoRA adapters are loaded")
    if not tensors:  # it would load as no adapter at all: the base model, passed off as erased
        raise ModelLoadError(f"{path} holds no LoRA weights: damaged or emptied; re-create it")
    # Normalised key by key: files written before lora_state_dict used peft's format mix two formats.
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in tensors.items()})
    try:
        adapter_metadata = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        adapter_metadata = {k.removeprefix("unet."): v for k, v in adapter_metadata.items() if k.startswith("unet.")}
    except (ValueError, AttributeError):  # not JSON, or not an object
        raise ModelLoadError(f"{path} holds a damaged adapter description (lora_adapter_metadata); re-create it") from None
    # The layers an adapter could wrap, listed before one does (it then holds them as children).
    layers = [name for name, module in model.unet.named_modules() if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)]
    try:
        # peft warns where the description names layers the file lacks; the check below refuses such a file.
        with logs_silenced("diffusers"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="While injecting the PEFT adapters", category=RuntimeWarning)
            model.unet.load_lora_adapter(state, prefix=None, metadata=adapter_metadata or None, adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
        raise ModelLoadError(f"{path} does not fit this base model's UNet ({' '.join(str(exc).split())[:300]})") from None
    # diffusers only logs the LoRA weights a file lacks, and those layers keep their random initialisation;
    # and peft wraps only the layers the file has weights for, so a file missing whole layers is checked
    # against the layers its description names.
    made = {n.replace(f".{ADAPTER_NAME}.", "."): p for n, p in model.unet.named_parameters() if f".{ADAPTER_NAME}." in n}
    missing, unused = sorted(set(made) - set(state)), sorted(set(state) - set(made))
    wrapped = {n.split(".lora_")[0] for n in made}
    # peft's own matching of the description (target and exclude modules, layers_to_transform); without a
    # description the file's own keys say which layers it has.
    config = model.unet.peft_config[ADAPTER_NAME]
    described = {name for name in layers if check_target_module_exists(config, name)} if adapter_metadata else wrapped
    if missing or unused or described - wrapped:
        absent = sorted(described - wrapped)
        raise ModelLoadError(f"{path} does not fit the adapter it describes ({len(missing)} LoRA weights missing, e.g. "
                             f"{missing[:1]}; {len(unused)} unused, e.g. {unused[:1]}; {len(absent)} described layers "
                             f"without weights, e.g. {absent[:1]}): damaged or edited; re-create it")
    # Float32, as add_lora trains it: diffusers builds the adapter in a half-precision base's dtype, which
    # would round the trained weights and make the loaded model another one.
    for name, param in made.items():
        param.data = state[name].to(device=param.device, dtype=torch.float32)
    model.unet.requires_grad_(False)


def merge_lora(model: DiffusionModel) -> None:
    """Fold the adapter into the UNet's weights and drop the LoRA layers. The weights it changes are
    remembered first, so ``model.original()`` is still the model before erasure."""
    suffix = ".base_layer.weight"
    before = {name.replace(suffix, ".weight"): p.detach().clone()  # the only copy: remember_originals keeps it
              for name, p in model.unet.named_parameters() if name.endswith(suffix)}
    model.unet.fuse_lora()
    model.unet.unload_lora()
    model.remember_originals(list(before), values=before)
