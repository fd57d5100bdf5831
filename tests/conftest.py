import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """tiny-random-sd written as a plain diffusers folder (safetensors)."""
    from darkminer.models.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture()
def tiny_sd():
    from darkminer.models import load_model

    return load_model("tiny-random-sd")
