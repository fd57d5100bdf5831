"""The built-in erasers: importing a module registers its methods by name."""

from darkminer.erasers import esd  # noqa: F401
