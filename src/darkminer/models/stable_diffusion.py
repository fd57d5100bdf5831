"""Stable Diffusion 1.x/2.x through diffusers: CLIP text encoder, VAE, UNet."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from darkminer.errors import ModelLoadError
from darkminer.models.base import DiffusionModel, SamplingOptions
from darkminer.models.erased import INFO_NAME
from darkminer.models.loading import (
    CONVERT_PICKLED,
    bars_hidden,
    cached_snapshot,
    check_tokenizer,
    checked_weights,
    first_line,
    fp16_variant_only,
    names_a_folder,
    only_pickled_weights,
    pipeline_class,
)

if TYPE_CHECKING:  # imported where used: a bad argument is refused before diffusers loads (seconds)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


def _check_local_folder(path: Path) -> None:
    if (path / INFO_NAME).is_file():
        raise ModelLoadError(f"{path} is an erased model, not a base: load it with --erased (erased= in Python)")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers Stable Diffusion folder (no model_index.json in it)")
    for component in ("unet", "vae", "text_encoder"):
        folder = path / component
        pickled = only_pickled_weights(folder)
        if pickled:
            raise ModelLoadError(f"{folder} holds only pickled weights ({pickled}); darkminer loads safetensors only: "
                                 f"{CONVERT_PICKLED}")


class StableDiffusionModel(DiffusionModel):
    """A diffusers Stable Diffusion pipeline's components behind the model interface."""

    default_sampling = SamplingOptions(steps=50, guidance_scale=7.5, batch_size=4)

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: dict,
        name: str,
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.name = name
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()
        check_tokenizer(tokenizer, name)
        if unet.config.in_channels != vae.config.latent_channels:
            raise ModelLoadError(
                f"{name}: the UNet takes {unet.config.in_channels} input channels and the VAE makes "
                f"{vae.config.latent_channels}; inpainting and other conditioned UNets are not supported"
            )
        super().__init__()

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionPipeline, name: str) -> StableDiffusionModel:
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler_config=dict(pipe.scheduler.config),
            name=name,
        )

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> StableDiffusionModel:
        """Load from a local diffusers folder or a hub id already in the cache; never downloads."""
        path = Path(name_or_path).expanduser()
        if names_a_folder(name_or_path) and not path.exists():
            raise ModelLoadError(f"model folder {path} does not exist")
        if path.exists():
            _check_local_folder(path)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        source = str(path) if path.exists() else name_or_path
        folder = path if path.exists() else cached_snapshot(name_or_path)
        try:
            with bars_hidden("diffusers", "transformers"):
                # The weighted components are loaded one by one, so that what each loaded can be checked.
                loaded = {
                    name: checked_weights(
                        model_class.from_pretrained(
                            source, subfolder=name, torch_dtype=dtype, local_files_only=True, use_safetensors=True,
                            output_loading_info=True,
                            variant="fp16" if folder is not None and fp16_variant_only(folder / name) else None,
                        ),
                        f"{name_or_path!r} {name}",
                    )
                    for name, model_class in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                                              ("text_encoder", CLIPTextModel))
                }
                pipe = pipeline_class().from_pretrained(
                    source, **loaded, local_files_only=True, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False,
                )
        except ModelLoadError:
            raise
        except Exception as exc:  # any library error while reading foreign files: one line, what to do
            what = ("the folder must hold a whole diffusers pipeline: model_index.json, and each component's config "
                    "and safetensors weights" if path.exists() else
                    "darkminer never downloads: pass a local diffusers folder with safetensors weights, or fetch the "
                    f"model into the Hugging Face cache first (`hf download {name_or_path}`)")
            raise ModelLoadError(
                f"cannot load Stable Diffusion model {name_or_path!r} ({type(exc).__name__}: {first_line(exc)}); {what}"
            ) from None
        return cls.from_pipeline(pipe.to(device), name=name_or_path)

    def to_pipeline(self) -> StableDiffusionPipeline:
        """A plain diffusers pipeline sharing this model's modules (no copy)."""
        from diffusers import DDIMScheduler

        return pipeline_class()(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    # ----------------------------------------------------------------------------------------- text
    @property
    def max_length(self) -> int:
        # A tokenizer_config.json without model_max_length leaves it "unlimited"; the text encoder is not.
        return min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))

    def encode_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0].to(self.dtype)

    def encode_embeddings(self, embeds: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        # The same computation as CLIPTextModel.forward, entered after the token lookup.
        from transformers.masking_utils import create_causal_mask

        te = self.text_encoder
        hidden = te.embeddings(inputs_embeds=embeds.to(te.dtype))
        mask = create_causal_mask(config=te.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = te.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return te.final_layer_norm(hidden).to(self.dtype)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_encoder.embeddings.token_embedding

    @cached_property
    def vocabulary(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))

    @cached_property
    def special_token_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)

    @property
    def placeholder_id(self) -> int:
        return int(self.tokenizer("x", add_special_tokens=False).input_ids[0])

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    # ---------------------------------------------------------------------------------------- latents
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def images_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.vae.device, self.vae.dtype) * 2 - 1
        return self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((decoded.float() + 1) / 2).clamp(0, 1)
