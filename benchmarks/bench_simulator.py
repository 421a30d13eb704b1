"""Throughput of the chest radiograph simulator.

Two measurements:

* ``writer``: the full dataset writer (``python -m train simulate``): journeys, images, exact
  counterfactuals, masks, reports, parameters and manifests written to disk, with
  ``--workers`` processes. The target of issue #4 is 10,000 images of 256 x 256 in at most
  5 minutes on a 2-core machine with 2 workers (>= 34 images/s).
* ``render``: in-memory :func:`train.simulator.render` only (one process, no files), per image.

Usage::

    python benchmarks/bench_simulator.py --patients 400 --visits 5 --workers 2 --out bench.json

Prints a table and, with ``--out``, writes the numbers as JSON. CPU time is reported next to
wall time because a shared machine's load changes the wall time but not the work done. The
dataset goes to a temporary folder under the repository's git-ignored ``out/`` (file creation
cost depends on the filesystem: on the development VM, creating a file in /tmp took ~1 ms,
under the repository ~0.2 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.simulator import render_counterfactual, render_visit, sample_journey, sample_patient  # noqa: E402
from train.simulator.writer import SimulationConfig, write_dataset  # noqa: E402

TARGET_IMAGES = 10_000
TARGET_SECONDS = 300.0


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_writer(patients: int, visits: int, size: int, workers: int, seed: int, keep: Path | None) -> dict:
    """Times the dataset writer end to end."""
    scratch = Path(__file__).resolve().parents[1] / "out"  # git-ignored; on the project's disk
    scratch.mkdir(exist_ok=True)
    out = keep or Path(tempfile.mkdtemp(prefix="bench_sim_", dir=scratch))
    try:
        load_before = os.getloadavg()[0]
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        summary = write_dataset(SimulationConfig(out=str(out), patients=patients, visits=visits, size=size,
                                                 seed=seed, workers=workers))
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        load_after = os.getloadavg()[0]
        files = sum(1 for _ in out.rglob("*") if _.is_file())
        megabytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    finally:
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)
    images_per_s = summary.images / wall
    return {
        "patients": patients, "visits": visits, "size": size, "workers": workers,
        "images": summary.images, "pairs": summary.pairs, "renders": summary.renders,
        "files": files, "megabytes": round(megabytes, 1),
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "images_per_s": round(images_per_s, 2),
        "renders_per_s": round(summary.renders / wall, 2),
        "cpu_ms_per_image": round(1000 * cpu / summary.images, 1),
        "cpu_ms_per_render": round(1000 * cpu / summary.renders, 1),
        "projected_s_for_10k_images": round(TARGET_IMAGES / images_per_s, 1),
        "meets_target": bool(TARGET_IMAGES / images_per_s <= TARGET_SECONDS),
        "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2),
    }


def bench_render(patients: int, visits: int, size: int, seed: int) -> dict:
    """Times in-memory rendering (images + counterfactuals, patient-level fields included)."""
    rng = np.random.default_rng(seed)
    journeys = []
    for _ in range(patients):
        patient = sample_patient(rng)
        journeys.append((patient, sample_journey(patient, visits, rng)))
    renders = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for patient, visits_ in journeys:
        for k, visit in enumerate(visits_):
            render_visit(patient, visit, size)
            renders += 1
            if k:
                render_counterfactual(patient, visits_[k - 1], visit, size)
                renders += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"patients": patients, "visits": visits, "size": size, "renders": renders,
            "wall_ms_per_render": round(1000 * wall / renders, 1),
            "cpu_ms_per_render": round(1000 * cpu / renders, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=200, help="patients for the writer run")
    parser.add_argument("--visits", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-patients", type=int, default=20, help="patients for the in-memory run (0: skip)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the dataset here and keep it (default: a temporary folder under out/)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
    }
    if args.render_patients > 0:
        result["render"] = bench_render(args.render_patients, args.visits, args.size, args.seed)
    result["writer"] = bench_writer(args.patients, args.visits, args.size, args.workers, args.seed, args.keep)

    w = result["writer"]
    rows = [("measurement", "value")]
    if "render" in result:
        r = result["render"]
        rows += [(f"render() {r['size']}px, in memory, 1 process", f"{r['wall_ms_per_render']} ms/image wall, "
                                                                  f"{r['cpu_ms_per_render']} ms CPU")]
    rows += [
        (f"writer {w['patients']} patients x {w['visits']} visits, {w['workers']} workers",
         f"{w['images']} images + {w['pairs']} counterfactuals in {w['wall_s']} s"),
        ("dataset images per second", f"{w['images_per_s']}"),
        ("rendered images per second (incl. counterfactuals)", f"{w['renders_per_s']}"),
        ("CPU per dataset image (all processes)", f"{w['cpu_ms_per_image']} ms"),
        ("projected time for 10,000 images", f"{w['projected_s_for_10k_images']} s "
                                             f"({'meets' if w['meets_target'] else 'misses'} the 300 s target)"),
        ("load average before / after", f"{w['load_average_before']} / {w['load_average_after']} "
                                        f"on {result['machine']['cpus']} CPUs"),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
