"""``python -m train evaluate-real``: where an instruct model's edits land on real films (no ground truth).

Real films have no exact counterfactual, but their lungs are known (V7 Labs' masks where a film
has one, else the segmenter's). For every film of the chosen patient split and every instruction
it records how large the change is and where it falls: in the asked lung, in the other lung, or
outside both (lungs grown by ``--grow`` pixels, 3 at 256 px, so that the costophrenic recess
counts as lung). The instructions, and what a good model does with them:

* ``new large left pleural effusion`` / ``new large right pleural effusion``: more change in the
  asked lung than in the other (asked-side rate), most of it inside the lungs;
* ``new large cardiomegaly``: the heart grows (the segmenter's cardiothoracic ratio rises);
* ``no interval change``: next to nothing moves (mean |change|).

Writes ``OUT.json`` (per film and instruction, plus the aggregate), ``OUT.md`` and, with
``--sheet``, a contact sheet of the first films::

    python -m train evaluate-real --model assets/models/journey-mini \\
        --films ../shared/data/hannover-covid19 --split test --out docs/eval/real_films_journey-mini.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from engine.errors import InputError

log = logging.getLogger(__name__)

INSTRUCTIONS = {
    "left effusion": ("new large left pleural effusion", "left"),
    "right effusion": ("new large right pleural effusion", "right"),
    "cardiomegaly": ("new large cardiomegaly", None),
    "no change": ("no interval change", None),
}
"""Report key -> (instruction, asked side)."""


@dataclass(frozen=True)
class FilmLungs:
    film_id: str
    view: str | None
    canvas: np.ndarray  # (S, S) the film on the model's canvas
    right: np.ndarray  # (S, S) bool, the patient's right lung (image left)
    left: np.ndarray
    source: str  # v7 | segmenter


def film_lungs(films: str, split: str, size: int, masks: str = "auto", segmenter: str = "auto",
               limit: int | None = None) -> list[FilmLungs]:
    """The films of ``split`` on the canvas with their two lungs (``masks`` as ``simulate --on-films``:
    V7 masks first, else the segmenter; or a folder of masks)."""
    from engine.io import read_xray, to_square

    from train.manifest import REAL_FILM_FRACTIONS, split_for
    from train.simulator.filmpairs import MaskSource, discover_films
    from train.simulator.onfilms import split_lungs

    source = MaskSource(masks, segmenter)
    out = []
    for film in discover_films(films):
        if split != "all" and split_for(film.patient_id, REAL_FILM_FRACTIONS) != split:
            continue
        xray = read_xray(film.path)
        lungs, where_from = source.lungs(film, xray.pixels)
        if lungs is None:
            continue
        canvas, _ = to_square(xray, size)
        try:
            img_left, img_right = split_lungs(to_square(lungs.astype(np.float32), size)[0] > 0.5)
        except InputError as exc:
            log.info("skipping %s: %s", film.film_id, exc)
            continue
        out.append(FilmLungs(film.film_id, film.view, canvas, img_left, img_right, where_from))
        if limit is not None and len(out) == limit:
            break
    return out


def where(delta: np.ndarray, film: FilmLungs, side: str | None, grow: int) -> dict[str, float]:
    """How large ``delta`` is and which share falls in the asked lung, the other lung and outside both."""
    a = np.abs(delta)
    total = float(a.sum())
    lungs = {"right": ndimage.binary_dilation(film.right, iterations=grow),
             "left": ndimage.binary_dilation(film.left, iterations=grow)}
    inside = lungs["right"] | lungs["left"]
    row: dict[str, float] = {"mean_abs": float(a.mean()), "inside_lungs": float(a[inside].sum()) / total if total else 0.0}
    row["outside_lungs"] = 1.0 - row["inside_lungs"] if total else 0.0
    if side is not None:
        other = "left" if side == "right" else "right"
        asked, away = float(a[lungs[side] & ~lungs[other]].sum()), float(a[lungs[other] & ~lungs[side]].sum())
        row.update(asked_lung=asked / total if total else 0.0, other_lung=away / total if total else 0.0,
                   asked_more=bool(asked > away))
    return row


def evaluate_real(model: str | None, films: str, *, split: str = "test", out: str, limit: int | None = None,
                  seed: int = 0, grow: int = 3, device: str = "auto", masks: str = "auto", segmenter: str = "auto",
                  sheet: int = 0, progress: bool = True, sampler: str = "auto", steps: int | None = None,
                  confine: str = "anatomy") -> dict[str, Any]:
    """Runs the report (see the module docstring) and writes ``out`` (.json) with ``.md`` and an optional sheet.

    ``sampler``, ``steps`` and ``confine`` as :class:`engine.EditRequest`'s (default: what the app
    runs). With ``confine="anatomy"`` the edit is kept to the segmenter's lungs (grown), so on
    films whose lungs here are the segmenter's too the inside/outside split is partly by
    construction: the aggregate also gives it for the films with V7's independent masks."""
    import engine
    from engine.analysis.segmentation import cardiothoracic_ratio, load_segmenter

    t0 = time.perf_counter()
    eng = engine.load(model, device=device)
    seg = load_segmenter(segmenter) if segmenter != "none" else None
    films_ = film_lungs(films, split, eng.resolution, masks, segmenter, limit)
    if not films_:
        raise InputError(f"no films of split {split!r} with lung masks in {films}")
    rows: list[dict[str, Any]] = []
    examples: list[tuple[FilmLungs, dict[str, np.ndarray]]] = []
    for k, film in enumerate(films_):
        images = {}
        for key, (instruction, side) in INSTRUCTIONS.items():
            cf = eng.counterfactual(film.canvas, instruction, seed=seed, sampler=sampler, steps=steps, confine=confine)
            used = f"{cf.request.sampler} {cf.request.steps}"
            delta = cf.image - cf.prior
            row = {"film_id": film.film_id, "view": film.view, "mask_source": film.source, "edit": key,
                   "instruction": instruction, **where(delta, film, side, grow)}
            if key == "cardiomegaly" and seg is not None:
                before, after = seg.segment([cf.prior, cf.image])
                row.update(ctr_before=cardiothoracic_ratio(before), ctr_after=cardiothoracic_ratio(after))
            rows.append(row)
            images[key] = cf.image
        if k < sheet:
            examples.append((film, images))
        if progress:
            print(f"\rreal films: {k + 1}/{len(films_)}", end="", flush=True)
    if progress:
        print()
    report = {"model_id": eng.model_id, "model_hash": eng.model_hash, "sampler": used if films_ else None,
              "split": split, "films": len(films_),
              "views": {v: sum(1 for f in films_ if f.view == v) for v in sorted({str(f.view) for f in films_})},
              "mask_sources": {s: sum(1 for f in films_ if f.source == s) for s in sorted({f.source for f in films_})},
              "seed": seed, "grow_px": grow, "confine": confine, "seconds": round(time.perf_counter() - t0, 1),
              "aggregate": aggregate_real(rows), "rows": rows}
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    out_path.with_suffix(".md").write_text(markdown_real(report))
    if examples:
        contact_sheet(examples).save(out_path.with_suffix(".png"), optimize=True)
    return report


def aggregate_real(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per instruction: films, asked-side rate, median shares inside/outside the lungs, mean |change|."""
    out: dict[str, Any] = {}
    for key in INSTRUCTIONS:
        sel = [r for r in rows if r["edit"] == key]
        if not sel:
            continue
        agg: dict[str, Any] = {
            "films": len(sel),
            "mean_abs_median": statistics.median(r["mean_abs"] for r in sel),
            "mean_abs_max": max(r["mean_abs"] for r in sel),
            "inside_lungs_median": statistics.median(r["inside_lungs"] for r in sel),
            "outside_lungs_median": statistics.median(r["outside_lungs"] for r in sel),
        }
        v7 = [r["outside_lungs"] for r in sel if r.get("mask_source") == "v7"]
        if v7:  # the films whose lungs were drawn by hand, independent of the segmenter
            agg["outside_lungs_median_v7"] = statistics.median(v7)
            agg["films_v7"] = len(v7)
        if "asked_more" in sel[0]:
            agg["asked_side_rate"] = sum(r["asked_more"] for r in sel) / len(sel)
            agg["asked_lung_median"] = statistics.median(r["asked_lung"] for r in sel)
            agg["other_lung_median"] = statistics.median(r["other_lung"] for r in sel)
        if "ctr_after" in sel[0]:
            pairs = [(r["ctr_before"], r["ctr_after"]) for r in sel if np.isfinite(r["ctr_before"]) and np.isfinite(r["ctr_after"])]
            if pairs:
                agg["ctr_rise_rate"] = sum(b < a for b, a in pairs) / len(pairs)
                agg["ctr_change_median"] = statistics.median(a - b for b, a in pairs)
        out[key] = agg
    films = [r for r in rows if r["edit"] == "cardiomegaly" and np.isfinite(r.get("ctr_before", np.nan))]
    if films:  # the segmenter's cardiothoracic ratio of each film as acquired
        ctr = np.array([r["ctr_before"] for r in films])
        out["film_ctr"] = {"films": len(films), "median": float(np.median(ctr)),
                           "p05": float(np.percentile(ctr, 5)), "p95": float(np.percentile(ctr, 95)),
                           "within_0.35_0.65": float(np.mean((ctr >= 0.35) & (ctr <= 0.65)))}
        for view in sorted({str(r["view"]) for r in films}):
            sel = np.array([r["ctr_before"] for r in films if str(r["view"]) == view])
            out["film_ctr"][f"median_{view}"] = float(np.median(sel))
    return out


def markdown_real(report: dict[str, Any]) -> str:
    """The aggregate as a markdown table."""
    lines = [f"Real films: {report['films']} of the {report['split']} patients (views {report['views']}; lungs "
             f"from {report['mask_sources']}); model `{report['model_id']}` ({report['model_hash'][:12]}), "
             f"sampler {report.get('sampler') or '?'}, confine {report.get('confine', 'none')}, seed "
             f"{report['seed']}, lungs grown by {report['grow_px']} px.", "",
             "| instruction | films | asked lung > other | asked / other lung (median share) | inside / outside lungs "
             "(median share) | outside, films with V7 masks (median) | mean abs change (median, max) | CTR rises "
             "(median change) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, agg in report["aggregate"].items():
        if key == "film_ctr":
            continue
        side = (f"{agg['asked_side_rate']:.0%}", f"{agg['asked_lung_median']:.2f} / {agg['other_lung_median']:.2f}") \
            if "asked_side_rate" in agg else ("-", "-")
        ctr = f"{agg['ctr_rise_rate']:.0%} ({agg['ctr_change_median']:+.3f})" if "ctr_rise_rate" in agg else "-"
        lines.append(f"| {INSTRUCTIONS[key][0]} | {agg['films']} | {side[0]} | {side[1]} | "
                     f"{agg['inside_lungs_median']:.2f} / {agg['outside_lungs_median']:.2f} | "
                     f"{(format(agg['outside_lungs_median_v7'], '.2f') + ' (' + str(agg['films_v7']) + ')') if 'films_v7' in agg else '-'} | "
                     f"{agg['mean_abs_median']:.4f}, {agg['mean_abs_max']:.4f} | {ctr} |")
    ctr = report["aggregate"].get("film_ctr")
    if ctr:
        by_view = ", ".join(f"{k.removeprefix('median_')} {v:.2f}" for k, v in ctr.items() if k.startswith("median_"))
        lines += ["", f"Cardiothoracic ratio of the films as acquired (segmenter): median {ctr['median']:.2f} "
                      f"(by view: {by_view}), 5-95 % {ctr['p05']:.2f}-{ctr['p95']:.2f}, "
                      f"{ctr['within_0.35_0.65']:.0%} within 0.35-0.65 ({ctr['films']} films)."]
    return "\n".join(lines) + "\n"


def contact_sheet(examples: list[tuple[FilmLungs, dict[str, np.ndarray]]]) -> Any:
    """One row per film: the film, then each instruction's counterfactual (marked synthetic)."""
    from PIL import Image, ImageDraw

    size = examples[0][0].canvas.shape[0]
    cols = 1 + len(INSTRUCTIONS)
    sheet = Image.new("L", (cols * size, len(examples) * (size + 14)), 0)
    draw = ImageDraw.Draw(sheet)
    for i, (film, images) in enumerate(examples):
        tiles = [("film " + film.film_id, film.canvas)] + [(f"SYNTHETIC: {INSTRUCTIONS[k][0]}", images[k]) for k in INSTRUCTIONS]
        for j, (caption, image) in enumerate(tiles):
            sheet.paste(Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)), (j * size, i * (size + 14)))
            draw.text((j * size + 3, i * (size + 14) + size + 1), caption, fill=230)
    return sheet


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate-real", help="where a model's edits land on real films (no ground truth)",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--films", required=True, help="folder of films (or the Hannover layout)")
    p.add_argument("--split", default="test", choices=("train", "validate", "test", "all"))
    p.add_argument("--out", required=True, help="report JSON path (.md and .png next to it)")
    p.add_argument("--limit", type=int, default=None, help="first N films only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grow", type=int, default=3, help="px the lung masks are grown by (the costophrenic recess)")
    p.add_argument("--masks", default="auto", help="lung masks: auto (V7, else the segmenter), v7, or a folder")
    p.add_argument("--segmenter", default="auto", help="for films without a mask and for the CTR ('none': no CTR)")
    p.add_argument("--sheet", type=int, default=6, help="films in the contact sheet (0: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sampler", default="auto", choices=("auto", "fast", "full"),
                   help="auto (the app's: the model's fast sampler when it has one), fast or full")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the sampler's own)")
    p.add_argument("--confine", default="anatomy", choices=("anatomy", "none"),
                   help="anatomy (the app's: edits kept to the anatomy of the findings named) or none")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = evaluate_real(args.model, args.films, split=args.split, out=args.out, limit=args.limit, seed=args.seed,
                           grow=args.grow, device=args.device, masks=args.masks, segmenter=args.segmenter,
                           sheet=args.sheet, progress=not args.quiet, sampler=args.sampler, steps=args.steps,
                           confine=args.confine)
    print(markdown_real(report))
    return 0
