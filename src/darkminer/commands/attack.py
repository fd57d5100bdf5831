"""``darkminer attack``: attack a (possibly erased) model and save what the attack found; or replay a
saved attack on another model (transfer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from darkminer.attacks import BUILTIN_ATTACKS
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
from darkminer.errors import DarkMinerError

ATTACK_NAMES = ", ".join(BUILTIN_ATTACKS)  # the table, not the registry: importing the attacks would slow --help
DEFAULT_N_PROMPTS = 16


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack", help="attack a model with adversarial prompts",
        description="Run an attack against a base or erased model; writes OUT/attack.json (per-prompt success, "
                    "adversarial prompts, attack success rate) and OUT/embeddings.safetensors for soft attacks.",
    )
    p.add_argument("--attack", default=None, help=f"one of {ATTACK_NAMES}, or one a --plugin registers (not with "
                                                  "--replay)")
    add_concept_args(p, erased_default="; left out, the concept of the --replay attack, or the one --erased was made "
                                        "to erase")
    add_model_args(p)
    p.add_argument("--config", default=None, help="JSON or YAML file of the attack's config options")
    p.add_argument("--n-prompts", type=int, default=None,
                   help=f"prompts to attack: the first N of --prompts, else N concept prompts (default {DEFAULT_N_PROMPTS})")
    p.add_argument("--seed", type=int, default=None, help="the attack's seed (overrides the config)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps of the images judged and aimed at (default: the model's; a replay on the attack's base model draws as the attack did)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of those images (default: the model's; a CSV's evaluation_guidance holds for its row)")
    p.add_argument("--replay", default=None, help="a directory written by `darkminer attack`: judge its prompts again on this model")
    p.add_argument("--use-text", action="store_true", help="with --replay: replay the readable text, not token ids/embeddings")
    add_resume_arg(p, "its progress (the prompts searched, CCE's last checkpoint)")
    add_detector_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from darkminer.io import main_process_lock

    with main_process_lock(args.out):  # from the start: a second run on --out is refused before it loads
        _run(args)


def _run(args: argparse.Namespace) -> None:
    from darkminer.api import attack
    from darkminer.attacks.base import attack_success_rate, get_attack
    from darkminer.attacks.io import (
        OUTPUT_KIND,
        RESULTS_KEYS,
        RESULTS_NAME,
        load_results,
        replay,
        save_results,
    )
    from darkminer.io import read_record

    if (args.attack is None) == (args.replay is None):
        raise DarkMinerError("give either --attack NAME or --replay DIR")
    if args.replay:
        ignored = [flag for flag, value in (("--config", args.config), ("--seed", args.seed),
                                            ("--n-prompts", args.n_prompts), ("--resume", args.resume or None))
                   if value is not None]
        if ignored:
            raise DarkMinerError(f"--replay judges the saved prompts again, as they were found; {', '.join(ignored)} "
                                 "would change nothing: leave them out")
    elif args.use_text:
        raise DarkMinerError("--use-text goes with --replay (it replays a saved attack's readable text)")
    earlier = read_record(Path(args.out) / RESULTS_NAME, RESULTS_KEYS)
    if args.attack:
        concept_of_erased(args)
        note_resume(args)
        config = get_attack(args.attack).config_class.from_file(args.config, seed=args.seed)
        n_prompts = DEFAULT_N_PROMPTS if args.n_prompts is None else args.n_prompts
        results = attack(args.attack, args.concept, args.out, model=args.model, erased=args.erased, config=config,
                         anchor=args.anchor, prompts=args.prompts, kind=args.kind, n_prompts=n_prompts,
                         steps=args.steps, guidance_scale=args.guidance, grading=detector_options(args),
                         resume=args.resume, device=args.device, dtype=args.dtype, speed=speed_options(args))
    else:
        from darkminer.api import attack_sampling
        from darkminer.evaluation import EvaluationConfig, concept_detector
        from darkminer.evaluation.evaluate import check_grader_options
        from darkminer.io import check_output_directory, overlap
        from darkminer.models import base_id, is_testbed, load_model
        from darkminer.models.erased import ErasedModelInfo, warn_unless_erased
        from darkminer.parallel import init_processes
        from darkminer.targets import check_target, resolve_target

        if overlap(args.out, args.replay):  # the replay's results would replace the searches they replay
            raise DarkMinerError(f"--out {args.out} and --replay {args.replay} overlap; write the replay's results "
                                 "to another folder")
        check_output_directory(args.out, RESULTS_NAME, OUTPUT_KIND, apart_from=args.erased,  # before loading
                               marker_keys=RESULTS_KEYS)
        grading = EvaluationConfig.from_dict(detector_options(args))  # bad detector options fail before loading too
        asked = attack_sampling(args.steps, args.guidance)  # and bad sampling
        meta, saved = load_results(args.replay)  # and a damaged replay
        recorded_target = meta.get("target")
        found_for = recorded_target.get("name") if isinstance(recorded_target, dict) else None
        if args.concept is None and found_for is None:  # an attack.json from before targets were recorded
            raise DarkMinerError(f"{args.replay} does not record its concept: name it with --concept")
        args.concept = args.concept or found_for
        testbed = base_id(args.model, args.erased) == "testbed"
        check_target(args.concept, testbed, kind=args.kind, prompts_csv=args.prompts)
        check_grader_options(grading, testbed)
        model = load_model(args.model, erased=args.erased, device=args.device, dtype=args.dtype, speed=speed_options(args))
        recorded_kind = recorded_target.get("kind") if isinstance(recorded_target, dict) else None
        if args.kind is None and not is_testbed(model) and recorded_kind != "free":  # graded as the attack graded
            args.kind = recorded_kind
        target = resolve_target(model, args.concept, anchor=args.anchor, prompts_csv=args.prompts, kind=args.kind)
        if found_for is not None and found_for != target.name:  # else a clean-looking rate for the wrong concept
            raise DarkMinerError(f"{args.replay} holds prompts attacked for {found_for!r}, not {target.name!r}: "
                                 f"replay them with --concept {found_for!r}")
        record = ErasedModelInfo.read(args.erased) if args.erased else None
        warn_unless_erased(record, target.name, args.erased)
        success = concept_detector(model, target, config=grading)
        # On the attack's own base model (erased or not), drawn as the attack drew; on another model (--use-text)
        # or from an attack.json written before sampling was recorded, at the model's defaults; the flags win.
        recorded = (meta.get("sampling") or {}) if meta.get("model") == model.name else {}
        steps = recorded.get("steps") if asked[0] is None else asked[0]
        guidance = recorded.get("guidance_scale") if asked[1] is None else asked[1]
        with model.sampling_defaults(steps, guidance):
            results = replay(model, saved, success, use_text=args.use_text)
            drawn = model.default_sampling
        # Under a launcher every process replays the whole set; the main one writes.
        init_processes().on_main(lambda: save_results(
            args.out, results, attack=meta["attack"], config={**meta["config"], "replayed_from": args.replay},
            target=target, model=model.name, success=success, erased=record.record(args.erased) if record else None,
            sampling=drawn))
    was = (earlier or {}).get("target")
    replaced = earlier and f"{earlier.get('attack')} on {was.get('name') if isinstance(was, dict) else 'a concept'}"
    broken = sum(r.success for r in results)  # as evaluate's summary line gives a rate: with its count
    print(f"ASR {100 * attack_success_rate(results):.1f}% ({broken}/{len(results)} prompts broken); wrote {args.out}"
          f"{replacing(replaced)}")
