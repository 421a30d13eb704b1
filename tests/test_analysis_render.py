"""Overlays and figures (matplotlib Agg, no pyplot): colours, sizes, files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.analysis import delta, render
from engine.analysis.attention import AttentionComparison
from engine.errors import InputError


def _image(n: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n] / (n - 1)
    return (0.2 + 0.6 * x * y).astype(np.float32)


def test_delta_colours_are_symmetric_and_white_at_zero():
    c = render.delta_colors(np.array([[-1.0, 0.0, 1.0]]), limit=1.0)[0]
    assert np.all(c[1] > 0.9)  # no change: (near) white
    assert c[2, 0] > c[2, 2] + 0.2  # brighter: red
    assert c[0, 2] > c[0, 0] + 0.2  # darker: blue
    with pytest.raises(InputError):
        render.delta_colors(np.zeros((2, 2)), limit=0.0)


def test_delta_overlay_leaves_unchanged_pixels_alone():
    img = _image()
    d = np.zeros_like(img)
    d[10:20, 10:20] = 0.3
    out = render.delta_overlay(img, d, limit=0.3)
    assert out.shape == (48, 48, 3) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[30, 30], img[30, 30])
    assert out[15, 15, 0] > out[15, 15, 2]
    assert render.to_uint8(out).dtype == np.uint8


def test_heatmap_and_mask_overlays():
    img = _image()
    heat = np.zeros_like(img)
    np.testing.assert_allclose(render.heatmap_overlay(img, heat), render.gray_rgb(img))
    mask = np.zeros((48, 48), bool)
    mask[8:24, 8:24] = True
    out = render.mask_overlay(img, {"heart": mask}, alpha=0.3)
    np.testing.assert_allclose(out[8, 8], render.STRUCTURE_COLORS["heart"])  # outline in the structure's colour
    np.testing.assert_allclose(out[40, 40], img[40, 40])  # outside untouched
    assert render.mask_outline(mask).sum() == 4 * 16 - 4
    with pytest.raises(InputError, match="differ in size"):
        render.mask_overlay(img, {"heart": mask[:10]})


def _read_png(path):
    with Image.open(path) as im:
        return im.size, dict(im.info)


def test_delta_figure_with_colour_bar_and_structure_chart(tmp_path):
    prior = _image()
    cf = prior.copy()
    cf[36:44, 5:15] += 0.2
    masks = {"right_lung": np.zeros((48, 48), bool), "left_lung": np.zeros((48, 48), bool)}
    masks["right_lung"][20:44, 2:20] = True
    masks["left_lung"][20:44, 28:46] = True
    dm = delta.delta_map(cf, prior, sigma_px=1.0, percentile=80, masks=masks)
    fig = render.delta_figure(prior, cf, dm, masks=masks, title="new right lower zone opacity")
    assert len(fig.axes) == 6  # prior, counterfactual, delta, colour bar, spacer, chart
    cbar = fig.axes[3]
    ticks = cbar.get_yticks()
    assert ticks[0] == pytest.approx(-dm.limit) and ticks[-1] == pytest.approx(dm.limit)  # symmetric
    chart = fig.axes[5]
    assert chart.get_yticklabels()[-1].get_text() == "right lower zone"  # the biggest change on top
    size, info = _read_png(render.save_figure(fig, tmp_path / "delta.png", dpi=80))
    assert size[0] > size[1] > 100 and "synthetic" in info.get("Description", "")


def test_attention_segmentation_and_grid_figures(tmp_path):
    img = _image()
    heat = np.zeros_like(img)
    heat[10:20, 10:20] = 1.0
    comp = AttentionComparison("Pleural Effusion", "grad_cam", heat, heat, 0.1, 0.8)
    render.save_figure(render.attention_figure(img, img, comp), tmp_path / "att.png", dpi=60)
    masks = {"heart": img > 0.5}
    render.save_figure(render.segmentation_figure(img, img, masks, masks, {"heart": 1.0}), tmp_path / "seg.png", dpi=60)
    rows = [render.ExampleRow("a", {"Prior": img}, {"Δ": (img - img.mean(), 0.3)}, img),
            render.ExampleRow("b", {"Prior": img}, {}, img)]
    fig = render.example_grid(rows, ["Prior", "Δ"])
    render.save_figure(fig, tmp_path / "grid.png", dpi=60)
    for name in ("att.png", "seg.png", "grid.png"):
        assert (tmp_path / name).stat().st_size > 1000
    with pytest.raises(InputError):
        render.example_grid([], ["Prior"])


def test_delta_and_render_do_not_import_torch():
    """The UI never imports torch: it can use the delta, metric and render code directly."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from engine.analysis import delta, metrics, render; "
            "d = delta.delta_map(np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32)); "
            "render.delta_overlay(np.zeros((8, 8), np.float32), d.display, d.limit); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
