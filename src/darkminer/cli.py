"""The ``darkminer`` command: parses arguments, builds configs, calls the Python API. Nothing more."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from darkminer.errors import DarkMinerError

Handler = Callable[[argparse.Namespace], int | None]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="testbed (default; alias toy), tiny-random-sd, a diffusers folder or a cached hub id")
    p.add_argument("--erased", default=None, help="an erased-model directory written by `darkminer erase`")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")


def _cmd_generate(args: argparse.Namespace) -> None:
    from darkminer.imaging import make_grid, save_png
    from darkminer.models import load_model

    if not args.prompt.strip() and not args.allow_empty:
        raise DarkMinerError("--prompt is empty; give a prompt (or --allow-empty for unconditional samples)")
    if args.n < 1:
        raise DarkMinerError("-n must be >= 1")
    if not args.out.lower().endswith(".png"):
        raise DarkMinerError(f"--out must name a .png file, got {args.out}")
    model = load_model(args.model, erased=args.erased, device=args.device, dtype=args.dtype)
    seeds = [args.seed + i for i in range(args.n)]
    images = model.generate([args.prompt] * args.n, seeds, steps=args.steps, guidance_scale=args.guidance, progress=True)
    scale = max(1, 256 // images.shape[-1])
    path = save_png(make_grid(images, scale=scale), args.out)
    print(f"wrote {path} ({args.n} images, seeds {seeds[0]}..{seeds[-1]})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkminer",
        description="Erase a concept from a text-to-image diffusion model so that no prompt brings it back.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="draw images from a base or erased model", description="Draw N images for one prompt into a PNG grid.")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("-n", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--allow-empty", action="store_true", help="accept an empty prompt (unconditional samples)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.set_defaults(handler=_cmd_generate)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (deprecations, optional-backend notices) hides our own one-line messages."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # we never download; fail fast instead of retrying
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except DarkMinerError as exc:
        print(f"darkminer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("darkminer: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
