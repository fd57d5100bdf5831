"""``darkminer erase``: remove a concept with one of the registered methods."""

from __future__ import annotations

import argparse
from pathlib import Path

from darkminer.commands.common import (
    add_concept_args,
    add_model_args,
    add_resume_arg,
    note_resume,
    replacing,
    speed_options,
)
from darkminer.erasers import BUILTIN_ERASERS

METHOD_NAMES = ", ".join(BUILTIN_ERASERS)  # the table, not the registry: importing the erasers would slow --help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "erase", help="erase a concept from a model",
        description="Erase a concept and write an erased-model directory (weights in safetensors + darkminer.json).",
    )
    p.add_argument("--method", required=True, help=f"one of {METHOD_NAMES}, or one a --plugin registers")
    add_concept_args(p)
    add_model_args(p, erased_help="an erased-model directory to erase on top of (several concepts, one after "
                                  "another); --model is then its base, as recorded unless given")
    p.add_argument("--config", default=None, help="JSON or YAML file of the method's config options")
    add_resume_arg(p, "its last checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from darkminer.api import erase

    note_resume(args)
    replaced = _earlier_erasure(args.out)
    out = erase(args.method, args.concept, args.out, model=args.model, erased=args.erased, config=args.config,
                anchor=args.anchor, prompts=args.prompts, kind=args.kind, resume=args.resume, device=args.device,
                dtype=args.dtype, speed=speed_options(args))
    print(f"wrote erased model {out}{replacing(replaced)}")


def _earlier_erasure(out: str) -> str | None:
    """What an earlier erase into ``out`` was ("esd-x on blood", a stack "esd-x on blood, over uce on nudity"),
    which this run replaces; None if none."""
    from dataclasses import asdict

    from darkminer.errors import DarkMinerError
    from darkminer.models.erased import INFO_NAME, ErasedModelInfo, stack_description

    if not (Path(out) / INFO_NAME).is_file():
        return None
    try:
        info = ErasedModelInfo.read(out)
    except DarkMinerError:  # a record we cannot read: still an earlier output, replaced
        return "an erased model whose record could not be read"
    return stack_description(asdict(info))
