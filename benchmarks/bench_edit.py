"""Speed of one counterfactual: ``Engine.counterfactual`` at the model's resolution.

    python benchmarks/bench_edit.py                                  # bundled journey-mini, CPU, 2 threads
    python benchmarks/bench_edit.py --device cuda --repeats 20       # GPU figure
    python benchmarks/bench_edit.py --model runs/x-model --threads 2 --steps 20 --out bench_edit.json

The prior is one simulated radiograph (train.simulator, fixed seed), so no data file is needed.
Reports the median and every repeat's wall time (model loading and one warm-up call excluded).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled journey-mini)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--instruction", default="new large left pleural effusion")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()

    import numpy as np
    import torch

    import engine
    from train.simulator import Findings, Nuisance, render, sample_patient

    torch.set_num_threads(args.threads)
    eng = engine.load(args.model, device=args.device, dtype=args.dtype)
    prior = render(sample_patient(np.random.default_rng(0)), Findings(), Nuisance(), size=eng.resolution, noise_seed=0).image
    eng.counterfactual(prior, args.instruction, steps=args.steps, seed=0)  # warm-up
    times = []
    for i in range(args.repeats):
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.counterfactual(prior, args.instruction, steps=args.steps, seed=i)
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "model": str(eng.model_id), "resolution": eng.resolution, "steps": args.steps, "device": str(eng.device),
        "dtype": str(eng.dtype) if hasattr(eng, "dtype") else args.dtype, "threads": torch.get_num_threads(),
        "median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times],
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "load_average_1min": load,
        "gpu": torch.cuda.get_device_name() if eng.device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
