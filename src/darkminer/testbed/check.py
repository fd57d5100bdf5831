"""``darkminer testbed check``: measure the testbed's gates with the judge on the shipped model.

Gates (issue "The testbed"): judge accuracy per head on held-out procedural images; concept rate from
direct prompts and held-out paraphrases per concept; negative rate (a concept seen where no prompt asked
for one), and which concepts make it up; the anchor rate (the concept seen on prompts asking for its anchor
instead); attribute accuracy; the residual (concept rate after ESD-x on the concept's word, and after a
CCE attack on that erased model, on the direct prompts and on those that hold the word); the time to draw
64 images at 25 DDIM steps.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from darkminer.config import Config, check_positive, check_sampling_steps
from darkminer.errors import ConfigError
from darkminer.evaluation.metrics import attribute_accuracy
from darkminer.provenance import file_digest
from darkminer.testbed import captions, world
from darkminer.testbed.concepts import CONCEPTS, Concept, EvalPrompt, concept_names, get_concept
from darkminer.testbed.judge import Judge, judge_weights
from darkminer.testbed.model import TestbedModel

# Scene values that no target concept uses: prompts for "negative" images.
_NEUTRAL = {
    "overlay": ("none",),
    "shape": tuple(v for v in world.SHAPES if v not in {c.value for c in CONCEPTS.values() if c.head == "shape"}),
    "style": tuple(v for v in world.STYLES if v not in {c.value for c in CONCEPTS.values() if c.head == "style"}),
}


@dataclass
class CheckConfig(Config):
    n_images: int = 200  # per cell
    seed: int = 0
    steps: int = 25
    concepts: list[str] = field(default_factory=concept_names)
    residual: bool = True
    esd_iterations: int = 200
    # The testbed's ESD-x rate: the authors' 1e-5 x 100, calibrated once on blood (docs/methods.md).
    esd_lr: float = 1e-3
    # 900, not 300: at 300 CCE had not converged on striped (0.440 against 0.875); at 900 every concept's
    # attack brings its concept back in >= 0.775 of the direct prompts (docs/testbed.md, "CCE at 900 steps").
    cce_steps: int = 900
    judge_images: int = 2048
    timing_images: int = 64  # the speed gate: this many images at 25 DDIM steps
    judge: str | None = None  # None: the shipped judge (v2); "v1" or a weights file to re-grade as before

    def validate(self) -> None:
        check_sampling_steps(self, steps=self.steps)
        check_positive(self, n_images=self.n_images, esd_iterations=self.esd_iterations,
                       cce_steps=self.cce_steps, esd_lr=self.esd_lr, judge_images=self.judge_images,
                       timing_images=self.timing_images)
        judge_weights(self.judge)
        if not self.concepts:
            raise ConfigError("concepts (--concepts) is empty; name at least one concept (darkminer testbed concepts)")
        if doubled := sorted({name for name in self.concepts if self.concepts.count(name) > 1}):
            raise ConfigError(f"concepts (--concepts) names {', '.join(doubled)} more than once; name each once")
        for name in self.concepts:
            get_concept(name)


def neutral_prompts(n: int, seed: int) -> list[EvalPrompt]:
    """Prompts naming shape, colour and style, none of them a target concept, on clean scenes."""
    rng = np.random.default_rng([seed, 17])
    prompts = []
    for _ in range(n):
        fixed = {head: values[rng.integers(len(values))] for head, values in _NEUTRAL.items()}
        scene = world.sample_scene(rng, **fixed)
        text = captions.caption(scene, rng, dropout=0.0, mention={"shape": True, "colour": True, "style": True, "overlay": False})
        prompts.append(EvalPrompt(text, int(rng.integers(2**31 - 1)), {h: getattr(scene, h) for h in ("shape", "colour", "style")}))
    return prompts


def drawn_concept_rate(
    model: TestbedModel, judge: Judge, prompts: list[EvalPrompt], concept: Concept | str, steps: int
) -> float:
    images = model.generate([p.text for p in prompts], [p.seed for p in prompts], steps=steps)
    return judge.has_concept(images, concept).float().mean().item()


def concepts_seen(judge: Judge, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per target concept, whether the judge sees it in each image; on neutral images, the negatives."""
    return {name: judge.has_concept(images, concept) for name, concept in CONCEPTS.items()}


def sampling_seconds(model: TestbedModel, n: int = 64) -> float:
    """Wall time to draw ``n`` images at 25 DDIM steps: the testbed's speed gate, and the machine-speed
    reference that other timings on the testbed are read against (``benchmarks/erase_time.py``)."""
    tick = time.perf_counter()
    model.generate(["a red star"] * n, list(range(n)), steps=25)
    return time.perf_counter() - tick


def run_check(config: CheckConfig, model: TestbedModel | None = None) -> dict:
    torch.manual_seed(config.seed)
    judge = Judge.load(config.judge)
    model = model or TestbedModel.load()
    # Which trained judge graded these numbers (judge v1 and v2 read generated fire differently).
    report: dict = {"n_images_per_cell": config.n_images, "seed": config.seed,
                    "judge": file_digest(judge_weights(config.judge))}

    rng = np.random.default_rng([config.seed, 99])
    _, images, labels = world.sample_batch(config.judge_images, rng)
    report["judge_accuracy"] = {h: round(a, 4) for h, a in judge.accuracy(images, labels).items()}

    report[f"seconds_{config.timing_images}_images"] = round(sampling_seconds(model, config.timing_images), 2)

    report["concept_rate"], report["anchor_rate"] = {}, {}
    for name in tqdm(config.concepts, desc="concept rates"):
        concept = get_concept(name)
        report["concept_rate"][name] = {
            "direct": round(drawn_concept_rate(model, judge, concept.direct_prompts(config.n_images, config.seed), concept, config.steps), 4),
            "paraphrase": round(drawn_concept_rate(model, judge, concept.paraphrase_prompts(config.n_images, config.seed), concept, config.steps), 4),
        }
        # The rate an eraser that turned the concept exactly into its anchor would still score: the floor
        # under the erasure gate.
        anchor_prompts = concept.anchor_prompts(config.n_images, config.seed)
        report["anchor_rate"][name] = round(drawn_concept_rate(model, judge, anchor_prompts, concept, config.steps), 4)

    neutral = neutral_prompts(config.n_images, config.seed)
    images = model.generate([p.text for p in neutral], [p.seed for p in neutral], steps=config.steps)
    by_concept = concepts_seen(judge, images)
    report["negative_rate"] = round(torch.stack(list(by_concept.values())).any(0).float().mean().item(), 4)
    # Which concepts the unasked-for images show: where a missed negative gate comes from.
    report["negative_by_concept"] = {name: round(hit.float().mean().item(), 4) for name, hit in by_concept.items()}
    scored = attribute_accuracy(judge.predict_values(images), [p.expected for p in neutral])
    report["attribute_accuracy"] = round(scored["accuracy"], 4)

    if config.residual:
        # The residual's settings travel with its numbers: CCE's length decides whether it brings striped back.
        report["residual_setting"] = {"esd_iterations": config.esd_iterations, "esd_lr": config.esd_lr,
                                      "cce_steps": config.cce_steps}
        report["residual"] = {name: _residual(judge, name, config) for name in tqdm(config.concepts, desc="residual")}
    return report


def esd_x(name: str, out: Path, config: CheckConfig) -> Path:
    """ESD-x on the concept's word at the check's setting (iterations, rate, seed, DDIM steps): the residual's
    erased model, written to ``out``."""
    from darkminer.api import erase

    return erase("esd-x", name, out, model="testbed",
                 config={"iterations": config.esd_iterations, "lr": config.esd_lr, "seed": config.seed,
                         "ddim_steps": config.steps})


def _residual(judge: Judge, name: str, config: CheckConfig) -> dict:
    """Concept rate after ESD-x on the concept's word, and after CCE against that erased model.

    Both on the direct prompts and on the direct prompts that hold the erased word (``Concept.word_prompts``):
    ESD-x learns that one word, and the other trigger phrases ("wounded", "blazing", "line art") keep much of
    the concept without any attack, so the direct rate mixes what ESD-x erased with what it never saw.
    """
    from darkminer.attacks.base import AttackPrompt, before_and_after_rates
    from darkminer.attacks.cce import CCEConfig, ConceptInversion
    from darkminer.models import load_model
    from darkminer.targets import resolve_target

    concept = get_concept(name)
    with tempfile.TemporaryDirectory() as tmp:
        erased = load_model("testbed", erased=esd_x(name, Path(tmp) / "esd-x", config))
    direct = concept.direct_prompts(config.n_images, config.seed)
    named = concept.word_prompts(config.n_images, config.seed)
    target = resolve_target(erased, name, seed=config.seed)
    attack = ConceptInversion(CCEConfig(steps=config.cce_steps, seed=config.seed))
    # One token for both sets; each prompt's unattacked verdict is the erased model's (ESD-x's) on it.
    results = attack.run(erased, target, [AttackPrompt(p.text, p.seed) for p in direct + named],
                         lambda images: judge.has_concept(images, concept))
    direct_before, direct_after = before_and_after_rates(results[:len(direct)])
    word_before, word_after = before_and_after_rates(results[len(direct):])
    return {"esd_direct": round(direct_before, 4), "cce_attack": round(direct_after, 4),
            "esd_word": round(word_before, 4), "cce_attack_word": round(word_after, 4)}
