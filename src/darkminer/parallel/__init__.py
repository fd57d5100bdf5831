"""Speed at Stable Diffusion scale (mixed precision, SDPA, checkpointing, channels-last) and more than one
process (sharded generation, DDP training) through accelerate. See docs/performance.md."""

from darkminer.parallel.distributed import Processes, data_parallel, init_processes, sharded_sample
from darkminer.parallel.speed import SpeedOptions, apply_speed_options, attention_processors

__all__ = [
    "Processes",
    "SpeedOptions",
    "apply_speed_options",
    "attention_processors",
    "data_parallel",
    "init_processes",
    "sharded_sample",
]
