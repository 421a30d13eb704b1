"""Lung Dice of anatomy segmenters on held-out real films against V7 Labs' hand-drawn masks.

Every film of the chosen patient split that has a V7 mask fitting it (masks drawn on another crop
of the film are skipped: :func:`train.sources.v7masks.on_blank_border`) is segmented as the
workstation does (:func:`engine.regions.structure_mask`: letterboxed, segmented, mapped back) and
each lung's Dice is computed on the film's own grid, where V7's masks were drawn. Prints a table
(one row per segmenter, means and the worst film) and writes JSON::

    python benchmarks/segmenter_real_dice.py --films ../shared/data/hannover-covid19 \\
        --segmenter assets/models/cxr-segmenter-mini --out docs/eval/segmenter_real_dice.json

Target (issue 26): lung Dice at least 0.93 on the held-out (test) patients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def held_out_films(films: str, split: str) -> list[tuple[str, str | None, np.ndarray, np.ndarray, np.ndarray]]:
    """``(film_id, view, pixels, right lung, left lung)`` of the split's films with a fitting V7 mask."""
    from engine.io import read_xray
    from train.manifest import REAL_FILM_FRACTIONS, split_for
    from train.simulator.filmpairs import MaskSource, discover_films
    from train.simulator.onfilms import split_lungs

    source = MaskSource("v7", segmenter="none")
    out = []
    for film in discover_films(films):
        if split_for(film.patient_id, REAL_FILM_FRACTIONS) != split:
            continue
        pixels = read_xray(film.path).pixels
        lungs, _ = source.lungs(film, pixels)
        if lungs is None:
            continue
        image_left, image_right = split_lungs(lungs)  # the patient's right lung is on the image's left
        out.append((film.film_id, film.view, pixels, image_left, image_right))
    return out


def score(segmenter_spec: str, films: list[tuple[str, str | None, np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Per-film and mean Dice of one segmenter (``right``/``left``: the patient's lungs)."""
    from engine.analysis.segmentation import load_segmenter
    from engine.regions import structure_mask

    seg = load_segmenter(segmenter_spec)
    rows = []
    for film_id, view, pixels, right, left in films:
        rows.append({"film_id": film_id, "view": view,
                     "right_lung": dice(structure_mask(seg, pixels, "right_lung"), right),
                     "left_lung": dice(structure_mask(seg, pixels, "left_lung"), left)})
    out = {"segmenter": segmenter_spec, "films": len(rows), "rows": rows}
    for lung in ("right_lung", "left_lung"):
        values = [r[lung] for r in rows]
        out[f"{lung}_mean"] = float(np.mean(values))
        out[f"{lung}_min"] = float(np.min(values))
    out["lungs_mean"] = (out["right_lung_mean"] + out["left_lung_mean"]) / 2
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--films", required=True, help="the Hannover folder (../shared/data/hannover-covid19)")
    p.add_argument("--split", default="test", choices=("train", "validate", "test"))
    p.add_argument("--segmenter", action="append", required=True, help="segmenter folder, auto or xrv (repeatable)")
    p.add_argument("--out", required=True, help="JSON report")
    args = p.parse_args(argv)
    films = held_out_films(args.films, args.split)
    if not films:
        print(f"no {args.split} films with a fitting V7 mask in {args.films}", file=sys.stderr)
        return 1
    reports = [score(spec, films) for spec in args.segmenter]
    print(f"{len(films)} {args.split} films with a fitting V7 lung mask, Dice on each film's own grid")
    print("| segmenter | right lung Dice (mean, worst) | left lung Dice (mean, worst) | both |")
    print("| --- | --- | --- | --- |")
    for r in reports:
        print(f"| {r['segmenter']} | {r['right_lung_mean']:.3f}, {r['right_lung_min']:.3f} | "
              f"{r['left_lung_mean']:.3f}, {r['left_lung_min']:.3f} | {r['lungs_mean']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"split": args.split, "grid": "film", "reports": reports}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
