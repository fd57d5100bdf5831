"""Arguments shared by several commands."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="testbed (default; alias toy), tiny-random-sd, a diffusers folder or a cached hub id")
    p.add_argument("--erased", default=None, help="an erased-model directory written by `darkminer erase`")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")


def add_concept_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--concept", required=required, help="testbed: a registry name (`darkminer testbed concepts`); SD: free text, e.g. nudity")
    p.add_argument("--anchor", default=None, help="SD: the concept to map to (default: the empty prompt); testbed: the registry's anchor")
    p.add_argument("--prompts", default=None, help="CSV with a `prompt` column (optional evaluation_seed, evaluation_guidance)")
