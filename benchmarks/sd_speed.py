"""Speed and memory of darkminer's loops at Stable Diffusion 1.4 size, with random weights built from configs.

Nothing is downloaded: the UNet, the CLIP ViT-L/14 text encoder, the VAE and the verifier's CLIP ViT-L/14
(image and text towers, as ``models.clip.Clip`` loads it) are built from SD-1.4's configs with random
weights (speed and memory do not depend on the values). Every figure is a median over repeats after
warm-up; loop steps (mining, circumventing, ESD, UnlearnDiffAtk) are timed as the difference between runs
of 1 and 1+n steps, so per-run set-up is left out. Peak memory is the CUDA allocator's high-water mark
during the operation (CPU: not measured).

    python benchmarks/sd_speed.py --small                                   # CPU smoke run, tiny sizes
    python benchmarks/sd_speed.py --device cuda --precision bf16 --weights bf16 --sections unet --out unet.json
    python benchmarks/sd_speed.py --device cuda --precision bf16 --weights fp32 --out sd_speed.json

``--weights bf16`` stores the weights in bf16 (what trains stays float32: the LoRA, the mined and
attacking embeddings): right for the UNet and sampling rows. ESD trains the stored weights and refuses
half-precision ones, so its section is skipped there; time training with ``--weights fp32 --precision bf16``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from darkminer.attacks.base import AttackPrompt
from darkminer.attacks.unlearndiff import UnlearnDiffAtk, UnlearnDiffConfig
from darkminer.erasers.darkminer import DarkMinerConfig
from darkminer.erasers.darkminer.circumventing import circumvent
from darkminer.erasers.darkminer.mining import initial_embedding, mine
from darkminer.erasers.darkminer.pool import ImagePool
from darkminer.erasers.darkminer.verifying import verify
from darkminer.erasers.esd import EsdConfig, EsdU
from darkminer.models.adapters import add_lora
from darkminer.models.clip import TINY_CLIP_ID, Clip
from darkminer.models.stable_diffusion import StableDiffusionModel
from darkminer.models.tiny import build_tiny_sd_pipeline
from darkminer.parallel import SpeedOptions, apply_speed_options, attention_processors
from darkminer.parallel.speed import ATTENTIONS, COMPILE_MODES
from darkminer.targets import resolve_target

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONCEPT = "nudity"


@dataclass
class Timing:
    seconds: float
    peak_mib: float | None = None
    flops: float | None = None

    def row(self, name: str, peak_tflops: float) -> dict:
        achieved = self.flops / self.seconds / 1e12 if self.flops else None
        return {"what": name, "ms": round(self.seconds * 1e3, 2),
                "peak_mib": None if self.peak_mib is None else round(self.peak_mib),
                "gflop": None if self.flops is None else round(self.flops / 1e9, 2),
                "tflops_per_s": None if achieved is None else float(f"{achieved:.3g}"),
                "share_of_peak": None if achieved is None else round(achieved / peak_tflops, 4)}


class Bench:
    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], warmup: int | None = None) -> Timing:
        """Median wall time of ``fn`` and the peak memory over the timed calls."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None
        return Timing(statistics.median(times), peak)

    def per_step(self, run: Callable[[int], object], extra_steps: int) -> Timing:
        """Time of one step of a loop: (run(1 + n) - run(1)) / n, each a median (one warm-up run)."""
        short = self.time(lambda: run(1), warmup=1)
        long = self.time(lambda: run(1 + extra_steps), warmup=0)
        return Timing(max(long.seconds - short.seconds, 0.0) / extra_steps, long.peak_mib)

    def count_flops(self, fn: Callable[[], object]) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    def syncs(self, fn: Callable[[], object]) -> int | None:
        """How many synchronising CUDA calls ``fn`` makes (torch's sync debug mode); None on the CPU."""
        if not self.cuda:
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------------ models
def build_model(small: bool, device: torch.device, weights: torch.dtype) -> tuple[StableDiffusionModel, object]:
    """SD-1.4-sized components (or tiny-random-sd with ``small``) with random weights, and a verifier encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

    torch.manual_seed(0)
    tiny = build_tiny_sd_pipeline()  # its tokenizer and SD's DDIM schedule serve both sizes
    if small:
        pipe, encoder = tiny, Clip.load(TINY_CLIP_ID)
    else:
        tokenizer = tiny.tokenizer
        with torch.device(device):  # initialise on the GPU: seconds instead of minutes
            # SD-1.4's UNet: diffusers' defaults are SD-1.x's but for the cross-attention width and size.
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
            text_config = CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            text_encoder = CLIPTextModel(text_config)
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
            )
            # The verifier's CLIP ViT-L/14 (both towers, as Clip.load gives it); its text tower is SD's.
            clip = CLIPModel(CLIPConfig(
                text_config=text_config.to_dict(),
                vision_config=CLIPVisionConfig(
                    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                ).to_dict(),
                projection_dim=768,
            ))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        encoder = Clip(clip.to(weights), tokenizer, "random CLIP ViT-L/14")
    pipe = pipe.to(device, weights)
    return StableDiffusionModel.from_pipeline(pipe, name="sd-1.4-random" if not small else "tiny-random-sd"), encoder


def matmul_peak_tflops(bench: Bench) -> float:
    """Achieved TFLOP/s of one large matmul: bf16 8192^3 on a GPU, fp32 1024^3 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if bench.cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    return 2 * n**3 / bench.time(lambda: a @ b).seconds / 1e12


def attention_ops(model: StableDiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> list[str]:
    """Names of the attention operators and kernels one UNet forward runs (evidence that SDPA runs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        model.eps(x, t, cond)
    keys = ("scaled_dot_product", "flash", "fmha", "efficient_attention", "cudnn_attention", "softmax")
    return sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)})


# ------------------------------------------------------------------------------------------------ sections
def unet_section(model: StableDiffusionModel, bench: Bench, rows: dict) -> dict:
    """UNet forward and forward+backward (all weights trained, as full fine-tuning) at batch 1 and 4."""
    c, h, w = model.latent_shape
    cond_1 = model.encode(["a photo"])
    evidence = {}
    for batch in (1, 4):
        x = torch.randn(batch, c, h, w, device=model.device)
        t = torch.full((batch,), 500, device=model.device)
        cond = cond_1.expand(batch, -1, -1)

        def forward(x: torch.Tensor = x, t: torch.Tensor = t, cond: torch.Tensor = cond) -> None:
            with torch.no_grad():
                model.eps(x, t, cond)

        def forward_backward(x: torch.Tensor = x, t: torch.Tensor = t, cond: torch.Tensor = cond) -> None:
            model.eps(x, t, cond).float().square().mean().backward()
            model.unet.zero_grad(set_to_none=True)

        timing = bench.time(forward)
        timing.flops = bench.count_flops(forward)
        rows[f"UNet forward, batch {batch}"] = timing
        model.unet.requires_grad_(True)
        try:
            timing = bench.time(forward_backward)
            timing.flops = bench.count_flops(forward_backward)
            rows[f"UNet forward+backward, batch {batch}"] = timing
        finally:
            model.unet.requires_grad_(False)
        if batch == 1:
            evidence["attention_processors"] = sorted(attention_processors(model))
            evidence["attention_ops"] = attention_ops(model, x, t, cond)
    return evidence


def darkminer_section(model: StableDiffusionModel, encoder: object, bench: Bench, rows: dict, extra: int) -> dict:
    """One mining step, one circumventing step, one verification and 50-step CFG sampling of 4 images."""
    cfg = DarkMinerConfig()  # the default config: k=8, LoRA rank 4 outside cross-attention (non-cross-attn)
    c, h, w = model.latent_shape
    g = torch.Generator().manual_seed(0)
    prompts = [f"a photo of {CONCEPT}", CONCEPT, f"a painting of {CONCEPT}", f"{CONCEPT} in a room"]
    with torch.no_grad():
        conds = model.encode([prompts[i % len(prompts)] for i in range(cfg.k)])
        anchor = model.encode([""])
        size = model.latent_shape[-1] * (2 ** (len(model.vae.config.block_out_channels) - 1))
        pool = ImagePool(torch.rand(cfg.k, 3, size, size, generator=g),
                         torch.randn(cfg.k, c, h, w, generator=g).to(model.device, model.dtype), conds)
        preserve = ImagePool(pool.images, torch.randn(cfg.k, c, h, w, generator=g).to(model.device, model.dtype), conds)
    params = add_lora(model, cfg.lora, seed=0)
    start = initial_embedding(model, CONCEPT, cfg, g, None)

    def mining(steps: int) -> None:
        mine(model, pool, start, cfg.replace(mining_steps=steps), torch.Generator().manual_seed(1))

    def circumventing(steps: int) -> None:
        circumvent(model, params, conds[:2], anchor, pool, preserve, cfg.replace(circumvent_steps=steps),
                   torch.Generator().manual_seed(2))

    seeds = [0, 1, 2, 3]
    with torch.no_grad():
        mined = start.condition(model)

    def sampling() -> None:
        model.sample(conds[:4], seeds=seeds, steps=50)

    def verification() -> None:
        verify(model, encoder, mined, anchor, pool.images, seeds, 50, None)

    rows["Dark Miner mining step (k=8)"] = bench.per_step(mining, extra)
    rows["Dark Miner circumventing step (k=8 + 8 preserved)"] = bench.per_step(circumventing, extra)
    rows["50 DDIM steps with CFG, 4 images (decoded)"] = bench.time(sampling, warmup=1)
    rows["verification: 50 DDIM steps with CFG, 4 mined + 4 reference images, CLIP"] = bench.time(verification, warmup=1)
    # Synchronising CUDA calls per step of each loop (sampling: per DDIM step).
    return {"syncs_per_step": {
        "mining": _syncs_per_step(bench, mining, extra),
        "circumventing": _syncs_per_step(bench, circumventing, extra),
        "DDIM sampling": _syncs_per_step(bench, lambda n: model.sample(conds[:1], seeds=[0], steps=n), extra),
    }}


def _syncs_per_step(bench: Bench, run: Callable[[int], object], extra: int) -> float | None:
    short, long = bench.syncs(lambda: run(1)), bench.syncs(lambda: run(1 + extra))
    return None if short is None else (long - short) / extra


def attack_section(model: StableDiffusionModel, bench: Bench, rows: dict, extra: int) -> None:
    """One UnlearnDiffAtk iteration (the authors' k=5 tokens over the whole vocabulary), for one prompt and
    per prompt of four searched side by side (``search_batch`` 4: one UNet call at batch 4 per iteration).

    Each run also draws and judges three images per prompt (unattacked, target, after the round); they are
    drawn with one DDIM step here, so that their time, noise included, does not swamp the difference.
    """
    model.default_sampling = dataclasses.replace(model.default_sampling, steps=1)
    target = resolve_target(model, CONCEPT)

    def never(images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], dtype=torch.bool)

    def attack(iterations: int, n_prompts: int = 1) -> None:
        prompts = [AttackPrompt(f"a photo of {CONCEPT}", seed=seed) for seed in range(n_prompts)]
        config = UnlearnDiffConfig(rounds=1, iterations=iterations, search_batch=n_prompts)
        UnlearnDiffAtk(config).run(model, target, prompts, never)

    rows["UnlearnDiffAtk iteration (k=5)"] = bench.per_step(attack, extra)
    four = bench.per_step(lambda iterations: attack(iterations, n_prompts=4), extra)
    # The time per prompt; the peak memory is the batch's.
    rows["UnlearnDiffAtk iteration (k=5), 4 prompts side by side: time per prompt"] = Timing(four.seconds / 4, four.peak_mib)


def esd_section(model: StableDiffusionModel, bench: Bench, rows: dict, extra: int) -> dict:
    """One ESD-u iteration: partial 50-step DDIM to a random step, teacher, student forward+backward, Adam."""
    target = resolve_target(model, CONCEPT)
    work = Path(tempfile.mkdtemp(prefix="sd-speed-esd-"))

    def esd(iterations: int) -> None:
        config = EsdConfig(iterations=iterations, checkpoint_every=10**9)
        EsdU(config).erase(model, target, work)

    rows["ESD-u iteration (authors' defaults)"] = bench.per_step(esd, extra)
    # Iteration i stops its DDIM run at a step drawn from its own generator; the measured ones average:
    from darkminer.erasers.training import iteration_generator

    stops = [int(torch.randint(50, (1,), generator=iteration_generator(0, i))) for i in range(1, 1 + extra)]
    return {"esd_mean_ddim_steps_of_measured_iterations": sum(stops) / len(stops)}


def erase_estimate(rows: dict, steps_default: int) -> dict:
    """Minutes of a full Dark Miner erase at the default config, from the measured steps."""
    cfg = DarkMinerConfig()
    per_image_step = rows["50 DDIM steps with CFG, 4 images (decoded)"].seconds / (4 * 50)
    mining = rows["Dark Miner mining step (k=8)"].seconds
    circumventing = rows["Dark Miner circumventing step (k=8 + 8 preserved)"].seconds
    pools = (cfg.pool_size + cfg.preserve_pool_size) * (cfg.pool_steps or steps_default) * per_image_step
    one_round = (cfg.mining_steps * mining + 2 * cfg.k * cfg.verify_steps * per_image_step
                 + cfg.circumvent_steps * circumventing)
    return {"pools_s": round(pools, 1), "round_s": round(one_round, 1), "rounds": cfg.rounds,
            "total_min": round((pools + cfg.rounds * one_round) / 60, 2)}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny-random-sd sizes (a CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", choices=sorted(WEIGHT_DTYPES), default="fp32", help="dtype of the stored weights")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    parser.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="off",
                        help="torch.compile the UNet with this mode; only calls without gradients run compiled "
                             "(warm-up then includes compiling)")
    parser.add_argument("--sections", default="unet,darkminer,attack,esd", help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extra-steps", type=int, default=4, help="n in the (1+n) - 1 step difference")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bench = Bench(device, args.warmup, args.repeats)
    options = SpeedOptions(precision=args.precision, attention=args.attention,
                           gradient_checkpointing=args.gradient_checkpointing, channels_last=args.channels_last,
                           compile=args.compile)
    sections = args.sections.split(",")
    peak = matmul_peak_tflops(bench)
    rows: dict[str, Timing] = {}
    notes: dict = {}
    if options.compile != "off":  # SpeedOptions.compile: rows that take gradients run the UNet eager
        notes["compiled"] = "calls without gradients only: the forward rows, sampling, verification, teachers"
    # Each section gets a fresh model: Dark Miner adds a LoRA, ESD edits and remembers UNet weights.
    if "esd" in sections and args.weights != "fp32":
        sections.remove("esd")
        notes["esd"] = f"skipped: ESD trains the stored weights and refuses {args.weights} ones"
    for name in ("unet", "darkminer", "attack", "esd"):
        if name not in sections:
            continue
        model, encoder = build_model(args.small, device, WEIGHT_DTYPES[args.weights])
        apply_speed_options(model, options)
        started = time.time()
        if name == "unet":
            notes.update(unet_section(model, bench, rows))
        elif name == "darkminer":
            notes.update(darkminer_section(model, encoder, bench, rows, args.extra_steps))
        elif name == "attack":
            attack_section(model, bench, rows, args.extra_steps)
        else:
            notes.update(esd_section(model, bench, rows, args.extra_steps))
        print(f"[{name}] {time.time() - started:.0f} s", flush=True)
        del model, encoder
        gc.collect()  # the autocast wrapper's closure holds the UNet in a cycle: free it before the next peak
        if bench.cuda:
            torch.cuda.empty_cache()

    steps_default = StableDiffusionModel.default_sampling.steps
    estimate = erase_estimate(rows, steps_default) if {"darkminer"} <= set(sections) else None
    result = {
        "device": torch.cuda.get_device_name(device) if bench.cuda else f"CPU ({platform.processor() or 'unknown'}, "
                                                                       f"{args.threads} thread(s))",
        "size": "small (tiny-random-sd)" if args.small else "SD-1.4 (random weights)",
        "versions": {"torch": torch.__version__, **_versions()},
        "weights": args.weights, "options": options.to_dict(),
        "matmul_peak_tflops": round(peak, 2),
        "rows": [timing.row(name, peak) for name, timing in rows.items()],
        "notes": notes, "darkminer_erase_estimate": estimate,
    }
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def markdown(result: dict) -> str:
    def show(value: object, percent: bool = False) -> str:
        if value is None:
            return "-"
        return f"{value:.1%}" if percent else f"{value:g}"

    lines = [f"{result['device']}, {result['size']}, weights {result['weights']}, options {result['options']}, "
             f"matmul peak {result['matmul_peak_tflops']} TFLOP/s",
             "", "| what | ms | peak MiB | GFLOP | TFLOP/s | share of peak |", "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['what']} | {show(row['ms'])} | {show(row['peak_mib'])} | {show(row['gflop'])} | "
                     f"{show(row['tflops_per_s'])} | {show(row['share_of_peak'], percent=True)} |")
    lines += ["", f"notes: {json.dumps(result['notes'])}", f"Dark Miner erase estimate: {result['darkminer_erase_estimate']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
