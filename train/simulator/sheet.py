"""Contact sheet of simulator samples for the docs.

``python -m train.simulator.sheet --out docs/images/simulator_contact_sheet.png`` writes a 4 x 4
grid of 256 px images with captions: four patients, four findings, four device sets, and one
journey pair as prior -> follow-up -> exact counterfactual -> |prior - counterfactual|.
Captions use the patient's side ("R" / "L"); in these PA images the patient's right is on the
image's left.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .anatomy import sample_patient
from .params import Device, Findings, Nuisance, Severity, Visit
from .render import change_mask, render, render_counterfactual, render_visit

CAPTION = 18


def _tile(image: np.ndarray, caption: str, font: ImageFont.ImageFont) -> Image.Image:
    size = image.shape[0]
    tile = Image.new("L", (size, size + CAPTION), 0)
    tile.paste(Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)), (0, 0))
    ImageDraw.Draw(tile).text((4, size + 2), caption, fill=230, font=font)
    return tile


def contact_sheet(seed: int = 0, size: int = 256) -> Image.Image:
    """Renders the 4 x 4 sheet (deterministic for a seed).

    Args:
        seed: picks the patients.
        size: tile size in pixels.

    Returns:
        A greyscale PIL image of 4 * size x 4 * (size + 18) pixels.
    """
    rng = np.random.default_rng(seed)
    patients = [sample_patient(rng) for _ in range(13)]
    tiles: list[tuple[np.ndarray, str]] = []
    for k, p in enumerate(patients[:4]):
        r = render(p, size=size, noise_seed=k, nuisance=Nuisance(inspiration=0.7))
        tiles.append((r.image, f"{p.sex} {p.age}y, no findings"))
    findings = [
        (Findings(effusion=Severity(0.75, side="right")), "large R pleural effusion"),
        (Findings(pneumothorax=Severity(0.55, side="left")), "moderate L pneumothorax"),
        (Findings(cardiomegaly=Severity(0.8), edema=Severity(0.7)), "cardiomegaly + severe edema"),
        (Findings(consolidation=Severity(0.7, side="right", zone="lower", seed=3),
                  atelectasis=Severity(0.45, side="left", seed=1)), "RLL consolidation, L atelectasis"),
    ]
    for k, (f, caption) in enumerate(findings):
        tiles.append((render(patients[4 + k], f, size=size, noise_seed=10 + k).image, caption))
    device_sets = [
        ((Device("ett", seed=1), Device("ng_tube", seed=2), Device("cvc", side="right", seed=3),
          Device("ecg", seed=4)), "ETT, NG tube, R IJ CVC, ECG"),
        ((Device("pacemaker", side="left", seed=5), Device("sternal_wires", seed=6)), "pacemaker, sternotomy wires"),
        ((Device("chest_tube", side="right", seed=7), Device("cvc", side="left", seed=8)), "R chest tube, L subclavian CVC"),
        ((Device("icd", side="left", seed=9),), "ICD (shock coils)"),
    ]
    for k, (devices, caption) in enumerate(device_sets):
        findings_k = Findings(pneumothorax=Severity(0.2, side="right")) if k == 2 else Findings()
        tiles.append((render(patients[8 + k], findings_k, devices=devices, size=size, noise_seed=20 + k).image,
                      caption))
    p = patients[12]
    prior = Visit(findings=Findings(effusion=Severity(0.15, side="left")), devices=(Device("cvc", side="right", seed=1),),
                  nuisance=Nuisance(rotation_deg=-2.5, shift_x=-0.02, inspiration=0.8, exposure=1.1), noise_seed=31)
    followup = Visit(findings=Findings(effusion=Severity(0.6, side="left"), cardiomegaly=Severity(0.35)),
                     nuisance=Nuisance(rotation_deg=3.0, shift_x=0.03, shift_y=0.03, inspiration=0.3, exposure=0.8),
                     noise_seed=32)
    a = render_visit(p, prior, size)
    b = render_visit(p, followup, size)
    cf = render_counterfactual(p, prior, followup, size)
    diff = np.abs(a.image - cf.image)
    diff = np.clip(diff / max(float(diff.max()), 1e-6), 0, 1) ** 0.5
    outline = change_mask(a, cf)
    edge = outline & ~np.roll(outline, 1, 0) | outline & ~np.roll(outline, 1, 1)
    diff = np.where(edge, 0.35, diff)
    tiles += [(a.image, "prior: trace L effusion, R CVC"), (b.image, "follow-up (new position)"),
              (cf.image, "exact counterfactual"), (diff, "|prior - cf|, change mask")]
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    sheet = Image.new("L", (4 * size, 4 * (size + CAPTION)), 0)
    for k, (image, caption) in enumerate(tiles):
        sheet.paste(_tile(image, caption, font), ((k % 4) * size, (k // 4) * (size + CAPTION)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    """``python -m train.simulator.sheet --out PNG [--seed N] [--size S]``."""
    parser = argparse.ArgumentParser(description="Write the simulator contact sheet PNG.")
    parser.add_argument("--out", type=Path, default=Path("docs/images/simulator_contact_sheet.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(args.seed, args.size).save(args.out, optimize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
