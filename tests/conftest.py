import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)  # one thread per test process: pytest-xdist's workers (-n auto) use the cores


def pytest_xdist_auto_num_workers(config):
    # Each worker holds torch, diffusers and the tiny models (about 1 GB): a core each, at most four.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    return min(cores, 4)


def pytest_collection_modifyitems(items):
    # Tests marked `first` run first: under -n auto the other workers share out the rest meanwhile, where
    # one such test started last would run alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """tiny-random-sd written as a plain diffusers folder (safetensors)."""
    from darkminer.models.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture()
def tiny_sd():
    from darkminer.models import load_model

    return load_model("tiny-random-sd")
