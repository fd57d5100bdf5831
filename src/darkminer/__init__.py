"""darkminer: erase concepts from text-to-image diffusion models so that no prompt brings them back.

The API mirrors the CLI: ``erase``, ``evaluate``, ``run_benchmark``, ``load_model``; attacks are run with
``darkminer.attacks.get_attack(name)`` and ``darkminer.attacks.io.run_attack``. Imports are lazy so that
``import darkminer`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "erase": "darkminer.api",
    "evaluate": "darkminer.evaluation",
    "run_benchmark": "darkminer.evaluation",
    "load_model": "darkminer.models",
    "DiffusionModel": "darkminer.models",
    "get_eraser": "darkminer.erasers.base",
    "get_attack": "darkminer.attacks.base",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'darkminer' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
