"""What a film's first edit costs beyond the model: confining to the anatomy, removing devices.

A first edit of a film in the app is a confined one (``confine="anatomy"``: the film is
segmented, with its mirror) and "without support devices" detects and inpaints the devices
(:mod:`engine.devices`); both are cached by prior, so a re-edit costs what an unconfined edit
does. For each film this times, single runs with the prior cache cleared before each first
edit, on the bundled model's default (fast) sampler::

    python benchmarks/bench_first_edit.py --film ../shared/data/hannover-covid19/png/2168a917.png \\
        --film RG1_UNCR.dcm --out docs/eval/bench_first_edit.json

Prints a table (seconds) and writes JSON. ``RG1_UNCR.dcm`` is read from pydicom's test data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = (
    ("unconfined effusion", "new large left pleural effusion", {"confine": "none"}),
    ("confined effusion (the app's)", "new large left pleural effusion", {"confine": "anatomy"}),
    ("without support devices, model", "without support devices", {"devices": "model"}),
    ("without support devices, detect (the app's)", "without support devices", {"devices": "detect"}),
)


def _film(name: str):
    from engine.io import read_xray

    path = Path(name)
    if not path.is_file():
        from pydicom.data import get_testdata_file

        path = Path(get_testdata_file(name))
    return path.name, read_xray(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--film", action="append", required=True, help="a film (PNG, DICOM; repeatable)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--out", required=True, help="JSON report")
    args = p.parse_args(argv)

    import torch

    import engine

    eng = engine.load(args.model, device="cpu")
    eng.warm_up()
    first_film = _film(args.film[0])[1]
    for _, instruction, options in CASES:  # loads the segmenter and the detector: load time is not timed
        eng.counterfactual(first_film, instruction, seed=0, **options)
    rows = []
    for name in args.film:
        film_name, xray = _film(name)
        for label, instruction, options in CASES:
            eng.clear_prior_cache()
            t0 = time.perf_counter()
            eng.counterfactual(xray, instruction, seed=0, **options)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            eng.counterfactual(xray, instruction, seed=1, **options)
            again = time.perf_counter() - t0
            rows.append({"film": film_name, "case": label, "first_s": round(first, 3), "re_edit_s": round(again, 3)})
    print(f"{torch.get_num_threads()} threads; seconds, fast sampler")
    print("| film | case | first edit | re-edit |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['film']} | {r['case']} | {r['first_s']:.2f} | {r['re_edit_s']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(),
                                          "model": eng.card.name, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
