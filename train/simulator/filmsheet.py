"""Contact sheet of real-anatomy renders: each kind at each severity on real films (docs figure).

    python -m train.simulator.filmsheet --films ../shared/data/hannover-covid19 \\
        --out docs/images/real_anatomy_contact_sheet.png [--split test] [--count 3] [--seed 0]

One row per finding kind (and one for devices), columns: the film as acquired, then slight,
moderate and large on the first film, the same on the second, ... Films are drawn from one
patient split (default ``test``: patients no model is trained on) among those with a V7 lung
mask. Captions name the patient's side; the images are PA/AP displays (patient's right on the
image's left).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .anatomy import sample_patient
from .edits import GRADE_VALUES
from .params import Device, Findings, Severity

CAPTION = 16
ROWS = (
    ("effusion", "right", "R pleural effusion"),
    ("effusion", "left", "L pleural effusion"),
    ("consolidation", "right", "R consolidation"),
    ("atelectasis", "left", "L atelectasis"),
    ("pneumothorax", "right", "R pneumothorax"),
    ("edema", None, "pulmonary edema"),
    ("cardiomegaly", None, "cardiomegaly"),
)
DEVICE_SETS = (
    (Device("ett", seed=1), Device("ng_tube", seed=2), Device("cvc", side="right", seed=3)),
    (Device("pacemaker", side="left", seed=5), Device("ecg", seed=4)),
    (Device("chest_tube", side="right", seed=7), Device("icd", side="left", seed=9)),
)


def _tile(image: np.ndarray, caption: str, font: ImageFont.ImageFont) -> Image.Image:
    size = image.shape[0]
    tile = Image.new("L", (size, size + CAPTION), 0)
    tile.paste(Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)), (0, 0))
    ImageDraw.Draw(tile).text((3, size + 2), caption, fill=230, font=font)
    return tile


def film_sheet(films: str, *, split: str = "test", count: int = 3, size: int = 256, seed: int = 0) -> Image.Image:
    """Renders the sheet: rows = kinds, columns = ``count`` films x (film, slight, moderate, large)."""
    from engine.io import read_xray, to_square

    from ..manifest import REAL_FILM_FRACTIONS, split_for
    from ..sources.v7masks import MAX_ON_BORDER, V7LungMasks, on_blank_border
    from .filmpairs import HEART_CTR_RANGE, discover_films
    from .onfilms import fit_anatomy, render_on_film

    masks = V7LungMasks()
    rng = np.random.default_rng(seed)
    candidates = [f for f in discover_films(films)
                  if f.film_id in masks and split_for(f.patient_id, REAL_FILM_FRACTIONS) == split]
    rng.shuffle(candidates)
    chosen, seen_patients = [], set()
    for film in candidates:
        if len(chosen) == count or film.patient_id in seen_patients:
            continue
        xray = read_xray(film.path)
        canvas, _ = to_square(xray, size)
        mask = masks.mask(film.film_id, xray.pixels.shape)
        if on_blank_border(mask, xray.pixels) > MAX_ON_BORDER:  # drawn on another crop of the film
            continue
        lungs, _ = to_square(mask.astype(np.float32), size)
        content, _ = to_square(np.ones(xray.pixels.shape, dtype=np.float32), size)
        try:
            anatomy = fit_anatomy(canvas, lungs > 0.5, content=content > 0.5, seed=len(chosen))
        except ValueError:
            continue
        if not HEART_CTR_RANGE[0] <= anatomy.cardiothoracic_ratio() <= HEART_CTR_RANGE[1]:
            continue
        chosen.append((film, anatomy))
        seen_patients.add(film.patient_id)
    font = ImageFont.load_default()
    grades = list(GRADE_VALUES)
    rows: list[list[Image.Image]] = []
    for name, side, label in ROWS:
        row = []
        for film, anatomy in chosen:
            row.append(_tile(anatomy.image, f"{film.film_id} ({film.view or '?'}) as acquired", font))
            for grade in grades:
                lo, hi = GRADE_VALUES[grade]
                sev = Severity(0.5 * (lo + hi), side=side, seed=7, zone="lower" if name == "consolidation" else None)
                row.append(_tile(render_on_film(anatomy, Findings(**{name: sev})).image, f"{grade} {label}", font))
        rows.append(row)
    row = []
    for k, (film, anatomy) in enumerate(chosen):
        patient = sample_patient(np.random.default_rng(seed + k))
        row.append(_tile(anatomy.image, f"{film.film_id} as acquired", font))
        for devices in DEVICE_SETS:
            caption = ", ".join(d.kind.replace("_", " ") + (f" {d.side[0].upper()}" if d.side else "") for d in devices)
            row.append(_tile(render_on_film(anatomy, Findings(), devices, patient).image, caption, font))
    rows.append(row)
    width = max(len(r) for r in rows) * size
    sheet = Image.new("L", (width, len(rows) * (size + CAPTION)), 0)
    for i, r in enumerate(rows):
        for j, tile in enumerate(r):
            sheet.paste(tile, (j * size, i * (size + CAPTION)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", required=True, help="Hannover-layout folder (data.csv + png/)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--split", default="test", choices=("train", "validate", "test"))
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sheet = film_sheet(args.films, split=args.split, count=args.count, size=args.size, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
