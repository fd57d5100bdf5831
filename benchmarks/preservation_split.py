"""Preservation accuracy split by prompt: the prompts that ask for an erased concept, and the rest.

    .venv/bin/python benchmarks/preservation_split.py runs/eval-fire/judgements.json --asks overlay=blood,overlay=fire

Reads the per-image judge readings that ``darkminer evaluate --preservation accuracy`` writes on the testbed
(``judgements.json``, sets ``preservation`` and ``preservation-original``) and prints the attribute accuracy of
the erased model and of the original on each part, with each part's change in points. A prompt is in the
first part if it asks for any of the ``--asks`` values (``head=value``, as in ``asked``). After erasing blood
and fire together, a preservation prompt that asks for a blood overlay is one the stack ought not to draw:
it belongs to the erasure, not to what is preserved (docs/methods.md, "Several concepts").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from darkminer.evaluation.metrics import attribute_accuracy


def split(judgements: list[dict], asks: set[tuple[str, str]]) -> dict[str, dict]:
    """For each part ("asks" / "rest"): its prompt count and the accuracy of both sets on it."""
    result: dict[str, dict] = {}
    for part in ("asks", "rest"):
        row: dict = {}
        for name in ("preservation", "preservation-original"):
            chosen = [j for j in judgements if j["set"] == name and (part == "asks") == bool(asks & set(j["asked"].items()))]
            row["prompts"] = len(chosen)
            if chosen:
                scored = attribute_accuracy([j["seen"] for j in chosen], [j["asked"] for j in chosen])
                row[name] = {"accuracy": scored["accuracy"], "per_attribute": scored["per_attribute"]}
        if row["prompts"]:
            row["change_points"] = 100 * (row["preservation"]["accuracy"] - row["preservation-original"]["accuracy"])
        result[part] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("judgements", type=Path, help="an evaluation's judgements.json")
    parser.add_argument("--asks", required=True, help="comma-separated head=value pairs, e.g. overlay=blood,overlay=fire")
    args = parser.parse_args()
    asks = {tuple(pair.split("=", 1)) for pair in args.asks.split(",")}
    judgements = json.loads(args.judgements.read_text())
    if not any(j["set"] == "preservation" for j in judgements):
        parser.error(f"{args.judgements} holds no preservation readings (evaluate with --preservation accuracy on the testbed)")
    for part, row in split(judgements, asks).items():
        if not row["prompts"]:
            print(f"{part}: no prompts")
            continue
        erased, original = row["preservation"], row["preservation-original"]
        print(f"{part}: {row['prompts']} prompts, accuracy {erased['accuracy']:.3f} (original {original['accuracy']:.3f}), "
              f"change {row['change_points']:+.1f} points")
        for head, value in erased["per_attribute"].items():
            print(f"    {head}: {value:.3f} (original {original['per_attribute'][head]:.3f})")


if __name__ == "__main__":
    main()
