"""``darkminer testbed concepts|train|check``: the embedded testbed's registry, training and gates."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="the embedded testbed: concepts, training, gates",
                       description="The embedded testbed model: list its concepts, retrain it, measure its gates.")
    tb = p.add_subparsers(dest="testbed_command", required=True, metavar="SUBCOMMAND")

    c = tb.add_parser("concepts", help="one line per target concept: NAME KIND",
                      description="List the testbed's target concepts, one line each: NAME KIND.")
    c.set_defaults(handler=_concepts)

    t = tb.add_parser("train", help="retrain the judge, the image encoder and the UNet from a seed (the UNet resumes)",
                      description="Retrain the testbed's judge, image encoder and UNet from a seed into --out "
                                  "(docs/testbed.md). The UNet's training (hours) resumes from --work-dir; the "
                                  "judge and the encoder (minutes) are trained whole each run (--only unet skips them).")
    t.add_argument("--seed", type=int, default=None, help="override the recipes' seed (default: theirs)")
    t.add_argument("--work-dir", default="runs/testbed-train",
                   help="the UNet's checkpoints and caches (a rerun resumes from here)")
    t.add_argument("--out", required=True,
                   help="weights folder to write (judge.safetensors, image_encoder.safetensors, unet/); the shipped "
                        "weights are replaced only if you name their folder (src/darkminer/testbed/weights in a checkout)")
    t.add_argument("--unet-config", default="unet-stage1",
                   help="UNet training recipe: a YAML/JSON file or a shipped recipe name "
                        "(unet-stage1, unet-stage2; default unet-stage1)")
    t.add_argument("--unet-steps", type=int, default=None, help="override the recipe's number of steps")
    t.add_argument("--init-from", default=None, help="UNet folder to continue from (stage 2 starts from stage 1)")
    t.add_argument("--only", choices=("judge", "encoder", "unet"), default=None, help="train one of the three")
    t.set_defaults(handler=_train)

    k = tb.add_parser("check", help="measure the testbed's gates with the judge; writes JSON",
                      description="Measure the testbed's gates (concept rates, speed, the ESD-x + CCE residual) "
                                  "with the judge and write them to a JSON file (docs/testbed.md).")
    k.add_argument("--out", required=True, help="output JSON file")
    k.add_argument("--config", default=None,
                   help="JSON or YAML file of check options (CheckConfig: also judge_images, timing_images, "
                        "esd_iterations...; docs/testbed.md); flags override it")
    k.add_argument("-n", type=int, default=None, help="images per cell (default 200)")
    k.add_argument("--seed", type=int, default=None, help="seed of the prompts and images (default 0)")
    k.add_argument("--concepts", default=None, help="comma-separated subset (default: all six)")
    k.add_argument("--no-residual", action="store_true", help="skip the ESD-x + CCE residual gate (slow)")
    k.add_argument("--cce-steps", type=int, default=None,
                   help="CCE optimiser steps of the residual's attack (default 900; docs/testbed.md)")
    k.add_argument("--judge", default=None, help="grade with judge v1 (the judge shipped before v2) or a judge file (default: v2)")
    k.set_defaults(handler=_check)


def _concepts(args: argparse.Namespace) -> None:
    from darkminer.testbed.concepts import CONCEPTS, concept_names

    for name in concept_names():
        print(f"{name} {CONCEPTS[name].kind}")


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from darkminer.io import check_output_file
    from darkminer.testbed import train_aux
    from darkminer.testbed.train_unet import UNetTrainConfig, check_training_folders, train_unet

    out = Path(args.out)
    files = {"judge": out / "judge.safetensors", "encoder": out / "image_encoder.safetensors"}
    parts = [part for part in files if args.only in (None, part)]
    # read and checked first: a bad recipe or folder fails in a second, not after the judge and the encoder trained
    config = UNetTrainConfig.from_recipe(args.unet_config, seed=args.seed, steps=args.unet_steps,  # --threads
                                         init_from=args.init_from, threads=args.threads) if args.only in (None, "unet") else None
    for part in parts:
        check_output_file(files[part])
    if config is not None:
        check_training_folders(args.work_dir, out / "unet")
    if "judge" in parts:
        train_aux.train_judge(seed=args.seed or 0, out_path=files["judge"])
    if "encoder" in parts:
        train_aux.train_image_encoder(seed=args.seed or 0, out_path=files["encoder"])
    if config is not None:
        log = train_unet(config, args.work_dir, out / "unet")
        print(f"UNet trained: {config.steps} steps in {log['seconds']:.0f} s")
    print(f"weights in {out}")


def _check(args: argparse.Namespace) -> None:
    from darkminer.config import load_config_file
    from darkminer.io import check_output_file, write_json
    from darkminer.testbed.check import CheckConfig, run_check

    check_output_file(args.out)  # before the check (minutes), not after it
    options = load_config_file(args.config) if args.config else {}
    flags = {"n_images": args.n, "seed": args.seed, "judge": args.judge, "cce_steps": args.cce_steps}
    options.update({name: value for name, value in flags.items() if value is not None})
    if args.no_residual:
        options["residual"] = False
    if args.concepts is not None:  # an empty list is refused, not read as "all six"
        options["concepts"] = [c.strip() for c in args.concepts.split(",") if c.strip()]
    report = run_check(CheckConfig.from_dict(options))
    write_json(args.out, report)
    print(f"wrote {args.out}")
