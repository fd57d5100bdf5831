"""Dark Miner: mining, verifying and circumventing in a recurring loop (see loop.py)."""

from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.erasers.darkminer.loop import DarkMiner, keep_rounds, load_rounds

__all__ = ["DarkMiner", "DarkMinerConfig", "keep_rounds", "load_rounds"]
