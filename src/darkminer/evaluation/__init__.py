"""Evaluation: detectors (NudeNet, CLIP zero-shot, the testbed judge), prompt suites, metrics,
``evaluate`` (one model, one concept -> metrics.json) and the benchmark runner with its report."""

from darkminer.evaluation.benchmark import PRESETS, BenchmarkConfig, load_benchmark_config, run_benchmark
from darkminer.evaluation.detectors import (
    ClipZeroShotDetector,
    Detector,
    JudgeDetector,
    NudeNetDetector,
)
from darkminer.evaluation.evaluate import EvaluationConfig, concept_detector, evaluate
from darkminer.models.clip import Clip

__all__ = [
    "PRESETS",
    "BenchmarkConfig",
    "Clip",
    "ClipZeroShotDetector",
    "Detector",
    "EvaluationConfig",
    "JudgeDetector",
    "NudeNetDetector",
    "concept_detector",
    "evaluate",
    "load_benchmark_config",
    "run_benchmark",
]
