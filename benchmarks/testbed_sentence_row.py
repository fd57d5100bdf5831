"""An experiment on the testbed's text conditioning (session 16, rejected): does a sentence-level context
row carry the concept to held-out paraphrases that the token states do not?

The variant appends one row to the 24 MiniLM token states: their masked mean, the state all-MiniLM-L6-v2
was trained to compare sentences by (``benchmarks/testbed_paraphrases.py`` shows that space reads most
held-out phrases as their concept). The shipped UNet is fine-tuned under it; in ``--token-dropout`` of the
captions the 24 token rows are replaced by the empty caption's, so the UNet must learn to draw from the
sentence row alone. Then the paraphrase rates per phrase and the direct rates are measured as the gates
are (seed 0).

    python benchmarks/testbed_sentence_row.py --work-dir runs/sentence-row -n 126 \
        --out benchmarks/results/testbed_sentence_row.json

Resumable (``--work-dir``). 2,500 steps take about 50 minutes on one core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from testbed_paraphrases import SEED, paraphrase_report

from darkminer.io import write_json
from darkminer.testbed.check import drawn_concept_rate
from darkminer.testbed.concepts import concept_names, get_concept
from darkminer.testbed.judge import Judge
from darkminer.testbed.model import UNET_DIR, TestbedModel, load_text_encoder
from darkminer.testbed.train_unet import UNetTrainConfig, train_unet


class SentenceRowTestbed(TestbedModel):
    """The testbed with a 25th context row: the masked mean of the token states."""

    def encode_embeddings(self, embeds: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        states = super().encode_embeddings(embeds, input_ids)
        mask = (input_ids != self.pad_id).to(states.device, states.dtype).unsqueeze(-1)
        sentence = (states * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        return torch.cat([states, sentence], 1)


def load(unet_dir: str | Path) -> SentenceRowTestbed:
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    encoder, tokenizer = load_text_encoder()
    return SentenceRowTestbed(unet, encoder, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--token-dropout", type=float, default=0.3)
    parser.add_argument("-n", type=int, default=126, help="images per prompt set (126 cycles every phrase set evenly)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work_dir)
    config = UNetTrainConfig(seed=2, steps=args.steps, learning_rate=args.lr, lr_schedule="cosine")

    def token_dropout(cond: torch.Tensor, empty: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        drop = torch.from_numpy(rng.random(len(cond)) < args.token_dropout)
        cond[drop, :-1] = empty[:-1]
        return cond

    log = train_unet(config, work, work / "unet", model=load(UNET_DIR), condition=token_dropout)
    model = load(work / "unet")
    torch.set_num_threads(1)
    judge = Judge.load()
    direct = {name: round(drawn_concept_rate(model, judge, get_concept(name).direct_prompts(args.n, SEED), get_concept(name), 25), 4)
              for name in concept_names()}
    print("direct", direct, flush=True)
    write_json(args.out, {"n": args.n, "seed": SEED, "config": config.to_dict(), "token_dropout": args.token_dropout,
                          "training_seconds": round(log["seconds"]), "losses": log["losses"],
                          "direct": direct, "paraphrase": paraphrase_report(model, args.n)})


if __name__ == "__main__":
    main()
