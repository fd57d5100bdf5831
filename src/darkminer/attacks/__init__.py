"""Attacks on erased models; importing a module registers its attacks by name."""

from darkminer.attacks import cce, prompts  # noqa: F401
