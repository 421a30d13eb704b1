"""The fast sampler timed against the full one and diffusers' pipeline, in one process.

    python benchmarks/bench_fast.py --threads 2 --repeats 20 --out docs/eval/bench_cpu_fast.json
    python benchmarks/bench_fast.py --model runs/journey-mini-fast --res 256 512 --cuda-graphs --out gpu.json

One fresh process, the same weights, seeds and 256 px radiograph (the simulator's, as in
``bench_engine.py``) for every side:

1. **Cold**: ``engine.load`` and then the first edit of a new image on the default path (the fast
   sampler when the model has one), timed as a user meets it after start-up (load timed apart).
2. **Warm**: a warm-up call of each side, then ``--repeats`` rounds that alternate the sides
   (median and p95 over the rounds):

   * ``fast`` -- :meth:`Engine.counterfactual` with default options (the student, its card's steps,
     one UNet call per step), prior cache off: the image is encoded, and a ``change`` model's prior
     decoded, on every call, as diffusers does;
   * ``fast, re-edit`` -- the same with the prior cache on: another instruction, seed or severity
     on the image already loaded (the workstation's live preview);
   * ``full`` -- ``sampler="full"``, 20 steps, three guidance branches per step, prior cache off;
   * ``diffusers`` -- ``StableDiffusionInstructPix2PixPipeline`` at 20 steps on the same modules
     (``bench_engine.instruct_pipeline``);
   * ``fast, 6-rung journey`` -- the severity ladder's six requests as one batch on the fast path.

3. **Batch CLI** (``--batch-rows N``): ``python -m engine batch`` on ``N`` rows in a subprocess;
   its summary's images/s (model load excluded) and the wall time including start-up.

Writes ``--out`` (JSON: environment, rows, cold edit, batch CLI) and prints the table
(``benchmarks/performance.py`` puts it into docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_engine import (  # noqa: E402
    IMAGE_GUIDANCE, JOURNEY, TEXT_GUIDANCE, Side, diffusers_instruct, environment, instruct_pipeline, measure,
    sample_radiograph, with_resolution,
)
from engine.errors import InputError, ModelFolderError  # noqa: E402

INSTRUCTION = JOURNEY[2]  # "new large left pleural effusion"
LADDER = [("left pleural effusion has resolved", "none"), ("interval decrease in left pleural effusion", "none"),
          ("new left pleural effusion", "slight"), ("new left pleural effusion", "moderate"),
          ("new left pleural effusion", "large"), ("new left pleural effusion; heart size unchanged", "large")]


def _requests(count: int, sampler: str, seed: int = 0) -> list:
    from engine.engine import EditRequest

    return [EditRequest(INSTRUCTION, seed=seed + i, sampler=sampler, text_guidance=TEXT_GUIDANCE,
                        image_guidance=IMAGE_GUIDANCE, steps=None if sampler != "full" else 20) for i in range(count)]


def _ladder(sampler: str) -> list:
    from engine.engine import EditRequest

    return [EditRequest(text, severity=sev, seed=0, sampler=sampler) for text, sev in LADDER]


def cold_edit(model: str, device: str, dtype: str, canvas: Any, cuda_graphs: bool) -> tuple[Any, dict[str, Any]]:
    """Loads the engine and times its first edit of an image it has not seen (the default path)."""
    import engine as engine_api

    t0 = time.perf_counter()
    eng = engine_api.load(model, device=device, dtype=dtype, cuda_graphs=cuda_graphs)
    load_s = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    cf = eng.counterfactual(canvas, INSTRUCTION, seed=0)
    first, first_cpu = time.perf_counter() - t1, time.process_time() - c1
    return eng, {"load_s": round(load_s, 3), "first_edit_s": round(first, 4), "first_edit_cpu_s": round(first_cpu, 4),
                 "sampler": cf.request.sampler,
                 "steps": cf.request.steps, "timings": {k: round(v, 4) for k, v in cf.timings.items()}}


def _row(name: str, sampler: str, steps: int, calls: int, batch: int, record: dict[str, Any], res: int,
         eng: Any) -> dict[str, Any]:
    return {"side": name, "sampler": sampler, "steps": steps, "unet_calls_per_edit": calls, "batch": batch,
            "res": res, "median_s": round(record["median_s"], 4), "p95_s": round(record["p95_s"], 4),
            "min_s": record["min_s"], "times_s": record["times_s"], "images_per_s": round(batch / record["median_s"], 3),
            "stages": {k.removesuffix("_median_s"): v for k, v in record.items() if k.endswith("_median_s")
                       and k != "median_s"}, "device": eng.device.type, "dtype": str(eng.dtype).removeprefix("torch.")}


def run_resolution(eng: Any, res: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The warm rows at one resolution."""
    canvas = sample_radiograph(res)
    fast = eng.fast

    def with_prior_cache(on: bool):
        def apply() -> None:
            eng.prior_cache_size = 8 if on else 0
            if not on:
                eng.clear_prior_cache()
        return apply

    def timed(requests_fn, cache: bool):
        def call(_steps: int) -> dict[str, float]:
            with_prior_cache(cache)()
            out = eng.counterfactuals(canvas, requests_fn())
            return {k: out[0].timings[k] for k in ("text", "encode", "denoise", "decode")}
        return call

    sides: list[tuple[Side, str, int, int, int]] = []
    if fast is not None:
        sides.append((Side("fast", timed(lambda: _requests(1, "fast"), False)), "fast", fast.steps, fast.steps, 1))
        sides.append((Side("fast, re-edit", timed(lambda: _requests(1, "fast"), True)), "fast", fast.steps,
                      fast.steps, 1))
    sides.append((Side("full", timed(lambda: _requests(1, "full"), False)), "full", 20, 60, 1))
    pipe = instruct_pipeline(eng) if args.compare == "diffusers" else None
    if pipe is not None:
        def theirs(_steps: int) -> None:
            diffusers_instruct(pipe, eng, canvas, [r.validated() for r in _requests(1, "full")])
        sides.append((Side("diffusers", theirs), "diffusers pipeline", 20, 60, 1))
    if fast is not None:
        sides.append((Side("fast, 6-rung journey", timed(lambda: _ladder("fast"), False)), "fast", fast.steps,
                      fast.steps, 6))
    cpu: dict[str, list[float]] = {}

    def with_cpu_time(side: Side) -> Side:
        """The side, also recording the process's CPU seconds per call: on a CPU with one thread
        that is the call's compute time, unaffected by other processes sharing the core or
        pausing this one (the wall time is not)."""
        def call(steps: int) -> Any:
            t0 = time.process_time()
            out = side.call(steps)
            cpu.setdefault(side.name, []).append(time.process_time() - t0)
            return out
        return Side(side.name, call)

    records = measure([with_cpu_time(s) for s, *_ in sides], eng.device, steps=20, warmup=1, warmup_steps=20,
                      repeats=args.repeats, memory=False)
    rows = [_row(side.name, sampler, steps, calls, batch, record, res, eng)
            for (side, sampler, steps, calls, batch), record in zip(sides, records)]
    for row in rows:  # the first entry is the warm-up call
        timed_cpu = cpu.get(row["side"], [])[1:]
        row["cpu_median_s"] = round(statistics.median(timed_cpu), 4) if timed_cpu else None
    by = {r["side"]: r for r in rows}
    for r in rows:
        if "diffusers" in by and r["side"] != "diffusers":
            r["x_faster_than_diffusers"] = round(by["diffusers"]["median_s"] / r["median_s"] * r["batch"], 2)
            if r.get("cpu_median_s") and by["diffusers"].get("cpu_median_s"):
                r["x_faster_than_diffusers_cpu"] = round(by["diffusers"]["cpu_median_s"] / r["cpu_median_s"]
                                                         * r["batch"], 2)
        if "fast" in by and r["side"] == "fast, 6-rung journey":
            r["x_one_fast_edit"] = round(r["median_s"] / by["fast"]["median_s"], 2)
    return rows


def batch_cli(model: str, rows: int, threads: int | None, device: str) -> dict[str, Any]:
    """``python -m engine batch`` on ``rows`` rows of the sample radiograph in a subprocess."""
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        film = Path(tmp) / "film.png"
        Image.fromarray((sample_radiograph(256) * 255).astype(np.uint8)).save(film)
        jobs = Path(tmp) / "jobs.csv"
        with jobs.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["film", "instruction", "severity", "seed"])
            for i in range(rows):
                text, sev = LADDER[i % len(LADDER)]
                writer.writerow([film.name, text, sev, i])
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "engine", "batch", str(jobs), "--out", str(Path(tmp) / "out"),
                               "--model", model, "--device", device, "--quiet"], capture_output=True, text=True,
                              env=env, cwd=Path(__file__).resolve().parent.parent)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"rows": rows, "error": proc.stderr.strip()[-500:]}
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        cpu = summary.get("generate_cpu_seconds")
        return {"rows": rows, "done": summary["done"], "images_per_s": summary["images_per_s"],
                "images_per_cpu_s": round(summary["done"] / cpu, 3) if cpu else None,
                "load_s": summary["load_seconds"], "wall_s_with_start_up": round(wall, 2),
                "wall_images_per_s": round(summary["done"] / wall, 3)}


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    from engine.engine import default_model, resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise InputError("--repeats must be at least 1")
    model = str(args.model or default_model())
    device = resolve_device(args.device)
    env = environment(device, resolve_dtype(args.dtype, device), argv)
    env["command"] = " ".join(["python benchmarks/bench_fast.py", *argv])
    result: dict[str, Any] = {"kind": "fast", "environment": env, "model": model, "rows": []}
    eng, result["cold"] = cold_edit(model, args.device, args.dtype, sample_radiograph(256), args.cuda_graphs)
    result["model_hash"] = eng.model_hash
    result["fast_sampler"] = None if eng.fast is None else {"steps": eng.fast.steps, "made_by": eng.fast.made_by}
    with tempfile.TemporaryDirectory(prefix="bench-fast-") as tmp:
        for res in args.res or [eng.resolution]:
            if res != eng.resolution:
                import engine as engine_api

                folder = with_resolution(Path(eng.parts.root), res, Path(tmp) / f"res{res}")
                current = engine_api.load(folder, device=args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs)
            else:
                current = eng
            print(f"bench_fast: {res} px ...", file=sys.stderr, flush=True)
            result["rows"] += run_resolution(current, res, args)
    warm = next((r for r in result["rows"] if r["side"] == "fast" and r["res"] == eng.resolution), None)
    if warm is not None:
        result["cold"]["x_warm"] = round(result["cold"]["first_edit_s"] / warm["median_s"], 2)
        if warm.get("cpu_median_s"):
            result["cold"]["x_warm_cpu"] = round(result["cold"]["first_edit_cpu_s"] / warm["cpu_median_s"], 2)
    if args.batch_rows:
        print(f"bench_fast: python -m engine batch, {args.batch_rows} rows ...", file=sys.stderr, flush=True)
        result["batch_cli"] = batch_cli(model, args.batch_rows, args.threads, args.device)
    env["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return result


def format_table(result: dict[str, Any]) -> str:
    """The rows as Markdown, with the cold edit and the batch CLI below."""
    def f(v: float | None, digits: int = 3) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    lines = ["| path | res | steps | UNet calls per edit | batch | median (s) | p95 (s) | CPU s per call (median) | "
             "images/s | x faster than diffusers (wall / CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        x, xc = r.get("x_faster_than_diffusers"), r.get("x_faster_than_diffusers_cpu")
        lines.append(f"| {r['side']} | {r['res']} | {r['steps']} | {r['unet_calls_per_edit']} | {r['batch']} | "
                     f"{r['median_s']:.3f} | {r['p95_s']:.3f} | {f(r.get('cpu_median_s'))} | {r['images_per_s']:.2f} | "
                     f"{f(x, 2)} / {f(xc, 2)} |")
    cold = result["cold"]
    lines += ["", f"Cold: model load {cold['load_s']:.2f} s, then the first edit ({cold['sampler']}, {cold['steps']} steps) "
                  f"{cold['first_edit_s']:.3f} s" + (f" = {cold['x_warm']:.2f}x the warm median" if "x_warm" in cold else "")
              + (f" (CPU {cold['first_edit_cpu_s']:.3f} s = {cold['x_warm_cpu']:.2f}x)" if "x_warm_cpu" in cold else "")
              + "."]
    journey = next((r for r in result["rows"] if "x_one_fast_edit" in r), None)
    if journey:
        lines[-1] += f" The 6-rung journey on the fast path takes {journey['x_one_fast_edit']:.2f}x one fast edit."
    batch = result.get("batch_cli")
    if batch and "error" not in batch:
        per_cpu = batch.get("images_per_cpu_s")
        lines.append(f"`python -m engine batch`, {batch['rows']} rows: {batch['images_per_s']:.2f} images/s once loaded"
                     + (f" ({per_cpu:.2f} per CPU second)" if per_cpu else "")
                     + f"; {batch['wall_images_per_s']:.2f} images/s over {batch['wall_s_with_start_up']:.1f} s including "
                     f"start-up and a {batch['load_s']:.1f} s model load.")
    env = result["environment"]
    where = (f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"commit {env['git_commit']}, load average {env['load_average_1min_start']} at start; model "
             f"`{result['model']}` ({result['model_hash'][:12]}); `{env['command']}`")
    if env.get("note"):
        where += f"; {env['note']}"
    return "\n".join(lines) + f"\n\n{where}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled journey-mini)")
    parser.add_argument("--res", type=int, nargs="+", default=None, help="resolutions (default: the model's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--compare", default="diffusers", choices=["none", "diffusers"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--batch-rows", type=int, default=0, help="also time python -m engine batch on N rows")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", default=None, metavar="JSON", help="print an earlier result's table and exit")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if args.table:
            print(format_table(json.loads(Path(args.table).read_text())))
            return 0
        result = run(args, argv)
    except (InputError, ModelFolderError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
