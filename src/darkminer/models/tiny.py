"""``tiny-random-sd``: a small randomly initialised Stable Diffusion built from configs.

Same classes as SD 1.x (CLIP text encoder, VAE, UNet with cross-attention), a few hundred thousand
parameters, 32x32 images. The tests use it to exercise the real diffusers code path on a CPU; users can
use it as a dry run. Its tokenizer is a byte-level BPE with the CLIP pre-tokenizer, characters plus
merges for a list of common words, built offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from darkminer.models.base import seeded
from darkminer.models.loading import pipeline_class

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

_WORDS = (
    "a photo of an the and with in on painting style by picture image art drawing portrait landscape "
    "nude naked nudity woman man person people body violence blood gun fire car dog cat church tench "
    "parachute garbage truck van gogh starry night sky tree house red green blue black white"
).split()


def build_tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    symbols = list(bytes_to_unicode().values())  # GPT-2/CLIP's reversible byte alphabet
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny SD, deterministic for a seed."""
    tokenizer = build_tiny_tokenizer()
    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # SD 1.x's schedule.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return pipeline_class()(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD as a diffusers folder (safetensors), loadable by plain diffusers."""
    path = Path(path)
    build_tiny_sd_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
