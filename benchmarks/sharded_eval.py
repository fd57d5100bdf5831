"""Scaling of sharded generation and evaluation: one process against several, on this machine's CPUs.

Three runs of the same work, each timed inside the processes from a barrier after model loading and a
warm-up (so interpreter start-up and imports are reported apart):

* 1 process, 1 thread;
* 1 process, N threads (what one process makes of the same cores through intra-op parallelism);
* N processes, 1 thread each, launched by torchrun (what ``accelerate launch --multi_gpu`` runs on GPUs),
  sharing the batches through ``darkminer.parallel.sharded_sample``.

``--mode generation`` times ``sharded_sample`` alone; ``--mode evaluate`` times ``darkminer.evaluate``
(drawing sharded; loading, detection and metrics on every process); ``--mode attack`` times
``darkminer.attack`` (loading included) on ``--images`` prompts, which the attack shares out.
The N-process images (attack: the adversarial texts, token ids and verdicts) are checked to equal the
1-process ones bit for bit.

    python benchmarks/sharded_eval.py --mode generation --images 16 --steps 50 --out sharded_generation.json
    python benchmarks/sharded_eval.py --mode attack --model testbed --erased runs/blood --concept blood \
        --attack unlearndiff --attack-config '{"rounds": 5}' --images 8 --runs 1x1,Nx1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a photo of a dog", "a red car", "a painting of a church", "a cat", "a blue house", "a landscape"]
EVALUATION = {"preservation": [], "grid_images": 4}


def worker(args: argparse.Namespace) -> None:
    """One process of a run: load, warm up, wait for the others, then time the work."""
    torch.set_num_threads(args.threads)
    from darkminer.models import load_model
    from darkminer.parallel import init_processes, sharded_sample

    processes = init_processes()
    model = load_model(args.model)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    seeds = list(range(args.images))
    with torch.no_grad():
        conds = model.encode(prompts)
    sharded_sample(model, conds[:1], seeds[:1], steps=2, batch_size=args.batch_size)  # warm-up
    processes.barrier()
    started = time.perf_counter()
    if args.mode == "generation":
        images = sharded_sample(model, conds, seeds, steps=args.steps, batch_size=args.batch_size)
        digest, drawn = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16], len(images)
    elif args.mode == "attack":
        from darkminer.api import attack

        results = attack(args.attack, args.concept, model=args.model, erased=args.erased, n_prompts=args.images,
                         config=json.loads(args.attack_config))
        found = [(r.adversarial_text, r.input_ids, r.success_before, r.success_after) for r in results]
        digest, drawn = hashlib.sha256(json.dumps(found).encode()).hexdigest()[:16], len(results)
    else:
        from darkminer.evaluation import evaluate

        config = {**EVALUATION, "n_images": args.images, "steps": args.steps, "batch_size": args.batch_size}
        out = Path(args.result).with_suffix(".evaluation")
        metrics = evaluate("nudity", out, model=args.model, config=config)
        digest = hashlib.sha256((out / metrics["images"]["plain"]).read_bytes()).hexdigest()[:16] if processes.is_main else ""
        drawn = metrics["n_images"]  # plain, preservation and the original's preservation images
    processes.barrier()
    seconds = time.perf_counter() - started
    if processes.is_main:
        Path(args.result).write_text(json.dumps({"seconds": seconds, "digest": digest, "images": drawn}))


def run(args: argparse.Namespace, processes: int, threads: int) -> dict:
    """Launch one run (torchrun for several processes) and read back rank 0's timing."""
    folder = Path(tempfile.mkdtemp(prefix="sharded-eval-"))
    result = folder / "result.json"
    own = [__file__, "--worker", "--mode", args.mode, "--model", args.model, "--images", str(args.images),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(threads),
           "--concept", args.concept, "--attack", args.attack, "--attack-config", args.attack_config,
           "--result", str(result), *(["--erased", args.erased] if args.erased else [])]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *own]
    else:
        command = [sys.executable, *own]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    measured = json.loads(result.read_text())
    return {"processes": processes, "threads": threads, "seconds": round(measured["seconds"], 2),
            "images": measured["images"], "images_per_s": round(measured["images"] / measured["seconds"], 3), "wall_with_startup_s": round(wall, 1),
            "digest": measured["digest"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["generation", "evaluate", "attack"], default="generation")
    parser.add_argument("--model", default="tiny-random-sd")
    parser.add_argument("--erased", default=None, help="attack mode: the erased model's folder")
    parser.add_argument("--concept", default="nudity", help="attack mode: the concept attacked")
    parser.add_argument("--attack", default="unlearndiff", help="attack mode: the attack")
    parser.add_argument("--attack-config", default="{}", help="attack mode: the attack's options, as JSON")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--runs", default="1x1,1xN,Nx1", help="processes x threads layouts to run; the first is the baseline")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    n = args.processes
    load = os.getloadavg()[0]
    layouts = {"1x1": (1, 1), "1xN": (1, n), "Nx1": (n, 1)}
    runs = [run(args, *layouts[name]) for name in args.runs.split(",")]
    base = runs[0]["seconds"]
    for r in runs:
        r["speedup"] = round(base / r["seconds"], 2)
    sharded = [r for r in runs if r["processes"] > 1]
    same = all(r["digest"] == runs[0]["digest"] for r in sharded) if sharded else None
    what = (f"{args.attack} {args.attack_config} on {args.images} {args.concept} prompts" if args.mode == "attack"
            else f"{args.images} images, {args.steps} steps, batch {args.batch_size}")
    print(f"{args.mode}: {what}, model {args.model}{f' erased {args.erased}' if args.erased else ''}; "
          f"load average before: {load:.1f}")
    unit = "prompts" if args.mode == "attack" else "images"
    print(f"| processes x threads | seconds | {unit}/s | speedup | wall incl. start-up (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['processes']} x {r['threads']} | {r['seconds']} | {r['images_per_s']} | {r['speedup']} | "
              f"{r['wall_with_startup_s']} |")
    print(f"{n}-process output equals the 1-process output bit for bit: {same}")
    if args.out:
        setting = ({"attack": args.attack, "attack_config": json.loads(args.attack_config), "concept": args.concept,
                    "erased": args.erased} if args.mode == "attack" else {"steps": args.steps, "batch_size": args.batch_size})
        Path(args.out).write_text(json.dumps({"mode": args.mode, "images": args.images, "model": args.model, **setting,
                                              "load_average_before": round(load, 1), "runs": runs, "identical": same},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
