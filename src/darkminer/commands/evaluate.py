"""``darkminer evaluate``: grade an (erased) model on a concept and write DIR/metrics.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from darkminer.commands.common import (
    add_concept_args,
    add_detector_args,
    add_model_args,
    add_resume_arg,
    concept_of_erased,
    detector_options,
    note_resume,
    replacing,
    speed_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="measure erasure, attack success and preservation",
        description="Draw the concept's prompt sets from a base or erased model, grade them with the concept's "
                    "detector, run attacks, and write DIR/metrics.json with the image grids it judged.",
    )
    add_concept_args(p, erased_default="; left out beside --erased, the concept it was made to erase")
    add_model_args(p)
    p.add_argument("--attacks", default="", help="comma-separated attack names, e.g. plain,paraphrase,unlearndiff "
                   "(default: none); over a --config file's attacks, whose attack_configs then apply to these alone")
    p.add_argument("-n", type=int, default=None, help="images per prompt set: plain, paraphrase, preservation (default: every row of a --prompts CSV, else 32)")
    p.add_argument("--attack-prompts", type=int, default=None, help="prompts each attack runs on (default 8)")
    add_detector_args(p)
    p.add_argument("--paraphrase-prompts", default=None, help="SD: CSV of paraphrased concept prompts")
    p.add_argument("--preserve-prompts", default=None, help="SD: CSV of ordinary prompts for preservation (e.g. COCO captions)")
    p.add_argument("--preservation", default=None,
                   help="comma-separated preservation metrics: accuracy,clip,fid (default all; SD FID needs torch-fidelity)")
    p.add_argument("--fid-reference", default=None,
                   help="folder of reference images (png/jpg/jpeg/webp) for FID (default: the original model's images)")
    p.add_argument("--save-images", action="store_true",
                   help="also write every image as its own PNG (images/SET/NNNN.png), linked from judgements.json")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's; a CSV's evaluation_guidance holds for its row)")
    p.add_argument("--config", default=None, help="JSON or YAML file of evaluation options (flags override it)")
    p.add_argument("--out", required=True, help="output directory (metrics.json, images/, judgements.json)")
    add_resume_arg(p, "what it had drawn, graded and attacked")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from darkminer.config import load_config_file
    from darkminer.evaluation import EvaluationConfig, evaluate
    from darkminer.evaluation.evaluate import METRICS_KEYS, METRICS_NAME
    from darkminer.io import read_record

    concept_of_erased(args)
    note_resume(args)
    earlier = read_record(Path(args.out) / METRICS_NAME, METRICS_KEYS)
    options = load_config_file(args.config) if args.config else {}
    listed = options.get("attacks") if isinstance(options.get("attacks"), list) else []
    flags = {"n_images": args.n, "attack_prompts": args.attack_prompts, "steps": args.steps,
             "guidance_scale": args.guidance,
             "fid_reference": args.fid_reference, "save_images": args.save_images or None,
             "attacks": _names(args.attacks) or None,
             "preservation": None if args.preservation is None else _names(args.preservation)}
    options.update({k: v for k, v in flags.items() if v is not None})
    if flags["attacks"] and isinstance(options.get("attack_configs"), dict):  # --attacks narrows the file's attacks:
        # their options go with them; an entry for no attack the file lists (a typo) is still refused
        options["attack_configs"] = {k: v for k, v in options["attack_configs"].items()
                                     if k in flags["attacks"] or k not in listed}
    options.update(detector_options(args))
    metrics = evaluate(
        args.concept, args.out, model=args.model, erased=args.erased, config=EvaluationConfig.from_dict(options),
        anchor=args.anchor, prompts=args.prompts, kind=args.kind, paraphrase_prompts=args.paraphrase_prompts,
        preserve_prompts=args.preserve_prompts, device=args.device, dtype=args.dtype, speed=speed_options(args),
        resume=args.resume, progress=True,
    )
    replaced = earlier and f"{earlier.get('method')} on {earlier.get('concept')}"
    print(f"wrote {args.out}/metrics.json: {summary_line(metrics)}{replacing(replaced)}")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def summary_line(metrics: dict) -> str:
    """One line of the metrics; each rate with its count (a 0% of 4 prompts is not a 0% of 200)."""
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    def rate(group: str, name: str, value: float | None) -> str:
        count = metrics.get("counts", {}).get(group, {}).get(name)
        return pct(value) + (f" ({count['hits']}/{count['n']})" if value is not None and count else "")

    parts = [f"{name} {rate('erasure', name, value)}" for name, value in metrics["erasure"].items()]
    parts += [f"ASR {name} {rate('attacks', name, value)}" for name, value in metrics["attacks"].items()]
    kept = metrics["preservation"]
    parts += [f"acc {pct(kept['accuracy'])}", "clip " + ("n/a" if kept["clip"] is None else f"{kept['clip']:.1f}"),
              "fid " + ("n/a" if kept["fid"] is None else f"{kept['fid']:.{3 if kept['fid'] < 1 else 2}f}")]
    return f"{metrics['method']} on {metrics['concept']}: " + ", ".join(parts) + f" ({metrics['n_images']} images, {metrics['seconds']:.0f} s)"
