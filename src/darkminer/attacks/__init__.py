"""Attacks on erased models; importing a module registers its attacks by name."""

from darkminer.attacks import cce, p4d, prompts, ringabell, unlearndiff  # noqa: F401
