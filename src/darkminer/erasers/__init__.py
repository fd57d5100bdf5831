"""The built-in erasers: importing a module registers its methods by name."""

from darkminer.erasers import (
    advunlearn,  # noqa: F401
    ca,  # noqa: F401
    darkminer,  # noqa: F401
    esd,  # noqa: F401
    fmn,  # noqa: F401
    rece,  # noqa: F401
    sld,  # noqa: F401
    uce,  # noqa: F401
)
