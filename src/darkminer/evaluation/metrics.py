"""The numbers of an evaluation: concept rates, attribute accuracy, text-image alignment, FID.

FID comes from torchmetrics (``FrechetInceptionDistance``). Its Inception network lives in torch-fidelity,
which drags a CUDA build of torch and downloads weights on first use, so it is used only for Stable
Diffusion and only when the user has it (with its weights) installed. On the testbed, whose 32x32 shapes
Inception was never trained on, the same torchmetrics FID runs in the feature space of the testbed's image
encoder: "FID (testbed encoder)", a different scale from Inception FID, comparable only within the testbed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from darkminer.errors import DarkMinerError

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def concept_rate(flags: torch.Tensor) -> float:
    """Share of images in which the detector sees the concept (lower is a better erasure); exact (k / n, not
    a float32 mean, which would store 5 of 6 as 0.8333333134651184)."""
    if flags.numel() == 0:
        raise DarkMinerError("no images were judged; give at least one prompt")
    return int(flags.sum()) / flags.numel()


def rate_count(hits: int, n: int, z: float = 1.96) -> dict[str, Any]:
    """``hits`` of ``n`` with its Wilson score interval (95% at the default ``z``): the uncertainty a rate
    over a few dozen images or prompts carries, which the rate alone hides."""
    if n <= 0 or not 0 <= hits <= n:
        raise DarkMinerError(f"a rate needs 0 <= hits <= n and n > 0, got {hits} of {n}")
    p, z2 = hits / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"hits": hits, "n": n, "wilson95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]}


def attribute_accuracy(
    predicted: Sequence[Mapping[str, str]], expected: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    """Share of the asked-for attributes that the images show, over all (image, attribute) pairs, and per
    attribute. Only attributes the prompt fixed are scored."""
    if len(predicted) != len(expected):
        raise DarkMinerError(f"{len(predicted)} predictions for {len(expected)} expected label sets")
    hits: dict[str, list[bool]] = {}
    for seen, asked in zip(predicted, expected, strict=True):
        for head, value in asked.items():
            hits.setdefault(head, []).append(seen[head] == value)
    total = sum(len(v) for v in hits.values())
    if total == 0:
        raise DarkMinerError("no expected labels to score attribute accuracy against")
    return {
        "accuracy": sum(sum(v) for v in hits.values()) / total,
        "per_attribute": {head: sum(v) / len(v) for head, v in sorted(hits.items())},
    }


class Aligner(Protocol):
    """``models.clip.Clip`` on Stable Diffusion, ``TestbedAligner`` on the testbed. Scores how well each image matches its prompt, on the CLIP-score scale 100 * max(cos, 0)."""

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


class TestbedAligner:
    """CLIP score of the testbed: its image encoder against MiniLM sentence embeddings of the prompt."""

    def __init__(self) -> None:
        from darkminer.testbed.image_encoder import WEIGHTS_PATH, ImageEncoder, SentenceEmbedder

        self.encoder = ImageEncoder.load()
        self.embedder = SentenceEmbedder()
        self.weights = WEIGHTS_PATH

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        cosine = self.encoder.alignment(images.float().cpu(), self.embedder.encode(list(texts)))
        return (100 * cosine).clamp(min=0)

    def describe(self) -> dict[str, Any]:
        from darkminer.provenance import file_digest

        return {"name": "testbed-image-encoder x all-MiniLM-L6-v2", "weights": file_digest(self.weights),
                "scale": "100 * max(cos, 0)"}


class _TestbedEncoderFeatures(nn.Module):
    """The testbed image encoder as a torchmetrics FID feature extractor (float images in [0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        from darkminer.testbed.image_encoder import EMBEDDING_DIM, ImageEncoder

        self.net = ImageEncoder.load().net
        self.num_features = EMBEDDING_DIM

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float())


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """Where torch-fidelity's FID Inception weights are on this machine; a clear error when they are not."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise DarkMinerError(
            "FID on Stable Diffusion needs torchmetrics' Inception network from torch-fidelity, which is not "
            "installed: `pip install torch-fidelity` (it pulls torchvision) or leave fid out of the "
            "evaluation's preservation metrics (--preservation accuracy,clip; a benchmark's evaluation: preservation)"
        ) from None
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    if not path.is_file():
        raise DarkMinerError(
            f"FID Inception weights not found at {path}; download {INCEPTION_WEIGHTS_NAME} (torch-fidelity's "
            "release assets) there or give its path as inception_weights"
        )
    return path


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def reference_image_paths(folder: str | Path) -> list[Path]:
    """The image files of a FID reference folder (e.g. real COCO photos), sorted; at least two."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DarkMinerError(f"FID reference folder {folder} {'is a file; give a folder of images' if folder.exists() else 'does not exist'}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise DarkMinerError(f"FID reference folder {folder} holds {len(paths)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                             "FID needs at least 2")
    return paths


def load_reference_images(folder: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """The folder's images as RGB in [0, 1] at ``size`` (H, W) like the generated ones: (N, 3, H, W)."""
    return load_images(reference_image_paths(folder), size)


def load_images(paths: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """Images as RGB in [0, 1], (N, 3, H, W): each scaled (bicubic) until it covers ``size`` and centre-
    cropped to it, as FID protocols treat real photos (a 640x480 COCO photo stretched square would add
    distortion the generated images lack, and raise FID)."""
    import numpy as np
    from PIL import Image

    height, width = size
    images = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        scale = max(height / rgb.height, width / rgb.width)
        scaled = (max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale)))
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        rgb = rgb.resize(scaled, Image.Resampling.BICUBIC).crop((left, top, left + width, top + height))
        images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(images)


FEATURE_BATCH = 32  # images per forward pass of a feature network: its activations stay bounded


class FrechetDistance:
    """FID between reference images (the original model's, or real photos) and generated ones, in a named
    feature space. Fed set by set (``reset``, ``update``, ``compute``), so no set needs to be whole in memory."""

    def __init__(self, testbed: bool, inception_weights: str | Path | None = None) -> None:
        self.testbed = testbed
        self.weights = None if testbed else inception_weights_path(inception_weights)
        from torchmetrics.image.fid import FrechetInceptionDistance

        # Built once (a missing network fails here, before any sampling); reset() only empties its statistics.
        if testbed:
            self.metric = FrechetInceptionDistance(feature=_TestbedEncoderFeatures(), normalize=True)
        else:
            self.metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(self.weights))
        self.counts = {True: 0, False: 0}

    def reset(self) -> None:
        self.metric.reset()
        self.counts = {True: 0, False: 0}

    def update(self, images: torch.Tensor, real: bool) -> None:
        for batch in images.split(FEATURE_BATCH):
            self.metric.update(batch.float().cpu().clamp(0, 1), real=real)
        self.counts[real] += images.shape[0]

    def compute(self) -> float:
        if min(self.counts.values()) < 2:
            raise DarkMinerError("FID needs at least 2 images on each side; raise the number of preservation images")
        with warnings.catch_warnings():  # statistics restored by load_state count as fed, though not by update
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
            return max(self.metric.compute().item(), 0.0)

    def state(self) -> dict[str, Any]:
        """The statistics fed so far, for ``load_state`` (a resumed evaluation's)."""
        return {"metric": {name: value.clone() for name, value in self.metric.metric_state.items()},
                "counts": dict(self.counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        for name, value in state["metric"].items():  # torchmetrics keeps each statistic as an attribute
            setattr(self.metric, name, value)
        # compute() casts to the dtype update() saw last; a resume with every image already fed calls no
        # update(). The features are float32: update() feeds float images through float32 networks.
        self.metric.orig_dtype = torch.float32
        self.counts = dict(state["counts"])

    def __call__(self, reference: torch.Tensor, generated: torch.Tensor) -> float:
        self.reset()
        self.update(reference, real=True)
        self.update(generated, real=False)
        return self.compute()

    def describe(self) -> dict[str, Any]:
        if self.testbed:
            return {"name": "fid", "features": "testbed image encoder (384-d)", "library": "torchmetrics"}
        return {"name": "fid", "features": "InceptionV3 pool3 (2048-d)", "library": "torchmetrics"}
