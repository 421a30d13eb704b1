"""Patient anatomy: sampling identity parameters and building patient-level canonical fields.

A chest radiograph is modelled as the sum of line integrals of attenuation, in cm of
water-equivalent thickness, split over two canonical frames:

* the **body frame** (soft tissue outline, breasts, ribs, clavicles, scapulae, humeri, spine),
  placed into the image by the visit's rotation/translation/magnification;
* the **thorax frame** (lungs, heart, mediastinum, trachea, diaphragm, vessels, gastric bubble,
  findings and devices), placed by the same transform plus a vertical stretch about the lung
  apices that models the depth of inspiration (the diaphragm moves against the ribs).

Lungs are *negative* attenuation (air replacing soft tissue); the heart is where that air is
missing. Everything here is computed once per (patient, size) by :func:`build_anatomy` and
cached; per-visit work is in :mod:`.findings`, :mod:`.devices` and :mod:`.render`.

Geometry functions take canonical coordinates (see :mod:`.params`) as numpy arrays of any
shape, so the same function rasterises a field and answers "is this point inside the lung?".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import F32, Canvas, bump, grid, smooth_noise, smoothstep, tube_profile
from .params import Patient

AIR_FRACTION = 0.8
"""Fraction of the lung's geometric depth that is air (the rest is parenchyma and blood)."""

HEART_AIR_BLOCK = 0.72
"""Fraction of the lung air in front of / behind the heart that the heart displaces."""

MASK_BITS: dict[str, int] = {
    "left_lung": 0,
    "right_lung": 1,
    "heart": 2,
    "mediastinum": 3,
    "diaphragm": 4,
    "spine": 5,
    "clavicles": 6,
    "trachea": 7,
    "ribs": 8,
    "finding": 9,
    "devices": 10,
}
"""Bit of each structure in the 16-bit mask PNGs (``(value >> bit) & 1``). Lungs are the
PATIENT's left/right: ``left_lung`` is on the image's right. ``heart`` is inside
``mediastinum``; every other pair may overlap only where the anatomy overlaps in projection
(ribs over lungs, spine behind the mediastinum)."""

DEVICE_KIND_SHIFT = 11
"""First of the three mask bits that hold, where ``devices`` is set, which kind of device shows
there (``(value >> DEVICE_KIND_SHIFT) & 7``: a :data:`DEVICE_KIND_LABELS` value, 0 for none or
unknown). Where devices cross, the one that adds most attenuation is named."""

DEVICE_KIND_LABELS: dict[str, int] = {
    "ett": 1,
    "ng_tube": 2,
    "cvc": 3,
    "pacemaker": 4,
    "icd": 4,
    "ecg": 5,
    "chest_tube": 6,
    "sternal_wires": 7,
}
"""Label of each simulator device kind in the kind bits (a pacemaker and an ICD are one kind to a
reader asking for "the pacemaker" to go: a generator in a pocket with leads into the heart)."""

DEVICE_KIND_TARGETS: dict[str, int] = {
    "device_ett": 1,
    "device_ng_tube": 2,
    "device_cvc": 3,
    "device_pacemaker": 4,
    "device_ecg": 5,
    "device_chest_tube": 6,
    "device_sternal_wires": 7,
}
"""Segmenter targets read from the kind bits: ``device_<kind>`` is where that kind of device shows."""


def structure_mask(bits: np.ndarray, name: str) -> np.ndarray:
    """Bool mask of structure ``name`` in a packed mask image: a :data:`MASK_BITS` bit, or a
    :data:`DEVICE_KIND_TARGETS` kind.

    Raises:
        KeyError: an unknown name.
    """
    bits = np.asarray(bits).astype(np.int64)
    if name in MASK_BITS:
        return ((bits >> MASK_BITS[name]) & 1).astype(bool)
    if name in DEVICE_KIND_TARGETS:
        return ((bits >> DEVICE_KIND_SHIFT) & 7) == DEVICE_KIND_TARGETS[name]
    raise KeyError(f"{name!r}; structures are {sorted(MASK_BITS) + sorted(DEVICE_KIND_TARGETS)}")



# --------------------------------------------------------------------------------------------
# Sampling


def sample_patient(rng: np.random.Generator, patient_id: str | None = None) -> Patient:
    """Draws a random adult patient.

    Args:
        rng: the only source of randomness.
        patient_id: identifier to store; default derived from the drawn seed.

    Returns:
        A :class:`Patient`.
    """
    seed = int(rng.integers(0, 2**31 - 1))
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(20, 91))
    habitus = float(rng.beta(2.0, 2.2))
    male = sex == "M"
    dome_right = 0.4 + rng.normal(0.0, 0.025)
    old = max(0.0, (age - 40) / 45.0)
    return Patient(
        patient_id=patient_id or f"SIM-{seed:08x}",
        seed=seed,
        sex=sex,
        age=age,
        habitus=habitus,
        body_half_width=float(0.9 + 0.1 * habitus + rng.normal(0.0, 0.012)),
        thorax_half_width=float(0.74 + (0.02 if male else 0.0) + rng.normal(0.0, 0.02)),
        apex_y=float(-0.74 + rng.normal(0.0, 0.015)),
        dome_right_y=float(dome_right),
        dome_left_drop=float(rng.uniform(0.025, 0.065)),
        cp_drop=float(0.2 + rng.normal(0.0, 0.015)),
        heart_x=float(0.07 + rng.normal(0.0, 0.015)),
        heart_y=float(dome_right - 0.1 + rng.normal(0.0, 0.015)),
        heart_size=float(np.clip(1.0 + rng.normal(0.0, 0.05) + 0.04 * old, 0.88, 1.14)),
        heart_tilt_deg=float(28.0 + rng.normal(0.0, 4.0)),
        aortic_unfolding=float(np.clip(old + rng.normal(0.0, 0.15), 0.0, 1.0)),
        mediastinum_half_width=float(0.12 + rng.normal(0.0, 0.008)),
        trachea_x=float(-0.012 + rng.normal(0.0, 0.005)),
        rib_spacing=float(0.113 + rng.normal(0.0, 0.004)),
        bone_density=float(np.clip(1.08 - 0.35 * old * (1.3 if not male else 1.0)
                                   + rng.normal(0.0, 0.05), 0.5, 1.2)),
        breast_size=0.0 if male else float(rng.uniform(0.3, 1.0)),
        scoliosis=float(np.clip(rng.normal(0.0, 0.012), -0.04, 0.04)),
        gastric_bubble=float(rng.uniform(0.0, 1.0)),
        costal_calcification=float(np.clip(old * rng.uniform(0.2, 1.0), 0.0, 1.0)),
    )


# --------------------------------------------------------------------------------------------
# Thorax geometry (thorax frame, canonical coordinates; ``s`` = -1 patient right, +1 left)

APEX_U = 0.27  # lateral position of the lung apex tip


def dome_top(p: Patient, s: int) -> float:
    """Top of the hemidiaphragm dome on side ``s`` (the right one is higher)."""
    return p.dome_right_y + (p.dome_left_drop if s > 0 else 0.0)


def cp_y(p: Patient, s: int) -> float:
    """Height of the costophrenic angle on side ``s``."""
    return dome_top(p, s) + p.cp_drop


def _t(p: Patient, y: np.ndarray, s: int) -> np.ndarray:
    return np.clip((y - p.apex_y) / (cp_y(p, s) - p.apex_y), 0.0, 1.0)


def wall_u(p: Patient, y: np.ndarray, s: int) -> np.ndarray:
    """Lateral lung border (inner rib cage), as distance from the midline, at height ``y``."""
    t = _t(p, y, s)
    width = p.thorax_half_width * (1.012 if s < 0 else 1.0)
    grow = np.sin(0.5 * np.pi * np.minimum(t / 0.7, 1.0)) ** 0.55
    narrow = 1.0 - 0.05 * np.clip((t - 0.7) / 0.3, 0.0, 1.0) ** 2
    return APEX_U + (width - APEX_U) * grow * narrow


def mediastinal_u(p: Patient, y: np.ndarray, s: int) -> np.ndarray:
    """Mediastinal border: superior vena cava / ascending aorta on the right; on the left the
    descending aorta with the convex aortic knob and pulmonary trunk above the heart."""
    m = p.mediastinum_half_width
    if s < 0:
        return m + 0.035 * bump(y, -0.28, 0.32) + 0.02 * p.aortic_unfolding * bump(y, -0.15, 0.2)
    border = 0.85 * m + 0.01 * bump(y, 0.1, 0.5)
    for cx, cy, r in (aortic_knob(p), pulmonary_trunk(p)):
        # A convex bulge of the contour reaching cx + r at height cy.
        border = np.maximum(border, 0.85 * m + (cx + r - 0.85 * m) * np.sqrt(bump(y, cy, 1.15 * r)))
    return border


def medial_u(p: Patient, y: np.ndarray, s: int) -> np.ndarray:
    """Medial lung border: rounds into the apex, then follows the mediastinum."""
    t = _t(p, y, s)
    grow = np.sin(0.5 * np.pi * np.minimum(t / 0.16, 1.0)) ** 0.55
    return APEX_U - (APEX_U - mediastinal_u(p, y, s)) * grow


def _dome_side(p: Patient, u: np.ndarray, s: int) -> np.ndarray:
    top, cp = dome_top(p, s), cp_y(p, s)
    width = float(wall_u(p, np.asarray(cp), s))
    peak = 0.48 * width
    lateral = top + (cp - top) * (np.maximum(u - peak, 0.0) / (width - peak)) ** 2.6
    medial = top + 0.035 * (np.maximum(peak - u, 0.0) / peak) ** 2
    return np.where(u >= peak, lateral, medial)


def dome_y(p: Patient, x: np.ndarray) -> np.ndarray:
    """Height of the diaphragm at image column ``x`` (both domes, blended at the midline)."""
    x = np.asarray(x, dtype=np.float64)
    right = _dome_side(p, -x, -1)
    left = _dome_side(p, x, 1)
    w = smoothstep((x + 0.12) / 0.24)
    return (1.0 - w) * right + w * left


def aortic_knob(p: Patient) -> tuple[float, float, float]:
    """(x, y, radius) of the aortic knob (patient's left = image right); unfolds with age."""
    a = p.aortic_unfolding
    return 0.14 + 0.05 * a, -0.3 - 0.02 * a, 0.065 + 0.02 * a


def pulmonary_trunk(p: Patient) -> tuple[float, float, float]:
    """(x, y, radius) of the main pulmonary artery bulge below the knob."""
    return 0.12, -0.14, 0.045


def hilum(p: Patient, s: int) -> tuple[float, float]:
    """Centre of the hilum on side ``s`` (the left hilum is higher)."""
    return (s * 0.2, -0.06) if s < 0 else (s * 0.18, -0.1)


def carina(p: Patient) -> tuple[float, float]:
    """Tracheal bifurcation."""
    return p.trachea_x + 0.005, p.apex_y + 0.43


def lung_outline(p: Patient, x: np.ndarray, y: np.ndarray, s: int) -> np.ndarray:
    """Anatomical extent of one lung in projection (incl. the part behind the heart).

    Args:
        p: the patient.
        x, y: canonical coordinates (any shape).
        s: -1 patient right (image left), +1 patient left (image right).

    Returns:
        Boolean array, True inside the lung.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    u = s * x
    return (y > p.apex_y) & (u > medial_u(p, y, s)) & (u < wall_u(p, y, s)) & (y < _dome_side(p, u, s))


# --------------------------------------------------------------------------------------------
# Heart


def heart_q(p: Patient, x: np.ndarray, y: np.ndarray, enlargement: float = 0.0) -> np.ndarray:
    """Union-of-ellipses level function of the cardiac silhouette (< 1 inside).

    Cardiomegaly (``enlargement`` in [0, 1]) scales the heart about its base, mostly to the
    patient's left (image right) and downwards, as left-ventricular enlargement does.
    """
    hs = p.heart_size
    ax, ay = p.heart_x - 0.06, p.heart_y - 0.12
    kx, ky = 1.0 + 0.42 * enlargement, 1.0 + 0.16 * enlargement
    xs = ax + (x - ax) / kx
    ys = ay + (y - ay) / ky
    tilt = math.radians(p.heart_tilt_deg)
    c, s = math.cos(tilt), math.sin(tilt)
    ellipses = (
        # (centre x, centre y, semi-axis along tilt, semi-axis across, rotated?)
        (p.heart_x + 0.12 * hs, p.heart_y + 0.0 * hs, 0.31 * hs, 0.21 * hs, True),  # left ventricle
        (p.heart_x - 0.14 * hs, p.heart_y + 0.05 * hs, 0.15 * hs, 0.2 * hs, False),  # right atrium
        (p.heart_x + 0.02 * hs, p.heart_y - 0.12 * hs, 0.15 * hs, 0.2 * hs, False),  # base, atria
    )
    q = None
    for cx, cy, a, b, rotated in ellipses:
        dx, dy = xs - cx, ys - cy
        if rotated:
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        qi = (dx / a) ** 2 + (dy / b) ** 2
        q = qi if q is None else np.minimum(q, qi)
    return q


def heart_fraction(p: Patient, x: np.ndarray, y: np.ndarray, enlargement: float = 0.0) -> np.ndarray:
    """Projected heart thickness, 0 outside the silhouette rising steeply to 1 (compact)."""
    q = heart_q(p, x, y, enlargement)
    return np.sqrt(np.clip((1.0 - q) / 0.12, 0.0, 1.0)).astype(F32)


# --------------------------------------------------------------------------------------------
# The patient-level fields


@dataclass
class Anatomy:
    """Patient-level canonical fields at one size (built once, reused for every visit).

    Attributes:
        patient: the patient.
        size: grid size S.
        body_att: (S, S) body-frame attenuation, cm water-equivalent (soft tissue + bone).
        body_bits: (S, S) uint16 body-frame structure bits (spine, clavicles, ribs).
        thorax_att: (S, S) thorax-frame attenuation change (negative where there is air).
        thorax_bits: (S, S) uint16 thorax-frame structure bits for the normal heart.
        outline: patient side -> (S, S) bool anatomical lung extent (incl. retrocardiac).
        depth: patient side -> (S, S) air-equivalent lung depth in cm, before the heart.
        air: patient side -> (S, S) air actually present (depth minus what the heart displaces).
        edt: patient side -> (S, S) distance to the lung's border inside it, canonical units.
        heart: (S, S) heart fraction of the normal heart.
        vessels: (S, S) vascular markings, cm water-equivalent.
        dome: (S,) diaphragm height per image column.
        texture: (S, S) smooth noise in [0, 1] for finding shapes.
        apex_y: pivot of the inspiration stretch.
    """

    patient: Patient
    size: int
    body_att: np.ndarray
    body_bits: np.ndarray
    thorax_att: np.ndarray
    thorax_bits: np.ndarray
    outline: dict[str, np.ndarray]
    depth: dict[str, np.ndarray]
    air: dict[str, np.ndarray]
    edt: dict[str, np.ndarray]
    heart: np.ndarray
    vessels: np.ndarray
    dome: np.ndarray
    texture: np.ndarray
    apex_y: float


SIDE_SIGNS = {"right": -1, "left": 1}
MIN_VESSEL_WIDTH = 0.004  # 0.8 mm: thinner vessels are not drawn


@functools.lru_cache(maxsize=4)
def build_anatomy(patient: Patient, size: int) -> Anatomy:
    """Computes (and caches) every patient-level canonical field at ``size``.

    Args:
        patient: the patient.
        size: output size S (square).

    Returns:
        The :class:`Anatomy`. Treat its arrays as read-only: they are shared by the cache.
    """
    p = patient
    x, y = grid(size)
    rng = np.random.default_rng(p.seed)
    col, row = x[:1, :], y[:, :1]  # (1, S) and (S, 1): most geometry depends on one of them
    outline = {side: lung_outline(p, col, row, s) for side, s in SIDE_SIGNS.items()}
    lungs = outline["right"] | outline["left"]
    # The lungs never touch (the mediastinum is between them), so one transform serves both.
    distance = ndimage.distance_transform_edt(lungs).astype(F32) * F32(2.0 / size)
    depth, edt = {}, {}
    for side, s in SIDE_SIGNS.items():
        d = distance * outline[side]
        edt[side] = d
        t = _t(p, row, s)
        depth_cm = 19.0 * np.sqrt(np.clip(d / 0.16, 0.0, 1.0)) * (0.72 + 0.38 * t)
        depth[side] = (AIR_FRACTION * depth_cm * outline[side]).astype(F32)
    heart = heart_fraction(p, x, y)
    air = {side: (depth[side] * (1.0 - HEART_AIR_BLOCK * heart)).astype(F32) for side in depth}

    vessels = _vessels(p, size, rng, lungs)
    texture = smooth_noise(rng, size, sigma_px=size / 24)
    fine = smooth_noise(rng, size, sigma_px=max(1.5, size / 110))
    dome = dome_y(p, x[0]).astype(F32)

    thorax = -(air["right"] + air["left"])
    thorax += vessels
    thorax += (fine - 0.5) * 0.9 * (depth["right"] + depth["left"]) / 10.8
    trachea_air, trachea_mask = _trachea(p, x, y)
    thorax -= trachea_air
    thorax -= _gastric_bubble(p, x, y)
    thorax = thorax.astype(F32)

    thorax_bits = thorax_structure_bits(p, x, y, outline, heart > 0, dome, trachea_mask)
    body_att, body_bits = _body(p, size, x, y, rng)
    return Anatomy(
        patient=p, size=size, body_att=body_att, body_bits=body_bits, thorax_att=thorax,
        thorax_bits=thorax_bits, outline=outline, depth=depth, air=air, edt=edt, heart=heart,
        vessels=vessels, dome=dome, texture=texture, apex_y=p.apex_y,
    )


def thorax_structure_bits(
    p: Patient,
    x: np.ndarray,
    y: np.ndarray,
    outline: dict[str, np.ndarray],
    heart_region: np.ndarray,
    dome: np.ndarray,
    trachea: np.ndarray,
) -> np.ndarray:
    """Packs the thorax-frame structure masks into uint16 bits (see :data:`MASK_BITS`).

    Lungs are the anatomical lung fields minus the cardiac silhouette; the heart ends at the
    diaphragm; the mediastinum is everything between the lungs from the apices to the
    diaphragm (it contains the heart); the diaphragm is a 0.7 cm band under both domes
    between the costophrenic angles.
    """
    dome_rows = dome[None, :]
    above_dome = y < dome_rows
    heart = heart_region & (y < dome_rows + 0.01)
    right = outline["right"] & ~heart
    left = outline["left"] & ~heart
    cage = (y > p.apex_y + 0.03) & above_dome & (np.abs(x) < 0.45)
    row = y[:, :1]
    cage &= (x > -wall_u(p, row, -1)) & (x < wall_u(p, row, 1))
    mediastinum = (cage & ~outline["right"] & ~outline["left"]) | heart
    cp_right = -float(wall_u(p, np.asarray(cp_y(p, -1)), -1))
    cp_left = float(wall_u(p, np.asarray(cp_y(p, 1)), 1))
    diaphragm = (y >= dome_rows) & (y < dome_rows + 0.035) & (x > cp_right) & (x < cp_left)
    bits = np.zeros(x.shape, dtype=np.uint16)
    for name, m in (("left_lung", left), ("right_lung", right), ("heart", heart),
                    ("mediastinum", mediastinum), ("diaphragm", diaphragm), ("trachea", trachea)):
        bits |= m.astype(np.uint16) << MASK_BITS[name]
    return bits


# --------------------------------------------------------------------------------------------
# Thorax-frame details


def _segment_distance(x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - (ax + t * dx), y - (ay + t * dy))


def _trachea(p: Patient, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Air in the trachea and main bronchi (cm) and the tracheal mask."""
    cx, cy = carina(p)
    rows = y[:, 0] < cy + 0.2
    xs, ys = x[rows], y[rows]
    tube = [((p.trachea_x - 0.004, -1.05), (p.trachea_x, cy - 0.05), 0.042),
            ((p.trachea_x, cy - 0.05), (cx, cy), 0.038)]
    bronchi = [((cx, cy), (cx - 0.1, cy + 0.1), 0.03), ((cx - 0.1, cy + 0.1), (-0.17, cy + 0.17), 0.022),
               ((cx, cy), (cx + 0.1, cy + 0.06), 0.028), ((cx + 0.1, cy + 0.06), (0.17, cy + 0.12), 0.021)]
    air = np.zeros(xs.shape, dtype=F32)
    for a, b, w in tube + bronchi:
        prof = tube_profile(_segment_distance(xs, ys, a, b), w)
        air = np.maximum(air, (1.9 * prof).astype(F32))
    mask = np.zeros(xs.shape, dtype=bool)
    for a, b, w in tube:
        mask |= _segment_distance(xs, ys, a, b) < w
    full_air = np.zeros(x.shape, dtype=F32)
    full_mask = np.zeros(x.shape, dtype=bool)
    full_air[rows] = air
    full_mask[rows] = mask & (ys < cy)
    return full_air, full_mask


def _gastric_bubble(p: Patient, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Air in the gastric fundus under the left hemidiaphragm (air-fluid level below)."""
    if p.gastric_bubble < 0.15:
        return np.zeros(x.shape, dtype=F32)
    size = 0.5 + 0.7 * p.gastric_bubble
    cx = 0.34
    top = float(_dome_side(p, np.asarray(cx), 1)) + 0.02
    rx, ry = 0.12 * size, 0.075 * size
    cy = top + ry
    q = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    level = cy + 0.25 * ry
    below_dome = y > dome_y(p, x[:1, :]) + 0.018
    air = 4.0 * np.sqrt(np.clip(1.0 - q, 0.0, 1.0)) * (y < level) * below_dome
    return air.astype(F32)


def _vessels(p: Patient, size: int, rng: np.random.Generator, lungs: np.ndarray) -> np.ndarray:
    """Pulmonary vascular markings: branching trees from each hilum, tapering to the periphery.

    Grown breadth-first (all branches of one generation at once): each branch splits in two,
    shorter and thinner, until it is thinner than :data:`MIN_VESSEL_WIDTH` or leaves the lung.
    """
    segments = []
    # Membership tests on a fixed 256 x 256 raster of the lung outline: fast, and the tree does
    # not depend on the output size.
    ref = 256
    centres = (np.arange(ref) + 0.5) / ref * 2.0 - 1.0
    for side, s in SIDE_SIGNS.items():
        raster = lung_outline(p, centres[None, :], centres[:, None], s)

        def inside_lung(xs: np.ndarray, ys: np.ndarray, raster: np.ndarray = raster) -> np.ndarray:
            j = np.clip(((xs + 1.0) * 0.5 * ref).astype(int), 0, ref - 1)
            i = np.clip(((ys + 1.0) * 0.5 * ref).astype(int), 0, ref - 1)
            return raster[i, j]

        hx, hy = hilum(p, s)
        # Trunk directions: angle from the lateral direction, + = downwards.
        base = np.array([-78.0, -45.0, -12.0, 20.0, 50.0, 80.0, 112.0])
        angle = np.radians(base + rng.normal(0.0, 6.0, base.shape))
        width = 0.026 * np.where(base > 0, 1.15, 0.85)  # gravity: basal vessels are larger
        x0 = np.full(base.shape, hx)
        y0 = np.full(base.shape, hy)
        length = np.full(base.shape, 0.11)
        for generation in range(9):
            x1 = x0 + s * np.cos(angle) * length
            y1 = y0 + np.sin(angle) * length
            inside = inside_lung(x1, y1) | (generation == 0)
            # Branches that leave the lung are shortened once and end there.
            xs, ys = x0 + s * np.cos(angle) * length * 0.45, y0 + np.sin(angle) * length * 0.45
            short = ~inside & inside_lung(xs, ys)
            segments.append(np.stack([x0, y0, x1, y1, width], 1)[inside])
            segments.append(np.stack([x0, y0, xs, ys, width], 1)[short])
            keep = inside & (width * 0.74 >= MIN_VESSEL_WIDTH)
            n = int(keep.sum())
            if n == 0:
                break
            spread = np.radians(rng.uniform(16.0, 34.0, n))
            jitter = rng.uniform(0.7, 1.2, (2, n))
            angle = np.concatenate([angle[keep] - spread * jitter[0], angle[keep] + spread * jitter[1]])
            x0 = np.tile(x1[keep], 2)
            y0 = np.tile(y1[keep], 2)
            length = np.tile(length[keep], 2) * rng.uniform(0.74, 0.88, 2 * n)
            width = np.tile(width[keep], 2) * rng.uniform(0.68, 0.8, 2 * n)
    canvas = Canvas(size, supersample=2)
    seg = np.concatenate(segments)
    px = (seg[:, :4] + 1.0) * 0.5 * canvas.n
    widths = np.maximum(1, np.rint(seg[:, 4] * 0.5 * canvas.n)).astype(int)
    # A vessel of diameter w (canonical; 1 unit = 20 cm) replaces air: ~pi/4 * d cm of water,
    # times ~6 for the vessels superimposed along the beam.
    values = 6.0 * 0.785 * 20.0 * seg[:, 4]
    draw = canvas.draw.line
    for (x0, y0, x1, y1), w, v in zip(px.tolist(), widths.tolist(), values.tolist()):
        draw(((x0, y0), (x1, y1)), fill=v, width=w)
    field = canvas.field()
    field = ndimage.gaussian_filter(field, 0.45 * size / 256, truncate=2.0)
    x, y = grid(size)
    hila = np.zeros(x.shape, dtype=bool)
    for s in (-1, 1):
        hx, hy = hilum(p, s)
        hila |= (x - hx) ** 2 + ((y - hy) / 1.6) ** 2 < 0.08 ** 2
    return (field * (lungs | hila)).astype(F32)


# --------------------------------------------------------------------------------------------
# Body frame: soft tissue and bones


def _body(p: Patient, size: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue and bone attenuation in the body frame, and its structure bits."""
    soft = _soft_tissue(p, x, y)
    ribs, rib_mask = _ribs(p, x, y, rng)
    clav, clav_mask = _clavicles(p, x, y)
    spine, spine_mask = _spine(p, x, y)
    shoulder = _shoulder_girdle(p, size, x, y)
    density = p.bone_density
    bone = density * (ribs + 3.4 * clav + spine) + density * shoulder
    bits = (spine_mask.astype(np.uint16) << MASK_BITS["spine"])
    bits |= clav_mask.astype(np.uint16) << MASK_BITS["clavicles"]
    bits |= rib_mask.astype(np.uint16) << MASK_BITS["ribs"]
    return (soft + bone).astype(F32), bits


def _soft_tissue(p: Patient, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Projected soft-tissue thickness (cm): neck, shoulders, chest wall, abdomen, breasts."""
    u = np.abs(x)
    row = y[:, :1]
    hw = p.body_half_width * (1.0 - 0.04 * (row - 0.15) ** 2)
    # Shoulder line: the neck below y=-1, sloping trapezius to the shoulders at the image corners.
    shoulder_line = -1.03 + 0.36 * smoothstep((u[:1, :] - 0.22) / 0.8) ** 1.4
    torso = (y > shoulder_line) & (u < hw)
    centre = 20.0 + 8.0 * p.habitus + 3.0 * smoothstep((row - 0.4) / 0.5)
    neck = 11.0 + 2.0 * p.habitus
    centre = neck + (centre - neck) * smoothstep((row + 0.95) / 0.35)
    profile = np.sqrt(np.clip(1.0 - (u / hw) ** 2, 0.0, 1.0))
    # Soft edge over ~3 mm under the shoulder line so the outline is not a hard cut.
    edge = smoothstep((y - shoulder_line) / 0.03)
    soft = centre * profile * edge * torso
    if p.breast_size > 0:
        for s in (-1, 1):
            cx, cy = s * 0.5, 0.3
            rx, ry = 0.36 + 0.08 * p.breast_size, 0.24 + 0.06 * p.breast_size
            q = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
            fade = smoothstep((y - (cy - 1.2 * ry)) / (1.6 * ry))  # fades out upwards
            soft += 4.0 * p.breast_size * np.sqrt(np.clip(1.0 - q, 0.0, 1.0)) ** 0.7 * fade
    return soft.astype(F32)


def _arc_distance(u: np.ndarray, v: np.ndarray, a: float, b: float, posterior: bool) -> tuple[np.ndarray, np.ndarray]:
    """Approximate signed distance to a quarter (super)ellipse and how vertical it runs there.

    Posterior arcs use ``|u/a|^1.5 + |v/b|^1.5 = 1`` (curved along their whole length),
    anterior arcs a plain ellipse.
    """
    au = np.abs(u) / a + 1e-6
    av = np.abs(v) / b + 1e-6
    if posterior:
        su, sv = np.sqrt(au), np.sqrt(av)
        r = np.cbrt((au * su + av * sv) ** 2)
        scale = 1.0 / np.sqrt(r)
        gx, gy = scale * su / a, scale * sv / b
    else:
        r = np.sqrt(au * au + av * av)
        gx, gy = au / (r * a), av / (r * b)
    g2 = gx * gx + gy * gy
    return (r - 1.0) / np.sqrt(g2), gx * gx / g2


def _ribs(p: Patient, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Twelve pairs of ribs as tilted hoops projected to half-(super)ellipses.

    The upper arc of each hoop is the posterior rib (leaves the spine, rises a little, curves
    down along the lateral chest wall, brighter where it is seen end-on); the lower arc is the
    anterior rib (slopes down towards the midline, fainter, and fades at the costochondral
    junction, where the cartilage is invisible unless calcified).
    """
    out = np.zeros(x.shape, dtype=F32)
    mask = np.zeros(x.shape, dtype=bool)
    col = x[0]
    row = y[:, 0]
    y0 = p.apex_y - 0.03
    uc = 0.12
    for k in range(1, 13):
        y_top = y0 + (k - 1) * p.rib_spacing + rng.normal(0.0, 0.004)
        b_top, b_bot = 0.3 + 0.012 * k, 0.2 + 0.014 * k
        hw_post, hw_ant = 0.02 + 0.0012 * k, 0.026
        yc = y_top + b_top
        cc = 0.25 + 0.012 * k + rng.normal(0.0, 0.01)  # costochondral junction
        floating = k >= 11
        for s in (-1, 1):
            wall = float(wall_u(p, np.asarray(min(yc, cp_y(p, s) + 0.1)), s))
            a = wall + 0.012 - uc if k > 1 else 0.2
            c_lo, c_hi = sorted((s * 0.03, s * (uc + a + hw_ant + 0.02)))
            c0, c1 = np.searchsorted(col, c_lo), np.searchsorted(col, c_hi)
            halves = [(True, y_top - hw_post - 0.01, yc)]
            if not floating:
                halves.append((False, yc, yc + b_bot + hw_ant + 0.01))
            for posterior, top, bottom in halves:
                r0, r1 = np.searchsorted(row, top), np.searchsorted(row, bottom)
                if r1 <= r0 or c1 <= c0:
                    continue
                xs, ys = x[r0:r1, c0:c1], y[r0:r1, c0:c1]
                su = s * xs
                d, vertical = _arc_distance(su - uc, ys - yc, a, b_top if posterior else b_bot, posterior)
                if posterior:
                    hw = hw_post
                    prof = tube_profile(d, hw, cortex=0.35, marrow=0.45)
                    vis = smoothstep((su - 0.035) / 0.03) * (1.0 + 0.7 * vertical)
                    if floating:
                        vis = vis * smoothstep((0.55 - su) / 0.08)
                else:
                    hw = hw_ant
                    prof = tube_profile(d, hw, cortex=0.3, marrow=0.5)
                    ant = smoothstep((su - cc) / 0.05) * (0.9 if k < 9 else 0.5) if k < 12 else 0.0
                    calc = p.costal_calcification * 0.35 * (su > 0.1) * (su <= cc + 0.05) if k < 10 else 0.0
                    vis = 0.5 * (ant + calc)
                out[r0:r1, c0:c1] += (1.9 * prof * vis).astype(F32)
                mask[r0:r1, c0:c1] |= (np.abs(d) < hw) & (vis > 0.2)
    return out, mask


def _clavicles(p: Patient, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clavicles: S-shaped bones from the sternal notch up to the acromion."""
    out = np.zeros(x.shape, dtype=F32)
    mask = np.zeros(x.shape, dtype=bool)
    y_med, y_lat = p.apex_y + 0.3, p.apex_y + 0.07
    for s in (-1, 1):
        su = s * x
        t = (su - 0.06) / 0.66
        tc = np.clip(t, 0.0, 1.0)
        f = y_med + (y_lat - y_med) * tc + 0.018 * np.sin(2.0 * np.pi * tc)
        df = ((y_lat - y_med) + 0.036 * np.pi * np.cos(2.0 * np.pi * tc)) / 0.66
        d = (y - f) / np.sqrt(1.0 + df * df)
        hw = 0.03 + 0.012 * bump(tc, 0.0, 0.25) + 0.01 * bump(tc, 1.0, 0.2)
        ends = smoothstep(t / 0.04) * smoothstep((1.0 - t) / 0.04)
        prof = tube_profile(d, hw, cortex=0.3, marrow=0.5) * ends
        out += prof.astype(F32)
        mask |= (np.abs(d) < hw) & (ends > 0.5)
    return out, mask


def _spine(p: Patient, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thoracic spine: vertebral bodies with endplates, pedicle rings, spinous processes."""
    # Only a central band of columns can hold bone (width <= 0.12, transverse processes
    # <= 1.5 widths, scoliosis <= 0.04): compute there and pad.
    band = np.abs(x[0]) < 0.24
    c0, c1 = int(np.argmax(band)), len(band) - int(np.argmax(band[::-1]))
    spine_band, mask_band = _spine_band(p, x[:, c0:c1], y[:, c0:c1])
    spine = np.zeros(x.shape, dtype=F32)
    mask = np.zeros(x.shape, dtype=bool)
    spine[:, c0:c1] = spine_band
    mask[:, c0:c1] = mask_band
    return spine, mask


def _spine_band(p: Patient, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pitch = p.rib_spacing
    y0 = p.apex_y - 0.06
    xs = p.scoliosis * np.sin(np.pi * (y + 1.0) / 2.0)
    k = np.floor((y - y0) / pitch)
    v = (y - y0) / pitch - k
    width = 0.072 + 0.0033 * np.clip(k, -2, 14)
    dx = (x - xs) / width
    # Vertebral body: rounded rectangle between the thin disc spaces, faint cortical rim.
    dy = np.abs(v - 0.5) / 0.45
    q = dx ** 4 + dy ** 6
    body = (q < 1.0) * (0.9 * np.sqrt(np.clip(1.0 - dx * dx, 0.0, 1.0)) + 0.25 * smoothstep((q - 0.6) / 0.4))
    body = body + 0.35 * np.sqrt(np.clip(1.0 - dx * dx, 0.0, 1.0))  # disc spaces are not empty
    # Pedicles: cortical rings near the upper-lateral corners of each body.
    ped = np.zeros(x.shape)
    for side in (-1.0, 1.0):
        r = np.sqrt(((dx - side * 0.72) / 0.22) ** 2 + ((v - 0.38) / 0.2) ** 2)
        ped += np.clip(1.0 - np.abs(r - 0.8) / 0.35, 0.0, 1.0)
    # Spinous process: a teardrop in the midline over the lower half.
    spinous = np.clip(1.0 - (dx / 0.2) ** 2 - ((v - 0.85) / 0.25) ** 2, 0.0, 1.0)
    # Transverse processes.
    trans = (np.abs(dx) > 0.9) * (np.abs(dx) < 1.5) * np.clip(1.0 - ((v - 0.42) / 0.13) ** 2, 0.0, 1.0)
    spine = 1.5 * body + 0.7 * ped + 0.6 * spinous + 0.4 * trans
    spine *= smoothstep((y - (p.apex_y - 0.35)) / 0.1) * 0.85 + 0.15
    mask = (np.abs(dx) < 1.0) & (y > p.apex_y - 0.2)
    return spine.astype(F32), mask


def _shoulder_girdle(p: Patient, size: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Scapulae (projected lateral to the lungs) and humeral heads."""
    canvas = Canvas(size, supersample=2)
    ay = p.apex_y
    for s in (-1, 1):
        w = p.thorax_half_width
        blade = np.array([(0.5, ay + 0.03), (0.8, ay + 0.06), (w + 0.1, ay + 0.2), (w + 0.02, ay + 0.7),
                          (w - 0.08, ay + 0.62), (0.55, ay + 0.2)])
        blade[:, 0] *= s
        canvas.polygon(blade, 0.7)
        lateral = np.array([(0.84, ay + 0.16), (w + 0.08, ay + 0.35), (w + 0.01, ay + 0.68)])
        lateral[:, 0] *= s
        canvas.polyline(lateral, 0.025, 1.4)
        canvas.ellipse((s * 0.86, ay + 0.1), (0.035, 0.06), 2.0)  # glenoid
        canvas.polyline(np.array([(s * 0.62, ay + 0.05), (s * 0.85, ay - 0.01)]), 0.04, 1.6)  # spine/acromion
    girdle = ndimage.gaussian_filter(canvas.field(), 0.8 * size / 256)
    # Humeral heads: spheres at the top corners (only the top rows can hold them).
    cy, r = p.apex_y + 0.06, 0.12
    rows = slice(0, int(np.searchsorted(y[:, 0], cy + r)) + 1)
    xs, ys = x[rows], y[rows]
    for s in (-1, 1):
        cx = s * (p.thorax_half_width + 0.2)
        q = ((xs - cx) ** 2 + (ys - cy) ** 2) / (r * r)
        girdle[rows] += 5.0 * np.sqrt(np.clip(1.0 - q, 0.0, 1.0)) * (0.55 + 0.45 * smoothstep((q - 0.7) / 0.3))
    return girdle.astype(F32)
