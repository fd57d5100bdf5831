"""Where the held-out paraphrases sit: per phrase, the training value nearest to it in the text encoder's
own sentence space, and the rate at which the model draws the concept from it.

    python benchmarks/testbed_paraphrases.py -n 200 --out benchmarks/results/testbed_paraphrases.json

Encoder part: each held-out phrase and every training phrase of the same head are put in one short
caption ("a starfish", "a hollow circle", "a circle in a blaze") and compared by all-MiniLM-L6-v2's
sentence embedding (``SentenceEmbedder``: masked mean of the token states, normalised, how that model was
trained to compare sentences; the testbed's image encoder is trained against it). A phrase whose nearest training phrase belongs to another value is one the text encoder itself
reads as that value. Model part (``-n`` > 0): the paraphrase prompts of ``darkminer testbed check`` (seed 0),
judged per phrase (the prompts cycle through the phrases evenly).
"""

from __future__ import annotations

import argparse

import torch

from darkminer.io import write_json
from darkminer.testbed.captions import HELDOUT, NOUN, VOCABULARY, Phrase
from darkminer.testbed.concepts import concept_names, get_concept
from darkminer.testbed.image_encoder import SentenceEmbedder
from darkminer.testbed.judge import Judge
from darkminer.testbed.model import UNET_DIR, TestbedModel

SEED = 0
# Paraphrase prompts cycle through a concept's phrases; fewer prompts than phrases would leave some unmeasured.
MIN_IMAGES = max(len(phrases) for values in HELDOUT.values() for phrases in values.values())


def short_caption(phrase: Phrase) -> str:
    """The phrase alone with a neutral shape noun, as a training caption would place it."""
    if phrase.form == NOUN:
        return f"a {phrase.text}"
    return f"a {phrase.text} circle" if phrase.form == "adjective" else f"a circle {phrase.text}"


def encoder_neighbours(head: str, value: str, embedder: SentenceEmbedder) -> dict[str, dict]:
    """Per held-out phrase of ``head=value``: the nearest training value and the two similarities."""
    training = [(v, short_caption(p)) for v, phrases in VOCABULARY[head].items() for p in phrases]
    bank = embedder.encode([text for _, text in training])
    out = {}
    for phrase in HELDOUT[head][value]:
        sims = (bank @ embedder.encode([short_caption(phrase)])[0]).tolist()
        best: dict[str, float] = {}
        for (v, _), s in zip(training, sims, strict=True):
            best[v] = max(best.get(v, -1.0), s)
        nearest = max(best, key=best.get)
        others = max(s for v, s in best.items() if v != value)
        out[phrase.text] = {"nearest": nearest, "own": round(best[value], 3), "best_other": round(others, 3)}
    return out


def paraphrase_report(model: TestbedModel | None, n: int) -> dict[str, dict]:
    """Per concept: the encoder's agreement and, with a model, its paraphrase rate, overall and per phrase."""
    if model is not None and n < MIN_IMAGES:
        raise ValueError(f"n={n}: use at least {MIN_IMAGES} images, one per held-out phrase")
    embedder = SentenceEmbedder()
    judge = Judge.load() if model is not None else None
    results = {}
    for name in concept_names():
        concept = get_concept(name)
        phrases = encoder_neighbours(concept.head, concept.value, embedder)
        row = {"encoder_agrees": round(sum(p["nearest"] == concept.value for p in phrases.values()) / len(phrases), 3)}
        if model is not None:
            prompts = concept.paraphrase_prompts(n, SEED)
            images = model.generate([p.text for p in prompts], [p.seed for p in prompts], steps=25)
            hits = judge.has_concept(images, concept).tolist()
            for k, text in enumerate(phrases):
                mine = hits[k :: len(phrases)]
                phrases[text]["model_rate"] = round(sum(mine) / len(mine), 3)
            row["model_rate"] = round(sum(hits) / len(hits), 4)
        row["phrases"] = phrases
        results[name] = row
        print(name, {k: v for k, v in row.items() if k != "phrases"}, flush=True)
        for text, p in phrases.items():
            print(f"  {text:28s} {p}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default=str(UNET_DIR))
    parser.add_argument("-n", type=int, default=200, help="paraphrase images per concept (0: encoder part only)")
    parser.add_argument("--out", default=None, help="JSON of the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = paraphrase_report(TestbedModel.load(args.unet) if args.n else None, args.n)
    if args.out:
        write_json(args.out, {"n": args.n, "seed": SEED, "unet": args.unet, "concepts": results})


if __name__ == "__main__":
    main()
