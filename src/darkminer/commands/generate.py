"""``darkminer generate``: draw images from a base or erased model into a PNG grid."""

from __future__ import annotations

import argparse

from darkminer.commands.common import add_model_args, speed_options
from darkminer.errors import DarkMinerError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="draw images from a base or erased model", description="Draw N images for one prompt into a PNG grid.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("-n", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--allow-empty", action="store_true", help="accept an empty prompt (unconditional samples)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from darkminer.imaging import make_grid, save_png
    from darkminer.io import check_output_file
    from darkminer.models import load_model
    from darkminer.parallel import init_processes, sharded_sample

    if not args.prompt.strip() and not args.allow_empty:
        raise DarkMinerError("--prompt is empty; give a prompt (or --allow-empty for unconditional samples)")
    if args.n < 1:
        raise DarkMinerError("-n must be >= 1")
    if not args.out.lower().endswith(".png"):
        raise DarkMinerError(f"--out must name a .png file, got {args.out}")
    check_output_file(args.out)
    processes = init_processes()  # before loading: under a launcher each process takes its own GPU
    model = load_model(args.model, erased=args.erased, device=args.device, dtype=args.dtype, speed=speed_options(args))
    seeds = [args.seed + i for i in range(args.n)]
    with torch.no_grad():
        cond = model.encode([args.prompt]).expand(args.n, -1, -1)
    images = sharded_sample(model, cond, seeds, steps=args.steps, guidance_scale=args.guidance, progress=True,
                            processes=processes)
    if not processes.is_main:
        return
    scale = max(1, 256 // images.shape[-1])
    path = save_png(make_grid(images, scale=scale), args.out)
    print(f"wrote {path} ({args.n} images, seeds {seeds[0]}..{seeds[-1]})")
