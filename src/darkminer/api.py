"""The Python API; the CLI is a thin layer over it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darkminer.config import SEED_LIMIT, check_argument, check_seed
from darkminer.erasers.base import Eraser, EraserConfig, get_eraser
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.io import (
    check_no_unfinished_run,
    check_output_directory,
    claim_work_directory,
    exclusive_output,
    has_checkpoint,
    output_directory,
    read_json,
    released_if_unused,
    remove_work_directory,
    work_directory,
    write_json,
)
from darkminer.models import base_id, check_placement, erased_base, load_model, model_id
from darkminer.models.base import GUIDANCES, ClassifierFreeGuidance, DiffusionModel, SamplingOptions
from darkminer.models.erased import (
    EXPORT_INFO,
    INFO_NAME,
    OUTPUT_KIND,
    WEIGHT_KINDS,
    ErasedModelInfo,
    erasure_adopted,
    read_stackable,
    save_erased,
    warn_unless_erased,
)
from darkminer.provenance import code_identity, code_record, package_versions
from darkminer.targets import check_target, resolve_target

if TYPE_CHECKING:
    from darkminer.attacks.base import AttackConfig, AttackResult
    from darkminer.evaluation import EvaluationConfig
    from darkminer.parallel import SpeedOptions


EXPORTED_KIND = "an exported pipeline"  # what `export` may replace at --out


def _check_not_erased(model: DiffusionModel) -> None:
    """A model given to ``erase`` must be a base: a second erasure would silently stack on the first
    (``erased=`` stacks it on purpose, and records it)."""
    from darkminer.models.adapters import has_lora

    if has_lora(model) or model.edited_parameter_names or not isinstance(model.guidance, ClassifierFreeGuidance):
        raise ConfigError("this model already carries an erasure (erase changes the model it is given); "
                          "erase from a freshly loaded base model, with erased= naming the erasure to stack on")


@exclusive_output()
def erase(
    method: str,
    concept: str,
    out: str | Path,
    *,
    model: str | DiffusionModel | None = None,
    erased: str | Path | None = None,
    config: EraserConfig | dict[str, Any] | str | Path | None = None,
    anchor: str | None = None,
    prompts: str | Path | None = None,
    kind: str | None = None,
    resume: bool = False,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    speed: SpeedOptions | dict[str, Any] | None = None,
) -> Path:
    """Erase ``concept`` with ``method`` and write the erased-model directory ``out``.

    ``model``: a name or path to load, or a loaded base ``DiffusionModel``, which the erasure then changes
    in place (a model that already carries an erasure is refused).
    ``erased``: an erased-model directory to erase on top of, for several concepts one after another. The
    erased model is then the one being erased (the teacher, the image pools) and the base is the one it
    records (or ``model``); ``out`` records it and, unless it is whole weights (a UNet or a text encoder,
    which hold the erasure below), holds a copy of it.
    ``kind`` declares what a Stable Diffusion concept is (``targets.SD_KINDS``; e.g. ``style`` for an artist,
    which CA and FMN prompt differently); the testbed's concepts have theirs.
    ``resume`` continues a killed run from its last checkpoint (kept in ``out``'s work directory).
    ``speed``: the speed options (``SpeedOptions``, or a dict of the ones to change over the model's
    defaults), applied to the loaded model.
    ``device`` and ``dtype``: where and in what a model given by name is loaded (None: cpu, float32); a
    loaded model is used where it is, and one that is not on them is refused.
    """
    from darkminer.parallel import init_processes
    from darkminer.parallel.speed import (
        apply_speed_options,
        as_speed_options,
        resolve_speed_options,
        speed_run_record,
    )

    # Under `accelerate launch` every process runs the whole erase (DDP in circumventing); only the main
    # process writes the work directory's checkpoints and the output.
    processes = init_processes()
    for name, value, hint in (("method", method, str), ("concept", concept, str), ("anchor", anchor, str | None)):
        check_argument(name, value, hint)
    if isinstance(model, DiffusionModel):
        check_placement(model, device, dtype)
    out = check_output_directory(out, INFO_NAME, OUTPUT_KIND, apart_from=erased)  # before the work, not after it
    work_dir = work_directory(out)
    as_speed_options(speed)  # bad options fail before the (long) load
    eraser_cls = get_eraser(method)
    below = None if erased is None else read_stackable(erased)
    spec = model.name if isinstance(model, DiffusionModel) else model
    if erased is not None:
        spec = erased_base(erased, spec)
    check_target(concept, model_id(spec) == "testbed", kind=kind, prompts_csv=prompts)
    cfg = eraser_cls.config_for(config, model_id(spec))  # a config of another method fails here, before the load
    eraser = eraser_cls(cfg)
    cfg.check_model(model_id(spec))
    if not resume:  # after the arguments' own errors; every process (it only reads), so that each stops alike
        check_no_unfinished_run(work_dir)
    if isinstance(model, DiffusionModel):
        base = model
        _check_not_erased(base)
        if speed is not None:
            apply_speed_options(base, speed)
    else:
        base = load_model(model_id(spec), device=device, dtype=dtype, speed=speed)
    if speed is not None:  # what the model now runs with: the options given over its defaults
        speed = resolve_speed_options(base, speed)
    target = resolve_target(base, concept, anchor=anchor, prompts_csv=prompts, seed=cfg.seed, kind=kind)
    code = code_record(eraser_cls)

    def claim() -> None:
        record = {"method": method, "base_model": base.name, "config": cfg.to_dict(),
                  "target": {**target.to_dict(), "prompts": list(target.prompts), "preserve": list(target.preserve)}}
        if speed_record := speed_run_record(base, speed):  # a resume must not mix fp32 and bf16 rounds
            record["speed"] = speed_record
        if base.dtype != torch.float32:  # nor weights stored in other dtypes (float32 unrecorded, as before)
            record["dtype"] = str(base.dtype)
        if below is not None:  # nor a stack on another erased model
            record["erased_on"] = below.record(erased)
        if code is not None:  # nor a plugin's checkpoint with its file changed since
            record["code"] = code_identity(code)
        claim_work_directory(work_dir, record, resume)

    processes.on_main(claim)  # a refused resume stops every process with its line
    resumed = resume and has_checkpoint(work_dir)
    # The erasure below goes on only now, so that a bad argument leaves a given model as it was; while it
    # trains, the new erasure takes the one below as its original.
    with released_if_unused(work_dir):
        with nullcontext() if erased is None else erasure_adopted(base, erased):
            before = base.weight_fingerprints()
            started = time.time()
            summary = eraser.erase(base, target, work_dir)
            _check_erasure(eraser, base, summary, before)  # in the block: this erasure's own edits, not those below
        summary = {**summary, "seconds": round(time.time() - started, 2)}  # of this run only: a resumed one did less
        if resumed:
            summary["resumed"] = True
        info = ErasedModelInfo(
            method=method,
            concept=target.name,
            base_model=model_id(base.name),
            kind=eraser.output_kind,
            anchor=target.anchor,
            config=cfg.to_dict(),
            extra={"target": target.to_dict(), "speed": speed.to_dict() if speed else None, **summary},
            erased_on=None if below is None else below.record(erased),
            code=code,
        )
        def save() -> None:
            artifacts = work_dir / "artifacts"
            save_erased(base, out, info, erased_on=erased,
                        write_extra=(lambda d: shutil.copytree(artifacts, d, dirs_exist_ok=True)) if artifacts.is_dir() else None)
            remove_work_directory(work_dir)

        processes.barrier()  # every process is done with the work directory before the main one removes it
        processes.on_main(save)
    return out


# What erase records in darkminer.json's extra beside an eraser's summary, which may not hold these keys.
RECORDED_BY_ERASE = ("target", "speed", "seconds", "resumed")


def _check_erasure(eraser: Eraser, model: DiffusionModel, summary: object,
                   before: dict[str, tuple[int, int]]) -> None:
    """What ``Eraser.erase`` promises, checked before anything is written: a summary (a dict, recorded in
    darkminer.json, beside what darkminer records itself), the erasure of the eraser's kind on the model, and
    no weight edited in place that ``remember_originals`` was not told of (``before``: the weights'
    fingerprints before the erase). An eraser of one's own that breaks it gets this line, not a traceback from
    inside the saving, nor a wrong original model."""
    from darkminer.models.adapters import has_lora

    what = f"eraser {eraser.name!r} (kind {eraser.output_kind!r})"
    if not isinstance(summary, dict):
        raise DarkMinerError(f"{what} returned {type(summary).__name__} from erase(); return a dict summary "
                             "(it may be empty), as Eraser.erase says")
    if taken := [key for key in RECORDED_BY_ERASE if key in summary]:
        raise DarkMinerError(f"{what} returned {taken} in its summary, which darkminer.json records itself; name "
                             "them otherwise")
    after = model.weight_fingerprints()
    unregistered = [name for name, fingerprint in before.items()
                    if name in after and after[name] != fingerprint and name not in model.remembered_names]
    if unregistered:
        raise DarkMinerError(f"{what} changed {len(unregistered)} weight(s) in place that it did not register with "
                             f"model.remember_originals ({', '.join(unregistered[:3])}{' ...' if len(unregistered) > 3 else ''}): "
                             "call it with their names before editing them, else the original model (what the "
                             "evaluation and the attacks compare against) is the edited one")
    kind = eraser.output_kind
    if kind == "lora" and not has_lora(model):
        raise DarkMinerError(f"{what} added no LoRA adapter to the model (adapters.add_lora)")
    if kind == "guidance":
        saved = model.guidance.to_dict()
        if not isinstance(saved, dict) or GUIDANCES.get(saved.get("name")) is not type(model.guidance):
            raise DarkMinerError(f"{what} left no guidance that can be saved on the model: set model.guidance to a "
                                 "class registered with register_guidance whose to_dict() returns its settings "
                                 "with its registered name")
    if kind in WEIGHT_KINDS and kind not in model.own_edited_components:
        raise DarkMinerError(f"{what} edited no {kind} weight through model.remember_originals(names); call it "
                             "before editing weights in place")


def generate(
    prompt: str,
    out: str | Path | None = None,
    *,
    model: str | None = None,
    erased: str | Path | None = None,
    n: int = 4,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    allow_empty: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    speed: SpeedOptions | dict[str, Any] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``n`` images (n, 3, H, W) in [0, 1] of ``prompt`` from a base or ``erased`` model, image ``i`` at seed
    ``seed + i`` (model defaults for ``steps`` and ``guidance_scale``); with ``out``, also a PNG grid of them.
    Under a launcher the processes share the batches and the main one writes. ``progress``: a progress bar.
    ``allow_empty``: accept an empty prompt, or a guidance scale of 0 or below, which draw unconditional
    samples (below 0, steered away from the prompt) and are refused otherwise."""
    from darkminer.imaging import make_grid, save_png
    from darkminer.io import check_output_file
    from darkminer.parallel import init_processes, sharded_sample

    _named_model_only(model, "generate", "model.generate(prompts, seeds)")
    check_argument("prompt", prompt, str)
    check_argument("n (-n)", n, int)
    steps, guidance_scale = _check_sampling_arguments(steps, guidance_scale)
    check_seed("seed (--seed)", seed)
    if not prompt.strip() and not allow_empty:
        raise ConfigError("the prompt is empty; give a prompt (or allow_empty / --allow-empty for unconditional samples)")
    if guidance_scale is not None and guidance_scale <= 0 and not allow_empty:  # as evaluate and attack refuse it
        raise ConfigError(f"guidance_scale (--guidance) is {guidance_scale}: at 0 the images ignore the prompt "
                          "(unconditional samples), below 0 they steer away from it; give a scale above 0, or "
                          "allow_empty / --allow-empty to draw them anyway")
    if n < 1:
        raise ConfigError(f"n (-n) must be >= 1, got {n}")
    if seed + n > SEED_LIMIT:  # image i is drawn at seed + i
        raise ConfigError(f"the images are drawn at seeds {seed} .. {seed + n - 1}, past the last seed 2**32 - 1; "
                          "lower seed (--seed) or n (-n)")
    if out is not None:
        if not str(out).lower().endswith(".png"):
            raise ConfigError(f"out (--out) must name a .png file, got {out}")
        check_output_file(out, apart_from=erased)
    processes = init_processes()  # before loading: under a launcher each process takes its own GPU
    net = load_model(model, erased=erased, device=device, dtype=dtype, speed=speed)
    seeds = [seed + i for i in range(n)]
    with torch.no_grad():
        cond = net.encode([prompt]).expand(n, -1, -1)
    images = sharded_sample(net, cond, seeds, steps=steps, guidance_scale=guidance_scale, progress=progress,
                            processes=processes)
    if out is not None:  # small tiles enlarged
        processes.on_main(lambda: save_png(make_grid(images, scale=max(1, 256 // images.shape[-1])), out))
    return images


def _named_model_only(model: object, function: str, instead: str) -> None:
    """``generate`` and ``attack`` load their model (a name or folder); for a loaded one, say what to call."""
    if isinstance(model, DiffusionModel):
        raise ConfigError(f"{function}() loads its model from a name or a folder; with a loaded model call "
                          f"{instead} (README, Python API)")


def _check_sampling_arguments(steps: int | None, guidance_scale: float | None) -> tuple[int | None, float | None]:
    """``steps`` and ``guidance_scale`` (None: the model's) checked before any work, as sampling would check them,
    as plain Python numbers (a numpy or torch one would be written to JSON as a string)."""
    check_argument("steps (--steps)", steps, int | None)
    check_argument("guidance_scale (--guidance)", guidance_scale, float | None)
    steps = None if steps is None else int(steps)
    guidance_scale = None if guidance_scale is None else float(guidance_scale)
    SamplingOptions(**{k: v for k, v in (("steps", steps), ("guidance_scale", guidance_scale)) if v is not None})
    return steps, guidance_scale


def attack_sampling(steps: int | None, guidance_scale: float | None) -> tuple[int | None, float | None]:
    """An attack's (or a replay's) ``steps`` and ``guidance_scale``, checked before any work: a guidance scale
    above 0, as the evaluation asks (at 0 the prompt would draw nothing)."""
    steps, guidance_scale = _check_sampling_arguments(steps, guidance_scale)
    if guidance_scale is not None and guidance_scale <= 0:
        raise ConfigError(f"guidance_scale (--guidance) must be > 0 for an attack, got {guidance_scale}")
    return steps, guidance_scale


@exclusive_output()
def attack(
    name: str,
    concept: str,
    out: str | Path | None = None,
    *,
    model: str | None = None,
    erased: str | Path | None = None,
    config: AttackConfig | dict[str, Any] | str | Path | None = None,
    anchor: str | None = None,
    prompts: str | Path | None = None,
    kind: str | None = None,
    n_prompts: int = 16,
    steps: int | None = None,
    guidance_scale: float | None = None,
    grading: EvaluationConfig | dict[str, Any] | None = None,
    resume: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    speed: SpeedOptions | dict[str, Any] | None = None,
) -> list[AttackResult]:
    """Attack ``concept`` on a base or ``erased`` model with the registered attack ``name`` and return what it
    found per prompt; with ``out``, also write ``out/attack.json`` (and the embeddings of a soft attack).

    The prompts attacked are the first ``n_prompts`` of the evaluation's ``plain`` set: a ``prompts`` CSV's
    rows, the testbed concept's direct prompts, or the concept word (SD) at seeds from the attack's seed.
    ``steps`` and ``guidance_scale`` set how the judged and target images are drawn (default: the model's; a
    prompt CSV's ``evaluation_guidance`` still holds for its row); ``attack.json`` records the sampling, and a
    replay on the same base model draws with it.
    ``grading`` holds the detector's ``EvaluationConfig`` options (``detector``, ``nudenet_threshold``...).
    ``resume`` continues a killed run into ``out`` from its journal: the prompts it finished are not searched
    again (``run_attack``).
    """
    from darkminer.attacks.base import AttackPrompt, build_attack
    from darkminer.attacks.io import OUTPUT_KIND as ATTACK_OUTPUT
    from darkminer.attacks.io import RESULTS_KEYS, RESULTS_NAME, run_attack
    from darkminer.evaluation import EvaluationConfig, concept_detector
    from darkminer.evaluation.evaluate import GRADER_OPTIONS, check_grader_options
    from darkminer.evaluation.suites import prompt_suites
    from darkminer.parallel import init_processes

    _named_model_only(model, "attack", "run_attack(build_attack(name, config), model, target, prompts, success)")
    for label, value, hint in (("attack name", name, str), ("concept", concept, str), ("anchor", anchor, str | None)):
        check_argument(label, value, hint)
    check_argument("n_prompts (--n-prompts)", n_prompts, int)
    if n_prompts < 1:
        raise ConfigError(f"n_prompts (--n-prompts) must be a positive number of prompts, got {n_prompts!r}")
    steps, guidance_scale = attack_sampling(steps, guidance_scale)
    attacker = build_attack(name, config)  # a bad name or option fails before the load
    given = set(grading) if isinstance(grading, Mapping) else set()  # an option set to its default counts too
    grading = EvaluationConfig.coerce(grading)
    given |= grading.changed_options()
    if others := sorted(given - set(GRADER_OPTIONS)):
        raise ConfigError(f"grading sets the detector only ({', '.join(GRADER_OPTIONS)}), not {', '.join(others)}; "
                          "sampling is steps and guidance_scale, the prompts n_prompts")
    testbed = base_id(model, erased) == "testbed"
    check_target(concept, testbed, kind=kind, prompts_csv=prompts)
    check_grader_options(grading, testbed)  # the other world's grader options, before the load
    if out is not None:
        out = check_output_directory(out, RESULTS_NAME, ATTACK_OUTPUT, apart_from=erased, marker_keys=RESULTS_KEYS)
        if not resume:  # an unfinished run's journal is refused before the load, not after it
            check_no_unfinished_run(work_directory(out))
    # Under a launcher the per-prompt attacks share their prompts out over the processes (run_attack); opened
    # before loading, so "cuda" is this process's GPU.
    init_processes()
    net = load_model(model, erased=erased, device=device, dtype=dtype, speed=speed)
    # The attacks that read the target's own prompts (Ring-A-Bell's concept vector) get at least the 64 that
    # resolve_target gives by default, however few prompts are attacked.
    target = resolve_target(net, concept, anchor=anchor, prompts_csv=prompts, kind=kind, n_prompts=max(n_prompts, 64))
    warn_unless_erased(ErasedModelInfo.read(erased) if erased is not None else None, target.name, erased)
    attacker.check_target(target)
    success = concept_detector(net, target, config=grading)
    plain = prompt_suites(target, n_prompts, attacker.config.seed, prompts_csv=prompts)["plain"]
    attacked = [AttackPrompt(p.text, p.seed, p.guidance) for p in plain.prompts]
    with net.sampling_defaults(steps, guidance_scale):
        return run_attack(attacker, net, target, attacked, success, out=out, erased=erased, resume=resume)


@exclusive_output()
def export(
    erased: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    dtype: str | torch.dtype = torch.float32,
) -> Path:
    """Write the erased model as a plain diffusers Stable Diffusion pipeline folder (``out``), the erasure
    folded into its weights (an adapter merged), loadable by ``StableDiffusionPipeline.from_pretrained``
    without darkminer. ``model`` names the base where the erased directory's record is not enough (as
    ``load_model``). An inference-time erasure (SLD) lives in the sampling loop, not the weights, and is
    refused; so is the testbed, which is no diffusers pipeline."""
    from darkminer.models.adapters import has_lora, merge_lora
    from darkminer.models.stable_diffusion import StableDiffusionModel

    info = ErasedModelInfo.read(erased)
    if info.kind == "guidance":
        raise DarkMinerError(f"{erased} is an inference-time erasure ({info.method}): it changes sampling, not "
                             "weights, so no plain pipeline carries it; deploy it through darkminer")
    # The marker is darkminer's own record, not model_index.json: every pipeline folder has one, and a
    # user's base model given as --out would be replaced.
    out = check_output_directory(out, EXPORT_INFO, EXPORTED_KIND, apart_from=erased)
    loaded = load_model(model, erased=erased, dtype=dtype)
    if not isinstance(loaded, StableDiffusionModel):
        raise DarkMinerError(f"export writes a diffusers Stable Diffusion pipeline; {loaded.name!r} is not one (a "
                             "testbed erasure is used where it is: --erased DIR, or load_model(erased=DIR))")
    if has_lora(loaded):
        merge_lora(loaded)
    with output_directory(out, EXPORT_INFO, EXPORTED_KIND) as tmp:
        loaded.to_pipeline().save_pretrained(tmp, safe_serialization=True)
        # diffusers loads a pipeline in float32 unless torch_dtype says otherwise; transformers would load the
        # text encoder in the dtype its config names, and a half one beside a float32 UNet fails on the first
        # image. Its config says float32, as on the hub's fp16 variants: the half weights load upcast, or in half
        # everywhere with torch_dtype.
        text_config = tmp / "text_encoder" / "config.json"
        write_json(text_config, {**read_json(text_config), "dtype": "float32"})
        write_json(tmp / EXPORT_INFO, {"erased": str(Path(erased).resolve()), "erasure": asdict(info),
                                       "base_model": loaded.name,  # the weights folded in (--model may differ)
                                       "dtype": str(loaded.dtype), "versions": package_versions()})
    return out
