"""``darkminer generate``: draw images from a base or erased model into a PNG grid."""

from __future__ import annotations

import argparse

from darkminer.commands.common import add_model_args, speed_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="draw images from a base or erased model", description="Draw N images for one prompt into a PNG grid.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("-n", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept an empty prompt or a guidance scale of 0 or below (unconditional samples)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from darkminer.api import generate

    generate(args.prompt, args.out, model=args.model, erased=args.erased, n=args.n, seed=args.seed, steps=args.steps,
             guidance_scale=args.guidance, allow_empty=args.allow_empty, device=args.device, dtype=args.dtype,
             speed=speed_options(args), progress=True)
    print(f"wrote {args.out} ({args.n} image{'s' * (args.n != 1)}, seeds {args.seed}..{args.seed + args.n - 1})")
