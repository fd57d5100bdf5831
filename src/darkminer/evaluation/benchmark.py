"""``darkminer benchmark``: methods x concepts x attacks in one command, resumable cell by cell.

::

    OUT/config.json                                   the resolved config (a rerun must match it)
    OUT/cells/<method>/<concept>/erased/              the erased model (kept: a rerun does not erase again)
    OUT/cells/<method>/<concept>/evaluation/          metrics.json + image grids (present = cell finished)
    OUT/results.json, results.md, report.html         written when every cell is finished

A killed run picks up where it stopped: finished cells are read back, a half-finished erase or evaluation
resumes from its checkpoint, nothing finished is computed again.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkminer.config import ONE_IS_A_LIST, Config, check_unique
from darkminer.errors import ConfigError, DarkMinerError, ModelLoadError
from darkminer.evaluation.evaluate import (
    METRICS_NAME,
    ORIGINAL_METHOD,
    EvaluationConfig,
    build_attacks,
    check_grader_options,
    check_preservation_applies,
    evaluate,
    evaluation_versions,
    resolved_options,
)
from darkminer.evaluation.report import cell_summary, erase_seconds, write_results
from darkminer.io import (
    changed_keys,
    check_output_directory,
    exclusive_output,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from darkminer.models import check_device, check_model_here, model_id
from darkminer.models.erased import INFO_NAME, ErasedModelInfo
from darkminer.parallel import SpeedOptions, init_processes
from darkminer.provenance import code_record, same_code
from darkminer.targets import check_kind
from darkminer.testbed.concepts import concept_names

ALL = "all"
CONFIG_NAME = "config.json"  # the resolved config a benchmark folder was made with (and may resume under)
CONFIG_KEYS = ("methods", "attacks")  # a benchmark's record, not a model folder's config.json
CELLS = "cells"  # cells/METHOD/CONCEPT/{erased,evaluation}

# The CPU-sized budgets of `demo` and `quick` (measured in docs/BENCHMARKS.md): Dark Miner with 4 of its 8
# rounds, ESD-x at its testbed rate (docs/methods.md), every attack cut from the authors' GPU budgets, 32
# images per prompt set, 4 attacked prompts, searched side by side (search_batch; docs/attacks.md: the
# same adversarial prompts and table, in less time).
_CPU_BUDGETS: dict[str, Any] = {
    "model": "testbed",
    "concepts": ["blood"],
    "attacks": ["plain", "paraphrase", "unlearndiff", "p4d", "ringabell", "cce"],
    "method_configs": {"darkminer": {"rounds": 4},
                       "esd-x": {"iterations": 200, "ddim_steps": 25, "lr": 1e-3}},
    "evaluation": {
        "n_images": 32,
        "attack_prompts": 4,
        "attack_configs": {
            "unlearndiff": {"iterations": 40, "rounds": 2, "search_batch": 4},
            "p4d": {"iterations": 50, "eval_every": 25, "search_batch": 4},
            "ringabell": {"population": 32, "generations": 20},
            "cce": {"steps": 150},
        },
    },
}

# Built-in presets (``--config demo`` / ``quick`` / ``full``); benchmarks/presets/*.yaml are the same, as
# files to copy and edit (a test keeps them equal).
PRESETS: dict[str, dict[str, Any]] = {
    # `darkminer demo`, the README's main job: <= 15 minutes on 2 CPU cores.
    "demo": {**_CPU_BUDGETS, "methods": ["darkminer", "esd-x"]},
    # <= 20 minutes on 2 CPU cores: the demo plus UCE.
    "quick": {**_CPU_BUDGETS, "methods": ["darkminer", "esd-x", "uce"]},
    "full": {
        "model": "testbed",
        "methods": ALL,
        "concepts": concept_names(),
        "attacks": ALL,
        "evaluation": {"n_images": 128, "attack_prompts": 32,
                       "attack_configs": {"unlearndiff": {"search_batch": 8}, "p4d": {"search_batch": 8}}},
    },
}


@dataclass
class BenchmarkConfig(Config):
    """``methods`` and ``attacks`` are lists of registered names or ``all`` (every registered one at run
    time). ``method_configs`` maps a method to its eraser config options; ``evaluation`` holds
    ``EvaluationConfig`` options (attacks come from ``attacks``). ``prompts`` maps a free-text (SD)
    concept to its prompt CSV; ``preserve_prompts`` is the SD preservation CSV. ``anchors`` maps a concept
    to the prompt its erasure maps it to (default: the testbed registry's anchor; the empty prompt on SD);
    ``kinds`` maps an SD concept to its kind (``targets.SD_KINDS``, e.g. ``style`` for an artist).
    ``device`` and ``speed`` (``SpeedOptions``: precision, attention, ...) say where and how models run."""

    methods: list[str] | str = ALL
    concepts: list[str] = field(default_factory=lambda: ["blood"])
    attacks: list[str] | str = ALL
    model: str = "testbed"
    include_original: bool = True
    method_configs: dict[str, dict] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    preserve_prompts: str | None = None
    anchors: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    speed: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("methods", "attacks"):
            value = getattr(self, name)
            if isinstance(value, str) and value != ALL:
                raise ConfigError(f"BenchmarkConfig.{name} must be a list of names or {ALL!r}, got {value!r} ({ONE_IS_A_LIST}: "
                                  f"{name}: [{value}])")
            if value != ALL:
                check_unique(self, name, value)
        if isinstance(self.concepts, str) or not self.concepts:
            raise ConfigError(f"BenchmarkConfig.concepts must be a non-empty list of names, got {self.concepts!r}")
        check_unique(self, "concepts", self.concepts, key=_slug)  # a concept's cells are in a folder named by its slug
        if model_id(self.model) == "testbed":
            from darkminer.targets import TESTBED_CSV_ERROR
            from darkminer.testbed.concepts import get_concept

            if self.prompts or self.preserve_prompts:
                raise ConfigError(TESTBED_CSV_ERROR)

            for concept in self.concepts:
                get_concept(concept)  # an unknown name fails before any work
        for name in ("anchors", "kinds"):
            unknown = sorted(set(getattr(self, name)) - set(self.concepts))
            if unknown:
                raise ConfigError(f"BenchmarkConfig.{name} names concepts that are not run: {unknown}")
        if self.kinds and model_id(self.model) == "testbed":
            raise ConfigError("BenchmarkConfig.kinds is for Stable Diffusion concepts: a testbed concept's kind is the registry's")
        for kind in self.kinds.values():
            check_kind(kind)
        if not self.methods:
            raise ConfigError("BenchmarkConfig.methods is empty; name at least one method")
        if "attacks" in self.evaluation:
            raise ConfigError("set attacks at the top level of the benchmark config, not under evaluation")
        SpeedOptions.from_dict(self.speed)
        try:  # now, not in the first cell after the output folder is made
            check_device(self.device)
        except ModelLoadError as exc:
            raise ConfigError(f"BenchmarkConfig.device: {exc}") from None
        # attack_configs is checked once "all" is resolved to the registered attacks.
        evaluation = EvaluationConfig.from_dict({k: v for k, v in self.evaluation.items() if k != "attack_configs"})
        check_preservation_applies(evaluation, model_id(self.model) == "testbed")

    def method_names(self) -> list[str]:
        from darkminer.erasers.base import ERASERS, get_eraser

        names = ERASERS.names() if self.methods == ALL else list(self.methods)
        unused = sorted(set(self.method_configs) - set(names))
        if unused:
            raise ConfigError(f"BenchmarkConfig.method_configs names methods that are not run: {unused}")
        for name in names:  # unknown names, bad options and what the model needs fail before any work
            get_eraser(name).config_for(self.method_configs.get(name, {}), model_id(self.model)).check_model(model_id(self.model))
        return names

    def attack_names(self) -> list[str]:
        from darkminer.attacks.base import ATTACKS, get_attack

        names = ATTACKS.names() if self.attacks == ALL else list(self.attacks)
        for name in names:
            get_attack(name)
        return names


def load_benchmark_config(config: BenchmarkConfig | dict[str, Any] | str | Path) -> BenchmarkConfig:
    """A config object, a dict, a preset name (``demo``, ``quick``, ``full``) or a JSON/YAML file."""
    if isinstance(config, str | Path) and str(config) in PRESETS:
        return BenchmarkConfig.from_dict(PRESETS[str(config)])
    if isinstance(config, str | Path) and not Path(config).is_file():
        raise ConfigError(f"benchmark config {config} is neither a file nor a preset ({', '.join(PRESETS)})")
    return BenchmarkConfig.coerce(config)


def _slug(name: str) -> str:
    """A directory name for a method or a free-text concept ("Van Gogh" -> "van-gogh")."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-.")
    if not slug:
        raise DarkMinerError(f"{name!r} cannot name a directory; use letters or digits")
    return slug


@exclusive_output()
def run_benchmark(
    config: BenchmarkConfig | dict[str, Any] | str | Path, out: str | Path, *, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out`` and write results.json, results.md and report.html."""
    cfg = load_benchmark_config(config)
    # Resumed in place; a folder holding only cells/ has erased models put there to be evaluated (keep_rounds).
    out = check_output_directory(out, CONFIG_NAME, "a benchmark output", replaced=False, prepared=(CELLS,),
                                 marker_keys=CONFIG_KEYS)
    methods, attacks = cfg.method_names(), cfg.attack_names()
    rows = ([ORIGINAL_METHOD] if cfg.include_original else []) + methods
    eval_cfg = EvaluationConfig.from_dict({**cfg.evaluation, "attacks": attacks})
    attack_configs = _attack_configs(eval_cfg)  # bad attack options fail before --out is claimed
    check_grader_options(eval_cfg, testbed=model_id(cfg.model) == "testbed")  # and the other world's grader's
    check_model_here(cfg.model)  # and a model that is not on this machine
    resolved = {**cfg.to_dict(), "methods": methods, "attacks": attacks}
    # Under a launcher every process runs every cell (the erase and the evaluation share their work) and the
    # main process writes; each cell's erase and evaluation return once their output is written.
    processes = init_processes()

    def claim() -> None:
        _claim(out, resolved)
        remove_stale_temporaries(out)  # what a killed run was writing (this run holds --out's lock)

    processes.barrier()  # every process has checked the folder before the main one writes into it
    processes.on_main(claim)
    _check_finished_cells(cfg, eval_cfg, attack_configs, out, rows)
    started = time.time()
    cells = []
    plan = [(method, concept) for concept in cfg.concepts for method in rows]
    for index, (method, concept) in enumerate(plan, 1):
        if progress and processes.is_main:
            print(f"[{index}/{len(plan)}] {method} x {concept}", flush=True)
        cells.append(_run_cell(cfg, eval_cfg, out, method, concept, progress))
    results = {
        "format": 1,
        "model": cfg.model,
        "methods": rows,
        "concepts": list(cfg.concepts),
        "attacks": attacks,
        "config": resolved,
        "versions": evaluation_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds_this_run": round(time.time() - started, 2),
        "cells": cells,
    }
    results["table"] = cell_summary(results)

    processes.on_main(lambda: write_results(out, results, out))
    return results


def _claim(out: Path, resolved: dict[str, Any]) -> None:
    """Record the config in ``out``; refuse to resume a directory whose cells were made with another config
    (an option written out at its default is the same config). A folder whose run failed before any cell
    wrote a file (a model that would not load) is taken over by the new config."""
    path = out / CONFIG_NAME
    if path.is_file():
        changed = changed_keys(_as_run(read_json(path)), _as_run(resolved))
        if not changed:
            return
        if any(p.is_file() or p.is_symlink() for p in (out / CELLS).rglob("*")):  # a linked cell is work too
            raise DarkMinerError(f"{out} holds a benchmark run with another config (differs in {changed}); "
                                 "use a new --out to run this one")
    write_json(path, resolved)


def _as_run(record: dict[str, Any]) -> dict[str, Any]:
    """A config record (``config.json``) with every eraser, evaluation and attack option resolved, so that
    records which run the same way compare equal."""
    from darkminer.erasers.base import get_eraser

    record = {**BenchmarkConfig().to_dict(), **record}
    try:
        evaluation = EvaluationConfig.from_dict({**record["evaluation"], "attacks": record["attacks"]})
        evaluation.attack_configs = {name: config.to_dict() for name, config in _attack_configs(evaluation).items()}
        methods = {name: get_eraser(name).config_for(record["method_configs"].get(name, {}), model_id(record["model"]))
                   for name in record["methods"]}
    except (DarkMinerError, TypeError, AttributeError):  # options this version no longer takes, or a hand-edited
        # record whose sections are not mappings: compared as written
        return record
    resolved = {**record, "evaluation": evaluation.to_dict(),
                "method_configs": {name: config.to_dict() for name, config in methods.items()}}
    return json.loads(json.dumps(resolved, default=str))  # as read back from JSON: tuples are lists


def _attack_configs(eval_cfg: EvaluationConfig) -> dict[str, Config]:
    """Each attack's options as it runs them (its defaults filled in); bad names or options fail here."""
    return {name: attack.config for name, attack in build_attacks(eval_cfg).items()}


def _cell_dir(out: Path, method: str, concept: str) -> Path:
    return out / CELLS / _slug(method) / _slug(concept)


def _check_finished_cells(cfg: BenchmarkConfig, eval_cfg: EvaluationConfig, attacks: dict[str, Config], out: Path,
                          rows: list[str]) -> None:
    """Refuse to resume where a finished cell was made with other resolved options than this run's, or by a
    plugin's eraser or attack whose file has changed since: the benchmark config can be the same while a default
    or the plugin's code changed in between, and the table would then silently mix cells made under both."""
    from darkminer.attacks.base import get_attack
    from darkminer.erasers.base import get_eraser

    def as_stored(options: dict[str, Any]) -> dict[str, Any]:  # as read back from JSON: tuples are lists
        return json.loads(json.dumps(options, default=str))

    def changed(have: dict[str, Any], want: Config) -> list[str]:
        return changed_keys(have, as_stored(want.to_dict()), defaults=as_stored(type(want)().to_dict()))

    for concept in cfg.concepts:
        for method in rows:
            cell = _cell_dir(out, method, concept)
            checks = []
            if method != ORIGINAL_METHOD and (cell / "erased" / INFO_NAME).is_file():
                want = get_eraser(method).config_for(cfg.method_configs.get(method, {}), model_id(cfg.model))
                info = ErasedModelInfo.read(cell / "erased")
                checks.append((f"{method} options", changed(info.config, want)))
                _check_same_code(cell, info.code, code_record(get_eraser(method)))
            if (cell / "evaluation" / METRICS_NAME).is_file():
                metrics = read_json(cell / "evaluation" / METRICS_NAME)
                kind = None if model_id(cfg.model) == "testbed" else cfg.kinds.get(concept, "free")
                have = resolved_options(metrics.get("config", {}), kind)  # as they applied to this concept
                # attack_configs as written ({plain: {}} or none) aside: each attack's resolved options follow
                want = as_stored(eval_cfg.resolved(kind))
                checks.append(("evaluation options", changed_keys({**have, "attack_configs": None},
                                                                  {**want, "attack_configs": None})))
                for name, details in metrics.get("attack_details", {}).items():
                    if name in attacks and "config" in details:  # cells evaluated before it was recorded lack it
                        checks.append((f"{name} options", changed(details["config"], attacks[name])))
                    if name in attacks and "files" in details:  # the files its options name, edited in place since
                        checks.append((f"{name} input files", changed_keys(details["files"], attacks[name].input_file_records())))
                    if name in attacks:
                        _check_same_code(cell, details.get("code"), code_record(get_attack(name)))
            for what, keys in checks:
                if keys:
                    raise DarkMinerError(f"{cell} was made with other {what} than this run resolves (they differ "
                                         f"in {keys}; a default may have changed since): delete {cell} to redo "
                                         "that cell, or use a new --out")


def _check_same_code(cell: Path, recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse a finished cell whose eraser or attack came from a plugin file other than today's (``code_record``
    then and now)."""
    if same_code(recorded, current):
        return
    if current is None:
        why = f"by the plugin {recorded['path']}, where a method of that name without a plugin file runs now"  # type: ignore[index]
    elif recorded is None:
        why = f"by a darkminer that did not record plugin code, or not by {current['path']}"
    else:
        why = f"by another version of {recorded['path']} (the plugin file has changed since)"
    raise DarkMinerError(f"{cell} was made {why}: delete {cell} to redo that cell, or use a new --out")


def _run_cell(cfg: BenchmarkConfig, eval_cfg: EvaluationConfig, out: Path, method: str, concept: str,
              progress: bool = False) -> dict[str, Any]:
    cell = _cell_dir(out, method, concept)
    relative = cell.relative_to(out)
    metrics_path = cell / "evaluation" / METRICS_NAME
    erased = None if method == ORIGINAL_METHOD else cell / "erased"
    if not metrics_path.is_file():
        if erased is not None and not (erased / INFO_NAME).is_file():
            from darkminer.api import erase

            erase(method, concept, erased, model=cfg.model, config=cfg.method_configs.get(method),
                  anchor=cfg.anchors.get(concept), prompts=cfg.prompts.get(concept), kind=cfg.kinds.get(concept),
                  resume=True, device=cfg.device,
                  speed=cfg.speed or None)
        evaluate(concept, cell / "evaluation", model=cfg.model, erased=erased, config=eval_cfg,
                 anchor=cfg.anchors.get(concept), prompts=cfg.prompts.get(concept), kind=cfg.kinds.get(concept),
                 preserve_prompts=cfg.preserve_prompts, resume=True, device=cfg.device,
                 speed=cfg.speed or None, progress=progress)
    # A finished cell's erased model may have been deleted to free disk (a whole SD UNet is 3.4 GB): its
    # metrics stand, its erase time is unknown.
    kept = erased is not None and (erased / INFO_NAME).is_file()
    return {"method": method, "concept": concept, "dir": str(relative), "evaluation": str(relative / "evaluation"),
            "erase_seconds": erase_seconds(ErasedModelInfo.read(erased).extra if kept else None),
            "metrics": read_json(metrics_path)}

