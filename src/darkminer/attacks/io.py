"""Running an attack into a directory, reading it back, and replaying it on another model (transfer).

::

    DIR/attack.json           attack, config, target, model, attack success rate, per-prompt results
    DIR/embeddings.safetensors input-embedding sequences of soft results (key = result index)

Both files are written atomically (temporary name, then rename); ``attack.json`` is written last, so a
directory that has it is whole. Until then the run keeps its progress (``attacks.journal``) in a hidden work
directory beside DIR (``io.work_directory``), which ``resume`` continues from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from darkminer.attacks.base import (
    Attack,
    AttackPrompt,
    AttackResult,
    SuccessFn,
    attack_success_rate,
    before_and_after_rates,
)
from darkminer.attacks.journal import resumable
from darkminer.attacks.soft_prompt import judge_conditions, judge_texts
from darkminer.errors import ConfigError, DarkMinerError
from darkminer.io import (
    check_no_unfinished_run,
    check_output_directory,
    claim_work_directory,
    exclusive_output,
    has_checkpoint,
    load_tensors,
    output_directory,
    read_json,
    released_if_unused,
    remove_work_directory,
    save_tensors,
    work_directory,
    write_json,
)
from darkminer.models.base import DiffusionModel, SamplingOptions
from darkminer.models.erased import ErasedModelInfo
from darkminer.parallel import init_processes
from darkminer.parallel.speed import autocast_dtype
from darkminer.provenance import code_identity, code_record
from darkminer.targets import EraseTarget

RESULTS_NAME = "attack.json"
RESULTS_KEYS = ("attack", "config", "results")  # an attack output's attack.json, not another tool's
EMBEDDINGS_NAME = "embeddings.safetensors"
OUTPUT_KIND = "an attack output"  # what may be replaced at --out
FORMAT_VERSION = 1


def save_results(
    directory: str | Path,
    results: Sequence[AttackResult],
    *,
    attack: str,
    config: dict[str, Any],
    target: EraseTarget,
    model: str,
    success: SuccessFn | None = None,
    erased: dict[str, Any] | None = None,
    sampling: SamplingOptions | None = None,
    resumed: bool = False,
    code: dict[str, Any] | None = None,
) -> Path:
    """Write ``attack.json`` (and the soft prompts' embeddings) as a new folder ``directory``, atomically.
    A ``success`` function that describes itself (the evaluation's detectors) is recorded as the grader;
    ``erased``, the erased model the attacked model was loaded from (``ErasedModelInfo.record``);
    ``sampling``, how its images were drawn (a replay draws the same way); ``resumed``, that the run went on
    from a killed one's checkpoint; ``code``, a plugin attack's file (``provenance.code_record``)."""
    with output_directory(directory, RESULTS_NAME, OUTPUT_KIND, RESULTS_KEYS) as tmp:
        soft = {str(i): r.embeddings for i, r in enumerate(results) if r.embeddings is not None}
        if soft:
            save_tensors(tmp / EMBEDDINGS_NAME, soft)
        write_json(tmp / RESULTS_NAME, {
            "format": FORMAT_VERSION,
            "attack": attack,
            "config": config,
            "target": target.to_dict(),
            "model": model,
            "erased": erased,
            "detector": success.describe() if hasattr(success, "describe") else None,
            "sampling": None if sampling is None else asdict(sampling),
            "attack_success_rate": attack_success_rate(results),
            "success_before_rate": before_and_after_rates(results)[0],
            "n_prompts": len(results),
            "seconds_per_prompt": sum(r.seconds for r in results) / len(results),
            "results": [r.to_dict() for r in results],
            **({"resumed": True} if resumed else {}),
            **({"code": code} if code else {}),
        })
    return Path(directory)


def load_results(directory: str | Path) -> tuple[dict[str, Any], list[AttackResult]]:
    """The run's metadata (``attack.json`` without its results) and its results, embeddings included."""
    directory = Path(directory)
    data = read_json(directory / RESULTS_NAME)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or not all(
            isinstance(row, dict) for row in data["results"]):
        raise DarkMinerError(f"{directory / RESULTS_NAME} holds no attack results; re-run `darkminer attack`")
    if not isinstance(data.get("attack"), str) or not isinstance(data.get("config"), dict):
        raise DarkMinerError(f"{directory / RESULTS_NAME} holds a damaged record (no attack name or config); re-run the attack")
    rows = data.pop("results")
    sampling = data.get("sampling")  # absent from attack.json files written before it was recorded
    if sampling is not None:
        try:
            steps, guidance = sampling["steps"], sampling["guidance_scale"]
            if type(steps) is not int or type(guidance) not in (int, float):  # bools refused too
                raise TypeError
            SamplingOptions(steps=steps, guidance_scale=guidance)  # in range
        except (TypeError, KeyError, ConfigError):
            raise DarkMinerError(f"{directory / RESULTS_NAME} holds a damaged sampling record; re-run the attack") from None
    needs_embeddings = any(row.get("soft") for row in rows)
    tensors = load_tensors(directory / EMBEDDINGS_NAME) if needs_embeddings else {}
    missing = [i for i, row in enumerate(rows) if row.get("soft") and str(i) not in tensors]
    if missing:
        raise DarkMinerError(f"{directory / EMBEDDINGS_NAME} lacks embeddings of results {missing[:5]}; re-run the attack")
    try:
        return data, [AttackResult.from_dict(row, tensors.get(str(i))) for i, row in enumerate(rows)]
    except (KeyError, TypeError, ValueError, DarkMinerError) as exc:
        raise DarkMinerError(f"{directory / RESULTS_NAME} holds a damaged result ({type(exc).__name__}: {exc}); "
                             "re-run the attack") from None


def adversarial_conditions(model: DiffusionModel, results: Sequence[AttackResult], use_text: bool = False) -> torch.Tensor:
    """Conditioning states of what each result found: its embeddings, else its token ids, else its text.

    ``use_text`` replays the readable text only (for a model with another tokenizer or text encoder).
    """
    conds = []
    vocabulary, embed_dim = model.token_embedding.weight.shape
    device = model.token_embedding.weight.device

    def token_ids(r: AttackResult) -> torch.Tensor:
        """The saved ids as a batch of one, checked: a damaged file's would index outside the embedding table."""
        if not all(isinstance(i, int) and 0 <= i < vocabulary for i in r.input_ids):
            raise DarkMinerError(f"a saved result's token ids fall outside this model's vocabulary of {vocabulary} "
                                 "(damaged, or from another tokenizer); re-run the attack on a model like this one")
        return torch.tensor([r.input_ids], device=device)

    with torch.no_grad():
        for r in results:
            if r.embeddings is not None:  # a learned embedding (CCE's token): only the same text encoder reads it
                if use_text:
                    raise DarkMinerError("a soft attack's result (a learned embedding, such as CCE's token) has no "
                                         "readable text to replay; replay it without --use-text (use_text=False)")
                positions = len(r.input_ids) if r.input_ids is not None else 0
                if positions != model.max_length or r.embeddings.shape[-1] != embed_dim:
                    raise DarkMinerError(
                        f"a soft attack's result ({positions} token positions, {r.embeddings.shape[-1]}-d embeddings) "
                        f"does not fit this model ({model.max_length} positions, {embed_dim}-d); it replays only on "
                        "a model with the same text encoder"
                    )
                conds.append(model.encode_embeddings(r.embeddings.unsqueeze(0).to(model.token_embedding.weight),
                                                     token_ids(r)))
            elif not use_text and r.input_ids is not None and len(r.input_ids) == model.max_length:
                conds.append(model.encode_ids(token_ids(r)))
            else:
                conds.append(model.encode([r.adversarial_text]))
    return torch.cat(conds)


def replay(
    model: DiffusionModel, results: Sequence[AttackResult], success: SuccessFn, use_text: bool = False
) -> list[AttackResult]:
    """The saved attack judged again on ``model`` (e.g. another erased model: transfer)."""
    if not results:
        raise DarkMinerError("no attack results to replay")
    prompts = [r.prompt for r in results]
    started = time.time()
    conditions = adversarial_conditions(model, results, use_text)  # what cannot be replayed fails before any drawing
    before = judge_texts(model, prompts, success)
    after = judge_conditions(model, conditions, prompts, success)
    seconds = (time.time() - started) / len(results)
    return [
        AttackResult(prompt=r.prompt, adversarial_text=r.adversarial_text, success_before=b, success_after=a,
                     input_ids=r.input_ids, embeddings=r.embeddings, seconds=seconds, extra=dict(r.extra))
        for r, b, a in zip(results, before, after, strict=True)
    ]


def _check_one_result_per_prompt(attack: Attack, prompts: Sequence[AttackPrompt], results: object) -> None:
    """An attack's ``run`` returns one result per prompt, in order: rates and replays count on it (an
    attack of one's own that skipped a prompt would otherwise lower its denominator silently)."""
    contract = "its run() must return a list of one AttackResult per prompt, in the prompts' order"
    if not isinstance(results, list) or not all(isinstance(r, AttackResult) for r in results):
        found = type(results).__name__
        if isinstance(results, list) and results:  # a list of something else: say of what
            found += " of " + ", ".join(sorted({type(r).__name__ for r in results}))
        raise DarkMinerError(f"attack {attack.name!r} returned {found}; {contract}")
    if len(results) != len(prompts):
        raise DarkMinerError(f"attack {attack.name!r} returned {len(results)} results for {len(prompts)} prompts; "
                             f"{contract}")
    wrong = next((i for i, (r, p) in enumerate(zip(results, prompts, strict=True)) if r.prompt != p), None)
    if wrong is not None:
        raise DarkMinerError(f"attack {attack.name!r}: result {wrong} is for {results[wrong].prompt!r}, prompt "
                             f"{wrong} is {prompts[wrong]!r}; {contract}")


@exclusive_output()
def run_attack(
    attack: Attack,
    model: DiffusionModel,
    target: EraseTarget,
    prompts: Sequence[AttackPrompt],
    success: SuccessFn,
    out: str | Path | None = None,
    original: DiffusionModel | None = None,
    erased: str | Path | None = None,
    resume: bool = False,
) -> list[AttackResult]:
    """Run ``attack`` and, with ``out``, save what it found there (``erased``: the erased model's folder
    ``model`` was loaded from, recorded with the results).

    With ``out``, the attack keeps its progress in ``out``'s work directory (the per-prompt searches as they
    end, CCE's training every ``checkpoint_every`` steps); ``resume`` continues a killed run from it (the same
    attack, config, prompts and model), searching only the prompts it had not finished. The unattacked
    judging and the target images are drawn again, as the whole run draws them, so the results equal an
    uninterrupted run's.

    Under a launcher every process calls this and the attack shares its work out (the per-prompt attacks
    their prompts, CCE its batches); every process returns the main process's results, once the main one
    has written them."""
    if not isinstance(attack, Attack):
        raise DarkMinerError(f"attack must be an Attack (build_attack(name, config)), got {attack!r}")
    if not prompts:
        raise DarkMinerError("no prompts to attack: give a prompt CSV or a concept with prompts")
    if wrong := next((p for p in prompts if not isinstance(p, AttackPrompt)), None):
        raise DarkMinerError(f"prompts must be AttackPrompt(text, seed) each, got {wrong!r}")
    if not callable(success):
        raise DarkMinerError(f"success must be a function of images to verdicts (e.g. concept_detector(...)), got {success!r}")
    attack.check_model(model)
    work_dir, resumed = None, False
    if out is not None:  # before the attack, not after it
        out = check_output_directory(out, RESULTS_NAME, OUTPUT_KIND, apart_from=erased, marker_keys=RESULTS_KEYS)
        work_dir = work_directory(out)
        if not resume:  # every process (it only reads), so that each stops with the same line
            check_no_unfinished_run(work_dir)
    record = ErasedModelInfo.read(erased).record(erased) if erased is not None else None
    code = code_record(type(attack))  # a plugin's file, for the claim and attack.json
    processes = init_processes()
    if work_dir is not None:
        # Everything the results depend on: the target's own prompts too (CCE's training images, Ring-A-Bell's
        # concept vector), and the precision the model computes in besides its weights' dtype.
        files = attack.config.input_file_records()  # recorded where there are any: older records resume as they were
        run = {"attack": attack.name, "config": attack.config.to_dict(), **({"files": files} if files else {}),
               "target": {**target.to_dict(), "prompts": list(target.prompts), "preserve": list(target.preserve)},
               "prompts": [asdict(p) for p in prompts], "model": model.name, "erased": record,
               "detector": success.describe() if hasattr(success, "describe") else None,
               "dtype": str(model.dtype), "autocast": str(autocast_dtype(model)),
               "sampling": asdict(model.default_sampling),
               **({"code": code_identity(code)} if code else {})}  # a plugin's, by contents
        resumed = resume and processes.on_main(lambda: has_checkpoint(work_dir))
        processes.on_main(lambda: claim_work_directory(work_dir, run, resume))  # a refusal stops every process
    with resumable(work_dir), released_if_unused(work_dir):
        started = time.time()
        results = processes.broadcast_object(attack.run(model, target, prompts, success, original=original))
        _check_one_result_per_prompt(attack, prompts, results)
    if not any(r.seconds for r in results):  # an attack that does not time its prompts (one's own): the run's share,
        share = processes.broadcast_object(time.time() - started) / len(results)  # the main process's, as the results
        results = [replace(r, seconds=share) for r in results]
    if out is not None:
        def save() -> None:
            save_results(out, results, attack=attack.name, config=attack.config.to_dict(), target=target,
                         model=model.name, success=success, erased=record, sampling=model.default_sampling,
                         resumed=resumed, code=code)
            remove_work_directory(work_dir)

        processes.on_main(save)
    return results
