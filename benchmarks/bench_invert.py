"""Seconds per inversion edit (method ``invert``) for each inversion choice, and a cached re-edit.

    python benchmarks/bench_invert.py                                   # bundled journey-mini, CPU, 2 threads
    python benchmarks/bench_invert.py --steps 50 --out bench_invert.json
    python benchmarks/bench_invert.py --model runwayml/stable-diffusion-v1-5 --unet PRISM_UNET --device cuda
    python benchmarks/bench_invert.py --arch sd15 --res 512 --device cuda   # random SD 1.5-sized weights

The input is one simulated radiograph with support devices (train.simulator, fixed seed). Each
row is a cold edit (the inversion cache cleared first) timed end to end, split into inversion
and editing; the last row re-edits the same image with another target caption, so the cached
null-text inversion is reused. Model loading and one warm-up call are excluded.

``--arch`` times a randomly initialised model of that size (``bench_engine.py``'s builder), so the
issue's SD 1.5-sized targets can be measured without downloading weights. With random weights
null-text inversion's early stopping (loss under a threshold) may stop at another inner
iteration than with trained ones, so its row bounds the method's cost rather than predicting it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INVERSIONS = ("ddim", "null-text", "negative-prompt", "direct")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="model folder or hub id (default: the bundled journey-mini)")
    which.add_argument("--arch", default=None, help="time a random model of this architecture (e.g. sd15) instead")
    parser.add_argument("--res", type=int, default=512, help="--arch models' resolution (default 512)")
    parser.add_argument("--unet", default=None, help="optional UNet override (.safetensors, folder or hub id)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (PRISM: 50)")
    parser.add_argument("--repeats", type=int, default=1, help="cold edits per inversion choice")
    parser.add_argument("--source-prompt", default="chest x-ray with support devices")
    parser.add_argument("--target-prompt", default="chest x-ray without support devices")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()

    import torch

    import engine
    from benchmarks.bench_engine import sample_radiograph
    from train.simulator.params import Device

    torch.set_num_threads(args.threads)
    model = args.model
    if args.arch:
        import tempfile

        from benchmarks.bench_engine import build_random_model

        workdir = tempfile.TemporaryDirectory(prefix="bench-invert-")
        print(f"bench_invert: building a random {args.arch} text2image model at {args.res} px ...", flush=True)
        model = build_random_model(Path(workdir.name) / f"{args.arch}-text2image-{args.res}", args.arch,
                                   method="text2image", resolution=args.res)
    eng = engine.load(model, device=args.device, dtype=args.dtype, unet=args.unet)
    devices = (Device("ett", seed=1), Device("cvc", side="right", seed=2), Device("ng_tube", seed=3))
    image = sample_radiograph(eng.resolution, devices)

    def edit(inversion: str, target: str) -> dict[str, float]:
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = eng.invert_edit(image, args.source_prompt, target, inversion=inversion, steps=args.steps)
        seconds = time.perf_counter() - t0
        return {"total": seconds, "invert": result.timings["invert"], "edit": result.timings["edit"],
                "cache_hit": result.cache_hit}

    edit("direct", args.target_prompt)  # warm-up (allocations, kernels)
    rows = []
    for inversion in INVERSIONS:
        runs = []
        for _ in range(args.repeats):
            eng.clear_inversion_cache()
            runs.append(edit(inversion, args.target_prompt))
        rows.append({"inversion": inversion, "cached": False,
                     "seconds_per_edit": round(statistics.median(r["total"] for r in runs), 3),
                     "invert_s": round(statistics.median(r["invert"] for r in runs), 3),
                     "edit_s": round(statistics.median(r["edit"] for r in runs), 3)})
        if inversion == "null-text":  # the same image again, another target: the inversion is cached
            again = edit("null-text", args.target_prompt + " now")
            rows.append({"inversion": "null-text (cached re-edit)", "cached": bool(again["cache_hit"]),
                         "seconds_per_edit": round(again["total"], 3), "invert_s": round(again["invert"], 3),
                         "edit_s": round(again["edit"], 3)})

    print(f"{'inversion':<28} {'s/edit':>9} {'invert s':>9} {'edit s':>9}")
    for r in rows:
        print(f"{r['inversion']:<28} {r['seconds_per_edit']:>9.2f} {r['invert_s']:>9.2f} {r['edit_s']:>9.2f}")
    result = {
        "model": str(eng.model_id), "arch": args.arch, "model_hash": eng.model_hash, "resolution": eng.resolution, "steps": args.steps,
        "device": str(eng.device), "dtype": str(eng.dtype), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "rows": rows,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if eng.device.type == "cuda" else None,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
