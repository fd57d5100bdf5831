"""``darkminer export``: an erased model as a plain diffusers pipeline folder, for deployment."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write an erased model as a plain diffusers pipeline",
        description="Fold an erasure into the base model's weights and write a Stable Diffusion pipeline folder "
                    "that StableDiffusionPipeline.from_pretrained loads without darkminer (Stable Diffusion erasures "
                    "only: the testbed is no diffusers pipeline).",
    )
    p.add_argument("--erased", required=True, help="an erased-model directory written by `darkminer erase`")
    p.add_argument("--model", default=None, help="the base model (default: the one the erased directory records)")
    p.add_argument("--dtype", default="float32", help="the weights' dtype in the export: float32 (default), float16 or bfloat16")
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from darkminer.api import export
    from darkminer.commands.common import replacing
    from darkminer.io import EXPORT_RECORD, WHOLE_OUTPUTS, read_record
    from darkminer.models.erased import stack_description

    earlier = read_record(Path(args.out) / EXPORT_RECORD, WHOLE_OUTPUTS[EXPORT_RECORD][1])
    carried = earlier and isinstance(earlier["erasure"], dict) and stack_description(earlier["erasure"])
    out = export(args.erased, args.out, model=args.model, dtype=args.dtype)
    replaced = (carried or "an export whose record could not be read") if earlier else None
    print(f"wrote diffusers pipeline {out}{replacing(replaced)}")
