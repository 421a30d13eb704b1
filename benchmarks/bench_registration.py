"""Registration speed and quality on the 148 real Hannover journeys (consecutive same-patient pairs).

    python benchmarks/bench_registration.py --sizes 256 512 --workers 1 --json out.json

Prints, per canvas size: ms per pair for the registration alone (median and mean, one process),
wall time per pair including reading the PNGs with ``--workers`` processes, and the NCC score
before and after registration (the filter's score).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.registration import RegistrationParams  # noqa: E402
from train.journeys import make_pairs  # noqa: E402
from train.registration import register_many  # noqa: E402
from train.sources import load_hannover  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hannover-covid19"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Hannover folder (data.csv + png/)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--transform", default="affine", choices=("rigid", "similarity", "affine"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=RegistrationParams.iterations)
    parser.add_argument("--sampling", type=float, default=RegistrationParams.sampling)
    parser.add_argument("--limit", type=int, default=None, help="first N pairs only")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    pairs = make_pairs(load_hannover(args.data), views=("PA", "AP"), require_finding="none")[: args.limit]
    files = [(p.prior_path, p.followup_path) for p in pairs]
    rows = []
    for size in args.sizes:
        params = RegistrationParams(transform=args.transform, size=size, iterations=args.iterations,
                                    sampling=args.sampling)
        start = time.perf_counter()
        results = register_many(files, params, workers=args.workers)
        wall = time.perf_counter() - start
        ms = [r.seconds * 1000 for r in results]
        row = {
            "size": size, "transform": args.transform, "iterations": args.iterations, "sampling": args.sampling, "pairs": len(results), "workers": args.workers,
            "register_ms_median": round(statistics.median(ms), 1), "register_ms_mean": round(statistics.mean(ms), 1),
            "wall_ms_per_pair": round(1000 * wall / len(results), 1),
            "ncc_before_mean": round(statistics.mean(r.score_before for r in results), 4),
            "ncc_after_mean": round(statistics.mean(r.score for r in results), 4),
            "ncc_after_min": round(min(r.score for r in results), 4),
            "improved": sum(r.score > r.score_before for r in results),
        }
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
