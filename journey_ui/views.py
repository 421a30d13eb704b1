"""How results look on screen: display images, the synthetic banner, the delta panel with its
colour bar, probability tables. Pure numpy/PIL/matplotlib (Agg, no pyplot); no torch, no Gradio.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DISPLAY_MIN_SIDE = 384
"""Images smaller than this (the 256 px model canvas) are enlarged for display."""

SYNTHETIC_BANNER = "SYNTHETIC - research only"
ACQUIRED_BANNER = "ACQUIRED"
"""On every acquired image: the input, a series' studies, the registered real follow-up."""


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def display_image(image: np.ndarray) -> Image.Image:
    """A [0, 1] greyscale ``(H, W)`` image (or ``(H, W, 3)`` uint8/float RGB) as a PIL image,
    enlarged (bicubic) when its short side is under :data:`DISPLAY_MIN_SIDE`."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        pil = Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    else:
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        pil = Image.fromarray(arr[..., :3], mode="RGB")
    short = min(pil.size)
    if short < DISPLAY_MIN_SIDE:
        factor = DISPLAY_MIN_SIDE / short
        pil = pil.resize((round(pil.width * factor), round(pil.height * factor)), Image.BICUBIC)
    return pil


def banner(image: np.ndarray, text: str = SYNTHETIC_BANNER, *, colour: tuple[int, int, int] = (170, 20, 20),
           caption: str | None = None) -> np.ndarray:
    """The display image with a coloured banner burned in along the bottom edge (red
    "SYNTHETIC" for generated images) and an optional caption strip just above it; RGB uint8.

    The bottom edge, because Gradio's image components overlay their label and buttons on the
    top edge: a banner there would be hidden on screen.
    """
    pil = display_image(image).convert("RGB")
    draw = ImageDraw.Draw(pil)
    h = max(12, pil.height // 18)
    top = pil.height - h - 6
    draw.rectangle([0, top, pil.width, pil.height], fill=colour)
    draw.text((4, top + 2), text, fill=(255, 255, 255), font=_font(h))
    if caption:
        ch = max(11, pil.height // 26)
        draw.rectangle([0, top - ch - 6, pil.width, top], fill=(0, 0, 0))
        draw.text((4, top - ch - 4), caption[:90], fill=(255, 255, 255), font=_font(ch))
    return np.asarray(pil)


def mark_synthetic(image: np.ndarray, caption: str | None = None) -> np.ndarray:
    """Burns the visible "SYNTHETIC" banner into a generated image; returns RGB uint8."""
    return banner(image, SYNTHETIC_BANNER, caption=caption)


def mark_acquired(image: np.ndarray, caption: str | None = None) -> np.ndarray:
    """Marks an acquired (not generated) image with a neutral banner; RGB uint8."""
    return banner(image, ACQUIRED_BANNER, colour=(40, 70, 110), caption=caption)


def plain(image: np.ndarray) -> np.ndarray:
    """A display copy without any banner (RGB uint8)."""
    return np.asarray(display_image(image).convert("RGB"))


def delta_panel(delta_rgb: np.ndarray, limit: float, *, synthetic: bool = True) -> np.ndarray:
    """The delta overlay with a vertical colour bar (RdBu_r over ``[-limit, limit]``) beside it.

    Red: brighter in the counterfactual (more attenuation: fluid, opacity, a larger heart);
    blue: darker (more air, a removed device). Returns RGB uint8.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    import matplotlib.cm as cm

    image = banner(delta_rgb, "SYNTHETIC change map") if synthetic else plain(delta_rgb)
    h, w = image.shape[:2]
    fig = Figure(figsize=(w / 100 + 1.3, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, w / (w + 130), 1))
    ax.imshow(image)
    ax.set_axis_off()
    cax = fig.add_axes((w / (w + 130) + 0.03, 0.08, 0.04, 0.84))
    bar = fig.colorbar(cm.ScalarMappable(Normalize(-limit, limit), "RdBu_r"), cax=cax)
    bar.set_label("Δ intensity (counterfactual − prior)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def probability_rows(probabilities: Mapping[str, tuple[float, float]]) -> list[list[Any]]:
    """Rows ``[finding, before, after, change]`` sorted by the size of the change."""
    rows = [[name, round(b, 3), round(a, 3), round(a - b, 3)] for name, (b, a) in probabilities.items()]
    return sorted(rows, key=lambda r: -abs(r[3]))


def metrics_markdown(metrics: Mapping[str, Any], *, skip: tuple[str, ...] = ("probabilities", "notes")) -> str:
    """A Markdown table of an analysis' metrics: nested groups flattened to ``group: key`` rows,
    numbers rounded, None shown as "n/a"; ``skip`` leaves out groups shown elsewhere."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if key in skip:
            continue
        if isinstance(value, Mapping):
            rows.extend((f"{key} {k}", v) for k, v in value.items())
        else:
            rows.append((key, value))
    if not rows:
        return ""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {_fmt(value)} |" for name, value in rows]
    return "\n".join(lines)


def finding_change(metrics: Mapping[str, Any]) -> float | None:
    """The probability change of the analysis' finding (counterfactual minus prior)."""
    finding = metrics.get("finding")
    entry = metrics.get("probabilities", {}).get(finding) if finding else None
    return None if entry is None else entry.get("change")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
