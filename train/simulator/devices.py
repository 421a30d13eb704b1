"""Support devices: radio-opaque tubes, lines, wires and generators, drawn in the thorax frame.

Each device's path follows the patient's anatomy (trachea, carina, superior vena cava, heart,
stomach, costophrenic angles) plus small jitter from ``Device.seed``. Values are attenuation in
cm water-equivalent: plastic tube walls ~0.3, barium stripes ~2.5, steel wire ~5, a pacemaker
can ~9 (all times :data:`RADIO_OPACITY`), so every device is clearly brighter than bone.
"""

from __future__ import annotations

import functools

import numpy as np

from .anatomy import carina, cp_y, dome_y, wall_u
from .geometry import F32, Canvas, spline
from .params import Device, Patient, side_sign

RADIO_OPACITY = 3.0
"""Scale of every drawn value: a sub-millimetre wire averaged over a 1.6 mm pixel still has to
read as white, as lines and tubes do on real radiographs."""


def device_field(patient: Patient, size: int, device: Device) -> np.ndarray:
    """The attenuation (cm water-equivalent) of one device on the thorax-frame grid (cached).

    Args:
        patient: the patient (devices follow the anatomy).
        size: grid size S.
        device: the device.

    Returns:
        (S, S) float32, exactly zero away from the device. Shared by the cache: do not modify.
    """
    return _device_field(patient, size, device)


@functools.lru_cache(maxsize=32)
def _device_field(patient: Patient, size: int, device: Device) -> np.ndarray:
    canvas = Canvas(size, supersample=2, min_width_px=1.0)
    rng = np.random.default_rng(device.seed)
    _DRAW[device.kind](canvas, patient, device, rng)
    field = canvas.field() * F32(RADIO_OPACITY)
    field.flags.writeable = False
    return field


def devices_field(patient: Patient, size: int, devices: tuple[Device, ...]) -> np.ndarray:
    """Sum of :func:`device_field` over ``devices`` (in a fixed order), (S, S) float32."""
    out = np.zeros((size, size), dtype=F32)
    for device in sorted(devices, key=lambda d: (d.kind, d.side or "", d.seed)):
        out += device_field(patient, size, device)
    return out


def _j(rng: np.random.Generator, scale: float = 0.01) -> float:
    return float(rng.normal(0.0, scale))


def _ett(c: Canvas, p: Patient, d: Device, rng: np.random.Generator) -> None:
    """Endotracheal tube: faint tube walls with a radio-opaque stripe; tip 4-6 cm above the carina."""
    cx, cy = carina(p)
    tip = cy - rng.uniform(0.2, 0.3)
    path = spline([(p.trachea_x + _j(rng, 0.015), -1.05), (p.trachea_x + _j(rng, 0.006), (tip - 1.05) / 2),
                   (p.trachea_x + _j(rng, 0.004), tip)], 48)
    c.polyline(path, 0.036, 0.35)
    c.polyline(path + [0.011, 0.0], 0.007, 3.5)


def _ng_tube(c: Canvas, p: Patient, d: Device, rng: np.random.Generator) -> None:
    """Nasogastric tube down the oesophagus, through the hiatus into the stomach."""
    _, cy = carina(p)
    dome_mid = float(dome_y(p, np.asarray(0.05)))
    dome_l = float(dome_y(p, np.asarray(0.3)))
    pts = [(p.trachea_x + 0.03 + _j(rng), -1.05), (0.025 + _j(rng, 0.005), cy),
           (0.035 + _j(rng, 0.008), p.heart_y), (0.07, dome_mid + 0.04),
           (0.2 + _j(rng, 0.02), dome_l + 0.14), (0.3 + _j(rng, 0.03), dome_l + 0.24 + _j(rng, 0.02))]
    path = spline(pts, 96)
    c.polyline(path[:-8], 0.012, 2.4)
    c.dashes(path[-9:], 0.012, 2.4, on=2, off=1)  # side holes near the tip


def _cvc(c: Canvas, p: Patient, d: Device, rng: np.random.Generator) -> None:
    """Central venous catheter via the internal jugular (right) or subclavian (left) vein,
    tip at the cavoatrial junction."""
    _, cy = carina(p)
    tip = (-0.075 + _j(rng, 0.008), cy + rng.uniform(0.16, 0.26))
    if d.side == "right":
        pts = [(-0.2 + _j(rng, 0.02), -1.05), (-0.13, p.apex_y + 0.18), (-0.09, cy - 0.02), tip]
    else:
        pts = [(0.6 + _j(rng, 0.03), p.apex_y + 0.22), (0.32, p.apex_y + 0.26), (0.1, p.apex_y + 0.3),
               (-0.05, cy - 0.02), tip]
    path = spline(pts, 80)
    c.polyline(path, 0.009, 1.9)


def _cardiac_device(c: Canvas, p: Patient, d: Device, rng: np.random.Generator) -> None:
    """Pacemaker / ICD: generator in the infraclavicular pocket, leads through the subclavian
    vein and superior vena cava to the right atrium and right-ventricular apex."""
    s = side_sign(d.side)
    _, cy = carina(p)
    gen = (s * (0.5 + _j(rng, 0.03)), p.apex_y + 0.3 + _j(rng, 0.02))
    half = (0.1, 0.07) if d.kind == "icd" else (0.08, 0.058)
    hs = p.heart_size
    ra_tip = (p.heart_x - 0.1 * hs, p.heart_y - 0.08 * hs)
    rv_tip = (p.heart_x + 0.2 * hs + _j(rng, 0.015), p.heart_y + 0.16 * hs)
    loop = [(gen[0] - s * 0.06, gen[1] - 0.06), (gen[0] + s * 0.02, gen[1] - 0.1),
            (gen[0] - s * 0.1, gen[1] - 0.1)]
    venous = [(s * 0.3, p.apex_y + 0.24), (s * 0.12, p.apex_y + 0.3), (-0.06, cy - 0.02),
              (-0.08, cy + 0.2)]
    ra = spline(loop + venous + [(-0.13, p.heart_y - 0.02), ra_tip], 96)
    rv = spline(loop + venous + [(-0.05, p.heart_y + 0.06), (p.heart_x + 0.05, p.heart_y + 0.16), rv_tip], 120)
    c.polyline(ra + [0.006, 0.0], 0.011, 3.5)
    c.polyline(rv, 0.011, 3.5)
    if d.kind == "icd":
        c.polyline(rv[-40:-26], 0.024, 5.0)  # superior vena cava coil region of the shock lead
        c.polyline(rv[-16:-3], 0.024, 5.0)  # right-ventricular coil
    for tip in (ra_tip, rv_tip):
        c.ellipse(tip, (0.011, 0.011), 5.5)
    c.rounded_rect(gen, half, 0.035, 9.0)
    c.rounded_rect((gen[0], gen[1] - half[1] - 0.012), (half[0] * 0.55, 0.016), 0.01, 2.5)  # header


def _ecg(c: Canvas, p: Patient, d: Device, rng: np.random.Generator) -> None:
    """ECG electrodes (foam pad with a metal snap) and their lead wires leaving the field."""
    spots = [(-0.62, p.apex_y + 0.16), (0.62, p.apex_y + 0.16), (0.58, 0.55), (-0.58, 0.55), (0.15, 0.6)]
    count = int(rng.integers(3, 6))
    for k in range(count):
        ex, ey = spots[k][0] + _j(rng, 0.04), spots[k][1] + _j(rng, 0.04)
        side = 1.0 if ex > 0 else -1.0
        end = (side * rng.uniform(0.9, 1.2), ey + rng.uniform(-0.5, 0.3))
        if rng.random() < 0.5:
            end = (ex + rng.uniform(-0.3, 0.3), -1.15)
        mid = ((ex + end[0]) / 2 + _j(rng, 0.12), (ey + end[1]) / 2 + _j(rng, 0.12))
        c.polyline(spline([(ex, ey), mid, end], 48), 0.005, 1.3)
        c.ellipse((ex, ey), (0.03, 0.03), 0.3)
        c.ellipse((ex, ey), (0.03, 0.03), 0.6, outline=0.004)
        c.ellipse((ex, ey), (0.01, 0.01), 6.0)


def _chest_tube(c: Canvas, p: Patient, d: Device, rng: np.random.Generator) -> None:
    """Chest tube entering the lateral chest wall low, coursing up towards the apex; the
    radio-opaque stripe is interrupted at the sentinel side hole."""
    s = side_sign(d.side)
    bottom = cp_y(p, s)
    wall = float(wall_u(p, np.asarray(bottom - 0.2), s))
    pts = [(s * (wall + 0.22), bottom - 0.02), (s * (wall + 0.02), bottom - 0.14),
           (s * (wall - 0.1), bottom - 0.45 + _j(rng, 0.03)),
           (s * (0.42 + _j(rng, 0.04)), p.apex_y + 0.22 + _j(rng, 0.03))]
    path = spline(pts, 90)
    c.polyline(path, 0.032, 0.45)
    c.polyline(path[:-24], 0.007, 2.6)
    c.polyline(path[-20:], 0.007, 2.6)


def _sternal_wires(c: Canvas, p: Patient, d: Device, rng: np.random.Generator) -> None:
    """Median sternotomy wires: 5-7 twisted steel loops along the midline."""
    count = int(rng.integers(5, 8))
    top, bottom = p.apex_y + 0.3, p.heart_y + 0.1
    for y in np.linspace(top, bottom, count):
        cx = 0.005 + _j(rng, 0.008)
        yy = float(y) + _j(rng, 0.01)
        rx = 0.032 + _j(rng, 0.004)
        c.ellipse((cx, yy), (rx, 0.012), 5.0, outline=0.007)
        knot = cx + (rx if rng.random() < 0.5 else -rx)
        c.ellipse((knot, yy), (0.01, 0.009), 6.5)
        c.polyline(np.array([(knot, yy), (knot + np.sign(knot - cx) * 0.015, yy + 0.015)]), 0.006, 5.0)


_DRAW = {
    "ett": _ett,
    "ng_tube": _ng_tube,
    "cvc": _cvc,
    "pacemaker": _cardiac_device,
    "icd": _cardiac_device,
    "ecg": _ecg,
    "chest_tube": _chest_tube,
    "sternal_wires": _sternal_wires,
}
