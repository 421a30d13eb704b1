"""Findings as thorax-frame attenuation changes with compact support.

Each finding returns a :class:`FindingField`: ``fill``, the fraction of the lung air it replaces
by fluid or tissue (effusion, consolidation, atelectasis, alveolar edema), and ``extra``, an
additive change in cm water-equivalent (pleural line, lost markings, Kerley lines, ...). Fills
combine multiplicatively, ``removed = air * (1 - prod(1 - fill_i))``, so overlapping findings
never remove more air than there is. Every field is exactly zero outside the finding's region,
which is what makes the prior and the exact counterfactual identical outside it.

Severity drives every field monotonically: a larger value never shrinks a region or lowers the
density inside it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import (
    HEART_AIR_BLOCK,
    MASK_BITS,
    SIDE_SIGNS,
    Anatomy,
    build_anatomy,
    cp_y,
    heart_fraction,
    hilum,
    medial_u,
    thorax_structure_bits,
    wall_u,
)
from .geometry import F32, grid, sample_bilinear, smoothstep
from .params import FINDING_NAMES, Findings, Patient, Severity, expand_sides


@dataclass(frozen=True)
class FindingField:
    """A finding's effect on the thorax frame.

    Attributes:
        fill: (S, S) fraction of the present lung air replaced, in [0, 1], or None.
        extra: (S, S) additive attenuation change in cm water-equivalent, or None.
    """

    fill: np.ndarray | None = None
    extra: np.ndarray | None = None


@dataclass(frozen=True)
class FindingsRender:
    """All findings of one image, combined in the thorax frame.

    Attributes:
        delta: (S, S) attenuation change (cm water-equivalent) from all findings.
        support: (S, S) bool, True where any finding changes the image.
        thorax_bits: (S, S) uint16 thorax structure bits (the heart grows with cardiomegaly).
        cardiothoracic_ratio: maximal transverse heart width over thoracic width (canonical).
    """

    delta: np.ndarray
    support: np.ndarray
    thorax_bits: np.ndarray
    cardiothoracic_ratio: float


def render_findings(patient: Patient, size: int, findings: Findings) -> FindingsRender:
    """Combines every finding of ``findings`` into one thorax-frame change (cached).

    Args:
        patient: the patient.
        size: grid size S.
        findings: the pathology.

    Returns:
        The :class:`FindingsRender` (arrays shared by the cache; do not modify).
    """
    return _render_findings(patient, size, findings)


@functools.lru_cache(maxsize=8)
def _render_findings(patient: Patient, size: int, findings: Findings) -> FindingsRender:
    anat = build_anatomy(patient, size)
    cardio = findings.cardiomegaly.value if findings.cardiomegaly else 0.0
    heart, cardio_delta, bits, ctr = _cardiomegaly(patient, size, cardio)
    air = (anat.air["right"] + anat.air["left"]) if cardio == 0.0 else _air_with_heart(anat, heart)
    keep = None
    extra = None if cardio == 0.0 else cardio_delta.copy()
    for name, sev in findings.present().items():
        if name == "cardiomegaly":
            continue
        ff = _FINDINGS[name](anat, sev)
        if ff.fill is not None:
            keep = (1.0 - ff.fill) if keep is None else keep * (1.0 - ff.fill)
        if ff.extra is not None:
            extra = ff.extra.copy() if extra is None else extra + ff.extra
    delta = np.zeros((size, size), dtype=F32)
    if keep is not None:
        delta += air * (1.0 - keep)
    if extra is not None:
        delta += extra
    support = delta != 0.0
    if keep is not None:
        support |= keep != 1.0
    return FindingsRender(delta=delta, support=support, thorax_bits=bits, cardiothoracic_ratio=ctr)


def _air_with_heart(anat: Anatomy, heart: np.ndarray) -> np.ndarray:
    depth = anat.depth["right"] + anat.depth["left"]
    return (depth * (1.0 - HEART_AIR_BLOCK * heart)).astype(F32)


@functools.lru_cache(maxsize=8)
def _cardiomegaly(patient: Patient, size: int, value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Heart fraction, attenuation change, structure bits and CTR for an enlargement."""
    anat = build_anatomy(patient, size)
    x, y = grid(size)
    if value == 0.0:
        heart = anat.heart
        delta = np.zeros_like(heart)
        bits = anat.thorax_bits
    else:
        heart = heart_fraction(patient, x, y, enlargement=value)
        depth = anat.depth["right"] + anat.depth["left"]
        delta = (depth * HEART_AIR_BLOCK * (heart - anat.heart)).astype(F32)
        trachea = (anat.thorax_bits >> MASK_BITS["trachea"]) & 1 == 1
        bits = thorax_structure_bits(patient, x, y, anat.outline, heart > 0, anat.dome, trachea)
    above = y < anat.dome[None, :] + 0.01
    cols = np.nonzero(((heart > 0) & above).any(axis=0))[0]
    heart_width = (cols[-1] - cols[0] + 1) * 2.0 / size if len(cols) else 0.0
    thorax = float(wall_u(patient, np.asarray(cp_y(patient, -1) - 0.05), -1)
                   + wall_u(patient, np.asarray(cp_y(patient, 1) - 0.05), 1))
    return heart, delta, bits, heart_width / thorax


# --------------------------------------------------------------------------------------------
# Individual findings


def _effusion(anat: Anatomy, sev: Severity) -> FindingField:
    """Dependent pleural fluid: blunts the costophrenic angle, then rises with a meniscus."""
    p, v = anat.patient, sev.value
    x, y = grid(anat.size)
    fill = np.zeros(x.shape, dtype=F32)
    for side in expand_sides(sev.side):
        s = SIDE_SIGNS[side]
        outline = anat.outline[side]
        bottom = cp_y(p, s)
        height = (0.04 + 0.62 * v ** 1.1) * (bottom - p.apex_y)
        u = s * x
        row = y[:, :1]
        med = medial_u(p, row, s)
        lateral = np.clip((u - med) / np.maximum(wall_u(p, row, s) - med, 1e-3), 0.0, 1.0)
        # Meniscus: the fluid climbs the lateral chest wall.
        surface = bottom - height - (0.04 + 0.45 * height) * lateral ** 2
        ramp = 0.03 + 0.2 * height
        f = smoothstep((y - surface) / ramp) * outline
        fill = np.maximum(fill, f.astype(F32))
    return FindingField(fill=fill)


def _pneumothorax(anat: Anatomy, sev: Severity) -> FindingField:
    """Pleural air: the lung collapses towards its base and hilum behind a thin visceral
    pleural line; no vascular markings beyond it."""
    p, v = anat.patient, sev.value
    x, y = grid(anat.size)
    extra = np.zeros(x.shape, dtype=F32)
    px_norm = 2.0 / anat.size
    for side in expand_sides(sev.side):
        s = SIDE_SIGNS[side]
        outline = anat.outline[side]
        hx, _ = hilum(p, s)
        ax, ay = hx + s * 0.05, cp_y(p, s) - 0.12  # collapse anchor: lower, towards the hilum
        c = 1.0 - (0.07 + 0.5 * v)
        xs, ys = ax + (x - ax) / c, ay + (y - ay) / c
        inner = sample_bilinear(anat.edt[side], xs, ys) * c  # distance inside the collapsed lung
        collapsed = (inner > 0.0) & outline
        space = outline & ~collapsed
        line_w = max(1.3 * px_norm, 0.006)
        line = np.clip(1.0 - inner / line_w, 0.0, 1.0) * collapsed
        extra += space * (-(anat.vessels + 0.18 * anat.depth[side]))
        extra += 1.1 * line
        # The collapsed lung is denser.
        extra += collapsed * (0.12 * v * anat.air[side])
    return FindingField(extra=extra.astype(F32))


def _consolidation(anat: Anatomy, sev: Severity) -> FindingField:
    """Lobar airspace opacity: patchy fill spreading through one lobe from a seed point, with a
    sharp margin at the minor fissure (right upper / middle lobe), silhouetting of the heart
    border (middle lobe, lingula) or the diaphragm (lower lobe), and air bronchograms."""
    p, v = anat.patient, sev.value
    x, y = grid(anat.size)
    rng = np.random.default_rng(sev.seed)
    zone = sev.zone or ("upper", "middle", "lower")[int(rng.integers(0, 3))]
    fill = np.zeros(x.shape, dtype=F32)
    bronchi = np.clip(anat.vessels / max(float(anat.vessels.max()), 1e-6) * 2.5, 0.0, 1.0)
    for side in expand_sides(sev.side):
        s = SIDE_SIGNS[side]
        u = s * x
        _, hy = hilum(p, s)
        fissure = hy - 0.01 + rng.normal(0.0, 0.015)
        sharp = 0.012 if s < 0 else 0.06  # only the right lung has a minor fissure
        bottom = cp_y(p, s)
        med = float(medial_u(p, np.asarray(hy + 0.2), s))
        wall = float(wall_u(p, np.asarray(hy + 0.2), s))
        if zone == "upper":
            lobe = smoothstep((fissure - y) / sharp)
            seed = (med + 0.55 * (wall - med), 0.5 * (p.apex_y + fissure))
        elif zone == "middle":
            lobe = smoothstep((y - fissure) / sharp) * smoothstep((med + 0.5 * (wall - med) - u) / 0.1)
            lobe = lobe * smoothstep((bottom - 0.1 - y) / 0.08)
            seed = (med + 0.25 * (wall - med), fissure + 0.2)
        else:
            lobe = smoothstep((y - hy - 0.04) / 0.2)
            seed = (med + 0.5 * (wall - med), bottom - 0.2)
        seed_x, seed_y = s * (seed[0] + rng.normal(0.0, 0.03)), seed[1] + rng.normal(0.0, 0.03)
        reach = 0.1 + 0.45 * v
        d = np.sqrt((x - seed_x) ** 2 + (y - seed_y) ** 2) / reach
        shape = np.clip(1.0 - d + 0.6 * (anat.texture - 0.5), 0.0, 1.0) ** 0.7 * lobe * anat.outline[side]
        density = 0.35 + 0.55 * v
        fill = np.maximum(fill, (density * shape * (1.0 - 0.45 * bronchi)).astype(F32))
    extra = (-0.9 * anat.vessels * (fill > 0) * np.minimum(fill / 0.3, 1.0)).astype(F32)  # markings lost
    return FindingField(fill=fill, extra=extra)


def _atelectasis(anat: Anatomy, sev: Severity) -> FindingField:
    """Basilar volume loss: plate-like bands, elevated dome; lobar collapse when severe."""
    p, v = anat.patient, sev.value
    x, y = grid(anat.size)
    rng = np.random.default_rng(sev.seed)
    fill = np.zeros(x.shape, dtype=F32)
    dome = anat.dome[None, :]
    for side in expand_sides(sev.side):
        s = SIDE_SIGNS[side]
        outline = anat.outline[side]
        # Elevated hemidiaphragm / basal crowding: the bottom of the lung fills in.
        lift = 0.02 + 0.1 * v
        f = smoothstep((y - (dome - lift)) / lift)
        # Plate-like (discoid) bands above the dome; more and thicker with severity.
        bands = np.zeros(x.shape, dtype=F32)
        for k in range(3):
            if v < 0.2 * k:
                continue
            cy = float(np.interp(s * 0.45, anat_x(anat), anat.dome)) - 0.09 - 0.07 * k + rng.normal(0.0, 0.015)
            cx = s * rng.uniform(0.3, 0.55)
            angle = np.radians(rng.uniform(-12.0, 12.0))
            along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
            across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
            half_len = 0.1 + 0.1 * v
            thick = 0.012 + 0.014 * v
            band = np.clip(1.0 - np.abs(across) / thick, 0.0, 1.0) * smoothstep((half_len - np.abs(along)) / 0.04)
            bands = np.maximum(bands, band * min(1.0, 0.5 + (v - 0.2 * k)))
        f = np.maximum(f, 0.4 * bands)
        if v > 0.4:
            # Lower-lobe collapse: triangular paraspinal/retrocardiac opacity.
            strength = min(1.0, (v - 0.4) / 0.4)
            u = s * x
            med = medial_u(p, y[:, :1], s)
            top = cp_y(p, s) - 0.45
            width = (0.06 + 0.2 * strength) * np.clip((y - top) / 0.45, 0.0, 1.0)
            tri = smoothstep((med + width - u) / 0.04) * smoothstep((y - top) / 0.05)
            f = np.maximum(f, 0.8 * strength * tri)
        fill = np.maximum(fill, (f * outline).astype(F32))
    return FindingField(fill=fill)


def anat_x(anat: Anatomy) -> np.ndarray:
    """Canonical x of every image column."""
    return grid(anat.size)[0][0]


def _edema(anat: Anatomy, sev: Severity) -> FindingField:
    """Pulmonary edema: vascular indistinctness and upper-zone redistribution, Kerley B lines,
    perihilar haze, and bilateral alveolar (bat-wing) opacities when severe."""
    p, v = anat.patient, sev.value
    x, y = grid(anat.size)
    lungs = anat.outline["right"] | anat.outline["left"]
    sigma = 1.6 * anat.size / 256
    blurred = ndimage.gaussian_filter(anat.vessels, sigma)
    upper = smoothstep((0.05 - y) / 0.5)
    extra = v * (1.4 * (blurred - anat.vessels) + 0.35 * blurred + 0.5 * upper * anat.vessels)
    # Kerley B lines: short horizontal lines at the lateral lung bases, reaching the pleura.
    rng = np.random.default_rng(p.seed + 17)
    n_lines = int(round(18 * min(1.0, v * 1.6)))
    lines = np.zeros(x.shape, dtype=F32)
    for k in range(18):
        s = -1 if k % 2 == 0 else 1
        side = "right" if s < 0 else "left"
        yk = cp_y(p, s) - 0.04 - rng.uniform(0.0, 0.3)
        wall = float(wall_u(p, np.asarray(yk), s))
        length = rng.uniform(0.025, 0.05)
        if k >= n_lines:
            continue
        seg = (np.abs(y - yk) < 0.005) & (s * x > wall - length) & anat.outline[side]
        lines = np.maximum(lines, seg.astype(F32))
    extra = extra + 0.9 * lines
    # Perihilar haze growing outwards from both hila; alveolar patches when severe.
    haze = np.zeros(x.shape, dtype=F32)
    for s in (-1, 1):
        hx, hy = hilum(p, s)
        reach = 0.25 + 0.35 * v
        d = np.sqrt(((x - hx) / 1.2) ** 2 + (y - hy) ** 2) / reach
        haze = np.maximum(haze, np.clip(1.0 - d, 0.0, 1.0) ** 1.3)
    alveolar = np.clip((v - 0.45) / 0.55, 0.0, 1.0) * np.clip(anat.texture * 1.6 - 0.3, 0.0, 1.0)
    fill = (0.12 + 0.55 * v ** 1.5) * haze + 0.5 * alveolar * (0.4 + 0.6 * haze)
    basal = smoothstep((y - 0.0) / 0.45) * 0.15 * v  # dependent interstitial fluid
    fill = np.clip(fill + basal, 0.0, 0.95) * lungs
    return FindingField(fill=fill.astype(F32), extra=(extra * lungs).astype(F32))


_FINDINGS = {
    "atelectasis": _atelectasis,
    "consolidation": _consolidation,
    "edema": _edema,
    "effusion": _effusion,
    "pneumothorax": _pneumothorax,
}
assert set(_FINDINGS) | {"cardiomegaly"} == set(FINDING_NAMES)
