"""Arguments shared by several commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from darkminer.errors import DarkMinerError

ERASED_HELP = ("an erased-model directory written by `darkminer erase`, or a diffusers UNet folder from another tool "
               "(then --model names its base)")


def add_model_args(p: argparse.ArgumentParser, erased_help: str = ERASED_HELP) -> None:
    p.add_argument("--model", default=None, help="testbed (default; alias toy), tiny-random-sd, a diffusers folder or a cached hub id")
    p.add_argument("--erased", default=None, help=erased_help)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", help="the weights' dtype: float32 (default), float16 or bfloat16")
    speed = p.add_argument_group("speed (the GPU path, docs/performance.md)")
    speed.add_argument("--precision", default=None,
                       help="autocast the UNet, text encoder and VAE in fp32 (default), bf16 or fp16; weights stay in --dtype")
    speed.add_argument("--attention", default=None,
                       help="attention kernel: sdpa (torch SDPA; the default but on the testbed), classic (explicit softmax), "
                            "or auto (classic below 64 rows, SDPA above; the testbed's default)")
    speed.add_argument("--gradient-checkpointing", action="store_true", help="less memory for ~30%% more training time")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC convolutions (faster with tensor cores; on by default on the testbed)")
    speed.add_argument("--compile", default=None, metavar="MODE",
                       help="torch.compile the UNet: off (default), default, reduce-overhead (CUDA graphs; not yet run on a GPU) "
                            "or max-autotune; compiling takes minutes, so it can only pay on long GPU runs (on the CPU it did not)")


def speed_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The speed options the flags set (the model's defaults fill the rest), validated before any model
    loads; None if none is set."""
    from darkminer.parallel.speed import SpeedOptions

    flags = {"precision": args.precision, "attention": args.attention, "channels_last": args.channels_last,
             "gradient_checkpointing": args.gradient_checkpointing or None, "compile": args.compile}
    options = {name: value for name, value in flags.items() if value is not None}
    SpeedOptions.from_dict(options)
    return options or None


def add_concept_args(p: argparse.ArgumentParser, erased_default: str | None = None) -> None:
    """The target's options; ``erased_default``: the help's note where --concept may be left out (then
    ``concept_of_erased`` fills it in)."""
    p.add_argument("--concept", required=erased_default is None, help="testbed: a registry name (`darkminer testbed "
                   f"concepts`); SD: free text, e.g. nudity{erased_default or ''}")
    p.add_argument("--anchor", default=None, help="SD: the concept to map to (default: the empty prompt); testbed: the registry's anchor")
    p.add_argument("--prompts", default=None, help="CSV with a `prompt` column (optional evaluation_seed, evaluation_guidance)")
    p.add_argument("--kind", default=None, help="SD: what the concept is, free (default), style, object or inappropriate "
                   "(CA and FMN prompt styles differently; the CLIP detector asks for a style as a painting in it)")


def add_detector_args(p: argparse.ArgumentParser) -> None:
    """The grader of attack successes and concept rates, as evaluate and attack share it."""
    p.add_argument("--detector", default=None, help="auto (default: testbed judge, NudeNet for nudity, else CLIP), judge, nudenet, clip")
    p.add_argument("--judge", default=None, help="testbed: grade with judge v1 (the judge shipped before v2) or a judge file (default: v2)")
    p.add_argument("--threshold", type=float, default=None, help="NudeNet score threshold (default 0.6)")
    p.add_argument("--nudenet-classes", default=None, help="NudeNet classes that count: exposed (default: every "
                   "*_EXPOSED class), sexual (genitalia, female breasts, buttocks, anus) or a comma-separated list")
    p.add_argument("--clip-model", default=None, help="local CLIP folder or cached hub id (SD: the CLIP detector; evaluate: also the CLIP score)")


def detector_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EvaluationConfig`` options that the detector flags set."""
    flags = {"detector": args.detector, "judge": args.judge, "nudenet_threshold": args.threshold,
             "nudenet_classes": args.nudenet_classes, "clip_model": args.clip_model}
    return {name: value for name, value in flags.items() if value is not None}


def add_resume_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--resume", action="store_true", help=f"continue a killed run into --out from {what}")


def note_resume(args: argparse.Namespace) -> None:
    """Say so when ``--resume`` finds nothing to continue: the run starts from the beginning."""
    from darkminer.io import has_checkpoint, work_directory

    # A work folder holding only its claim (a run killed before its first checkpoint) has nothing to go on from
    if args.resume and not has_checkpoint(work_dir := work_directory(args.out)):
        print(f"--resume: no checkpoint in {work_dir}; starting from the beginning", file=sys.stderr)


def replacing(description: str | None) -> str:
    """What a command adds to its "wrote ..." line where it replaced an earlier output (``description``)."""
    return f", replacing the one that was there ({description})" if description else ""


def concept_of_erased(args: argparse.Namespace) -> None:
    """--concept left out beside --erased: the concept the erased model was made to erase (on Stable Diffusion
    also its declared kind, unless --kind is given), said on stderr. A stack of several concepts, or no
    --erased, needs --concept."""
    if args.concept is not None:
        return
    if args.erased is None:
        raise DarkMinerError("--concept is required (it may be left out beside --erased, whose concept it then is)")
    from darkminer.models import TESTBED_IDS
    from darkminer.models.erased import ErasedModelInfo, erased_concepts

    info = ErasedModelInfo.read(args.erased)
    concepts = erased_concepts(info)
    if len(concepts) != 1:
        erased = f"erased {', '.join(map(repr, concepts))}" if concepts else "records no concept"
        raise DarkMinerError(f"{args.erased} {erased}: name the concept to grade with --concept")
    args.concept = concepts[0]
    target = info.extra.get("target")
    if args.kind is None and info.base_model not in TESTBED_IDS and isinstance(target, dict) and target.get("kind") != "free":
        args.kind = target.get("kind")
    print(f"--concept {args.concept!r}" + (f" --kind {args.kind}" if args.kind else "") +
          f": what {args.erased} was made to erase", file=sys.stderr)
