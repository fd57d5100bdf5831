"""Does ``torch.compile`` keep the UNet's LoRA gradients? The check behind ``SpeedOptions.compile`` running
only calls without gradients compiled (docs/performance.md, "torch.compile on the CPU").

For each attention kernel and memory format, one Dark Miner circumventing-like step (a student with a
perturbed default LoRA against its teacher, 16 rows) runs eager and then with the UNet's whole forward
compiled, backward included, bypassing darkminer's guard. Prints, per setting: how far the compiled
forward is from eager, how many LoRA gradient tensors differ by more than 0.1% (relative norm), how many
came out zero, and the ratio of the total gradient norms. Rerun it with a new torch, or on a GPU
(``--device cuda``), before letting compiled calls train.

    python benchmarks/compile_gradients.py --model testbed --out benchmarks/results/compile_gradients_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from darkminer.erasers.darkminer import DarkMinerConfig
from darkminer.models import load_model
from darkminer.models.adapters import add_lora
from darkminer.parallel.speed import SpeedOptions, apply_speed_options
from darkminer.provenance import package_versions

SETTINGS = {  # key: (attention, channels_last)
    "sdpa": ("sdpa", False),
    "sdpa-cl": ("sdpa", True),
    "classic": ("classic", False),
    "auto-cl": ("auto", True),  # the testbed's default
}


def step(model: torch.nn.Module, params: list[torch.nn.Parameter], batch: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, t, cond = batch
    with torch.no_grad():
        teacher = model.eps(x, t, cond, adapter=False)
    student = model.eps(x, t, cond)
    return student.detach(), list(torch.autograd.grad((student - teacher).square().mean(), params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    result = {"model": args.model, "device": args.device, "backend": args.backend, "rows": args.rows,
              "versions": package_versions(), "settings": rows}
    for name in args.settings.split(","):
        attention, channels_last = SETTINGS[name]
        torch._dynamo.reset()
        model = load_model(args.model, device=args.device)
        params = add_lora(model, DarkMinerConfig().lora, seed=0)
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p))
        apply_speed_options(model, SpeedOptions(attention=attention, channels_last=channels_last))
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(args.rows, *model.latent_shape, generator=g).to(model.device),
                 torch.randint(0, model.num_train_timesteps, (args.rows,), generator=g).to(model.device),
                 model.encode(["a red star on a blue sky"]).repeat(args.rows, 1, 1))
        eager_out, eager_grads = step(model, params, batch)
        plain = model.unet.forward
        model.unet.forward = torch.compile(plain, backend=args.backend)  # forward and backward compiled
        started = time.perf_counter()
        out, grads = step(model, params, batch)
        seconds = time.perf_counter() - started
        relative = [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(grads, eager_grads, strict=True)]
        norm = float(torch.stack([a.norm() for a in grads]).norm() / torch.stack([b.norm() for b in eager_grads]).norm())
        rows.append({"setting": name, "forward_max_abs_diff": float((out - eager_out).abs().max()),
                     "lora_tensors": len(grads), "off_by_over_0.1pct": sum(r > 1e-3 for r in relative),
                     "zero": sum(float(a.abs().max()) == 0.0 for a in grads), "grad_norm_ratio": round(norm, 4),
                     "first_step_seconds_with_compiling": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # after each setting: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| setting | forward max diff | LoRA tensors off (> 0.1%) | zero | gradient norm, compiled / eager |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['forward_max_abs_diff']:.1e} | {r['off_by_over_0.1pct']} of {r['lora_tensors']} "
              f"| {r['zero']} | {r['grad_norm_ratio']} |")


if __name__ == "__main__":
    main()
