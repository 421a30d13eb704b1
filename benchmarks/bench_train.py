"""Training throughput and peak memory per stage, with the trainer's own loss functions.

    python benchmarks/bench_train.py --arch sd15 --resolution 256 --batch 32 --device auto --json out.json
    python benchmarks/bench_train.py --arch mini --device cpu --batch 4 --steps 3

Random weights; latents and text states are random tensors of the right shapes, i.e. the
cached-latents path of ``python -m train fit`` (the VAE and text encoder do not run). Stages:
``instruct`` (stage 1/2: UNet with 8 input channels, prior latent concatenated), ``text2image``
(PRISM: 4 channels), ``vae`` (stage 0: encode + decode + L1/KL). Each step is AdamW with bf16
autocast on CUDA (fp32 on the CPU), gradient clipping and EMA, as in the loop. ../shared/GPU.md
records an eager baseline of 233 images/s (SD 1.5 UNet, 256 px, batch 32, H100).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import TrainConfig  # noqa: E402
from train.fit import EMA, Trainee, diffusion_loss, make_optimizer, trainable, vae_loss  # noqa: E402
from train.models import LATENT_CHANNELS, UNET_ARCHS, fresh_unet, fresh_vae, noise_scheduler_config  # noqa: E402

TEXT_TOKENS = {"sd15": 77, "mini": 128, "small": 77, "tiny": 32}  # small: journey-mini (MiniLM, 77)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def bench_stage(stage: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Times ``args.steps`` optimizer steps of one stage after ``args.warmup`` untimed ones."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batch, size = args.batch, args.resolution
    if stage == "vae":
        vae = fresh_vae(args.arch, resolution=size).to(device).train()
        models = SimpleNamespace(stage="vae", vae=vae, unet=None, projection=None)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
    else:
        factor = 8 if args.arch != "tiny" else 2
        unet = fresh_unet(args.arch, in_channels=LATENT_CHANNELS * (2 if stage == "instruct" else 1), resolution=size,
                          latent_factor=factor).to(device).train()
        models = SimpleNamespace(stage=stage, vae=None, unet=unet, projection=None)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
    trainee = Trainee(models, train_projection=False)
    params = trainable(trainee)
    n_params = sum(p.numel() for p in params.values())
    cfg = TrainConfig()  # the trainer's defaults: lr, betas, weight decay, EMA decay
    optimizer = make_optimizer(params, cfg, device)  # the trainer's own (fused AdamW on CUDA)
    ema = EMA(params, cfg.ema_decay)
    scheduler = DDPMScheduler.from_config(noise_scheduler_config())
    h = size // factor
    cross = UNET_ARCHS[args.arch]["cross_attention_dim"]
    states = torch.randn(batch, TEXT_TOKENS[args.arch], cross, device=device)
    mask = torch.ones(batch, TEXT_TOKENS[args.arch], dtype=torch.bool)
    latents = torch.randn(batch, LATENT_CHANNELS, h, h, device=device)
    prior = torch.randn_like(latents) if stage == "instruct" else None
    images = torch.rand(batch, 1, size, size, device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if stage == "vae":
                loss = vae_loss(trainee, models.vae, images, (-1.0, 1.0), 1e-6, gen)
            else:
                loss = diffusion_loss(trainee, scheduler, latents, prior, states, mask, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(params)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()  # float() synchronises
    seconds = (time.perf_counter() - start) / args.steps
    return {"stage": stage, "arch": args.arch, "params_m": round(n_params / 1e6, 1), "resolution": size,
            "batch": batch, "ms_per_step": round(seconds * 1000, 1), "images_per_s": round(batch / seconds, 1),
            "peak_memory_mb": round(_peak_mb(device)), "loss": round(loss, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(UNET_ARCHS), default="sd15")
    parser.add_argument("--stages", nargs="+", choices=("instruct", "text2image", "vae"), default=["instruct", "text2image", "vae"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else names[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "gradient_checkpointing": args.gradient_checkpointing, "channels_last": args.channels_last}
    rows = []
    for stage in args.stages:
        row = {**bench_stage(stage, args, device, dtype), **env}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
