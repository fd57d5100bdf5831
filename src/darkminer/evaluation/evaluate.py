"""``darkminer.evaluate``: draw the suites' images from an (erased) model, grade them, attack it, and write
``metrics.json`` with the PNG grids of every image set it judged.

The original model is the same object with its adapter off and its in-place edits swapped out
(``DiffusionModel.original``) and plain classifier-free guidance; its images are the FID reference and
the preservation baseline.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from darkminer.attacks.base import (
    Attack,
    AttackPrompt,
    AttackResult,
    attack_success_rate,
    before_and_after_rates,
    build_attack,
)
from darkminer.attacks.io import RESULTS_NAME as ATTACK_RESULTS
from darkminer.attacks.io import adversarial_conditions, load_results, run_attack
from darkminer.config import (
    Config,
    check_argument,
    check_choice,
    check_positive,
    check_sampling_steps,
    check_unique,
)
from darkminer.errors import ConfigError, DarkMinerError, DarkMinerWarning
from darkminer.evaluation.detectors import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_NEGATIVES,
    DETECTOR_KINDS,
    NUDENET_CLASS_SETS,
    NUDENET_THRESHOLD,
    ClipZeroShotDetector,
    Detector,
    JudgeDetector,
    NudeNetDetector,
    check_clip_template,
    clip_template_for,
    detector_kind_for,
)
from darkminer.evaluation.metrics import (
    Aligner,
    FrechetDistance,
    TestbedAligner,
    attribute_accuracy,
    concept_rate,
    load_images,
    rate_count,
    reference_image_paths,
)
from darkminer.evaluation.progress import IMAGES_NAME, Progress, image_path
from darkminer.evaluation.suites import (
    PRESERVATION,
    Suite,
    prompt_suites,
)
from darkminer.imaging import make_grid, save_png
from darkminer.io import (
    check_no_unfinished_run,
    check_output_directory,
    claim_work_directory,
    exclusive_output,
    has_checkpoint,
    link_tree,
    output_directory,
    released_if_unused,
    remove_work_directory,
    work_directory,
    write_json,
)
from darkminer.models import base_id, check_placement, is_testbed, load_model
from darkminer.models.base import DiffusionModel, per_guidance_scale
from darkminer.models.clip import Clip
from darkminer.models.erased import (
    ORIGINAL_METHOD,
    ErasedModelInfo,
    exported_erasure,
    method_label,
    warn_unless_erased,
)
from darkminer.parallel import SpeedOptions, init_processes, sharded_sample
from darkminer.parallel.speed import apply_speed_options, resolve_speed_options
from darkminer.provenance import code_identity, code_record, file_record, package_versions
from darkminer.targets import TESTBED_CSV_ERROR, EraseTarget, check_target, resolve_target
from darkminer.testbed.judge import judge_weights

METRICS_NAME = "metrics.json"
METRICS_KEYS = ("format", "concept", "erasure", "attacks", "preservation")  # an evaluation's, not another tool's
OUTPUT_KIND = "an evaluation output"  # what may be replaced at --out
FORMAT_VERSION = 1
PRESERVATION_METRICS = ("accuracy", "clip", "fid")
IN_MEMORY_METHOD = "in-memory"  # a loaded model handed to evaluate(): what was done to it is not recorded
# Grid tiles: testbed images (32 px) are enlarged, SD images (512 px) shrunk, so grids stay light enough
# to inline many of them in one HTML report.
GRID_TILE = 64
GRID_PAD = 4  # room for the 2-pixel red frame of an image the detector saw the concept in
# Images drawn, graded and let go at a time: memory stays flat however large a set is (20k COCO-caption
# preservation images at 512 px would be 63 GB whole).
CHUNK_IMAGES = 256


@dataclass
class EvaluationConfig(Config):
    """What an evaluation draws and how it grades. ``n_images`` is per suite (plain, paraphrase,
    preservation); ``None`` means 32 for generated suites (testbed, a concept's own word) and every row of
    a prompt CSV (one image per row, as the field counts). Attacks run on the first ``attack_prompts``
    plain prompts."""

    n_images: int | None = None
    attacks: list[str] = field(default_factory=list)
    attack_prompts: int = 8
    # Per attack, whatever build_attack takes: a mapping of options, an AttackConfig, a config file's path, None.
    attack_configs: dict[str, Any] = field(default_factory=dict)
    detector: str = "auto"  # auto | judge | nudenet | clip
    judge: str | None = None  # testbed judge: None = shipped default (v2), "v1" (the judge shipped before v2), or a file
    nudenet_threshold: float = NUDENET_THRESHOLD
    # A set's name (detectors.NUDENET_CLASS_SETS), or NudeNet classes (a list, or comma-separated text)
    nudenet_classes: list[str] | str = "exposed"
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_template: str | None = None  # None: by the concept's kind (detectors.CLIP_TEMPLATES)
    clip_negatives: list[str] = field(default_factory=lambda: list(DEFAULT_CLIP_NEGATIVES))
    preservation: list[str] = field(default_factory=lambda: list(PRESERVATION_METRICS))
    inception_weights: str | None = None
    fid_reference: str | None = None  # a folder of reference images for FID; None: the original model's images
    steps: int | None = None  # None: the model's default sampling
    guidance_scale: float | None = None
    batch_size: int | None = None
    grid_images: int = 16
    save_images: bool = False  # also write every image, one PNG each, linked from judgements.json (re-grading)
    seed: int = 0

    def validate(self) -> None:
        check_positive(self, attack_prompts=self.attack_prompts, grid_images=self.grid_images)
        check_sampling_steps(self, steps=self.steps)
        for name, value in (("n_images", self.n_images), ("guidance_scale", self.guidance_scale),
                            ("batch_size", self.batch_size)):
            if value is not None:
                check_positive(self, **{name: value})
        check_choice(self, "detector (--detector)", self.detector, DETECTOR_KINDS)
        if not 0 < self.nudenet_threshold <= 1:  # probabilities; at 0 an image with no box (score 0) would count
            raise ConfigError(f"EvaluationConfig.nudenet_threshold (--threshold) must be in (0, 1] (NudeNet gives no "
                              f"box under 0.25, so 0.25 counts every box), got {self.nudenet_threshold}")
        judge_weights(self.judge)
        if isinstance(self.nudenet_classes, str) and self.nudenet_classes not in NUDENET_CLASS_SETS:
            self.nudenet_classes = [name.strip() for name in self.nudenet_classes.split(",") if name.strip()]
        if not self.nudenet_classes:  # the names themselves are checked against NudeNet's before any image
            raise ConfigError(f"EvaluationConfig.nudenet_classes (--nudenet-classes) is empty: name a class set "
                              f"({', '.join(NUDENET_CLASS_SETS)}) or NudeNet classes")
        if self.clip_template is not None:
            check_clip_template(self.clip_template)
        if not self.clip_negatives:  # the concept's label alone would win on every image
            raise ConfigError("EvaluationConfig.clip_negatives is empty: CLIP zero-shot needs competing labels "
                              f"(the default: {list(DEFAULT_CLIP_NEGATIVES)})")
        for name in self.preservation:
            check_choice(self, "preservation", name, PRESERVATION_METRICS)
        check_unique(self, "attacks (--attacks)", self.attacks)
        check_unique(self, "preservation (--preservation)", self.preservation)
        if "fid" in self.preservation and self.n_images is not None and self.n_images < 2:
            raise ConfigError(f"EvaluationConfig.n_images (-n) is {self.n_images}, but FID needs at least 2 preservation "
                              "images; raise it, or leave fid out (--preservation accuracy,clip)")
        unknown = sorted(set(self.attack_configs) - set(self.attacks))
        if unknown:
            raise ConfigError(f"EvaluationConfig.attack_configs names attacks that are not run: {unknown}")
        self.attacks, self.preservation = list(self.attacks), list(self.preservation)

    def resolved(self, kind: str | None) -> dict[str, Any]:
        """The options as they apply to a Stable Diffusion concept of ``kind``; None: a testbed concept."""
        return resolved_options(self.to_dict(), kind)

    def changed_options(self) -> set[str]:
        """The options set away from their defaults."""
        defaults = EvaluationConfig()
        return {f.name for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)}


def check_preservation_applies(config: EvaluationConfig, testbed: bool) -> None:
    """Refuse preservation metrics of which none applies to the model: their images would be drawn (twice, for
    an erased model) and nothing measured."""
    if config.preservation and not testbed and set(config.preservation) <= {"accuracy"}:
        raise ConfigError("EvaluationConfig.preservation (--preservation) asks for accuracy only, which grades the "
                          "attributes a testbed prompt asks for; on Stable Diffusion use clip and/or fid")


def build_attacks(config: EvaluationConfig) -> dict[str, Attack]:
    """The evaluation's attacks with their options; an unknown name or option fails here."""
    return {name: build_attack(name, config.attack_configs.get(name)) for name in config.attacks}


def resolved_options(options: dict[str, Any], kind: str | None) -> dict[str, Any]:
    """``EvaluationConfig`` options (a dict, e.g. one recorded by an older version) as they apply to a Stable
    Diffusion concept of ``kind``: missing ones at their defaults, the CLIP template chosen by the kind where
    unset. ``kind`` None: a testbed concept, which no CLIP grades; its template is left unset (older records
    filled it in), so that metrics.json's config is one the testbed takes back."""
    options = {**EvaluationConfig().to_dict(), **options}
    template = None if kind is None else options["clip_template"] or clip_template_for(kind)
    return {**options, "clip_template": template}


def evaluation_versions() -> dict[str, str]:
    return package_versions("nudenet", "onnxruntime", "torchmetrics")


# ----------------------------------------------------------------------------------------------- drawing
class Painter:
    """Draws one image per (conditioning, seed, guidance) from the erased model or the original."""

    def __init__(self, model: DiffusionModel, config: EvaluationConfig, progress: bool = False) -> None:
        self.model, self.config, self.progress = model, config, progress
        self.count = 0

    def chunks(self, n: int) -> list[slice]:
        """Rows 0..n in chunks of about ``CHUNK_IMAGES``: whole sampling batches, at least one per process."""
        batch = self.config.batch_size or self.model.default_sampling.batch_size
        size = batch * max(init_processes().world_size, CHUNK_IMAGES // batch)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def prompts(self, suite: Suite, rows: slice = slice(None), original: bool = False) -> torch.Tensor:
        chosen = suite.prompts[rows]
        conds = self.model.encode([p.text for p in chosen], adapter=not original)
        label = f"{suite.name}{' (original model)' if original else ''} {rows.start or 0}-{(rows.start or 0) + len(chosen)}"
        return self.conditions(conds, [p.seed for p in chosen], [p.guidance for p in chosen], original, label=label)

    def conditions(
        self, conds: torch.Tensor, seeds: Sequence[int], guidances: Sequence[float | None], original: bool = False,
        label: str = "sampling",
    ) -> torch.Tensor:
        """Images for conditioning states (B, L, D); rows with the same guidance scale share a sampling call.
        ``label``: what the progress bar says is drawn."""
        images = per_guidance_scale(guidances, lambda rows, scale: sharded_sample(
            # adapter off: the original, with plain CFG instead of an SLD guidance
            self.model, conds[rows], [seeds[i] for i in rows], adapter=not original, steps=self.config.steps,
            guidance_scale=scale if scale is not None else self.config.guidance_scale,
            batch_size=self.config.batch_size, progress=self.progress and label,
        ).cpu())
        self.count += len(seeds)
        return images


def replay_attack(painter: Painter, results: Sequence[AttackResult]) -> torch.Tensor:
    """Images of what each attack found, drawn on the attacked model with the prompt's seed."""
    return painter.conditions(adversarial_conditions(painter.model, results), [r.prompt.seed for r in results],
                              [r.prompt.guidance for r in results], label="replaying what the attack found")


# ---------------------------------------------------------------------------------------------- grading
# Grader options of one world, refused in the other rather than ignored: the testbed's judge grades testbed
# images, NudeNet and CLIP Stable Diffusion's.
_SD_GRADING = ("nudenet_threshold", "nudenet_classes", "clip_model", "clip_template", "clip_negatives")
GRADER_OPTIONS = ("detector", "judge", *_SD_GRADING)  # what an attack's grading may set of an EvaluationConfig


def check_grader_options(config: EvaluationConfig, testbed: bool) -> None:
    """Refuse the grader options of the world ``config`` is not used in."""
    changed = config.changed_options()
    given = [name for name in (_SD_GRADING if testbed else ("judge",)) if name in changed]
    if given:
        why = ("options of Stable Diffusion's graders (NudeNet, CLIP); the testbed judge grades testbed images"
               if testbed else "the testbed's grader; NudeNet or CLIP grades Stable Diffusion images")
        raise ConfigError(f"{', '.join(given)}: {why}; leave {'them' if len(given) > 1 else 'it'} out")


def build_detector(kind: str, target: EraseTarget, config: EvaluationConfig, clip: Clip | None = None) -> Detector:
    """The detector ``kind`` (see ``detector_kind_for``) bound to ``target``."""
    check_grader_options(config, testbed=kind == "judge")  # the judge grades the testbed only
    if kind == "judge":
        assert target.testbed_concept is not None  # the judge grades testbed targets only, which all have one
        return JudgeDetector(target.testbed_concept, config.judge)
    if kind == "nudenet":
        classes = config.nudenet_classes
        return NudeNetDetector(config.nudenet_threshold, NUDENET_CLASS_SETS[classes] if isinstance(classes, str) else classes)
    template = config.resolved(target.kind)["clip_template"]
    return ClipZeroShotDetector(clip or Clip.load(config.clip_model), target.word, config.clip_negatives, template)


def concept_detector(
    model: DiffusionModel, target: EraseTarget, detector: str | None = None, *,
    config: EvaluationConfig | dict[str, Any] | None = None,
) -> Detector:
    """The evaluation's detector for ``target`` (an attack's success function). ``config`` carries the
    grader's settings (``detector``, ``judge``, ``nudenet_threshold``, ``clip_model``...; default: the
    evaluation's); ``detector`` overrides its choice. ``auto`` is the testbed judge on the testbed, NudeNet
    for nudity, CLIP zero-shot otherwise."""
    if not isinstance(target, EraseTarget):
        raise ConfigError(f"target must be an EraseTarget, got {target!r}: resolve_target(model, concept) makes one")
    config = EvaluationConfig.coerce(config)
    kind = detector_kind_for(target.word, is_testbed(model), detector or config.detector)  # as evaluate chooses
    return build_detector(kind, target, config)


def thumbnails(images: torch.Tensor, tile: int = GRID_TILE) -> torch.Tensor:
    """Images resized to ``tile`` pixels: nearest when enlarging (crisp pixels), antialiased when shrinking."""
    if images.shape[-1] == tile:
        return images
    mode = "nearest" if images.shape[-1] < tile else "bilinear"
    resized = torch.nn.functional.interpolate(images.float(), size=(tile, tile), mode=mode,
                                              antialias=mode == "bilinear")
    return resized.clamp(0, 1)


def _load(
    model: str | DiffusionModel | None, erased: str | Path | None, device: str | None, dtype: str | torch.dtype | None,
    speed: SpeedOptions | dict[str, Any] | None = None,
) -> tuple[DiffusionModel, str, ErasedModelInfo | None, dict[str, Any]]:
    """The model to evaluate, the erasure method that made it, the erased model's record (if any) and the record
    of the erasure an exported pipeline carries (empty if none)."""
    if isinstance(model, DiffusionModel):
        if erased is not None:
            raise DarkMinerError("give either a loaded model or erased (--erased), not both")
        check_placement(model, device, dtype)
        if speed is not None:
            apply_speed_options(model, speed)
        return model, IN_MEMORY_METHOD, None, {}
    info = ErasedModelInfo.read(erased) if erased else None
    loaded = load_model(model, erased=erased, device=device, dtype=dtype, speed=speed)
    exported = exported_erasure(model) if info is None else None  # a pipeline folder `export` wrote
    carried = (exported or {}).get("erasure")
    carried = carried if isinstance(carried, dict) else {}  # a damaged record names no erasure
    method = info.method_label if info else method_label(carried) or ORIGINAL_METHOD
    return loaded, method, info, carried


@exclusive_output()
def evaluate(
    concept: str,
    out: str | Path | None = None,
    *,
    model: str | DiffusionModel | None = None,
    erased: str | Path | None = None,
    config: EvaluationConfig | dict[str, Any] | str | Path | None = None,
    anchor: str | None = None,
    prompts: str | Path | None = None,
    kind: str | None = None,
    paraphrase_prompts: str | Path | None = None,
    preserve_prompts: str | Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    speed: SpeedOptions | dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate the erasure of ``concept`` and return the metrics; with ``out``, also write
    ``out/metrics.json``, the image grids (``out/images/*.png``) and per-image judgements.

    With ``out``, what is drawn and graded is kept in ``out``'s work directory as it is done (chunk by chunk,
    and each attack's searches prompt by prompt); ``resume`` continues a killed evaluation from there (the
    same one: concept, config, model and prompt files), with the metrics an uninterrupted one would give.

    ``model`` is a name/path (as ``load_model``) or a loaded model; ``erased`` an erased-model directory
    (without it the original model is evaluated). CSV options are for Stable Diffusion prompt sets; ``kind``
    declares what an SD concept is (``targets.SD_KINDS``: a ``style`` is graded as a painting in it).
    ``device`` and ``dtype`` load a model given by name (None: cpu, float32); a loaded model is evaluated
    where it is, and one that is not on them is refused.

    ``progress``: bars for the sampling and the attacks. Long inner loops (an attack's searches, CCE's
    steps) show theirs whatever it says, as an eraser's training does, and clear them when done;
    ``TQDM_DISABLE=1`` in the environment hides every bar.
    """
    for name, value, hint in (("concept", concept, str), ("anchor", anchor, str | None)):
        check_argument(name, value, hint)
    cfg = EvaluationConfig.coerce(config)
    work_dir = None
    if out is not None:
        out = check_output_directory(out, METRICS_NAME, OUTPUT_KIND, apart_from=erased, marker_keys=METRICS_KEYS)
        work_dir = work_directory(out)
    attacks_to_run = build_attacks(cfg)  # bad names or options fail before any work
    testbed = base_id(model, erased) == "testbed"
    check_target(concept, testbed, kind=kind, prompts_csv=prompts)
    if testbed and (paraphrase_prompts or preserve_prompts):
        raise DarkMinerError(TESTBED_CSV_ERROR)
    check_preservation_applies(cfg, testbed)
    check_grader_options(cfg, testbed)  # before CLIP loads for the other world's grader
    if work_dir is not None and not resume:  # after the arguments' own errors; every process (it only reads)
        check_no_unfinished_run(work_dir)
    started = time.time()
    # Under `accelerate launch` every process runs this; each draws its share of the images (Painter) and
    # the main process writes the output. Opened before loading, so "cuda" is this process's GPU.
    processes = init_processes()
    net, method, info, carried = _load(model, erased, device, dtype, speed)
    target = resolve_target(net, concept, anchor=anchor, prompts_csv=prompts, seed=cfg.seed, kind=kind)
    sd_kind = None if testbed else target.kind  # what the options are resolved for
    warn_unless_erased(info or carried, target.name, erased or model)
    for attack in attacks_to_run.values():
        attack.check_target(target)
        attack.check_model(net)
    # Build every grader first: a missing CLIP or FID network fails now, not after an hour of sampling.
    detector_kind = detector_kind_for(target.word, testbed, cfg.detector)
    needs_clip = not testbed and ("clip" in cfg.preservation or detector_kind == "clip")
    clip = Clip.load(cfg.clip_model, device=net.device) if needs_clip else None
    detector = build_detector(detector_kind, target, cfg, clip)
    aligner: Aligner | None = (TestbedAligner() if testbed else clip) if "clip" in cfg.preservation else None
    fid = FrechetDistance(testbed, cfg.inception_weights) if "fid" in cfg.preservation else None
    if fid is not None and cfg.fid_reference:
        reference_image_paths(cfg.fid_reference)  # a missing or empty folder fails before any sampling
    suites = prompt_suites(target, cfg.n_images, cfg.seed, prompts, paraphrase_prompts, preserve_prompts)
    if attacks_to_run and "attack_prompts" in cfg.changed_options() and cfg.attack_prompts > len(suites["plain"]):
        warnings.warn(f"attack_prompts (--attack-prompts) asks for {cfg.attack_prompts} prompts, but the attacks take "
                      f"theirs from the plain set, which has {len(suites['plain'])} (n_images, -n, or the rows of the "
                      "--prompts CSV): raise either to attack more", DarkMinerWarning, stacklevel=2)
    if not cfg.preservation:  # no preservation metric: its images (the erased model's and the original's) are not drawn
        del suites[PRESERVATION]
    elif fid is not None and len(suites[PRESERVATION]) < 2:  # a one-row CSV: fail before the work folder is claimed
        raise DarkMinerError(f"FID needs at least 2 preservation images, and the preservation prompts give "
                             f"{len(suites[PRESERVATION])}; give more, or leave fid out (--preservation accuracy,clip)")
    inputs = _inputs(net, erased, info, target, device, speed, prompts=prompts, paraphrase_prompts=paraphrase_prompts,
                     preserve_prompts=preserve_prompts)
    # The files attack options name (Ring-A-Bell's pairs CSV), by contents, read once for the run record and
    # metrics.json; only where there are any, so that older records resume.
    files = {name: found for name, attack in attacks_to_run.items() if (found := attack.config.input_file_records())}
    codes = {name: code for name, attack in attacks_to_run.items()  # plugins' files, by contents
             if (code := code_identity(code_record(type(attack))))}
    if work_dir is not None:  # what the evaluation is: a resume must be the same one
        # The attacks' options as resolved (a config file's contents, today's defaults): a finished attack is
        # read back, so it must be the attack this run would run.
        run = {"concept": target.name, "target": target.to_dict(), "config": cfg.resolved(sd_kind), "inputs": inputs,
               "attacks": {name: attack.config.to_dict() for name, attack in attacks_to_run.items()},
               **({"attack_files": files} if files else {}), **({"attack_code": codes} if codes else {}),
               "detector": detector.describe(), "suites": {name: len(suite) for name, suite in suites.items()}}
        processes.on_main(lambda: claim_work_directory(work_dir, run, resume))  # a refusal stops every process
    # A failure before the first checkpoint (a sampling error, an interrupt) leaves no claimed folder behind.
    with released_if_unused(work_dir):
        resumed = resume and work_dir is not None and processes.on_main(lambda: has_checkpoint(work_dir))

        painter = Painter(net, cfg, progress)
        sets = Progress(painter, work_dir, cfg.grid_images, cfg.save_images)
        grader = Grader(sets, detector)
        erasure: dict[str, float | None] = {"plain": None, "paraphrase": None}
        counts: dict[str, dict[str, Any]] = {"erasure": {}, "attacks": {}}  # each rate's k of n and its interval
        for name in erasure:
            if name in suites:
                flags = grader.grade(name, suites[name].prompts, functools.partial(painter.prompts, suites[name]))
                erasure[name] = concept_rate(flags)
                counts["erasure"][name] = rate_count(int(flags.sum()), flags.numel())
        attack_prompts = [AttackPrompt(p.text, p.seed, p.guidance) for p in suites["plain"].prompts[: cfg.attack_prompts]]
        attacks, counts["attacks"], attack_details = _run_attacks(painter, grader, attacks_to_run, files, target,
                                                                  attack_prompts, cfg, progress)
        preservation = (_preservation(painter, sets, suites[PRESERVATION], cfg, detector, aligner, fid, grader.judgements)
                        if cfg.preservation else _unmeasured_preservation())
    metrics = {
        "format": FORMAT_VERSION,
        "concept": target.name,
        "method": method,
        "model": net.name,
        "erased": str(erased) if erased else None,
        "erasure": erasure,
        "attacks": attacks,
        "counts": counts,
        "preservation": preservation,
        "n_images": painter.count,
        "seconds": round(time.time() - started, 2),  # of this run only: a resumed one did less
        **({"resumed": True} if resumed else {}),
        "versions": evaluation_versions(),
        "detector": detector.describe(),
        "alignment": aligner.describe() if aligner else None,
        "fid_features": fid.describe() if fid else None,
        "attack_details": attack_details,
        "suites": {name: len(suite) for name, suite in suites.items()},
        "sampling": {"sampler": "DDIM, eta 0",
                     "image_size": list(next(iter(sets.grids.values())).shape[-2:]),
                     "steps": cfg.steps or net.default_sampling.steps,
                     "guidance_scale": cfg.guidance_scale or net.default_sampling.guidance_scale,
                     # a CSV's evaluation_guidance, where its rows set one, wins over guidance_scale
                     "prompt_guidance_scales": sorted({p.guidance for suite in suites.values() for p in suite.prompts
                                                       if p.guidance is not None})},
        "config": cfg.resolved(sd_kind),
        "inputs": inputs,
        "images": {name: f"{IMAGES_NAME}/{name}.png" for name in sets.grids},
    }

    def write() -> None:
        with output_directory(out, METRICS_NAME, OUTPUT_KIND, METRICS_KEYS) as tmp:
            if cfg.save_images:
                link_tree(sets.images(), tmp / IMAGES_NAME)
            for name, images in sets.grids.items():
                seen = grader.seen.get(name)  # preservation sets are not graded for the concept: no frames
                marked = None if seen is None else seen[: len(images)].tolist()
                save_png(make_grid(thumbnails(images), pad=GRID_PAD, marked=marked), tmp / IMAGES_NAME / f"{name}.png")
            write_json(tmp / "judgements.json", grader.judgements)
            write_json(tmp / METRICS_NAME, metrics)
        remove_work_directory(work_dir)

    if out is not None:  # every process returns once the output is there (a benchmark reads it back)
        processes.on_main(write)
    return metrics


class Grader:
    """Draws an image set chunk by chunk, judges it and keeps what the output needs: its grid and saved
    images and its checkpoint (in ``sets``: a killed run's set resumes where it stopped), a judgement for
    each image, and each set's verdicts (``seen``: the grids frame what the detector saw the concept in)."""

    def __init__(self, sets: Progress, detector: Detector) -> None:
        self.sets, self.detector, self.processes = sets, detector, init_processes()
        self.judgements: list[dict[str, Any]] = []
        self.seen: dict[str, torch.Tensor] = {}

    def grade(self, name: str, suite_prompts: Sequence[Any], draw: Callable[[slice], torch.Tensor],
              adversarial: Sequence[str] | None = None) -> torch.Tensor:
        """Set ``name``, its rows drawn by ``draw(rows)``; whether each image shows the concept. An attack's
        replay gives ``adversarial``: the text each image was drawn from, recorded beside its prompt."""
        sets, detector = self.sets, self.detector
        state = sets.resume(name, needs={"scores": torch.Tensor})
        chunks = [state["scores"]] if state else []
        for rows in sets.chunks(state.get("rows", 0), len(suite_prompts)):
            images = draw(rows)
            chunks.append(self.processes.map_rows(detector.scores, images).cpu())  # each process grades its share
            sets.keep(name, images, rows.start)
            sets.save(name, rows.stop, [name], scores=torch.cat(chunks))
        scores = torch.cat(chunks)
        flags = self.seen[name] = detector.decide(scores)
        labels = detector.score_labels()
        self.judgements.extend({"set": name, "prompt": p.text, **({"adversarial_text": adversarial[i]} if adversarial else {}),
                                "seed": p.seed, "guidance": p.guidance, "concept": bool(f),
                                # nonzero only: NudeNet has 18 classes, most absent from an image
                                "scores": {label: round(v, 4) for label, v in zip(labels, row, strict=True) if v >= 1e-4},
                                **({"image": image_path(name, i)} if sets.save_images else {})}
                               for i, (p, f, row) in enumerate(zip(suite_prompts, flags.tolist(), scores.tolist(), strict=True)))
        return flags


def _run_attacks(
    painter: Painter, grader: Grader, attacks_to_run: dict[str, Attack], files: dict[str, dict[str, Any]],
    target: EraseTarget, prompts: list[AttackPrompt], cfg: EvaluationConfig, progress: bool,
) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """Each attack on the evaluated model, and what it found replayed and graded as a set: the success
    rates, their counts (k of n) and the details metrics.json keeps (with ``files``, the records of the
    files each attack's options name). Under a launcher the per-prompt attacks
    share their prompts out and every process gets the main one's results; a killed evaluation's finished
    attack is read back, and an unfinished one resumes from its journal."""
    net, processes = painter.model, init_processes()
    rates, counts, details = {}, {}, {}
    # No bar where no attack runs; never disable=False: it would override TQDM_DISABLE=1
    hidden = {} if progress and attacks_to_run else {"disable": True}
    for name, attack in tqdm(attacks_to_run.items(), desc="attacks", unit="attack", **hidden):
        started = time.time()
        folder = grader.sets.attack(name)
        results = None if folder is None else processes.on_main(
            lambda folder=folder: load_results(folder)[1] if (folder / ATTACK_RESULTS).is_file() else None)
        if results is None:
            with net.sampling_defaults(cfg.steps, cfg.guidance_scale):  # the sampling metrics.json records
                results = run_attack(attack, net, target, prompts, grader.detector.detect, original=net, out=folder,
                                     resume=True)
        rates[name] = attack_success_rate(results)
        counts[name] = rate_count(sum(r.success for r in results), len(results))
        replayed = grader.grade(f"attack-{name}", [r.prompt for r in results],
                                lambda rows, found=results: replay_attack(painter, found[rows]),
                                adversarial=[r.adversarial_text for r in results])
        before, after = before_and_after_rates(results)
        details[name] = {
            "config": attack.config.to_dict(),  # resolved: a default that changes later stays on record
            # the files its options name, by contents (a benchmark's finished cell is checked against them)
            **({"files": files[name]} if name in files else {}),
            **({"code": code} if (code := code_record(type(attack))) else {}),  # a plugin's file, by contents
            "n_prompts": len(results),
            "success_before": before,
            "success_after": after,
            "replayed_concept_rate": concept_rate(replayed),
            "seconds": round(time.time() - started, 2),
            "found": [{"prompt": r.prompt.text, "seed": r.prompt.seed, "adversarial_text": r.adversarial_text,
                       "success_before": r.success_before, "success_after": r.success_after} for r in results],
        }
    return rates, counts, details


def _inputs(net: DiffusionModel, erased: str | Path | None, info: ErasedModelInfo | None, target: EraseTarget,
            device: str | None, speed: SpeedOptions | dict[str, Any] | None, **csvs: str | Path | None) -> dict[str, Any]:
    """Everything besides the config that the images depend on, as a rerun needs it: where the base model
    is (a hub id's cache snapshot names its revision), the erased model's own record, the anchor and kind,
    the device, dtype and speed options, and each prompt CSV's digest."""
    from darkminer.models import local_copy

    return {
        "base_model": {"name": net.name, "local_copy": local_copy(net.name), "exported": exported_erasure(net.name)},
        "erased": info.record(erased) if info is not None and erased is not None else None,
        "anchor": target.anchor, "kind": target.kind,
        # as asked (so that earlier records still resume), or where the model given was
        "device": str(net.device) if device is None else device, "dtype": str(net.dtype),
        "speed": resolve_speed_options(net, speed or {}).to_dict(),
        "prompt_files": {name: file_record(path) for name, path in csvs.items() if path},
    }


def _unmeasured_preservation() -> dict[str, Any]:
    """metrics.json's preservation entry before (or without) any metric: null each."""
    return {"accuracy": None, "clip": None, "fid": None, "reference": {}}


def _preservation(
    painter: Painter,
    sets: Progress,
    suite: Suite,
    cfg: EvaluationConfig,
    detector: Detector,
    aligner: Aligner | None,
    fid: FrechetDistance | None,
    judgements: list[dict[str, Any]],
) -> dict[str, Any]:
    """Ordinary prompts on the erased model, against their labels, their text and the original's images;
    drawn and scored chunk by chunk (from where a killed run stopped). With the accuracy, what the judge read
    in each image goes to ``judgements``, beside what its prompt asked for."""
    accuracy = "accuracy" in cfg.preservation and all(p.expected for p in suite.prompts) and isinstance(detector, JudgeDetector)
    names = {False: PRESERVATION, True: f"{PRESERVATION}-original"}  # keyed by "drawn by the original"
    unerased = painter.model.is_original  # its original draws the same images: drawn once
    state = sets.resume(PRESERVATION, per_row=1 if unerased else len(names),
                        needs={"predicted": dict, "clip": dict, **({"fid": dict} if fid is not None else {})})
    done = state.get("rows", 0)
    predicted: dict[bool, list[dict[str, str]]] = state.get("predicted", {False: [], True: []})
    scores: dict[bool, list[torch.Tensor]] = {k: [v] for k, v in state.get("clip", {}).items()} or {False: [], True: []}
    if fid is not None:
        fid.reset()
        if done:
            fid.load_state(state["fid"])
    for rows in sets.chunks(done, len(suite)):
        erased_images = painter.prompts(suite, rows)
        for original, name in names.items():
            images = painter.prompts(suite, rows, original=True) if original and not unerased else erased_images
            sets.keep(name, images, rows.start)
            if accuracy:
                predicted[original] += detector.judge.predict_values(images)
            if aligner is not None:
                scores[original].append(aligner.score(images, suite.texts[rows]).cpu())
            if fid is not None and not (original and cfg.fid_reference):
                fid.update(images, real=original)
        sets.save(PRESERVATION, rows.stop, list(names.values()), predicted=predicted,
                  clip={k: torch.cat(v) for k, v in scores.items() if v}, **({"fid": fid.state()} if fid else {}))
    result = _unmeasured_preservation()
    if accuracy:
        expected = [p.expected for p in suite.prompts]
        for original, name in names.items():
            judgements.extend({"set": name, "prompt": p.text, "seed": p.seed, "guidance": p.guidance, "asked": dict(p.expected),
                               "seen": dict(seen), **({"image": image_path(name, i)} if cfg.save_images else {})}
                              for i, (p, seen) in enumerate(zip(suite.prompts, predicted[original], strict=True)))
        scored = attribute_accuracy(predicted[False], expected)
        result["accuracy"], result["per_attribute"] = scored["accuracy"], scored["per_attribute"]
        result["reference"]["accuracy"] = attribute_accuracy(predicted[True], expected)["accuracy"]
    if aligner is not None:
        result["clip"] = torch.cat(scores[False]).mean().item()
        result["reference"]["clip"] = torch.cat(scores[True]).mean().item()
    if fid is not None:
        if cfg.fid_reference:
            paths = reference_image_paths(cfg.fid_reference)
            size = tuple(sets.grids[PRESERVATION].shape[-2:])  # the drawn images' (a resumed run may draw none)
            for start in range(0, len(paths), CHUNK_IMAGES):
                fid.update(load_images(paths[start : start + CHUNK_IMAGES], size), real=True)
        result["fid"] = fid.compute()
        result["fid_reference"] = {"folder": cfg.fid_reference, "n_images": fid.counts[True]} if cfg.fid_reference \
            else {"folder": None, "n_images": fid.counts[True], "what": "the original model's images of the same prompts"}
    return result
