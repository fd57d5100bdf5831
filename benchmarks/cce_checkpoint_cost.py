"""What one CCE training checkpoint costs to write: the state at a late step of the authors' 5,000 (a
768-d token, AdamW's moments, the loss scale, the generator's state, the losses so far), written as
``TrainingCheckpoint.save`` writes it (``io.save_state``: safetensors, atomic, fsync).

    python benchmarks/cce_checkpoint_cost.py --step 4900 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from darkminer.io import save_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=4900)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--embed-dim", type=int, default=768, help="SD 1.x's text encoder width")
    args = parser.parse_args()

    token = torch.randn(1, args.embed_dim, requires_grad=True)
    optimizer = torch.optim.AdamW([token], lr=0.08, weight_decay=1e-2)
    token.grad = torch.randn_like(token)
    optimizer.step()  # AdamW's moments exist
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    generator = torch.Generator().manual_seed(0)
    state = {"step": args.step, "losses": [0.1234567] * args.step, "token": token, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "generator": generator.get_state()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cce_training.safetensors"
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            save_state(path, state)
            seconds.append(time.perf_counter() - started)
        size = path.stat().st_size
    print(json.dumps({"step": args.step, "bytes": size, "median_ms": round(1000 * statistics.median(seconds), 2),
                      "repeats": args.repeats}))


if __name__ == "__main__":
    main()
