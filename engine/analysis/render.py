"""Colour maps, overlays and figures (matplotlib's Agg renderer; no GUI, no pyplot state).

Overlays return float RGB arrays ``(H, W, 3)`` in [0, 1] (:func:`to_uint8` for display or
PNG), so the UI can show them without matplotlib figures. Figures are
``matplotlib.figure.Figure`` objects built without pyplot (thread-safe, nothing global), saved
with :func:`save_figure`.

Delta colours: a diverging map (``RdBu_r``) over symmetric limits ``[-v, v]``, so white is
exactly "no change", red is brighter in the counterfactual (more attenuation: new opacity,
fluid, a larger heart) and blue is darker (more air).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from engine.analysis._images import as_unit_image
from engine.analysis.delta import DeltaMap
from engine.errors import InputError

DELTA_CMAP = "RdBu_r"
ATTENTION_CMAP = "inferno"
OUTLINE_COLOR = (0.1, 0.62, 0.3)
"""Structure outlines on delta maps (green: off the diverging red-blue scale)."""
FIGURE_NOTICE = "Contains generated (synthetic) images. Research use only, not for diagnosis."

STRUCTURE_COLORS: dict[str, tuple[float, float, float]] = {
    "right_lung": (0.122, 0.467, 0.706),
    "left_lung": (0.682, 0.780, 0.910),
    "heart": (0.839, 0.153, 0.157),
    "mediastinum": (1.000, 0.498, 0.055),
    "diaphragm": (0.173, 0.627, 0.173),
    "spine": (0.580, 0.404, 0.741),
    "trachea": (0.090, 0.745, 0.812),
    "clavicles": (0.737, 0.741, 0.133),
    "left_clavicle": (0.737, 0.741, 0.133),
    "right_clavicle": (0.859, 0.859, 0.553),
    "ribs": (0.498, 0.498, 0.498),
    "finding": (0.890, 0.467, 0.761),
    "devices": (0.549, 0.337, 0.294),
    "aorta": (0.969, 0.714, 0.824),
}
"""Fixed colours per structure, so a structure looks the same in every figure."""

_FALLBACK = ((0.6, 0.3, 0.8), (0.3, 0.7, 0.5), (0.9, 0.6, 0.2), (0.2, 0.5, 0.9), (0.8, 0.3, 0.3))


def structure_color(name: str, index: int = 0) -> tuple[float, float, float]:
    """The colour for a structure (a fixed palette, then a fallback cycle)."""
    return STRUCTURE_COLORS.get(name, _FALLBACK[index % len(_FALLBACK)])


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] to uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def gray_rgb(image: Any) -> np.ndarray:
    """A [0, 1] greyscale image as ``(H, W, 3)`` float RGB."""
    img = as_unit_image(image)
    return np.repeat(img[..., None], 3, axis=2)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def delta_colors(delta: np.ndarray, limit: float, cmap: str = DELTA_CMAP) -> np.ndarray:
    """The signed delta through a diverging colour map over ``[-limit, limit]``: ``(H, W, 3)``.

    Raises:
        InputError: ``limit`` is not positive.
    """
    if not limit > 0:
        raise InputError(f"the colour limit must be positive, not {limit}")
    t = np.clip((np.asarray(delta, dtype=np.float64) / limit + 1.0) / 2.0, 0.0, 1.0)
    return _colormap(cmap)(t)[..., :3]


def delta_overlay(image: Any, delta: np.ndarray, limit: float, *, cmap: str = DELTA_CMAP, alpha_max: float = 0.85) -> np.ndarray:
    """The delta blended over a greyscale image, opacity proportional to ``|delta| / limit``.

    Unchanged pixels show the radiograph; strong changes show their colour.

    Returns:
        ``(H, W, 3)`` float RGB in [0, 1].

    Raises:
        InputError: shapes differ or ``limit`` is not positive.
    """
    base = gray_rgb(image)
    delta = np.asarray(delta, dtype=np.float64)
    if delta.shape != base.shape[:2]:
        raise InputError(f"delta {delta.shape} and image {base.shape[:2]} differ in size")
    alpha = (np.clip(np.abs(delta) / limit, 0.0, 1.0) * alpha_max)[..., None]
    return (1 - alpha) * base + alpha * delta_colors(delta, limit, cmap)


def heatmap_overlay(image: Any, heat: np.ndarray, *, cmap: str = ATTENTION_CMAP, alpha: float = 0.55) -> np.ndarray:
    """A [0, 1] heat map (Grad-CAM, saliency) over a greyscale image, opacity growing with heat.

    Returns:
        ``(H, W, 3)`` float RGB in [0, 1].

    Raises:
        InputError: shapes differ.
    """
    base = gray_rgb(image)
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    if heat.shape != base.shape[:2]:
        raise InputError(f"heat map {heat.shape} and image {base.shape[:2]} differ in size")
    a = (alpha * np.sqrt(heat))[..., None]
    return (1 - a) * base + a * _colormap(cmap)(heat)[..., :3]


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The inner boundary of a bool mask, ``width`` pixels thick."""
    mask = np.asarray(mask).astype(bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width), border_value=0)


def mask_overlay(image: Any, masks: Mapping[str, np.ndarray], *, alpha: float = 0.3, outline: int = 1,
                 colors: Mapping[str, tuple[float, float, float]] | None = None) -> np.ndarray:
    """Structures as translucent fills with solid outlines over a greyscale image.

    Args:
        image: ``(H, W)`` [0, 1].
        masks: name -> bool ``(H, W)``.
        alpha: fill opacity (0 for outlines only).
        outline: outline width in pixels (0 for none).
        colors: overrides of :data:`STRUCTURE_COLORS`.

    Returns:
        ``(H, W, 3)`` float RGB in [0, 1].

    Raises:
        InputError: a mask's shape differs from the image's.
    """
    rgb = gray_rgb(image)
    for k, (name, mask) in enumerate(masks.items()):
        m = np.asarray(mask).astype(bool)
        if m.shape != rgb.shape[:2]:
            raise InputError(f"mask {name!r} {m.shape} and image {rgb.shape[:2]} differ in size")
        color = np.asarray((colors or {}).get(name, structure_color(name, k)))
        if alpha > 0:
            rgb[m] = (1 - alpha) * rgb[m] + alpha * color
        if outline > 0:
            rgb[mask_outline(m, outline)] = color
    return rgb


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    return fig


def _show(ax, rgb_or_gray: np.ndarray, title: str | None = None, **kwargs: Any) -> Any:
    if rgb_or_gray.ndim == 2:
        kwargs.setdefault("cmap", "gray")
        kwargs.setdefault("vmin", 0.0)
        kwargs.setdefault("vmax", 1.0)
    im = ax.imshow(rgb_or_gray, interpolation="lanczos" if rgb_or_gray.shape[0] < 256 else "antialiased", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9, pad=3)
    return im


def _fmt_limit(v: float) -> str:
    return f"{v:.2g}" if v < 0.1 else f"{v:.2f}"


def _delta_colorbar(fig, limit: float, *, ax=None, cax=None, label: str = "Δ intensity (counterfactual − prior)",
                    orientation: str = "vertical") -> Any:
    """A colour bar for ``[-limit, limit]`` with its ends named (brighter / darker)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(-limit, limit), cmap=_colormap(DELTA_CMAP))
    cb = fig.colorbar(sm, ax=ax, cax=cax, orientation=orientation)
    v = _fmt_limit(limit)
    cb.set_ticks([-limit, 0.0, limit])
    if orientation == "vertical":
        cb.set_ticklabels([f"−{v}\ndarker", "0", f"+{v}\nbrighter"])
    else:
        cb.set_ticklabels([f"−{v} darker", "0", f"+{v} brighter"])
    cb.ax.tick_params(labelsize=6.5, length=2, pad=2)
    cb.set_label(label, fontsize=7)
    cb.outline.set_linewidth(0.5)
    return cb


def delta_figure(prior: Any, counterfactual: Any, dmap: DeltaMap, *, masks: Mapping[str, np.ndarray] | None = None,
                 title: str | None = None, top: int = 8) -> Any:
    """Prior, counterfactual, the signed delta heatmap with its colour bar, and per-structure change.

    Args:
        prior, counterfactual: ``(H, W)`` [0, 1] on one grid.
        dmap: from :func:`engine.analysis.delta.delta_map`.
        masks: structures to outline on the delta panel (thin green contours).
        title: figure title (e.g. the instruction).
        top: how many structures the bar chart shows (largest mean |change| first; a lung is
            left out when its zones are listed); the chart is left out when ``dmap`` has no
            statistics.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    pr = as_unit_image(prior, "prior")
    cf = as_unit_image(counterfactual, "counterfactual")
    has_stats = bool(dmap.stats)
    ratios = [1, 1, 1, 0.05] + ([0.02, 1.0] if has_stats else [])
    fig = _figure(2.35 * (4 if has_stats else 3) + 0.9, 2.75 if title else 2.55)
    axes = fig.subplots(1, len(ratios), gridspec_kw={"width_ratios": ratios})
    _show(axes[0], pr, "Prior\n")
    _show(axes[1], cf, "Counterfactual\n(synthetic)")
    overlay = delta_overlay(pr, dmap.display, dmap.limit)
    if masks:  # one neutral hue for outlines, so they never read as part of the red/blue scale
        for m in masks.values():
            edge = mask_outline(m, 1)
            overlay[edge] = 0.3 * overlay[edge] + 0.7 * np.asarray(OUTLINE_COLOR)
    how = [f"σ = {dmap.sigma_px:g} px"] if dmap.sigma_px else []
    how += [] if dmap.percentile is None else [f"top {100 - dmap.percentile:g} % of |Δ|"]
    _show(axes[2], overlay, "Signed change\n" + (", ".join(how) or "raw"))
    _delta_colorbar(fig, dmap.limit, cax=axes[3])
    if has_stats:
        axes[4].axis("off")
        ax = axes[5]
        zones = {n.split("_")[0] for n in dmap.stats if n.endswith("_zone")}
        ranked = [r for r in dmap.ranked("mean_abs") if r.pixels > 0
                  and not (r.name.endswith("_lung") and r.name.split("_")[0] in zones)][:top][::-1]
        names = [r.name.replace("_", " ") for r in ranked]
        means = np.asarray([r.mean for r in ranked])
        colors = [_colormap(DELTA_CMAP)(0.5 + 0.5 * float(np.clip(m / dmap.limit, -1, 1)))[:3] for m in means]
        y = np.arange(len(ranked))
        ax.barh(y, means, color=colors, edgecolor="0.3", linewidth=0.4, height=0.68)
        ax.scatter([r.max_increase for r in ranked], y, marker="|", s=36, color="#b2182b", linewidths=1.1)
        ax.scatter([r.max_decrease for r in ranked], y, marker="|", s=36, color="#2166ac", linewidths=1.1)
        ax.axvline(0.0, color="0.3", linewidth=0.6)
        ax.set_yticks(y, names, fontsize=7)
        ax.tick_params(axis="x", labelsize=6.5, length=2)
        ax.set_xlabel("Δ in structure: mean (bar), extremes (|)", fontsize=7)
        ax.set_title("Where it changed\n", fontsize=9, pad=3)
        ax.grid(axis="x", color="0.9", linewidth=0.5)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9.5)
    return fig


def attention_figure(prior: Any, counterfactual: Any, comparison: Any, *, title: str | None = None) -> Any:
    """Attention for one finding on the prior and on the counterfactual, with probabilities.

    Args:
        prior, counterfactual: ``(H, W)`` [0, 1].
        comparison: an :class:`engine.analysis.attention.AttentionComparison`.
        title: figure title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = _figure(6.2, 3.0)
    axes = fig.subplots(1, 2)
    method = "Grad-CAM" if comparison.method == "grad_cam" else "Saliency"
    _show(axes[0], heatmap_overlay(prior, comparison.prior_map), f"Prior: P({comparison.finding}) = {comparison.p_prior:.2f}")
    _show(axes[1], heatmap_overlay(counterfactual, comparison.counterfactual_map),
          f"Counterfactual: P = {comparison.p_counterfactual:.2f}")
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=_colormap(ATTENTION_CMAP)), ax=axes[1], fraction=0.046, pad=0.02)
    cb.ax.tick_params(labelsize=7, length=2)
    cb.set_label(f"{method} (joint scale)", fontsize=7.5)
    fig.suptitle(title or f"{method} for {comparison.finding}", fontsize=10)
    return fig


def segmentation_figure(prior: Any, counterfactual: Any, prior_masks: Mapping[str, np.ndarray],
                        counterfactual_masks: Mapping[str, np.ndarray], dice_scores: Mapping[str, float] | None = None,
                        *, title: str | None = None) -> Any:
    """Anatomy on the prior and on the counterfactual, with per-structure Dice in the legend.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    from matplotlib.patches import Patch

    fig = _figure(7.4, 3.0)
    axes = fig.subplots(1, 2)
    _show(axes[0], mask_overlay(prior, prior_masks), "Prior")
    _show(axes[1], mask_overlay(counterfactual, counterfactual_masks), "Counterfactual (synthetic)")
    handles = []
    for k, name in enumerate(prior_masks):
        label = name.replace("_", " ")
        if dice_scores and name in dice_scores:
            label += f"  Dice {dice_scores[name]:.2f}"
        handles.append(Patch(facecolor=structure_color(name, k), edgecolor="none", label=label))
    fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


@dataclass
class ExampleRow:
    """One row of an example grid: images by column title, delta panels by column title.

    Attributes:
        label: text shown at the row's left (e.g. the instruction).
        images: column title -> ``(H, W)`` [0, 1] image.
        deltas: column title -> ``(delta, limit)`` shown as a delta overlay on ``base``.
        base: the image deltas are drawn over (usually the prior).
    """

    label: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    deltas: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)
    base: np.ndarray | None = None


def example_grid(rows: Sequence[ExampleRow], columns: Sequence[str], *, title: str | None = None,
                 panel: float = 1.7, wrap: int = 38) -> Any:
    """A grid of examples: one row per pair, one column per image kind (missing cells blank).

    Delta columns share one colour scale down the column (the largest limit of its rows), shown
    by a colour bar under the column, so colours are comparable between rows.

    Returns:
        A ``matplotlib.figure.Figure``.

    Raises:
        InputError: no rows or no columns.
    """
    import textwrap

    if not rows or not columns:
        raise InputError("an example grid needs at least one row and one column")
    limits = {c: max((r.deltas[c][1] for r in rows if c in r.deltas), default=0.0) for c in columns}
    has_bar = any(v > 0 for v in limits.values())
    fig = _figure(panel * len(columns) + 1.5, panel * len(rows) + 0.45 + (0.55 if has_bar else 0.0))
    heights = [1.0] * len(rows) + ([0.07] if has_bar else [])
    grid = fig.add_gridspec(len(heights), len(columns), height_ratios=heights)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = fig.add_subplot(grid[i, j])
            if col in row.images:
                _show(ax, as_unit_image(row.images[col]))
            elif col in row.deltas and row.base is not None:
                _show(ax, delta_overlay(row.base, row.deltas[col][0], limits[col]))
            else:
                _show(ax, np.ones((8, 8, 3)))
            if i == 0:
                ax.set_title(col, fontsize=8.5, pad=3)
            if j == 0:
                label = row.label if len(row.label) <= 3 * wrap else row.label[: 3 * wrap - 1] + "…"
                ax.set_ylabel(textwrap.fill(label, wrap // 2 + 4), fontsize=6.5, rotation=0, ha="right", va="center", labelpad=4)
    if has_bar:
        for j, col in enumerate(columns):
            if limits[col] > 0:
                cax = fig.add_subplot(grid[len(rows), j])
                cb = _delta_colorbar(fig, limits[col], cax=cax, orientation="horizontal", label="Δ vs prior")
                v = _fmt_limit(limits[col])
                cb.set_ticklabels([f"−{v}", "0", f"+{v}"])
                cb.ax.set_xlabel("Δ vs prior (red: brighter)", fontsize=6.5, labelpad=1)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 200) -> Path:
    """Writes a figure as PNG (or PDF/SVG by extension) with a synthetic-content notice in its metadata.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    metadata = {"Software": "CXR Journey", "Description": FIGURE_NOTICE} if fmt == "png" else {"Subject": FIGURE_NOTICE}
    fig.savefig(out, dpi=dpi, format=fmt, metadata=metadata, facecolor="white")
    return out
