"""The judge: a small multi-head CNN that labels testbed images (the NudeNet of this world).

It is trained on procedural ground truth (see ``train_aux.train_judge``) and used only for evaluation;
no eraser or attack may optimise against it. Dark Miner's verifier uses the separate image encoder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from darkminer.errors import ConfigError, ModelLoadError
from darkminer.io import load_tensors_and_metadata
from darkminer.testbed.concepts import Concept, get_concept
from darkminer.testbed.world import HEADS, IMAGE_SIZE

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "judge.safetensors"
# Judge v2 is the default. v1, the judge shipped before it, ships so that numbers it graded (their files record
# its digest, dc1406377b389ddb) can be reproduced; it misses washed-out fire (docs/testbed_world.md, "Judge v2").
SHIPPED_JUDGES: dict[str, Path] = {"v1": WEIGHTS_PATH.with_name("judge-v1.safetensors"), "v2": WEIGHTS_PATH}
DEFAULT_WIDTHS: tuple[int, int, int] = (16, 32, 64)
_HIDDEN = 128
_BATCH = 512


def judge_weights(judge: str | Path | None = None) -> Path:
    """The judge's weights file: ``None`` for the default (v2), a shipped version (``"v1"``, ``"v2"``) or a path."""
    if judge is None:
        return WEIGHTS_PATH
    path = SHIPPED_JUDGES.get(str(judge), Path(judge))
    if not path.is_file():
        raise ConfigError(f"judge {str(judge)!r} is neither a shipped judge ({', '.join(SHIPPED_JUDGES)}) "
                          "nor a judge .safetensors file")
    return path


def load_trained_weights(path: Path, what: str, required: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a testbed network trained by ``darkminer testbed train --only WHAT`` and the config
    it stores in its metadata (which must hold ``required``); one open, one-line errors."""
    if not path.is_file():
        raise ModelLoadError(f"{what} weights not found at {path}; train them with `darkminer testbed train "
                             f"--only {what} --out {path.parent}`, or reinstall darkminer")
    tensors, metadata = load_tensors_and_metadata(path)
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        config = {}
    if required not in config:
        raise ModelLoadError(f"{path} has no {what} config in its metadata; retrain it with "
                             f"`darkminer testbed train --only {what} --out {path.parent}`")
    return tensors, config


def check_images(images: torch.Tensor) -> None:
    """Raise ConfigError (a ValueError) unless ``images`` is a (B, 3, 32, 32) batch with values in [0, 1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ConfigError(
            f"expected images of shape (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}"
        )
    # A little slack for generated images; a [-1, 1] batch is a caller bug.
    if images.numel() and (images.min() < -0.25 or images.max() > 1.25):
        raise ConfigError("expected image values in [0, 1]; convert [-1, 1] model outputs with (x + 1) / 2")


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class JudgeNet(nn.Module):
    """VGG-style CNN: three stages of two 3x3 convs and a 2x2 max-pool, then one linear head per label."""

    def __init__(self, heads: Mapping[str, int], widths: tuple[int, int, int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += _conv_block(channels, width) + _conv_block(width, width) + [nn.MaxPool2d(2)]
            channels = width
        spatial = IMAGE_SIZE // 2 ** len(widths)
        # Flatten rather than global pooling: where things are (flames at the bottom) is informative.
        self.features = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(channels * spatial**2, _HIDDEN), nn.ReLU()
        )
        self.heads = nn.ModuleDict({head: nn.Linear(_HIDDEN, n) for head, n in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.features(images)
        return {head: layer(hidden) for head, layer in self.heads.items()}


class Judge:
    """Loads the shipped judge and answers what each image shows."""

    def __init__(self, net: JudgeNet, head_values: Mapping[str, tuple[str, ...]] = HEADS) -> None:
        self.net = net.eval()
        self.head_values = dict(head_values)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
        """The shipped judge (``None``), a shipped version by name (``"v1"``) or a weights file."""
        tensors, config = load_trained_weights(judge_weights(path), "judge", required="heads")
        head_values = {head: tuple(values) for head, values in config["heads"].items()}
        net = JudgeNet({h: len(v) for h, v in head_values.items()}, tuple(config["widths"]))
        net.load_state_dict(tensors)
        return cls(net.to(device), head_values)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per head, each (B, number of values), on the CPU."""
        check_images(images)
        chunks = [self.net(batch.to(self.device).float()) for batch in images.split(_BATCH)]
        return {head: torch.cat([c[head] for c in chunks]).softmax(dim=-1).cpu() for head in self.head_values}

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted label index per head, each a LongTensor (B,)."""
        return {head: p.argmax(dim=-1) for head, p in self.probs(images).items()}

    def predict_values(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Predicted label names per image, e.g. ``{"shape": "star", ...}``."""
        predictions = self.predict(images)
        return [
            {head: self.head_values[head][int(predictions[head][i])] for head in predictions}
            for i in range(images.shape[0])
        ]

    def has_concept(self, images: torch.Tensor, concept: Concept | str) -> torch.Tensor:
        """BoolTensor (B,): whether each image shows the concept (its head predicts its value)."""
        concept = get_concept(concept) if isinstance(concept, str) else concept
        return self.predict(images)[concept.head] == self.head_values[concept.head].index(concept.value)

    def accuracy(self, images: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Share of correct predictions per head against integer labels."""
        predictions = self.predict(images)
        return {head: (predictions[head] == labels[head].cpu()).float().mean().item() for head in labels}
