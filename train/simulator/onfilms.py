"""Findings and devices rendered on real films: "real-anatomy pairs" with exact counterfactuals.

The simulator's phantoms teach what a finding does; real films teach what a chest looks like.
This module puts the two together: a real radiograph is the prior, a finding or device is
rendered in that film's own geometry, and the follow-up is the exact counterfactual (the same
film, only the rendered change differs), with its change mask.

**Anatomy** (:class:`FilmAnatomy`) comes from a lung mask (real masks such as the V7 Labs ones,
or the bundled segmenter's): the two lungs split at the mediastinum, per-row medial and lateral
borders, per-column domes, the costophrenic angles, the hila, and the heart between the lungs'
medial borders below the hila. Nothing is assumed about where the patient sits on the canvas.

**The attenuation domain.** A processed radiograph is a monotone, saturating display of the
log-transmitted intensity. Every change is applied to the film's log-odds ``L = logit(p)``, an
attenuation-like scale that saturates as the display does at both ends, and calibrated on the
film itself: ``tissue`` is the film's soft-tissue level (the median of the heart region) and the
*air* a pixel shows is ``max(tissue - blur(L), 0)``. A finding that replaces a fraction ``fill``
of the lung's air by fluid or tissue moves a pixel ``fill * air`` towards the film's own tissue
level, so an effusion on an under-exposed film is as bright as that film's heart, not as a
constant; additive changes (pleural lines, Kerley lines, devices) are in units of the film's
air contrast ``tissue - lung``. The film's grain and ribs stay (they are in the film, fluid does
not remove them); the vascular markings (a band-pass of ``L``) fade where air is replaced, and
vanish in a pneumothorax.

Outside a change's support the counterfactual equals the prior bit for bit.

Kinds (the simulator's :class:`~.params.Findings` and :class:`~.params.Device` parameters, with the
same severity values and words): pleural effusion (dependent, meniscus up the lateral wall,
the costophrenic angle blunted first), consolidation (patchy lobar opacity with air
bronchograms from the film's own airways), edema (perihilar haze, indistinct vessels, Kerley B
lines, alveolar opacities when severe), atelectasis (basal bands, elevated dome, lower-lobe
collapse when severe), pneumothorax (lung collapsed behind a visceral pleural line, no markings
beyond it), cardiomegaly (the heart borders displaced smoothly outwards, the left more) and every
simulator device, drawn along the film's anatomy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from engine.errors import InputError

from .geometry import F32, smooth_noise, smoothstep
from .params import Device, Findings, Patient, Severity, expand_sides

LOGIT_EPS = 2e-3
"""Pixels are clipped to [eps, 1 - eps] before the logit (8-bit films have exact 0 and 1)."""
SIDES = {"right": -1, "left": 1}
"""Patient side -> image direction (PA display: the patient's right is on the image's left)."""


def to_logit(p: np.ndarray) -> np.ndarray:
    """[0, 1] pixels to log-odds (float32)."""
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(p / (1.0 - p)).astype(F32)


def from_logit(x: np.ndarray) -> np.ndarray:
    """Log-odds back to [0, 1] pixels (float32)."""
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(F32)


# --------------------------------------------------------------------------------------------
# Anatomy of one film


@dataclass(frozen=True)
class Lung:
    """One lung on the canvas (pixel units; ``sign`` -1 = patient's right = image left).

    Attributes:
        mask: (S, S) bool.
        sign: -1 (right lung, image left) or +1 (left lung, image right).
        top: apex row; bottom: lowest row.
        medial, lateral: (S,) float column of the medial / lateral border per row (nan off the lung).
        dome: (S,) float lowest lung row per column (nan off the lung).
        cp: (x, y) of the costophrenic angle (the lowest point of the lateral third).
        hilum: (x, y) on the medial border, 40 % of the way down.
        edt: (S, S) distance to the lung's border inside it (px).
    """

    mask: np.ndarray
    sign: int
    top: int
    bottom: int
    medial: np.ndarray
    lateral: np.ndarray
    dome: np.ndarray
    cp: tuple[float, float]
    hilum: tuple[float, float]
    edt: np.ndarray

    @property
    def height(self) -> float:
        """Apex to costophrenic angle, px."""
        return max(self.cp[1] - self.top, 1.0)

    def edges_at(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Medial and lateral border columns for every row, extended past the apex and base
        with the nearest row that has lung."""
        valid = np.flatnonzero(np.isfinite(self.medial))
        r = np.clip(rows, valid[0], valid[-1]).astype(int)
        med = np.interp(r, valid, self.medial[valid])
        lat = np.interp(r, valid, self.lateral[valid])
        return med, lat

    def lateral_fraction(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """0 at the medial border, 1 at the lateral border (clipped), per pixel."""
        med, lat = self.edges_at(y[:, 0])
        med, lat = med[:, None], lat[:, None]
        return np.clip((x - med) / np.where(np.abs(lat - med) < 1, np.sign(lat - med + 1e-6), lat - med), 0.0, 1.0)


@dataclass(frozen=True)
class FilmAnatomy:
    """A real film on its canvas and the anatomy fitted to it (see the module docstring).

    Attributes:
        image: (S, S) float32 canvas in [0, 1].
        logit: :func:`to_logit` of ``image``.
        lungs: ``{"right": Lung, "left": Lung}`` (the patient's sides).
        heart: (S, S) bool, between the lungs' medial borders below the hila.
        heart_rows: (S,) bool, rows the heart spans.
        heart_right, heart_left: (S,) float heart border columns per row (nan elsewhere).
        tissue: the film's soft-tissue level (median log-odds of the heart region).
        lung_level: median log-odds of the lungs.
        air: (S, S) how much air each pixel shows, ``max(tissue - blur(L), 0)``.
        markings: (S, S) what a fill hides of the film's detail (``L`` minus its 5 px blur at 256 px):
            all of its darker part (airways, gaps) and 80 % of its bounded brighter part.
        texture: (S, S) [0, 1] smooth random field (patchiness of opacities), from ``seed``.
        content: (S, S) bool, the film's own pixels (a margin in from the letterbox); changes stay inside.
        base: (S, S) the film's log-odds blurred over 4 px (at 256 px): its local level.
        vessels: (S, S) thin bright lines of the film (a white top-hat of 5 px at 256 px): the
            vessels, without the ribs' edges that a band-pass also holds.
    """

    image: np.ndarray
    logit: np.ndarray
    lungs: dict[str, Lung]
    heart: np.ndarray
    heart_rows: np.ndarray
    heart_right: np.ndarray
    heart_left: np.ndarray
    tissue: float
    lung_level: float
    air: np.ndarray
    markings: np.ndarray
    texture: np.ndarray
    seed: int
    content: np.ndarray
    base: np.ndarray
    vessels: np.ndarray

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @property
    def contrast(self) -> float:
        """The film's air contrast, ``tissue - lung_level`` (log-odds)."""
        return max(self.tissue - self.lung_level, 0.3)

    @property
    def scale(self) -> float:
        """Pixels per 'lung height' unit: the mean apex-to-costophrenic height of the two lungs."""
        return 0.5 * (self.lungs["right"].height + self.lungs["left"].height)

    @property
    def lung_mask(self) -> np.ndarray:
        return self.lungs["right"].mask | self.lungs["left"].mask

    def cardiothoracic_ratio(self) -> float:
        """Widest heart (between the borders) over the widest thorax (outer lung edges)."""
        return _ctr(self.heart, self.lung_mask)


def _ctr(heart: np.ndarray, lungs: np.ndarray) -> float:
    def width(mask: np.ndarray) -> int:
        cols = np.flatnonzero(mask.any(axis=0))
        return int(cols[-1] - cols[0] + 1) if cols.size else 0

    h, t = width(heart), width(lungs)
    return h / t if h and t else float("nan")


def split_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left lung, image-right lung) of a both-lungs mask, split at the mediastinum.

    The split column is the emptiest column in the middle 40 % of the mask's horizontal extent;
    each side keeps its largest connected component.

    Raises:
        InputError: no mask, or one side without lung.
    """
    mask = np.asarray(mask, dtype=bool)
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size < 8:
        raise InputError("the lung mask is empty")
    lo, hi = cols[0], cols[-1]
    a, b = int(lo + 0.3 * (hi - lo)), int(lo + 0.7 * (hi - lo)) + 1
    counts = mask[:, a:b].sum(axis=0).astype(float)
    if counts.min() > 0.25 * mask.sum(axis=0).max():
        raise InputError("the lung mask shows no mediastinum between two lungs")
    mid = a + int(np.flatnonzero(counts == counts.min()).mean())
    left_img, right_img = mask.copy(), mask.copy()
    left_img[:, mid:] = False
    right_img[:, :mid] = False
    out = []
    for part in (left_img, right_img):
        labels, n = ndimage.label(part)
        if n == 0:
            raise InputError("the lung mask has lung on one side only")
        sizes = ndimage.sum(part, labels, index=np.arange(1, n + 1))
        out.append(labels == (1 + int(np.argmax(sizes))))
    if min(o.sum() for o in out) < 0.15 * max(o.sum() for o in out):
        raise InputError("one lung of the mask is less than 15 % of the other; not a usable lung mask")
    return out[0], out[1]


def _smooth_outline(mask: np.ndarray, size: int) -> np.ndarray:
    """A lung's mask closed over 4 px (at 256 px) with holes filled: a lung's outline has no notches
    or islands, but a segmenter's mask can (at the hilum, under a device), and every fill would
    leave them as dark holes in the rendered finding."""
    r = max(1, int(round(4 * size / 256)))
    padded = np.pad(mask, r + 1)
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool), iterations=r)[r + 1:-r - 1, r + 1:-r - 1]
    return ndimage.binary_fill_holes(closed)


def _fit_lung(mask: np.ndarray, sign: int) -> Lung:
    size = mask.shape[0]
    rows = np.flatnonzero(mask.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1])
    medial = np.full(size, np.nan, dtype=F32)
    lateral = np.full(size, np.nan, dtype=F32)
    for r in rows:
        c = np.flatnonzero(mask[r])
        # image-left lung (sign -1): lateral = smallest column
        medial[r], lateral[r] = (c[-1], c[0]) if sign < 0 else (c[0], c[-1])
    dome = np.full(size, np.nan, dtype=F32)
    cols = np.flatnonzero(mask.any(axis=0))
    for c in cols:
        dome[c] = np.flatnonzero(mask[:, c])[-1]
    # costophrenic angle: the lowest point of the lung's lateral third
    c0, c1 = cols[0], cols[-1]
    third = cols[cols <= c0 + (c1 - c0) / 3] if sign < 0 else cols[cols >= c1 - (c1 - c0) / 3]
    cp_col = third[int(np.argmax(dome[third]))]
    cp = (float(cp_col), float(dome[cp_col]))
    hy = top + 0.4 * (cp[1] - top) - (0.03 * (cp[1] - top) if sign > 0 else 0.0)
    hr = int(np.clip(round(hy), top, bottom))
    valid = np.flatnonzero(np.isfinite(medial))
    hr = int(valid[np.argmin(np.abs(valid - hr))])
    hilum = (float(medial[hr]) - sign * 0.08 * abs(float(lateral[hr] - medial[hr])), float(hr))
    edt = ndimage.distance_transform_edt(mask).astype(F32)
    return Lung(mask, sign, top, bottom, medial, lateral, dome, cp, hilum, edt)


def _heart(right: Lung, left: Lung, logit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cardiac silhouette: per row below the hila, the heart borders where the film turns from
    bright (heart in front of the lung) to dark (aerated lung) going out from the midline.

    Lung masks drawn as the lungs' full extent (V7's, the simulator's) run behind the heart, so
    their medial borders are not the heart's: each border is searched on the film, in the medial
    60 % of the lung (at least at its medial border), then smoothed over the rows with a
    quadratic fit.
    """
    size = logit.shape[0]
    top = int(round(max(right.hilum[1], left.hilum[1]) + 0.06 * 0.5 * (right.height + left.height)))
    rows = np.arange(size)
    smooth = ndimage.gaussian_filter(logit, 1.5 * size / 256.0)
    borders, bottoms = {}, {}
    for lung in (right, left):
        # the heart sits on the medial part of the dome
        cols = np.flatnonzero(np.isfinite(lung.dome))
        width = cols[-1] - cols[0]
        medial_cols = cols[cols >= cols[-1] - 0.4 * width] if lung.sign < 0 else cols[cols <= cols[0] + 0.4 * width]
        bottoms[lung.sign] = int(round(float(np.median(lung.dome[medial_cols]))))
    bottom = max(bottoms.values())
    for lung in (right, left):
        med, lat = lung.edges_at(rows)
        found_r, found_x = [], []
        for r in range(top, bottoms[lung.sign] + 1):
            if not lung.mask[r].any():
                continue
            span = abs(lat[r] - med[r])
            reach = 0.35 if lung.sign < 0 else 0.6  # the right heart border rarely projects far over the lung
            xs = np.round(med[r] + lung.sign * np.arange(-0.04 * span, reach * span)).astype(int)
            xs = xs[(xs >= 1) & (xs < size - 1)]
            if xs.size < 4:
                continue
            # bright (heart) -> dark (aerated lung) going laterally: the most negative lateral derivative
            g = lung.sign * (smooth[r, xs + lung.sign] - smooth[r, xs - lung.sign])
            if -g.min() < 0.02:
                continue
            found_r.append(r)
            found_x.append(int(xs[int(np.argmin(g))]))
        if len(found_r) < 5:
            x = med[top:bottom + 1]
        else:
            fr, fx = np.asarray(found_r, float), np.asarray(found_x, float)
            fx = ndimage.median_filter(fx, size=7, mode="nearest")
            coef = np.polyfit(fr, fx, 2)
            for _ in range(2):  # drop rows whose crossing was something else (a rib, a line), refit
                resid = np.abs(fx - np.polyval(coef, fr))
                keep = resid <= max(2.5 * np.median(resid), 1.5)
                if keep.sum() >= 5:
                    coef = np.polyfit(fr[keep], fx[keep], 2)
            r_all = np.arange(top, bottom + 1)
            x = np.polyval(coef, np.clip(r_all, fr.min(), fr.max()))  # no extrapolated flaring
            # never inside the mediastinum beyond the lung's medial border
            x = np.where(lung.sign < 0, np.minimum(x, med[top:bottom + 1] + 2), np.maximum(x, med[top:bottom + 1] - 2))
        borders[lung.sign] = x
    in_rows = (rows >= top) & (rows <= bottom)
    hr = np.full(size, np.nan, dtype=F32)
    hl = np.full(size, np.nan, dtype=F32)
    hr[top:bottom + 1] = borders[-1]
    hl[top:bottom + 1] = borders[1]
    cols = np.arange(size)[None, :]
    heart = in_rows[:, None] & (cols > np.nan_to_num(hr, nan=1e9)[:, None]) & (cols < np.nan_to_num(hl, nan=-1e9)[:, None])
    return heart, in_rows, hr, hl


def fit_anatomy(image: np.ndarray, lungs: np.ndarray, *, content: np.ndarray | None = None, seed: int = 0) -> FilmAnatomy:
    """Fits :class:`FilmAnatomy` to a film and its lung mask (both on the same square canvas).

    Args:
        image: (S, S) float [0, 1], bright = attenuating (MONOCHROME2 display).
        lungs: (S, S) bool, both lungs.
        content: (S, S) bool, the film's own pixels on the canvas (not the letterbox padding);
            nothing is ever rendered outside it. Default: the whole canvas.
        seed: the texture field's seed.

    Raises:
        InputError: the mask does not give two lungs, reaches outside the film, or the film
            shows no air contrast.
    """
    image = np.asarray(image, dtype=F32)
    size = image.shape[0]
    lungs = np.asarray(lungs, dtype=bool)
    if image.shape != (size, size) or lungs.shape != image.shape:
        raise InputError(f"film and lung mask must be the same square canvas, got {image.shape} and {lungs.shape}")
    content = np.ones_like(lungs) if content is None else np.asarray(content, dtype=bool)
    inner = ndimage.binary_erosion(content, iterations=max(1, size // 128))
    outside = float((lungs & ~inner).sum()) / max(float(lungs.sum()), 1.0)
    if outside > 0.01:
        raise InputError(f"{outside:.0%} of the lung mask lies outside the film (or on its edge); "
                         "the mask does not fit this film")
    img_left, img_right = (_smooth_outline(m, size) for m in split_lungs(lungs))
    right, left = _fit_lung(img_left, -1), _fit_lung(img_right, 1)
    logit = to_logit(image)
    heart, heart_rows, hr, hl = _heart(right, left, logit)
    core = ndimage.binary_erosion(heart, iterations=max(1, size // 128))
    if core.sum() < 20:
        raise InputError("the lungs leave no room for a heart between them; is the mask a chest's?")
    # soft tissue: the heart and the band just below both domes (liver, spleen); where the heart is
    # under-exposed or overlaps lung, the abdomen under the domes says what a chest full of water shows
    below = np.zeros_like(core)
    px_ = size / 256.0
    for lung in (right, left):
        cols = np.flatnonzero(np.isfinite(lung.dome))
        for c in cols:
            d = int(lung.dome[c])
            below[min(d + int(4 * px_), size - 1):min(d + int(16 * px_), size), c] = True
    below &= ndimage.binary_erosion(content, iterations=max(1, size // 64))
    tissue = float(np.percentile(logit[core | below], 60))
    lung_core = ndimage.binary_erosion(right.mask | left.mask, iterations=max(1, size // 64))
    lung_level = float(np.median(logit[lung_core if lung_core.any() else (right.mask | left.mask)]))
    if tissue - lung_level < 0.15:
        raise InputError("the lungs are not darker than the heart on this film; cannot calibrate it")
    px = size / 256.0
    base = ndimage.gaussian_filter(logit, 4.0 * px)
    # capped at the lungs' own air so that a soft edge reaching the air outside the body stays faint
    air = np.clip(tissue - base, 0.0, 1.25 * (tissue - lung_level)).astype(F32)
    # the air outside the body is darker than any lung: nothing is rendered there
    darkest = float(np.percentile(base[right.mask | left.mask], 2))
    body = ndimage.binary_fill_holes(base >= darkest - 0.15 * (tissue - lung_level))  # a dark bronchus is inside
    inner = inner & ndimage.binary_opening(body, iterations=2)
    fine = ndimage.gaussian_filter(logit, 0.5 * px)
    detail = fine - ndimage.gaussian_filter(logit, 5.0 * px)
    # What fluid or tissue hides where it replaces air: every darker structure (vessels' gaps, the
    # air of the bronchi, which would otherwise stay as black islands in an effusion) and half of
    # most of every brighter one (vessels; bones and wires stay faintly visible through fluid), that part
    # bounded so that an electrode or a dome's edge is not dug out.
    bound = 2.5 * float(np.std(detail[right.mask | left.mask]))
    markings = (np.minimum(detail, 0.0) + 0.8 * np.clip(detail, 0.0, bound)).astype(F32)
    # thin bright lines only (a white top-hat): the vessels, not the ribs' edges
    width = max(3, int(round(5 * px)) | 1)
    vessels = (fine - ndimage.grey_opening(fine, size=(width, width))).astype(F32)
    texture = smooth_noise(np.random.default_rng(seed), size, 6.0 * px)
    return FilmAnatomy(image, logit, {"right": right, "left": left}, heart, heart_rows, hr, hl, tissue, lung_level,
                       air, markings, texture, seed, inner, base.astype(F32), vessels)


# --------------------------------------------------------------------------------------------
# Findings in the film's geometry


@dataclass(frozen=True)
class FilmChange:
    """A change in the film's log-odds: ``fill`` of the air replaced, ``extra`` in units of the
    film's air contrast, ``unmark`` the fraction of the vascular markings removed (all (S, S) or
    None); ``target`` replaces the film's tissue level as what ``fill`` moves towards (the
    cardiomegaly band takes the brightness of the heart beside it)."""

    fill: np.ndarray | None = None
    extra: np.ndarray | None = None
    unmark: np.ndarray | None = None
    target: np.ndarray | None = None  # the level a fill moves towards; default the film's tissue


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(F32)
    return x, y


def _soft(mask: np.ndarray, px: float) -> np.ndarray:
    """A mask softened over ``px`` pixels (values in [0, 1])."""
    return np.clip(ndimage.gaussian_filter(mask.astype(F32), px), 0.0, 1.0)


def _inward(mask: np.ndarray, px: float) -> np.ndarray:
    """A mask softened over ``px`` pixels inwards only: 0 outside, rising to 1 inside. Fluid and
    collapse stay within the lung's outline (the inner margin of the ribs); the chest wall
    outside it keeps its own brightness."""
    return np.clip(2.0 * ndimage.gaussian_filter(mask.astype(F32), px) - 1.0, 0.0, 1.0) * mask


def _fluid_region(lung: Lung, px: float) -> np.ndarray:
    """Where fluid or collapse of one lung may show: the lung's outline grown medially and down
    (masks often stop short of the recesses behind the heart and the domes; the heart and the
    abdomen there are at tissue level already, so filling them changes nothing), but never past
    the lung's lateral border (the chest wall keeps its own brightness). Soft over ``px``."""
    size = lung.mask.shape[0]
    grown = ndimage.binary_dilation(lung.mask, iterations=max(1, int(round(0.08 * lung.height))))
    x, y = _grid(size)
    _, lateral = lung.edges_at(np.arange(size))
    beyond = lung.sign * (x - lateral[:, None])  # > 0 past the lateral border
    below = y > lung.top
    region = _soft(grown & below, px) * np.clip(0.5 - beyond / (2.0 * px), 0.0, 1.0)
    return region.astype(F32)


def _grown(mask: np.ndarray, px: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=max(px, 1))


def _effusion(a: FilmAnatomy, sev: Severity) -> FilmChange:
    """Dependent pleural fluid: blunts the costophrenic angle, then rises with a meniscus up the
    lateral wall; it fills the lung's outline grown into the recess and hides the dome."""
    x, y = _grid(a.size)
    px = a.size / 256.0
    fill = np.zeros_like(x)
    for side in expand_sides(sev.side):
        lung = a.lungs[side]
        h = lung.height
        v = sev.value
        height = (0.04 + 0.62 * v ** 1.1) * h
        lateral = lung.lateral_fraction(x, y)
        bottom = lung.cp[1]
        surface = bottom - height - (0.035 * h + 0.45 * height) * lateral ** 2
        ramp = 0.025 * h + 0.2 * height
        region = _fluid_region(lung, 1.5 * px)
        fill = np.maximum(fill, (smoothstep((y - surface) / ramp) * region).astype(F32))
    return FilmChange(fill=fill, unmark=np.minimum(1.0, 1.5 * fill))


def _pneumothorax(a: FilmAnatomy, sev: Severity) -> FilmChange:
    """Pleural air: the lung collapses towards its base and hilum behind a thin visceral pleural
    line; beyond it no markings, and the space is a little darker."""
    x, y = _grid(a.size)
    px = a.size / 256.0
    extra = np.zeros_like(x)
    unmark = np.zeros_like(x)
    fill = np.zeros_like(x)
    for side in expand_sides(sev.side):
        lung = a.lungs[side]
        v = sev.value
        ax = lung.hilum[0] + lung.sign * 0.1 * lung.height
        ay = lung.cp[1] - 0.1 * lung.height
        c = 1.0 - (0.07 + 0.5 * v)
        xs, ys = ax + (x - ax) / c, ay + (y - ay) / c
        inner = ndimage.map_coordinates(lung.edt, [ys, xs], order=1, mode="constant", cval=0.0).astype(F32) * c
        collapsed = (inner > 0.0) & lung.mask
        space = lung.mask & ~collapsed
        soft_space = _soft(space, 0.7 * px) * lung.mask
        line_w = 1.2 * px
        line = np.clip(1.0 - inner / line_w, 0.0, 1.0) * collapsed
        extra += -0.25 * soft_space + 0.5 * line
        unmark = np.maximum(unmark, soft_space)
        fill = np.maximum(fill, (0.12 * v * collapsed).astype(F32))
    # no vessels beyond the pleural line, but the ribs stay: remove the narrow band only
    return FilmChange(fill=fill, extra=(extra - unmark * a.vessels / a.contrast).astype(F32))


def _zone_seed(lung: Lung, zone: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float]]:
    """The lobe-like region of ``zone`` (soft, (S, S)) and a seed point inside it."""
    size = lung.mask.shape[0]
    x, y = _grid(size)
    h = lung.height
    fissure = lung.hilum[1] - 0.01 * h + rng.normal(0.0, 0.015 * h)
    sharp = 0.012 * h if lung.sign < 0 else 0.06 * h  # only the right lung has a minor fissure
    lateral = lung.lateral_fraction(x, y)
    if zone == "upper":
        lobe = smoothstep((fissure - y) / sharp)
    elif zone == "middle":
        lobe = smoothstep((y - fissure) / sharp) * smoothstep((0.5 - lateral) / 0.15)
        lobe = lobe * smoothstep((lung.cp[1] - 0.08 * h - y) / (0.07 * h))
    else:
        lobe = smoothstep((y - lung.hilum[1] - 0.04 * h) / (0.17 * h))
    weights = (lobe * lung.edt * (lung.edt > 2)).ravel().astype(np.float64)
    if weights.sum() <= 0:
        weights = lung.mask.ravel().astype(np.float64)
    k = int(rng.choice(weights.size, p=weights / weights.sum()))
    return lobe.astype(F32), (float(k % size), float(k // size))


def _consolidation(a: FilmAnatomy, sev: Severity) -> FilmChange:
    """Lobar airspace opacity spreading from a seed through one zone, patchy, with air bronchograms
    (the film's own dark airways stay darker) and silhouetting of the borders it meets."""
    x, y = _grid(a.size)
    px = a.size / 256.0
    rng = np.random.default_rng(sev.seed)
    zone = sev.zone or ("upper", "middle", "lower")[int(rng.integers(0, 3))]
    fill = np.zeros_like(x)
    bronchi = np.clip(-a.markings / (np.std(a.markings[a.lung_mask]) * 2.0 + 1e-6), 0.0, 1.0)
    for side in expand_sides(sev.side):
        lung = a.lungs[side]
        lobe, (sx, sy) = _zone_seed(lung, zone, rng)
        v = sev.value
        reach = (0.1 + 0.45 * v) * 0.85 * lung.height
        d = np.sqrt((x - sx) ** 2 + (y - sy) ** 2) / reach
        shape = np.clip(1.0 - d + 0.6 * (a.texture - 0.5), 0.0, 1.0) ** 0.7 * lobe * _soft(lung.mask, 1.0 * px)
        density = 0.45 + 0.5 * v
        fill = np.maximum(fill, (density * shape * (1.0 - 0.45 * bronchi)).astype(F32))
    return FilmChange(fill=fill, unmark=np.minimum(1.0, fill / 0.3) * 0.8)


def _atelectasis(a: FilmAnatomy, sev: Severity) -> FilmChange:
    """Basal volume loss: plate-like bands above an elevated dome; lower-lobe collapse when severe."""
    x, y = _grid(a.size)
    px = a.size / 256.0
    rng = np.random.default_rng(sev.seed)
    fill = np.zeros_like(x)
    v = sev.value
    for side in expand_sides(sev.side):
        lung = a.lungs[side]
        h = lung.height
        dome = np.interp(np.arange(a.size), np.flatnonzero(np.isfinite(lung.dome)),
                         lung.dome[np.isfinite(lung.dome)]).astype(F32)[None, :]
        lift = (0.02 + 0.1 * v) * 0.85 * h
        f = smoothstep((y - (dome - lift)) / lift)
        bands = np.zeros_like(x)
        lateral = lung.lateral_fraction(x, y)
        for k in range(3):
            if v < 0.2 * k:
                continue
            frac = rng.uniform(0.3, 0.7)
            col = lung.medial[np.isfinite(lung.medial)]
            cx_row = int(np.clip(round(lung.cp[1] - (0.1 + 0.07 * k) * h), lung.top, lung.bottom))
            med, lat = lung.edges_at(np.array([cx_row]))
            cx = float(med[0] + frac * (lat[0] - med[0]))
            cy = float(np.interp(cx, np.arange(a.size), dome[0])) - (0.09 + 0.07 * k) * 0.85 * h + rng.normal(0.0, 0.012 * h)
            del col
            angle = np.radians(rng.uniform(-12.0, 12.0))
            along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
            across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
            half_len = (0.1 + 0.1 * v) * 0.85 * h
            thick = max((0.012 + 0.014 * v) * 0.85 * h, 1.2 * px)
            band = np.clip(1.0 - np.abs(across) / thick, 0.0, 1.0) * smoothstep((half_len - np.abs(along)) / (0.04 * h))
            bands = np.maximum(bands, band * min(1.0, 0.5 + (v - 0.2 * k)))
        f = np.maximum(f, 0.5 * bands)
        if v > 0.4:
            strength = min(1.0, (v - 0.4) / 0.4)
            top = lung.cp[1] - 0.45 * h
            width = (0.08 + 0.3 * strength) * np.clip((y - top) / (0.45 * h), 0.0, 1.0)
            tri = smoothstep((width - lateral) / 0.05) * smoothstep((y - top) / (0.05 * h))
            f = np.maximum(f, 0.8 * strength * tri)
        region = _fluid_region(lung, 1.0 * px)
        fill = np.maximum(fill, (f * region).astype(F32))
    return FilmChange(fill=fill, unmark=np.minimum(1.0, 1.2 * fill))


def _edema(a: FilmAnatomy, sev: Severity) -> FilmChange:
    """Pulmonary edema: indistinct vessels, perihilar (bat-wing) haze, Kerley B lines at the
    lateral bases, basal interstitial fluid, alveolar opacities when severe."""
    x, y = _grid(a.size)
    px = a.size / 256.0
    v = sev.value
    rng = np.random.default_rng(sev.seed + 17)
    lungs = _soft(a.lung_mask, 1.0 * px)
    haze = np.zeros_like(x)
    lines = np.zeros_like(x)
    for side in ("right", "left"):
        lung = a.lungs[side]
        h = lung.height
        hx, hy = lung.hilum
        reach = (0.25 + 0.35 * v) * 0.85 * h
        d = np.sqrt(((x - hx) / 1.2) ** 2 + (y - hy) ** 2) / reach
        haze = np.maximum(haze, np.clip(1.0 - d, 0.0, 1.0) ** 1.3)
        n_lines = int(round(9 * min(1.0, v * 1.6)))
        for _ in range(n_lines):
            yk = lung.cp[1] - 0.04 * h - rng.uniform(0.0, 0.3 * h)
            _, lat = lung.edges_at(np.array([int(np.clip(round(yk), lung.top, lung.bottom))]))
            length = rng.uniform(0.03, 0.06) * h
            inward = -lung.sign  # from the lateral wall towards the midline
            x0 = float(lat[0])
            seg = (np.abs(y - yk) < 0.6 * px) & (inward * (x - x0) >= 0) & (inward * (x - x0) < length) & lung.mask
            lines = np.maximum(lines, seg.astype(F32))
    alveolar = np.clip((v - 0.45) / 0.55, 0.0, 1.0) * np.clip(a.texture * 1.6 - 0.3, 0.0, 1.0)
    basal = np.zeros_like(x)
    for side in ("right", "left"):
        lung = a.lungs[side]
        basal = np.maximum(basal, smoothstep((y - lung.hilum[1]) / (0.6 * lung.height)) * 0.15 * v)
    fill = np.clip((0.12 + 0.55 * v ** 1.5) * haze + 0.5 * alveolar * (0.4 + 0.6 * haze) + basal, 0.0, 0.95) * lungs
    extra = 0.35 * ndimage.gaussian_filter(lines, 0.5 * px) * lungs
    return FilmChange(fill=fill.astype(F32), extra=extra.astype(F32), unmark=(np.minimum(1.0, 0.5 * v + fill) * lungs).astype(F32))


def cardiomegaly_warp(a: FilmAnatomy, sev: Severity) -> tuple[np.ndarray, np.ndarray]:
    """Cardiomegaly as a smooth displacement of the heart borders: ``(source_cols, heart)``.

    Row by row over the heart, the picture is stretched horizontally away from the heart's
    centre: each border moves out by its share of the growth (the left two thirds, the right one
    third), the heart in between stretches with it, and the lung beyond is compressed over a
    margin that fades to nothing. Every texture moves with the border, so nothing is painted in.
    The vertical profile is zero at the top of the heart, largest in its lower half and still
    present at the diaphragm.

    Returns:
        ``source_cols`` (S, S): for each output pixel, the film column it shows (its own column
        wherever nothing moves); ``heart``: the enlarged heart mask.
    """
    size = a.size
    px = size / 256.0
    v = sev.value
    cols = np.arange(size, dtype=F32)
    source = np.broadcast_to(cols[None, :], (size, size)).copy()
    rows = np.flatnonzero(a.heart_rows)
    top, bottom = rows[0], rows[-1]
    thorax_cols = np.flatnonzero(a.lung_mask.any(axis=0))
    thorax = float(thorax_cols[-1] - thorax_cols[0] + 1)
    growth = (0.04 + 0.14 * v) * thorax  # heart width added at its widest, px
    t = np.clip((np.arange(size) - top) / max(bottom - top, 1), 0.0, 1.0)
    profile = np.sin(np.pi * np.clip(0.15 + 0.85 * t, 0.0, 1.0) * 0.75) ** 1.5
    profile = np.where(a.heart_rows, profile / profile.max(), 0.0)
    # fade in over the top rows so the displacement is smooth across rows
    profile = ndimage.gaussian_filter1d(profile, 3.0 * px)
    heart = np.zeros((size, size), dtype=bool)
    for r in range(size):
        if profile[r] < 1e-3 or not np.isfinite(a.heart_left[min(max(r, top), bottom)]):
            continue
        rr = min(max(r, top), bottom)
        left_b, right_b = float(a.heart_left[rr]), float(a.heart_right[rr])
        centre = 0.5 * (left_b + right_b)
        out = np.zeros(size, dtype=np.float64)  # displacement of each output column (source = x - out)
        for border, share, sign, lung in ((left_b, 2.0 / 3.0, 1.0, a.lungs["left"]),
                                          (right_b, 1.0 / 3.0, -1.0, a.lungs["right"])):
            shift = share * growth * profile[r]
            u = sign * (cols - centre)  # distance from the centre towards this border
            reach = abs(border - centre)
            # the compressed lung must end inside the lung: the chest wall never moves
            _, lateral = lung.edges_at(np.array([r]))
            # (only the medial 60 % of the lung beyond the border, so that a generous mask does not reach the wall)
            room = max(0.6 * (abs(float(lateral[0]) - centre) - reach), 0.0)
            shift = min(shift, room / 3.0)
            margin = min(2.0 * shift + 10.0 * px, room - shift)
            if shift < 0.05:
                continue
            new_border = reach + shift
            inner = np.clip(u / max(new_border, 1.0), 0.0, 1.0) * shift  # stretch of the heart
            outer = shift * np.clip(1.0 - (u - new_border) / margin, 0.0, 1.0)  # compressed lung
            d = np.where(u <= new_border, inner, outer)
            out += np.where(u > 0, sign * d, 0.0)
        source[r] = cols - out
        if a.heart_rows[r]:
            heart[r] = (cols > right_b - profile[r] * growth / 3.0) & (cols < left_b + profile[r] * growth * 2.0 / 3.0)
    return source.astype(F32), heart


_FILM_FINDINGS = {
    "atelectasis": _atelectasis,
    "consolidation": _consolidation,
    "edema": _edema,
    "effusion": _effusion,
    "pneumothorax": _pneumothorax,
}


# --------------------------------------------------------------------------------------------
# Devices: the simulator's drawings, mapped onto the film's lungs


DEVICE_MASK_CHANGE = 0.02
"""Display change (of [0, 1]) from which a rendered device counts as shown in its mask: the faint
PSF skirt of a wire is left out, so a device detector learns the line a reader sees."""

DEVICE_GAIN = 0.2
"""Log-odds per cm water-equivalent of a device, per unit of the film's air contrast: a steel
wire (5 x the simulator's RADIO_OPACITY) rises about three times as far above the lung as the
heart does, as the real leads and wires on the Hannover ICU films do; plastic tube walls stay faint."""


def device_frame(a: FilmAnatomy, patient: Patient) -> tuple[float, float, float, float]:
    """Affine from the simulator's canonical frame to the film's pixels: ``(sx, ox, sy, oy)`` with
    ``col = sx * x + ox`` and ``row = sy * y + oy``, matching the canonical patient's lung box
    (walls at +-thorax_half_width, apex to costophrenic angles) to the film's."""
    from .anatomy import cp_y

    cols = np.flatnonzero(a.lung_mask.any(axis=0))
    left_px, right_px = float(cols[0]), float(cols[-1])
    top_px = float(min(a.lungs["right"].top, a.lungs["left"].top))
    bottom_px = 0.5 * (a.lungs["right"].cp[1] + a.lungs["left"].cp[1])
    half = patient.thorax_half_width
    top_c, bottom_c = patient.apex_y, 0.5 * (cp_y(patient, -1) + cp_y(patient, 1))
    sx = (right_px - left_px) / (2 * half)
    ox = 0.5 * (left_px + right_px)
    sy = (bottom_px - top_px) / (bottom_c - top_c)
    oy = top_px - sy * top_c
    return sx, ox, sy, oy


def device_field_on_film(a: FilmAnatomy, patient: Patient, devices: tuple[Device, ...]) -> np.ndarray:
    """The devices' attenuation (cm water-equivalent) on the film's canvas, (S, S) float32.

    Drawn by the simulator in its canonical frame at a resolution where one canonical pixel is at
    most one film pixel, then resampled through :func:`device_frame`.
    """
    from .devices import devices_field

    if not devices:
        return np.zeros((a.size, a.size), dtype=F32)
    sx, ox, sy, oy = device_frame(a, patient)
    # canonical canvas size so that its pixels are no larger than the film's
    draw = int(min(2048, 2 ** int(np.ceil(np.log2(max(2 * sx, 2 * sy, a.size))))))
    field = devices_field(patient, draw, devices)
    cols, rows = np.meshgrid(np.arange(a.size, dtype=np.float64), np.arange(a.size, dtype=np.float64))
    xc, yc = (cols - ox) / sx, (rows - oy) / sy
    # canonical -> drawing pixel index
    u, w = (xc + 1.0) * 0.5 * draw - 0.5, (yc + 1.0) * 0.5 * draw - 0.5
    if draw > a.size:  # area-average the finer drawing first so thin wires keep their weight
        k = draw / max(sx, sy) / 2.0
        field = ndimage.gaussian_filter(field, max(0.0, 0.5 * k - 0.3))
    return ndimage.map_coordinates(field, [w, u], order=1, mode="constant", cval=0.0).astype(F32)


def device_kind_labels(a: FilmAnatomy, patient: Patient, devices: tuple[Device, ...], where: np.ndarray) -> np.ndarray:
    """(S, S) uint8: inside ``where``, the :data:`.anatomy.DEVICE_KIND_LABELS` value of the device
    that adds most attenuation at each pixel; 0 elsewhere."""
    from .anatomy import DEVICE_KIND_LABELS

    labels = np.zeros((a.size, a.size), dtype=np.uint8)
    if not devices or not where.any():
        return labels
    if len(devices) == 1:
        labels[where] = DEVICE_KIND_LABELS[devices[0].kind]
        return labels
    fields = np.stack([device_field_on_film(a, patient, (d,))[where] for d in devices])
    kinds = np.array([DEVICE_KIND_LABELS[d.kind] for d in devices], dtype=np.uint8)
    labels[where] = kinds[np.argmax(fields, axis=0)]
    return labels


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class FilmRender:
    """A film with rendered findings and devices.

    Attributes:
        image: (S, S) float32 in [0, 1].
        support: (S, S) bool, where the image differs from the film.
        heart: (S, S) bool heart mask (enlarged with cardiomegaly).
        lungs: (S, S) bool visible lung mask (the film's, less what an enlarged heart covers).
        cardiothoracic_ratio: of ``heart`` and the film's lungs.
        devices: (S, S) bool, where a rendered device shows (raises the display value by at least
            :data:`DEVICE_MASK_CHANGE`); empty without devices.
        device_kinds: (S, S) uint8, inside ``devices`` the kind of device that shows there (its
            :data:`.anatomy.DEVICE_KIND_LABELS` value; where devices cross, the one adding most
            attenuation), 0 elsewhere.
    """

    image: np.ndarray
    support: np.ndarray
    heart: np.ndarray
    lungs: np.ndarray
    cardiothoracic_ratio: float
    devices: np.ndarray
    device_kinds: np.ndarray


def render_on_film(a: FilmAnatomy, findings: Findings | None = None, devices: tuple[Device, ...] = (),
                   patient: Patient | None = None, device_gain: float = 1.0) -> FilmRender:
    """The film with ``findings`` and ``devices`` rendered in its log-odds (exact elsewhere).

    Args:
        a: the fitted film.
        findings: what to render (severities as the simulator's).
        devices: devices to draw along the film's anatomy (needs ``patient``, whose canonical
            geometry the drawings follow before they are mapped onto the film).
        patient: the simulator patient of the device drawings.
        device_gain: the devices' contrast as a multiple of :data:`DEVICE_GAIN`'s.
    """
    findings = findings or Findings()
    size = a.size
    fill_keep = np.ones((size, size), dtype=F32)
    extra = np.zeros((size, size), dtype=F32)
    unmark = np.zeros((size, size), dtype=F32)
    own_fill = np.zeros((size, size), dtype=F32)
    heart = a.heart
    touched = np.zeros((size, size), dtype=bool)
    source_cols = None
    for name, sev in findings.present().items():
        if name == "cardiomegaly":
            source_cols, heart = cardiomegaly_warp(a, sev)
            continue
        change = _FILM_FINDINGS[name](a, sev)
        if change.fill is not None and change.target is not None:
            own_fill = own_fill + change.fill * np.clip(change.target - a.base, 0.0, None)
            touched |= change.fill > 0
        elif change.fill is not None:
            fill_keep *= 1.0 - change.fill
            touched |= change.fill > 0
        if change.extra is not None:
            extra += change.extra
            touched |= change.extra != 0
        if change.unmark is not None:
            unmark = np.maximum(unmark, change.unmark)
            touched |= change.unmark > 0
    fill = 1.0 - fill_keep
    # markings fade only where there is air to replace (not on the spine, bones or hardware)
    unmark = np.clip(unmark, 0.0, 1.0) * np.clip(2.0 * a.air / a.contrast, 0.0, 1.0)
    delta = fill * a.air + own_fill + extra * a.contrast - unmark * a.markings
    device_mask = np.zeros((size, size), dtype=bool)
    device_kinds = np.zeros((size, size), dtype=np.uint8)
    if devices:
        if patient is None:
            raise ValueError("devices need the simulator patient their drawings follow")
        field = device_field_on_film(a, patient, devices)
        device_delta = device_gain * DEVICE_GAIN * a.contrast * field
        delta = delta + device_delta
        touched |= field > 1e-4
        device_mask = (from_logit(a.logit + device_delta) - from_logit(a.logit) >= DEVICE_MASK_CHANGE) & a.content
        device_kinds = device_kind_labels(a, patient, devices, device_mask)
    touched &= a.content
    image = a.image.copy()
    # the change in display value that the log-odds change makes (so a pixel the logit had to clip,
    # pure white or black, moves only by what the change adds, never back to the clip level)
    shown = a.logit[touched]
    image[touched] = np.clip(a.image[touched] + from_logit(shown + delta[touched]) - from_logit(shown), 0.0, 1.0)
    if source_cols is not None:  # cardiomegaly: the borders move, with whatever else was rendered
        moved = (np.abs(source_cols - np.arange(size, dtype=F32)[None, :]) > 1e-4) & a.content
        rows_idx = np.broadcast_to(np.arange(size, dtype=F32)[:, None], (size, size))
        warped = ndimage.map_coordinates(image, [rows_idx, source_cols], order=1, mode="nearest").astype(F32)
        image[moved] = warped[moved]
    support = image != a.image
    lungs = a.lung_mask & ~heart
    return FilmRender(image=image, support=support, heart=heart, lungs=lungs,
                      cardiothoracic_ratio=_ctr(heart, a.lung_mask), devices=device_mask,
                      device_kinds=device_kinds)


def change_support(prior: FilmRender, target: FilmRender) -> np.ndarray:
    """Where two renders of one film differ (outside it they are identical)."""
    return prior.image != target.image


def with_finding(findings: Findings, name: str, sev: Severity | None) -> Findings:
    """``findings`` with one field replaced."""
    return dataclasses.replace(findings, **{name: sev})
