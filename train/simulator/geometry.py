"""Small numeric helpers shared by the simulator: grids, warps, smooth steps, a raster canvas.

All fields are float32 arrays of shape (S, S) on the canonical grid: pixel (i, j) has centre
``x = (j + 0.5) / S * 2 - 1`` and ``y = (i + 0.5) / S * 2 - 1`` (see :mod:`.params`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

F32 = np.float32


@functools.lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical coordinates of every pixel centre: ``(x, y)``, each (S, S) float32, read-only."""
    c = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(F32)
    x, y = np.meshgrid(c, c)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def smoothstep(t: np.ndarray) -> np.ndarray:
    """Cubic 0 -> 1 ramp on [0, 1], exactly 0 below and 1 above (compact support)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def tube_profile(d: np.ndarray, half_width: float, cortex: float = 0.0, marrow: float = 1.0) -> np.ndarray:
    """Projected thickness across a cylinder of radius ``half_width`` (0 outside, compact).

    Args:
        d: distance from the centre line (same units as ``half_width``).
        half_width: outer radius.
        cortex: fraction of the radius that is dense cortex; the hollow inside is weighted by
            ``marrow`` (bone: marrow < 1 gives bright cortical margins).
        marrow: relative density of the inside.

    Returns:
        Chord length through the cylinder, normalised to 1 at the centre of a solid cylinder.
    """
    r2 = half_width * half_width
    outer = np.sqrt(np.maximum(r2 - d * d, 0.0))
    if cortex <= 0.0:
        return outer / half_width
    ri = half_width * (1.0 - cortex)
    inner = np.sqrt(np.maximum(ri * ri - d * d, 0.0))
    return (outer - (1.0 - marrow) * inner) / half_width


def bump(t: np.ndarray | float, center: float, width: float) -> np.ndarray | float:
    """Smooth compact bump: 1 at ``center``, 0 beyond ``center +- width``."""
    u = np.clip(1.0 - ((np.asarray(t) - center) / width) ** 2, 0.0, 1.0)
    return u * u


@dataclass(frozen=True)
class Warp:
    """A precomputed bilinear resampling: output pixel <- 4 weighted canonical pixels.

    Applying the same :class:`Warp` to identical inputs gives bit-identical outputs, and a pixel's
    output depends only on the (at most 4) canonical pixels it samples: the simulator relies on
    both for exact counterfactuals.
    """

    size: int
    index: np.ndarray  # (4, N) int32 flat indices into the canonical grid
    weight: np.ndarray  # (4, N) float32 bilinear weights
    nearest_index: np.ndarray  # (N,) flat index of the nearest canonical pixel

    def apply(self, field: np.ndarray) -> np.ndarray:
        """Resamples (S, S) or (C, S, S) float32 fields."""
        single = field.ndim == 2
        flat = field.reshape(1 if single else field.shape[0], -1)
        out = flat[:, self.index[0]] * self.weight[0]
        for k in range(1, 4):
            out += flat[:, self.index[k]] * self.weight[k]
        shape = (self.size, self.size) if single else (field.shape[0], self.size, self.size)
        return out.reshape(shape)

    def nearest(self, field: np.ndarray) -> np.ndarray:
        """Resamples an (S, S) label/bit field by nearest neighbour."""
        return field.reshape(-1)[self.nearest_index].reshape(self.size, self.size)


def make_warp(
    size: int,
    *,
    rotation_deg: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    stretch: float = 1.0,
    pivot_y: float = 0.0,
) -> Warp:
    """Builds the resampling that places a canonical field into the image.

    Forward map (canonical -> image): first a vertical stretch about ``y = pivot_y`` (depth of
    inspiration), then magnification ``scale`` and rotation about the image centre, then
    ``shift``. The warp stores the inverse so every output pixel samples the canonical field.

    Args:
        size: grid size S.
        rotation_deg: counter-clockwise as displayed.
        shift: (dx, dy) in canonical units.
        scale: magnification.
        stretch: vertical stretch factor.
        pivot_y: fixed row of the stretch.

    Returns:
        The :class:`Warp`.
    """
    return make_warps(size, rotation_deg=rotation_deg, shift=shift, scale=scale,
                      stretches=(stretch,), pivot_y=pivot_y)[0]


def make_warps(
    size: int,
    *,
    rotation_deg: float,
    shift: tuple[float, float],
    scale: float,
    stretches: tuple[float, ...],
    pivot_y: float,
) -> list[Warp]:
    """:func:`make_warp` for several vertical stretches sharing one rigid transform.

    The map is affine, so each source coordinate is a column term plus a row term: one
    broadcast addition per coordinate instead of per-pixel matrix arithmetic.
    """
    centres = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0)
    theta = math.radians(rotation_deg)
    c, s = math.cos(theta), math.sin(theta)
    u = (centres - shift[0]) / scale  # output columns -> unrotated canonical offsets
    v = (centres - shift[1]) / scale  # output rows
    half = 0.5 * size
    # Displayed counter-clockwise rotation with y down: forward [[c, s], [-s, c]]; inverse = T.
    col = (half * c * u + half - 0.5)[None, :].astype(F32) + (-half * s * v)[:, None].astype(F32)
    np.clip(col, 0.0, size - 1.0, out=col)
    c0 = np.minimum(col.astype(np.int32), size - 2)  # col >= 0, so truncation is floor
    fc = (col - c0).ravel()
    gc = F32(1.0) - fc
    c0 = c0.ravel()
    warps = []
    for stretch in stretches:
        # y_canonical = pivot + (s u + c v - pivot) / stretch
        row_u = (half * s * u / stretch)[None, :]
        row_v = (half * (pivot_y + (c * v - pivot_y) / stretch + 1.0) - 0.5)[:, None]
        row = row_u.astype(F32) + row_v.astype(F32)
        np.clip(row, 0.0, size - 1.0, out=row)
        r0 = np.minimum(row.astype(np.int32), size - 2)
        fr = (row - r0).ravel()
        index = np.empty((4, size * size), dtype=np.int32)
        np.multiply(r0.ravel(), size, out=index[0])
        index[0] += c0
        np.add(index[0], 1, out=index[1])
        np.add(index[0], size, out=index[2])
        np.add(index[0], size + 1, out=index[3])
        weight = np.empty((4, size * size), dtype=F32)
        gr = F32(1.0) - fr
        np.multiply(gr, gc, out=weight[0])
        np.multiply(gr, fc, out=weight[1])
        np.multiply(fr, gc, out=weight[2])
        np.multiply(fr, fc, out=weight[3])
        nearest = index[0] + (fc >= 0.5) + size * (fr >= 0.5)
        warps.append(Warp(size=size, index=index, weight=weight, nearest_index=nearest))
    return warps


def sample_bilinear(field: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Samples an (S, S) canonical field at canonical coordinates (clamped at the border)."""
    size = field.shape[0]
    return ndimage.map_coordinates(
        field, [(ys + 1.0) * 0.5 * size - 0.5, (xs + 1.0) * 0.5 * size - 0.5],
        order=1, mode="nearest",
    ).astype(F32)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1) x (2r+1) square (Chebyshev radius ``radius``)."""
    if radius <= 0:
        return mask.astype(bool)
    return ndimage.maximum_filter(mask.astype(np.uint8), size=2 * radius + 1, mode="constant") > 0


def gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian of half-width ``radius`` (exactly zero beyond)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(F32)


def separable_blur(field: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable convolution with a finite kernel: a pixel spreads at most ``len(kernel)//2``."""
    out = ndimage.convolve1d(field, kernel, axis=0, mode="nearest")
    return ndimage.convolve1d(out, kernel, axis=1, mode="nearest")


def smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to [0, 1] (a cheap texture / modulation field)."""
    low = max(8, int(size / max(sigma_px, 1.0) * 2))
    n = rng.standard_normal((low, low)).astype(F32)
    n = ndimage.gaussian_filter(n, 1.0, mode="wrap")
    n = ndimage.zoom(n, size / low, order=1, mode="grid-wrap", grid_mode=True)[:size, :size]
    lo, hi = float(n.min()), float(n.max())
    return ((n - lo) / max(hi - lo, 1e-6)).astype(F32)


class Canvas:
    """Rasterises strokes and shapes given in canonical coordinates, antialiased by supersampling.

    PIL draws into a float ("F") image at ``supersample`` x the target size; :meth:`field` averages
    it down. Strokes are at least ``min_width_px`` output pixels wide, so thin radio-opaque lines
    stay visible at small sizes. Later strokes overwrite earlier ones where they overlap (draw the faint tube wall
    first, then its radio-opaque stripe). Values are attenuation in cm water-equivalent.
    """

    def __init__(self, size: int, supersample: int = 2, min_width_px: float = 0.5) -> None:
        self.size = size
        self.ss = supersample
        self.n = size * supersample
        self.min_width = max(1, int(round(min_width_px * supersample)))
        self.image = Image.new("F", (self.n, self.n), 0.0)
        self.draw = ImageDraw.Draw(self.image)

    def _px(self, x: float, y: float) -> tuple[float, float]:
        return ((x + 1.0) * 0.5 * self.n, (y + 1.0) * 0.5 * self.n)

    def _width(self, width: float) -> int:
        return max(self.min_width, int(round(width * 0.5 * self.n)))

    def polyline(self, points: np.ndarray, width: float, value: float) -> None:
        """A stroke through (K, 2) canonical points, ``width`` in canonical units."""
        pts = [self._px(float(px), float(py)) for px, py in points]
        self.draw.line(pts, fill=float(value), width=self._width(width), joint="curve")

    def dashes(self, points: np.ndarray, width: float, value: float, on: int, off: int) -> None:
        """A stroke drawn only on alternating runs of ``on`` / ``off`` points (side holes, coils)."""
        k = 0
        while k < len(points) - 1:
            self.polyline(points[k:k + on + 1], width, value)
            k += on + off

    def ellipse(self, center: tuple[float, float], radii: tuple[float, float], value: float,
                outline: float | None = None) -> None:
        """A filled ellipse, or only its outline of width ``outline`` (canonical units)."""
        x0, y0 = self._px(center[0] - radii[0], center[1] - radii[1])
        x1, y1 = self._px(center[0] + radii[0], center[1] + radii[1])
        if outline is None:
            self.draw.ellipse([x0, y0, x1, y1], fill=float(value))
        else:
            self.draw.ellipse([x0, y0, x1, y1], outline=float(value), width=self._width(outline))

    def polygon(self, points: np.ndarray, value: float) -> None:
        """A filled polygon through (K, 2) canonical points."""
        self.draw.polygon([self._px(float(px), float(py)) for px, py in points], fill=float(value))

    def rounded_rect(self, center: tuple[float, float], half: tuple[float, float], radius: float,
                     value: float) -> None:
        """A filled rounded rectangle."""
        x0, y0 = self._px(center[0] - half[0], center[1] - half[1])
        x1, y1 = self._px(center[0] + half[0], center[1] + half[1])
        self.draw.rounded_rectangle([x0, y0, x1, y1], radius=radius * 0.5 * self.n, fill=float(value))

    def field(self) -> np.ndarray:
        """The (S, S) float32 field (mean over each supersampled block)."""
        a = np.asarray(self.image, dtype=F32)
        s = self.ss
        out = np.zeros((self.size, self.size), dtype=F32)
        for di in range(s):  # strided sums: much faster than a mean over reshaped axes
            for dj in range(s):
                out += a[di::s, dj::s]
        out *= F32(1.0 / (s * s))
        return out


def spline(points: list[tuple[float, float]], n: int = 64) -> np.ndarray:
    """A smooth curve through control points (Catmull-Rom), (n, 2) float64."""
    p = np.asarray(points, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    segs = len(p) - 3
    t = np.linspace(0.0, segs, n, endpoint=True)
    k = np.minimum(t.astype(int), segs - 1)
    u = (t - k)[:, None]
    p0, p1, p2, p3 = p[k], p[k + 1], p[k + 2], p[k + 3]
    return 0.5 * ((2 * p1) + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u ** 2
                  + (-p0 + 3 * p1 - 3 * p2 + p3) * u ** 3)
