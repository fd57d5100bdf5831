"""darkminer: erase concepts from text-to-image diffusion models so that no prompt brings them back.

The API mirrors the CLI: ``erase``, ``generate``, ``attack``, ``evaluate``, ``export``, ``run_benchmark``,
``load_model``. Piece by piece, an attack is ``build_attack(name, options)`` run by
``run_attack(attack, model, target, prompts, success)`` with ``target = resolve_target(model, concept)``,
``AttackPrompt`` prompts and ``success = concept_detector(model, target)``. One's own methods subclass
``Eraser``/``EraserConfig`` or ``Attack``/``AttackConfig`` and register with ``register_eraser`` or
``register_attack`` (docs/methods.md, "Your own eraser or attack"). Errors are ``DarkMinerError``s,
warnings ``DarkMinerWarning``s. Imports are lazy so that ``import darkminer`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "erase": "darkminer.api",
    "export": "darkminer.api",
    "attack": "darkminer.api",
    "generate": "darkminer.api",
    "evaluate": "darkminer.evaluation",
    "run_benchmark": "darkminer.evaluation",
    "compare_evaluations": "darkminer.evaluation.report",
    "load_model": "darkminer.models",
    "DiffusionModel": "darkminer.models",
    "get_eraser": "darkminer.erasers.base",
    "Eraser": "darkminer.erasers.base",
    "EraserConfig": "darkminer.erasers.base",
    "register_eraser": "darkminer.erasers.base",
    "get_attack": "darkminer.attacks.base",
    "build_attack": "darkminer.attacks.base",
    "Attack": "darkminer.attacks.base",
    "AttackConfig": "darkminer.attacks.base",
    "AttackPrompt": "darkminer.attacks.base",
    "AttackResult": "darkminer.attacks.base",
    "register_attack": "darkminer.attacks.base",
    "run_attack": "darkminer.attacks.io",
    "EraseTarget": "darkminer.targets",
    "resolve_target": "darkminer.targets",
    "EvaluationConfig": "darkminer.evaluation",
    "concept_detector": "darkminer.evaluation",
    "SpeedOptions": "darkminer.parallel",
    "DarkMinerError": "darkminer.errors",
    "ConfigError": "darkminer.errors",
    "ModelLoadError": "darkminer.errors",
    "DarkMinerWarning": "darkminer.errors",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'darkminer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
