"""The Dark Miner loop: mine -> verify -> circumvent, round after round, resumable after every round.

Every round draws its randomness from its own generator (seeded by config seed and round index) and
starts a fresh optimiser, so a run resumed from a round checkpoint ends with exactly the weights of an
uninterrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from darkminer.erasers.base import Eraser, damaged_checkpoint, register_eraser
from darkminer.erasers.darkminer.circumventing import circumvent
from darkminer.erasers.darkminer.config import DarkMinerConfig
from darkminer.erasers.darkminer.mining import MinedEmbedding, initial_embedding, mine
from darkminer.erasers.darkminer.pool import VERIFY_SEED_OFFSET, build_pools
from darkminer.erasers.darkminer.verifying import verify
from darkminer.erasers.training import iteration_generator
from darkminer.errors import DarkMinerError
from darkminer.io import check_output_directory, load_tensors, read_json, save_tensors, write_json, write_text
from darkminer.models.adapters import add_lora, lora_state_dict, set_lora_state_dict, target_module_names
from darkminer.models.base import DiffusionModel
from darkminer.models.image_encoders import load_image_encoder
from darkminer.models.slots import check_token_room
from darkminer.parallel import init_processes
from darkminer.targets import EraseTarget

CHECKPOINT = "checkpoint"
MINED_FILE = "mined_embeddings.safetensors"
ROUND_ADAPTERS_FILE = "round_adapters.safetensors"
ROUND_LOG_FILE = "rounds.jsonl"


def write_round_log(folder: Path, log: list[dict]) -> None:
    """The round log as JSON lines, one round per line."""
    write_text(folder / ROUND_LOG_FILE, "".join(json.dumps(e) + "\n" for e in log))


def read_round_log(erased_dir: str | Path) -> list[dict]:
    """The round log of an erased-model directory, one dict per round."""
    return [json.loads(line) for line in (Path(erased_dir) / ROUND_LOG_FILE).read_text().splitlines()]


@dataclass(frozen=True)
class Teachers:
    """What each erase row maps to (the teacher's condition c0): the bare anchor, or with
    ``contextual_anchor`` the anchor twin of the concept prompt the row comes from."""

    anchor: torch.Tensor  # (1, L, D): mined embeddings on their own
    own: torch.Tensor  # one per row of the concept's own words (the word's is the bare anchor)
    context: torch.Tensor  # one per in-context row: the first k pool prompts

    def of(self, mined: MinedEmbedding, n: int) -> torch.Tensor:
        """The teacher conditions of a round's ``n`` conditions (``DarkMiner._conditions``)."""
        return self.context[:n] if mined.in_context else self.anchor.expand(n, -1, -1)


@register_eraser("darkminer", kind="lora")
class DarkMiner(Eraser):
    """Dark Miner (Meng et al., arXiv 2409.17682), with the choices documented in docs/darkminer.md."""

    config_class = DarkMinerConfig

    def erase(self, model: DiffusionModel, target: EraseTarget, work_dir: Path) -> dict:
        cfg: DarkMinerConfig = self.config
        processes = init_processes()  # several under `accelerate launch`: DDP in circumventing, main writes
        # a placement that matches nothing, or more mined tokens than a prompt holds, fails before the pools
        target_module_names(model, cfg.lora.pattern)
        if cfg.space == "token":
            check_token_room(model, cfg.n_tokens, "mined tokens (DarkMinerConfig.n_tokens)")
        encoder = load_image_encoder(model, cfg.image_encoder) if cfg.verify else None
        pool, preserve = build_pools(model, target, cfg, work_dir)
        with torch.no_grad():
            anchor = model.encode([target.anchor])
            # On SD the target's prompts start with its word, which is already here once
            texts = [p for p in target.prompts if p != target.word][: cfg.concept_prompts]
            own_words = model.encode([target.word, *texts])
            teachers = Teachers(anchor, torch.cat([anchor, self._twins(model, target, anchor, texts)]),
                                self._twins(model, target, anchor, pool.prompts[: cfg.k]))
        params = add_lora(model, cfg.lora, seed=cfg.seed)

        state = self._load_checkpoint(model, work_dir)
        log: list[dict] = state["log"]
        mined_history: list[MinedEmbedding] = state["mined"]
        failures = state["failures"]
        if log and processes.is_main:
            tqdm.write(f"resuming Dark Miner on {target.name}: {len(log)} of {cfg.rounds} rounds done, from the "
                       f"checkpoint in {work_dir / CHECKPOINT}")
        previous = mined_history[-1] if mined_history else None
        bar = tqdm(range(len(log), cfg.rounds), desc=f"Dark Miner [{target.name}]", unit="round", initial=len(log),
                   total=cfg.rounds)  # a resumed run's bar goes on where it stopped
        for round_index in bar:
            if failures >= cfg.patience:
                break
            g = iteration_generator(cfg.seed, round_index)
            entry: dict = {"round": round_index}
            tick = time.time()
            bar.set_postfix_str(f"round {round_index}: mining")  # a round takes minutes: say which stage runs
            start = initial_embedding(model, target.word, cfg, g, previous, pool.prompts if cfg.mine_in_context else None)
            mined, entry["mining"] = mine(model, pool, start, cfg, g)
            entry["seconds_mining"] = round(time.time() - tick, 2)
            if mined.space == "token":
                _, words = model.nearest_tokens(mined.values, k=3)
                entry["nearest_tokens"] = words
            with torch.no_grad():
                cond = self._conditions(model, mined)
            cond_teachers = teachers.of(mined, len(cond))

            tick = time.time()
            if encoder is not None:
                bar.set_postfix_str(f"round {round_index}: verifying")
                seeds = [VERIFY_SEED_OFFSET + cfg.seed * 7919 + round_index * 1000 + i for i in range(cfg.k)]
                contrast = preserve.images[: cfg.k] if cfg.verify_contrast else None
                result = verify(model, encoder, cond, anchor, pool.images[: cfg.k], seeds, cfg.verify_steps,
                                cfg.guidance_scale, contrast_images=contrast)
                passed = processes.broadcast_object(result.score > cfg.tau)
                entry["score"] = round(result.score, 4)
                if result.contrast_score is not None:
                    entry["pool_score"], entry["contrast_score"] = round(result.pool_score, 4), round(result.contrast_score, 4)
            else:
                passed = True
            entry["passed"] = passed
            entry["seconds_verifying"] = round(time.time() - tick, 2)

            tick = time.time()
            erase_conds, erase_teachers = (cond, cond_teachers) if passed else (cond[:0], cond_teachers[:0])
            replayed, replayed_teachers = (self._replay_conditions(model, log, mined_history, own_words, teachers)
                                           if cfg.replay else (own_words[:0], teachers.own[:0]))
            if round_index == 0 and cfg.concept_word_first_round:
                erase_conds, erase_teachers = torch.cat([erase_conds, own_words]), torch.cat([erase_teachers, teachers.own])
            if len(erase_conds) or len(replayed):
                bar.set_postfix_str(f"round {round_index}: circumventing")
                entry["circumventing"] = circumvent(model, params, erase_conds, torch.cat([erase_teachers, replayed_teachers]),
                                                    pool, preserve, cfg, g, processes, replay_conds=replayed)
            entry["seconds_circumventing"] = round(time.time() - tick, 2)

            failures = 0 if passed else failures + 1
            previous = mined
            mined_history.append(mined)
            log.append(entry)
            if processes.is_main:
                self._save_checkpoint(model, work_dir, log, mined_history, failures)
            bar.set_postfix(**({"score": entry["score"], "verified": "yes" if passed else "no"} if encoder is not None else {}))
        bar.close()
        if processes.is_main:
            self._write_artifacts(work_dir, log, mined_history)
        return {
            "rounds": len(log),
            "passed_rounds": sum(e["passed"] for e in log),
            # patience ran out before the last round (a last-round failure stops nothing)
            "stopped_early": failures >= cfg.patience and len(log) < cfg.rounds,
            "final_score": log[-1].get("score") if log else None,
        }

    def _conditions(self, model: DiffusionModel, mined: MinedEmbedding) -> torch.Tensor:
        """What a round verifies and circumvents: the mined embedding, or its tokens in the first k pool prompts."""
        # Only the k prompts used, not all the pool's: replay re-encodes every earlier round each round.
        rows = torch.arange(min(self.config.k, len(mined.prompts.input_ids))) if mined.in_context else None
        return mined.condition(model, rows).detach()

    def _twins(self, model: DiffusionModel, target: EraseTarget, anchor: torch.Tensor,
               prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
        """The teacher condition of each concept prompt: its anchor twin with ``contextual_anchor``, else the
        bare anchor."""
        if not self.config.contextual_anchor:
            return anchor.expand(len(prompts), -1, -1)
        return model.encode([target.anchor_twin(p) for p in prompts]) if prompts else anchor[:0]

    def _replay_conditions(self, model: DiffusionModel, log: list[dict], mined: list[MinedEmbedding],
                           own_words: torch.Tensor, teachers: Teachers) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditions of every earlier round's verified embedding, and the concept's words once round 0 has
        run; and the teacher condition of each."""
        conds, targets = [], []
        with torch.no_grad():
            for m, entry in zip(mined, log, strict=True):
                if entry["passed"]:
                    conds.append(self._conditions(model, m))
                    targets.append(teachers.of(m, len(conds[-1])))
        if log and self.config.concept_word_first_round:
            conds.append(own_words)
            targets.append(teachers.own)
        if not conds:
            return own_words[:0], teachers.own[:0]
        return torch.cat(conds).detach(), torch.cat(targets)

    # ------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: DiffusionModel, work_dir: Path, log: list[dict], mined: list[MinedEmbedding],
                         failures: int) -> None:
        folder = work_dir / CHECKPOINT
        # The adapter after every round (the last one is the current adapter), so the rounds can be replayed.
        previous = load_tensors(folder / "state.safetensors") if (folder / "state.safetensors").is_file() else {}
        tensors = {k: v for k, v in previous.items() if k.startswith("round_")}
        tensors.update({f"round_{len(log) - 1}.{k}": v for k, v in lora_state_dict(model).items()})
        tensors.update({f"mined.{i}": m.values for i, m in enumerate(mined)})
        save_tensors(folder / "state.safetensors", tensors)
        # The JSON is written last: a checkpoint counts only once both files are complete.
        write_json(folder / "state.json", {"log": log, "failures": failures, "mined": [_mined_record(m) for m in mined]})

    def _load_checkpoint(self, model: DiffusionModel, work_dir: Path) -> dict:
        folder = work_dir / CHECKPOINT
        if not (folder / "state.json").is_file():
            return {"log": [], "mined": [], "failures": 0}
        try:
            meta = read_json(folder / "state.json")
            tensors = load_tensors(folder / "state.safetensors", device=model.device)
            last = f"round_{len(meta['log']) - 1}."
            adapter = {k.removeprefix(last): v for k, v in tensors.items() if k.startswith(last)}
            expected = lora_state_dict(model)
            if adapter.keys() != expected.keys() or any(v.shape != expected[k].shape for k, v in adapter.items()):
                raise KeyError(f"the adapter of {last.rstrip('.')}")  # a resume would train another adapter
            mined = [
                MinedEmbedding(m["space"], tensors[f"mined.{i}"]) if m["input_ids"] is None else
                MinedEmbedding.of_tokens(tensors[f"mined.{i}"], torch.tensor(m["input_ids"], device=model.device), m["slots"])
                for i, m in enumerate(meta["mined"])
            ]
            failures = int(meta["failures"])
        except (DarkMinerError, KeyError, TypeError, ValueError) as exc:
            raise damaged_checkpoint(work_dir, exc) from None
        set_lora_state_dict(model, adapter)
        return {"log": meta["log"], "mined": mined, "failures": failures}

    def _write_artifacts(self, work_dir: Path, log: list[dict], mined: list[MinedEmbedding]) -> None:
        artifacts = work_dir / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        write_round_log(artifacts, log)
        if not mined:
            return
        embeddings = {}
        for i, m in enumerate(mined):
            embeddings[f"round_{i}.values"] = m.values
            if m.prompts is not None:
                ids, slots = m.stored_ids()
                embeddings[f"round_{i}.input_ids"] = ids.clone()
                embeddings[f"round_{i}.slots"] = torch.tensor(slots, dtype=torch.long)
        save_tensors(artifacts / MINED_FILE, embeddings)
        state = load_tensors(work_dir / CHECKPOINT / "state.safetensors")
        save_tensors(artifacts / ROUND_ADAPTERS_FILE, {k: v for k, v in state.items() if k.startswith("round_")})


def _mined_record(mined: MinedEmbedding) -> dict:
    """What a checkpoint's state.json keeps of a mined embedding besides its values."""
    if mined.prompts is None:
        return {"space": mined.space, "slots": [], "input_ids": None}
    ids, slots = mined.stored_ids()
    return {"space": mined.space, "slots": slots, "input_ids": ids.tolist()}


def load_rounds(erased_dir: str | Path, device: str | torch.device = "cpu") -> list[tuple[MinedEmbedding, dict[str, torch.Tensor]]]:
    """Each round's mined embedding and the adapter state after that round, from an erased-model directory."""
    erased_dir = Path(erased_dir)
    mined, adapters = load_tensors(erased_dir / MINED_FILE, device=device), load_tensors(erased_dir / ROUND_ADAPTERS_FILE, device=device)
    rounds = []
    for i in range(len({k.split(".")[0] for k in mined})):
        ids, values = mined.get(f"round_{i}.input_ids"), mined[f"round_{i}.values"]
        embedding = MinedEmbedding("condition", values) if ids is None else \
            MinedEmbedding.of_tokens(values, ids, mined[f"round_{i}.slots"].tolist())
        prefix = f"round_{i}."
        rounds.append((embedding, {k.removeprefix(prefix): v for k, v in adapters.items() if k.startswith(prefix)}))
    return rounds


def keep_rounds(erased_dir: str | Path, rounds: int, out: str | Path) -> Path:
    """Write to ``out`` the erased model of the first ``rounds`` rounds of the run in ``erased_dir``.

    That is the run the same config with ``rounds`` set lower would have made: round r depends only on
    rounds 0..r-1 (its own generator, a fresh optimiser), so the first rounds of a longer run are the
    whole of a shorter one (bit for bit on the same machine and thread count). It lets a rounds budget be
    judged from one long run's snapshots instead of one erase per budget.
    """
    from darkminer.models import load_model
    from darkminer.models.erased import ERASED_ON, INFO_NAME, OUTPUT_KIND, ErasedModelInfo, save_erased

    erased_dir = Path(erased_dir)
    out = check_output_directory(out, INFO_NAME, OUTPUT_KIND, apart_from=erased_dir)  # never over its own source
    info = ErasedModelInfo.read(erased_dir)
    if info.method != "darkminer":
        raise DarkMinerError(f"{erased_dir} was erased with {info.method!r}; only a Dark Miner run has rounds to keep")
    log = read_round_log(erased_dir)
    if not 1 <= rounds <= len(log):
        raise DarkMinerError(f"{erased_dir} holds {len(log)} rounds; keep between 1 and {len(log)}, not {rounds}")
    model = load_model(erased=erased_dir)
    snapshots = load_rounds(erased_dir, device=model.device)[:rounds]
    set_lora_state_dict(model, snapshots[-1][1])
    kept = log[:rounds]
    info.config["rounds"] = rounds
    # A run configured with ``rounds`` would have run every kept round: it did not stop early.
    info.extra.update(rounds=rounds, passed_rounds=sum(e["passed"] for e in kept), final_score=kept[-1].get("score"),
                      stopped_early=False,
                      seconds=None, kept_rounds_of=str(erased_dir))  # this erase was not timed on its own

    def write_rounds(folder: Path) -> None:
        write_round_log(folder, kept)
        prefixes = tuple(f"round_{i}." for i in range(rounds))
        for name in (MINED_FILE, ROUND_ADAPTERS_FILE):
            tensors = load_tensors(erased_dir / name)
            save_tensors(folder / name, {k: v for k, v in tensors.items() if k.startswith(prefixes)})

    return save_erased(model, out, info, write_extra=write_rounds,
                       erased_on=erased_dir / ERASED_ON if info.erased_on is not None else None)
