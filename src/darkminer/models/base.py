"""The model interface: the only way erasers, attacks and metrics touch a text-to-image diffusion model.

A backend supplies a tokenizer, a frozen text encoder, a ``UNet2DConditionModel`` and (optionally) a VAE;
everything else -- encoding from token embeddings, noise schedule, DDIM sampling with classifier-free
guidance, switching the adapter off to get the frozen original as a teacher -- is shared here.
"""

from __future__ import annotations

import math
import numbers
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from darkminer.config import MAX_SAMPLING_STEPS, PROMPT_SEED_LIMIT, check_seed
from darkminer.errors import ConfigError, DarkMinerError, DarkMinerWarning, ModelLoadError
from darkminer.registry import Registry

if TYPE_CHECKING:  # imported where used: a bad argument is refused before they load (seconds)
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import PreTrainedTokenizerBase

# Before the names of the text encoder's parameters where they share a name space with the UNet's (the
# weights an erasure edited in place, its checkpoints); also the folder of an edited text encoder.
TEXT_ENCODER_PREFIX = "text_encoder."


def check_seed_list(seeds: Sequence[int]) -> None:
    """``seeds`` is one seed per image: a lone number is refused with what to give instead."""
    if isinstance(seeds, numbers.Integral):
        raise DarkMinerError(f"seeds is a list of seeds, one per image: give [{seeds}], not {seeds}")


_INTEGER_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_sums(weight: torch.Tensor) -> torch.Tensor:
    """A weight's bits as integers, summed plainly and weighted by position 1..n (int64, wrapping)."""
    bits = weight.detach().reshape(-1).view(_INTEGER_OF_WIDTH[weight.element_size()])
    positions = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
    return torch.stack([bits.sum(dtype=torch.int64), (bits * positions).sum()])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block torch's CPU generator starts from ``seed``; after it, the caller's generator is as it
    was: weights built from a seed (a LoRA's initial A, a tiny model) do not reseed the user's program."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would reseed the GPUs' too
        yield


def host_to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor copied to ``device`` (cast to ``dtype`` first, on the host: fewer bytes to move) without
    making the host wait for the device's queue.

    A copy from ordinary (pageable) host memory to a GPU is synchronous even with ``non_blocking``; from
    pinned memory it is queued. The random draws stay on CPU generators for reproducibility, so every
    draw the loops send to the device goes through here.
    """
    device = torch.device(device)
    tensor = tensor if dtype is None else tensor.to(dtype)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def per_guidance_scale(
    guidances: Sequence[float | None], draw: Callable[[list[int], float | None], torch.Tensor]
) -> torch.Tensor:
    """Images for rows that may each set their own guidance scale (None: the default): ``draw(rows,
    scale)`` once per distinct scale, so that rows sharing one share a sampling call; in row order."""
    images: list[torch.Tensor | None] = [None] * len(guidances)
    for scale in dict.fromkeys(guidances):
        rows = [i for i, g in enumerate(guidances) if g == scale]
        for i, image in zip(rows, draw(rows, scale), strict=True):
            images[i] = image
    return torch.stack(images)  # type: ignore[arg-type]


class Guidance:
    """Combines noise predictions at one sampling step. Subclasses may call the UNet more than once."""

    def predict(
        self, model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
        scale: float, step_index: int, adapter: bool,
    ) -> torch.Tensor:
        raise NotImplementedError

    registry_name = "cfg"

    def check_sampling(self, steps: int, guidance_scale: float) -> None:
        """Called by each ``sample``: a guidance warns here about settings under which it does nothing."""

    def to_dict(self) -> dict | None:
        """Serialisable settings (with ``name``), or None for plain classifier-free guidance."""
        return None

    @classmethod
    def from_dict(cls, model: DiffusionModel, data: dict) -> Guidance:
        raise NotImplementedError


# The guidances erased models save (models/guidance.py registers them); a name, as recorded, rebuilds one.
GUIDANCES: Registry[type[Guidance]] = Registry("guidance", {"sld": "darkminer.models.guidance"},
                                                name_attribute="registry_name")
G = TypeVar("G", bound=Guidance)


def register_guidance(name: str) -> Callable[[type[G]], type[G]]:
    return GUIDANCES.register(name)


def _components(parameter_names: Iterable[str]) -> set[str]:
    return {"text_encoder" if name.startswith(TEXT_ENCODER_PREFIX) else "unet" for name in parameter_names}


def guidance_from_dict(model: DiffusionModel, data: dict | None) -> Guidance:
    """Rebuild a saved guidance (``{"name": ..., **settings}``); ``None`` is plain CFG."""
    if data is None:
        return ClassifierFreeGuidance()
    if not isinstance(data, dict):
        raise ModelLoadError(f"a saved guidance must be a JSON object with a name, got {type(data).__name__}; "
                             "re-create the erased model")
    return GUIDANCES.lookup(data.get("name")).from_dict(model, data)


class ClassifierFreeGuidance(Guidance):
    """eps_u + s (eps_c - eps_u), with both branches in one batched UNet call."""

    def predict(
        self, model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
        scale: float, step_index: int, adapter: bool,
    ) -> torch.Tensor:
        if scale == 1.0:
            return model.eps(x, t, cond, adapter=adapter)
        eps_u, eps_c = model.eps(torch.cat([x, x]), t, torch.cat([uncond, cond]), adapter=adapter).chunk(2)
        return eps_u + scale * (eps_c - eps_u)


@dataclass(frozen=True)
class SamplingOptions:
    """How images are drawn. Defaults are the field's usual SD settings; the testbed overrides them."""

    steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_SAMPLING_STEPS:
            raise ConfigError(f"sampling steps (--steps) must be 1 .. {MAX_SAMPLING_STEPS} (DDIM takes a subset of the "
                              f"model's {MAX_SAMPLING_STEPS} training timesteps), got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"sampling batch size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.guidance_scale):
            raise ConfigError(f"the guidance scale (--guidance) must be a finite number, got {self.guidance_scale}")


class DiffusionModel(ABC):
    """A text-conditioned diffusion model behind one interface (Stable Diffusion or the testbed)."""

    unet: UNet2DConditionModel
    text_encoder: nn.Module
    tokenizer: PreTrainedTokenizerBase
    # The training noise schedule as diffusers config data; DDPM for training, DDIM for sampling.
    scheduler_config: dict
    default_sampling: SamplingOptions
    # The speed options (``darkminer.parallel.SpeedOptions`` fields) this model runs with unless told
    # otherwise; speed options given as a dict are applied over them. Empty: diffusers' own defaults.
    default_speed: ClassVar[dict[str, Any]] = {}
    name: str

    def __init__(self) -> None:
        # Originals of weights edited in place (closed-form or fine-tuned erasers): swapped back in by
        # ``original()`` so the frozen teacher needs no second copy of the model.
        self._originals: dict[str, torch.Tensor] = {}
        # The base's values of the weights of an erasure adopted as the original for the one stacked on it.
        self._adopted: dict[str, torch.Tensor] = {}
        # How the conditional and unconditional predictions combine while sampling; inference-time
        # erasers (SLD) replace it.
        self.guidance: Guidance = ClassifierFreeGuidance()
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self._reported_cut = False  # whether tokenize has reported a prompt cut to max_length

    # ----------------------------------------------------------------------------------------- text
    @property
    @abstractmethod
    def max_length(self) -> int:
        """Number of token positions of every encoded prompt."""

    def tokenize(self, prompts: Sequence[str]) -> torch.LongTensor:
        """Token ids (B, max_length), padded and cut to the text encoder's length. The first prompt that is
        cut is reported, once per model, so a long prompt does not silently lose its end."""
        prompts = list(prompts)
        if not self._reported_cut:
            longest = self.tokenizer(prompts, max_length=self.max_length + 1, truncation=True).input_ids
            cut = [prompt for prompt, ids in zip(prompts, longest, strict=True) if len(ids) > self.max_length]
            if cut:
                self._reported_cut = True
                warnings.warn(f"a prompt is longer than the text encoder's {self.max_length} tokens, so its end is "
                              f"cut off: {cut[0][:80]!r}{'...' if len(cut[0]) > 80 else ''} (later cuts are not "
                              "reported)", DarkMinerWarning, stacklevel=2)
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    @abstractmethod
    def encode_embeddings(self, embeds: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        """Conditioning states (B, L, D) from input token embeddings (B, L, E).

        ``input_ids`` are the ids the embeddings stand in for; backends use them only for padding masks,
        so optimised embeddings at a slot keep the slot's place in the sequence.
        """

    @property
    @abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The text encoder's input embedding table (V, E)."""

    @property
    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Token strings indexed by id, for projecting embeddings to real tokens."""

    @property
    @abstractmethod
    def special_token_ids(self) -> set[int]:
        """Ids never proposed when projecting to real tokens (BOS/EOS/PAD/...)."""

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def embed_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.token_embedding(input_ids.to(self.token_embedding.weight.device))

    def encode_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.encode_embeddings(self.embed_ids(input_ids), input_ids)

    def encode(self, prompts: Sequence[str] | str, adapter: bool = True) -> torch.Tensor:
        """Conditioning states for prompts; the empty prompt is the unconditional state. ``adapter=False``:
        the original text encoder's (it differs from the model's own only under a text-encoder erasure)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise DarkMinerError("no prompts to encode: give at least one prompt")
        with nullcontext() if adapter else self.original():
            return self.encode_ids(self.tokenize(list(prompts)))

    @property
    @abstractmethod
    def placeholder_id(self) -> int:
        """A real, non-special token id used to hold a free slot."""

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    def nearest_tokens(self, embeds: torch.Tensor, k: int = 1) -> tuple[torch.LongTensor, list[list[str]]]:
        """Nearest vocabulary tokens (cosine) of each embedding (N, E): ids (N, k) and their strings."""
        table = self.token_embedding.weight.detach()
        sims = nn.functional.normalize(embeds.detach().to(table), dim=-1) @ nn.functional.normalize(table, dim=-1).T
        banned = torch.tensor(sorted(self.special_token_ids), device=sims.device, dtype=torch.long)
        sims[:, banned] = -float("inf")
        ids = sims.topk(k, dim=-1).indices
        vocab = self.vocabulary
        return ids, [[vocab[i] for i in row] for row in ids.tolist()]

    def decode_ids(self, input_ids: torch.LongTensor) -> list[str]:
        """Readable text of token ids (special tokens dropped)."""
        return [t.strip() for t in self.tokenizer.batch_decode(input_ids.tolist(), skip_special_tokens=True)]

    # ----------------------------------------------------------------------------------------- unet
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, adapter: bool = True) -> torch.Tensor:
        """Noise prediction; ``adapter=False`` gives the frozen original model (the teacher)."""
        t = t.to(self.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if adapter:
            return self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample
        with self.original():
            return self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample

    @property
    def is_original(self) -> bool:
        """Whether no erasure is on the model (no adapter, no weight edited in place, plain guidance), so that
        ``original()`` changes nothing."""
        return (not getattr(self.unet, "peft_config", None) and not self._originals
                and type(self.guidance) is ClassifierFreeGuidance)

    @contextmanager
    def original(self) -> Iterator[None]:
        """Within the block the model is the original: adapters off, in-place edits swapped out, and plain
        classifier-free guidance instead of an inference-time eraser's (SLD)."""
        has_adapter = bool(getattr(self.unet, "peft_config", None)) and self._adapters_enabled()
        params = self._parameters_by_plain_name()
        edited = {name: params[name].data for name in self._originals}
        # peft's enable_adapters makes every adapter weight trainable; a loaded (frozen) one must stay frozen
        trainable = {name: p.requires_grad for name, p in params.items() if "lora_" in name} if has_adapter else {}
        guidance, self.guidance = self.guidance, ClassifierFreeGuidance()
        try:
            if has_adapter:
                self.unet.disable_adapters()
            for name, value in self._originals.items():
                params[name].data = value
            yield
        finally:
            self.guidance = guidance
            for name, value in edited.items():
                params[name].data = value
            if has_adapter:
                self.unet.enable_adapters()
                for name, flag in trainable.items():
                    params[name].requires_grad_(flag)

    def _adapters_enabled(self) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(not m.disable_adapters for m in self.unet.modules() if isinstance(m, BaseTunerLayer))

    def _parameters_by_plain_name(self) -> dict[str, torch.nn.Parameter]:
        # A layer that an adapter wraps keeps its own weight as ``base_layer``; edits remembered before the
        # adapter came (an erasure merged under a stacked one) name it without. The text encoder's
        # parameters carry its prefix, so that one name space covers every weight an erasure may edit.
        unet = {name.replace(".base_layer.", "."): p for name, p in self.unet.named_parameters()}
        return {**unet, **{TEXT_ENCODER_PREFIX + name: p for name, p in self.text_encoder.named_parameters()}}

    def remember_originals(self, names: Sequence[str], values: dict[str, torch.Tensor] | None = None) -> None:
        """Keep a copy of these parameters before an eraser edits them in place (``values``: the originals
        themselves, when the parameters have changed already, as a merged adapter's have). UNet parameters
        go by their names in the UNet, the text encoder's by theirs after ``TEXT_ENCODER_PREFIX``."""
        params = self._parameters_by_plain_name()
        missing = [n for n in names if n not in params]
        if missing:
            prefixed = [n for n in missing if TEXT_ENCODER_PREFIX + n in params]
            hint = (f"; a text-encoder weight goes by its name after {TEXT_ENCODER_PREFIX!r} "
                    f"({TEXT_ENCODER_PREFIX + prefixed[0]!r})" if prefixed else "")
            raise DarkMinerError(f"the model has no parameters {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                                 f"{hint}")
        for name in names:
            if name not in self._originals:
                self._originals[name] = params[name].detach().clone() if values is None else values[name]

    def weight_fingerprints(self) -> dict[str, tuple[int, int]]:
        """Each weight's bits summed, plainly and weighted by position (as integers of the weight's width, in
        int64 that wraps), by the names ``remember_originals`` takes: what tells a weight edited in place apart
        (a changed, NaN or moved value; two checksums, so an edit contrived to keep both would pass), without a
        copy of the weights and without float64 (MPS has none). About 10 s for SD-1.4's UNet and text encoder on
        2 CPU cores (docs/performance.md)."""
        params = self._parameters_by_plain_name()
        with torch.no_grad():
            sums = torch.stack([_bit_sums(p) for p in params.values()]).tolist()
        return {name: (plain, weighted) for name, (plain, weighted) in zip(params, sums, strict=True)}

    @property
    def remembered_names(self) -> set[str]:
        """The weights this erasure registered with ``remember_originals`` (not those of one it is stacked on)."""
        return set(self._originals)

    @property
    def edited_parameter_names(self) -> list[str]:
        return sorted({*self._originals, *self._adopted})

    @property
    def edited_components(self) -> set[str]:
        """``"unet"`` and/or ``"text_encoder"``: the components with a weight edited in place (by this
        erasure or one it is stacked on)."""
        return _components(self.edited_parameter_names)

    @property
    def own_edited_components(self) -> set[str]:
        """As ``edited_components``, less the edits adopted (``edits_adopted``): those of the erasure being
        made, not of the erased model it is stacked on."""
        return _components(self._originals)

    @contextmanager
    def edits_adopted(self) -> Iterator[None]:
        """Within the block the edited weights are the model's own (``original()`` is the model as it is on
        entry), as while an erasure is stacked on an erased one, which is then its teacher. On exit the
        original is the base again, under both."""
        if self._adopted:
            raise DarkMinerError("the model's edits are adopted already")
        self._adopted, self._originals = self._originals, {}
        try:
            yield
        finally:  # the base's values win over those of the adopted edits, which the new edits remembered
            self._originals.update(self._adopted)
            self._adopted = {}

    # ------------------------------------------------------------------------------------- schedule
    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t.to(x0.device))

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.LongTensor:
        return host_to_device(torch.randint(0, self.num_train_timesteps, (n,), generator=generator), self.device)

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the UNet's input."""

    @contextmanager
    def sampling_defaults(self, steps: int | None = None, guidance_scale: float | None = None) -> Iterator[None]:
        """Within the block, ``sample`` calls that leave ``steps`` or ``guidance_scale`` unset use these (None:
        unchanged): an evaluation's sampling then also holds for the attacks it runs, which sample by default."""
        previous = self.__dict__.get("default_sampling")  # an instance's own, else the class's
        changes = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance_scale)) if v is not None}
        self.default_sampling = replace(self.default_sampling, **changes)
        try:
            yield
        finally:
            if previous is None:
                del self.default_sampling
            else:
                self.default_sampling = previous

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """One noise tensor per seed, each from its own generator: an image depends on its seed only,
        never on batch size or on which process drew it."""
        for seed in seeds:  # torch would take a negative seed, or wrap one past its range, silently
            check_seed("a sampling seed", seed, limit=PROMPT_SEED_LIMIT)
        noise = [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    # ----------------------------------------------------------------------------------------- images
    def images_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) to the UNet's input space; identity-like for pixel models."""
        return images.to(self.device, self.dtype) * 2 - 1

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    # --------------------------------------------------------------------------------------- sampling
    def sampling_scheduler(self, steps: int) -> DDIMScheduler:
        """A DDIM scheduler for ``steps`` steps. Its timesteps stay on the host, where it indexes its tables by
        them: a device timestep would make every step wait for the device."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        trained = scheduler.config.num_train_timesteps
        if steps > trained:  # a schedule shorter than MAX_SAMPLING_STEPS, which configs allow
            raise DarkMinerError(f"{steps} sampling steps are more than this model's {trained} training timesteps; use fewer")
        scheduler.set_timesteps(steps)
        return scheduler

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        *,
        seeds: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        uncond: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
        adapter: bool = True,
        return_latents: bool = False,
        progress: bool | str = False,
    ) -> torch.Tensor:
        """DDIM sampling with classifier-free guidance from conditioning states (B, L, D).

        Give ``seeds`` (one per image) or a fixed ``noise``; ``uncond`` defaults to the empty prompt.
        Returns images in [0, 1] (B, 3, H, W), or final latents. ``progress``: a bar over the batches, labelled
        "sampling", or by what is drawn where a label is given.
        """
        default = self.default_sampling
        opts = SamplingOptions(  # validated: a step count of 0 or a NaN scale would draw noise, not fail
            steps=default.steps if steps is None else steps,
            guidance_scale=default.guidance_scale if guidance_scale is None else guidance_scale,
            batch_size=default.batch_size if batch_size is None else batch_size,
        )
        steps, guidance_scale, batch_size = opts.steps, opts.guidance_scale, opts.batch_size
        if adapter:
            self.guidance.check_sampling(steps, guidance_scale)
        if noise is None:
            if seeds is None:
                raise DarkMinerError("sample() needs seeds (one per image) or a fixed noise tensor")
            check_seed_list(seeds)
            if len(seeds) != cond.shape[0]:
                raise DarkMinerError(f"{len(seeds)} seeds for {cond.shape[0]} conditionings")
            noise = self.initial_noise(seeds)
        if uncond is None:
            uncond = self.encode([""], adapter=adapter)
        uncond = uncond.expand(cond.shape[0], -1, -1) if uncond.shape[0] == 1 else uncond
        outputs = []
        chunks = range(0, cond.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=progress if isinstance(progress, str) else "sampling", unit="batch")
        for start in chunks:
            sl = slice(start, start + batch_size)
            latents = self._final_sample(noise[sl], cond[sl], uncond[sl], guidance_scale, steps, adapter)
            outputs.append(latents if return_latents else self.latents_to_images(latents))
        return torch.cat(outputs)

    def _final_sample(
        self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float, steps: int, adapter: bool
    ) -> torch.Tensor:
        return deque(self.ddim_states(latents, cond, uncond, guidance, steps, adapter), maxlen=1)[0][0]

    @torch.no_grad()
    def ddim_states(
        self,
        noise: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        guidance_scale: float,
        steps: int,
        adapter: bool = True,
        guidance: Guidance | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """DDIM from ``noise`` (on the device) under ``guidance`` (default: the model's, or plain CFG for the
        original, ``adapter`` False: an inference-time eraser such as SLD lives in the guidance): yields (x, t)
        before each of the ``steps`` steps, the scaled noise first, then the final sample with t None.

        Lazy: a caller that stops early pays only for the steps it consumed. The UNet gets device
        timesteps copied once; the scheduler keeps its host ones.
        """
        guidance = guidance or (self.guidance if adapter else ClassifierFreeGuidance())
        scheduler = self.sampling_scheduler(steps)
        device_timesteps = host_to_device(scheduler.timesteps, self.device)
        x = noise * scheduler.init_noise_sigma
        for index, t in enumerate(scheduler.timesteps):
            yield x, device_timesteps[index]
            eps = guidance.predict(self, scheduler.scale_model_input(x, t), device_timesteps[index], cond, uncond,
                                   guidance_scale, index, adapter)
            x = scheduler.step(eps, t, x).prev_sample
        yield x, None

    def generate(self, prompts: str | Sequence[str], seeds: Sequence[int], **kwargs: object) -> torch.Tensor:
        """Images for prompts, one per (prompt, seed) pair; a single prompt is drawn once per seed. With
        ``adapter=False`` the original draws them, its own text encoder encoding the prompts."""
        check_seed_list(seeds)
        if isinstance(prompts, str):  # not a sequence of one-letter prompts
            prompts = [prompts] * len(seeds)
        if any(not isinstance(p, str) for p in prompts):
            raise DarkMinerError("prompts must be strings")
        cond = self.encode(list(prompts), adapter=bool(kwargs.get("adapter", True)))
        return self.sample(cond, seeds=seeds, **kwargs)  # type: ignore[arg-type]
