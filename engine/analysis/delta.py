"""The signed delta map: counterfactual minus prior, and where in the anatomy it changed.

The delta is computed on the two images as the model saw them (``Counterfactual.prior`` and
``Counterfactual.image`` share one canvas, so they are aligned), in float: a positive value means
the counterfactual is brighter there (more attenuation: new opacity, effusion, a larger heart),
a negative value means darker (more air: pneumothorax, a resolved opacity). Integer inputs are
converted first (:func:`engine.analysis._images.integer_to_unit`), never subtracted as uint8.

Display follows PRISM's difference maps, with two fixes: the colour limits are symmetric about
zero (so white is exactly "no change"), and the percentile threshold is taken over the change's
*magnitude* (PRISM's notebook thresholds the min-max normalised signed difference, which keeps
only the largest increases). Per-structure statistics turn "the change is in the right lower
zone" into numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from engine.analysis._images import as_masks, as_unit_image
from engine.errors import InputError

MIN_LIMIT = 1e-3
"""Smallest colour limit (in [0, 1] intensity units), so identical images still get a scale."""


def signed_delta(counterfactual: Any, prior: Any) -> np.ndarray:
    """``counterfactual - prior`` as float32 in [-1, 1].

    Args:
        counterfactual: ``(H, W)`` float in [0, 1] (or uint8/uint16, converted first).
        prior: the prior on the same grid.

    Raises:
        InputError: shapes differ or values are outside the intensity contract.
    """
    cf = as_unit_image(counterfactual, "counterfactual")
    pr = as_unit_image(prior, "prior")
    if cf.shape != pr.shape:
        raise InputError(
            f"The counterfactual {cf.shape} and the prior {pr.shape} are on different grids; "
            "compare Counterfactual.image with Counterfactual.prior (both at the model's resolution)"
        )
    return (cf.astype(np.float32) - pr.astype(np.float32)).astype(np.float32)


def smooth(delta: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing of a delta map (``sigma_px`` in pixels; 0 returns a copy).

    Raises:
        InputError: negative sigma.
    """
    if sigma_px < 0:
        raise InputError(f"smoothing sigma must be >= 0 pixels, not {sigma_px}")
    delta = np.asarray(delta, dtype=np.float32)
    if sigma_px == 0:
        return delta.copy()
    return ndimage.gaussian_filter(delta, sigma=float(sigma_px), mode="nearest").astype(np.float32)


def percentile_threshold(delta: np.ndarray, percentile: float) -> tuple[np.ndarray, float]:
    """Keeps the strongest changes: zeroes pixels whose ``|delta|`` is below its ``percentile``.

    PRISM's notebooks show the 70th-95th percentile. Signs are kept.

    Args:
        delta: ``(H, W)`` signed change.
        percentile: in [0, 100); 90 keeps the top 10 % of pixels by magnitude.

    Returns:
        ``(thresholded delta, cutoff)`` where ``cutoff`` is the magnitude threshold.

    Raises:
        InputError: percentile outside [0, 100).
    """
    if not 0 <= percentile < 100:
        raise InputError(f"the delta threshold percentile must be in [0, 100), not {percentile}")
    delta = np.asarray(delta, dtype=np.float32)
    magnitude = np.abs(delta)
    cutoff = float(np.percentile(magnitude, percentile))
    kept = np.where(magnitude >= cutoff, delta, 0.0).astype(np.float32)
    if cutoff == 0.0:  # ties at zero: nothing changed there, nothing to keep
        kept[magnitude == 0] = 0.0
    return kept, cutoff


def symmetric_limit(delta: np.ndarray, percentile: float = 100.0, floor: float = MIN_LIMIT) -> float:
    """The colour limit ``v`` for a diverging map shown over ``[-v, v]``.

    Args:
        delta: the signed change.
        percentile: of ``|delta|``; 100 is the maximum, 99.5 ignores a few outlier pixels.
        floor: the smallest limit returned (identical images still get a colour bar).

    Raises:
        InputError: percentile outside (0, 100].
    """
    if not 0 < percentile <= 100:
        raise InputError(f"the colour-limit percentile must be in (0, 100], not {percentile}")
    magnitude = np.abs(np.asarray(delta, dtype=np.float64))
    return float(max(np.percentile(magnitude, percentile), floor))


@dataclass(frozen=True)
class RegionChange:
    """How much one structure changed (intensity units of the [0, 1] images).

    Attributes:
        name: the structure.
        pixels: its area in pixels.
        mean: mean signed change (positive: brighter / more opaque).
        mean_abs: mean magnitude.
        max_increase: largest positive change (0 if none).
        max_decrease: most negative change, as a negative number (0 if none).
        max_abs: largest magnitude.
        fraction_changed: fraction of the structure's pixels with ``|delta| >= threshold``
            (``nan`` when no threshold was given).
        share_of_change: this structure's share of the image's total ``|delta|``.
    """

    name: str
    pixels: int
    mean: float
    mean_abs: float
    max_increase: float
    max_decrease: float
    max_abs: float
    fraction_changed: float
    share_of_change: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def structure_stats(delta: np.ndarray, masks: Mapping[str, Any], threshold: float | None = None) -> dict[str, RegionChange]:
    """Mean and max change inside each structure.

    Args:
        delta: ``(H, W)`` signed change (:func:`signed_delta`, optionally smoothed).
        masks: structure name -> bool ``(H, W)`` mask on the delta's grid.
        threshold: a magnitude (e.g. the cutoff from :func:`percentile_threshold`) for
            ``fraction_changed``.

    Returns:
        name -> :class:`RegionChange`; empty structures get zeros and ``pixels == 0``.

    Raises:
        InputError: a mask's shape differs from the delta's.
    """
    delta = np.asarray(delta, dtype=np.float64)
    if delta.ndim != 2:
        raise InputError(f"the delta must be a 2-D map, got shape {delta.shape}")
    total = float(np.abs(delta).sum())
    out: dict[str, RegionChange] = {}
    for name, mask in as_masks(masks, delta.shape).items():
        values = delta[mask]
        if values.size == 0:
            out[name] = RegionChange(name, 0, 0.0, 0.0, 0.0, 0.0, 0.0, float("nan"), 0.0)
            continue
        mag = np.abs(values)
        out[name] = RegionChange(
            name=name,
            pixels=int(values.size),
            mean=float(values.mean()),
            mean_abs=float(mag.mean()),
            max_increase=float(max(values.max(), 0.0)),
            max_decrease=float(min(values.min(), 0.0)),
            max_abs=float(mag.max()),
            fraction_changed=float((mag >= threshold).mean()) if threshold is not None else float("nan"),
            share_of_change=float(mag.sum() / total) if total > 0 else 0.0,
        )
    return out


def lung_zones(masks: Mapping[str, Any], zones: int = 3) -> dict[str, np.ndarray]:
    """Splits each lung into upper/middle/lower zones by thirds of its height.

    The radiological zones clinicians name ("right lower zone"), as masks for
    :func:`structure_stats`. Lungs are the patient's: ``right_lung`` is on the image's left.

    Args:
        masks: must contain ``right_lung`` and/or ``left_lung`` bool masks.
        zones: 3 (upper, middle, lower) or 2 (upper, lower).

    Returns:
        ``{"right_upper_zone": mask, ...}`` for each lung present.

    Raises:
        InputError: no lung mask, or ``zones`` not 2 or 3.
    """
    names = {3: ("upper", "middle", "lower"), 2: ("upper", "lower")}
    if zones not in names:
        raise InputError(f"lung zones must be 2 or 3, not {zones}")
    out: dict[str, np.ndarray] = {}
    for side in ("right", "left"):
        mask = masks.get(f"{side}_lung")
        if mask is None:
            continue
        mask = np.asarray(mask).astype(bool)
        rows = np.flatnonzero(mask.any(axis=1))
        for k, zone in enumerate(names[zones]):
            zone_mask = np.zeros_like(mask)
            if rows.size:
                top, bottom = rows[0], rows[-1] + 1
                edges = np.linspace(top, bottom, zones + 1)
                r0, r1 = int(round(edges[k])), int(round(edges[k + 1]))
                zone_mask[r0:r1] = mask[r0:r1]
            out[f"{side}_{zone}_zone"] = zone_mask
    if not out:
        raise InputError("lung_zones needs a 'right_lung' or 'left_lung' mask")
    return out


@dataclass(frozen=True)
class DeltaMap:
    """A delta map ready to show and to report.

    Attributes:
        delta: ``(H, W)`` raw signed change, counterfactual minus prior.
        display: smoothed and thresholded change (what the heatmap shows).
        limit: symmetric colour limit ``v``: show ``display`` over ``[-v, v]``.
        sigma_px: smoothing applied to ``display`` and to the statistics.
        percentile: threshold percentile (None: not thresholded).
        cutoff: the magnitude threshold that percentile gave (0 if none).
        stats: per-structure :class:`RegionChange` (on the smoothed, unthresholded change).
    """

    delta: np.ndarray
    display: np.ndarray
    limit: float
    sigma_px: float
    percentile: float | None
    cutoff: float
    stats: dict[str, RegionChange] = field(default_factory=dict)

    def ranked(self, key: str = "mean_abs") -> list[RegionChange]:
        """Structures sorted by ``key`` (largest first): where the change is."""
        return sorted(self.stats.values(), key=lambda r: getattr(r, key), reverse=True)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no arrays)."""
        return {
            "limit": self.limit,
            "sigma_px": self.sigma_px,
            "percentile": self.percentile,
            "cutoff": self.cutoff,
            "mean_abs": float(np.abs(self.delta).mean()),
            "max_abs": float(np.abs(self.delta).max()),
            "structures": {k: v.as_dict() for k, v in self.stats.items()},
        }


def delta_map(counterfactual: Any, prior: Any, *, sigma_px: float = 0.0, percentile: float | None = None,
              masks: Mapping[str, Any] | None = None, limit_percentile: float = 99.5) -> DeltaMap:
    """Signed delta, smoothing, percentile threshold, symmetric limit and per-structure stats in one call.

    Args:
        counterfactual: ``(H, W)`` float in [0, 1].
        prior: the prior on the same grid.
        sigma_px: Gaussian smoothing in pixels (0: none).
        percentile: keep only changes above this percentile of magnitude (None: keep all).
        masks: structure name -> bool mask for :attr:`DeltaMap.stats` (lungs also give zones
            when both are present).
        limit_percentile: percentile of ``|display|`` used as the colour limit.

    Raises:
        InputError: bad images, masks or settings.
    """
    raw = signed_delta(counterfactual, prior)
    smoothed = smooth(raw, sigma_px)
    if percentile is None:
        shown, cutoff = smoothed, 0.0
    else:
        shown, cutoff = percentile_threshold(smoothed, percentile)
    stats: dict[str, RegionChange] = {}
    if masks:
        all_masks = dict(masks)
        if "right_lung" in all_masks and "left_lung" in all_masks:
            all_masks.update(lung_zones(all_masks))
        stats = structure_stats(smoothed, all_masks, threshold=cutoff if percentile is not None else None)
    nonzero = shown[shown != 0]
    limit = symmetric_limit(nonzero if nonzero.size else shown, limit_percentile)
    return DeltaMap(raw, shown, limit, float(sigma_px), percentile, cutoff, stats)
