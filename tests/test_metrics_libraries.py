"""The library-backed metrics give the numbers the hand-written ones gave (floating-point noise aside).

The hand-written AUROC, Pearson, PSNR, SSIM and registration NCC that engine.analysis.metrics and
engine.registration used until scikit-learn, SciPy and scikit-image took over are copied here
verbatim, and compared with the new functions on random data with ties, masks and the degenerate
cases. This file goes once the comparison has been recorded (the commit that deletes it says so).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import rankdata

from engine.analysis import metrics
from engine.registration import ncc


# -- the hand-written implementations, as they were -------------------------------------------


def old_auroc(labels, scores) -> float:
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def old_pearson(x, y) -> float:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denom == 0:
        return float("nan")
    return float(np.clip((a * b).sum() / denom, -1.0, 1.0))


def old_psnr(a, b, mask=None, data_range=1.0) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sq = (a - b) ** 2
    if mask is not None:
        if not mask.any():
            return float("nan")
        sq = sq[mask]
    mse = float(sq.mean())
    if mse == 0:
        return float("inf")
    return float(10.0 * math.log10(data_range**2 / mse))


def old_ssim_map(a, b, data_range=1.0, sigma=1.5) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def blur(x):
        return ndimage.gaussian_filter(x, sigma=sigma, truncate=3.5, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return num / den


def old_ssim(a, b, mask=None, data_range=1.0) -> float:
    smap = old_ssim_map(a, b, data_range)
    if mask is None:
        return float(smap.mean())
    return float(smap[mask].mean()) if mask.any() else float("nan")


def old_ncc(a, b, mask=None) -> float:
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


# -- the comparison ----------------------------------------------------------------------------

MAX_DIFF: dict[str, float] = {}


def same(name: str, old: float, new: float, tol: float) -> None:
    if math.isnan(old) or math.isinf(old):
        assert (math.isnan(new) and math.isnan(old)) or new == old, (name, old, new)
        return
    diff = abs(old - new)
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)
    assert diff <= tol, (name, old, new)


def test_auroc_with_ties_and_one_class() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 400))
        labels = rng.random(n) < rng.uniform(0.05, 0.95)
        scores = rng.random(n)
        if trial % 3 == 0:
            scores = np.round(scores, 1)  # many ties
        if trial % 3 == 1:
            scores = (rng.random(n) < 0.5).astype(float)  # two values only
        same("auroc", old_auroc(labels, scores), metrics.auroc(labels.astype(int), scores), 1e-12)
    assert math.isnan(metrics.auroc([1, 1, 1], [0.1, 0.5, 0.5])) and math.isnan(old_auroc([1, 1, 1], [0.1, 0.5, 0.5]))
    assert math.isnan(metrics.auroc([0, 0], [0.1, 0.5]))
    probs = rng.random((50, 3))
    labels = rng.integers(0, 3, 50)
    old = np.mean([old_auroc(labels == k, probs[:, k]) for k in range(3)])
    same("multiclass_auroc", float(old), metrics.multiclass_auroc(labels, probs), 1e-12)


def test_pearson_with_ties_and_constants() -> None:
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(2, 2000))
        x = rng.standard_normal(n)
        y = rng.uniform(-1, 1) * x + rng.standard_normal(n) * rng.uniform(0, 2)
        if trial % 4 == 0:
            x, y = np.round(x), np.round(y, 1)  # ties
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        same("pearson", old_pearson(x, y), metrics.pearson(x, y), 1e-12)
    for x, y in (([1.0], [2.0]), ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]), ([0.0, 0.0], [0.0, 0.0])):
        assert math.isnan(metrics.pearson(x, y)) and math.isnan(old_pearson(x, y))
    # A constant whose mean is not exact in binary: the old code saw rounding noise as variance.
    assert math.isnan(metrics.pearson([0.1] * 3, [1.0, 2.0, 4.0]))


def _images(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = rng.random(shape)
    b = np.clip(a + rng.uniform(0.001, 0.3) * rng.standard_normal(shape), 0, 1)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = (yy - rng.uniform(0, shape[0])) ** 2 + (xx - rng.uniform(0, shape[1])) ** 2 < rng.uniform(4, 40) ** 2
    return a, b, mask


@pytest.mark.parametrize("shape", [(11, 11), (32, 48), (64, 64), (97, 80), (256, 256)])
def test_psnr_and_ssim_with_masks(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for _ in range(5):
        a, b, mask = _images(rng, shape)
        b32 = b.astype(np.float32)  # the engine's images are float32
        for m in (None, mask, ~mask):
            same("psnr", old_psnr(a, b32, m), metrics.psnr(a, b32, m), 1e-9)
            same("ssim", old_ssim(a, b32, m), metrics.ssim(a, b32, m), 1e-10)
        np.testing.assert_allclose(metrics.ssim_map(a, b), old_ssim_map(a, b), rtol=0, atol=1e-10)
        MAX_DIFF["ssim_map"] = max(MAX_DIFF.get("ssim_map", 0.0), float(np.abs(metrics.ssim_map(a, b) - old_ssim_map(a, b)).max()))
        r = metrics.region_fidelity(b, a, mask)
        same("region_fidelity", old_psnr(b, a, mask), r["psnr_in"], 1e-9)
        same("region_fidelity", old_ssim(b, a, ~mask), r["ssim_out"], 1e-10)
        # identical pixels: inf; an empty mask: nan
        same("psnr", old_psnr(a, a), metrics.psnr(a, a), 0)
        assert math.isnan(metrics.psnr(a, b, np.zeros(shape, bool))) and math.isnan(metrics.ssim(a, b, np.zeros(shape, bool)))


def test_registration_ncc() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        a, b, mask = _images(rng, (64, 64))
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        for m in (None, mask):
            same("ncc", old_ncc(a32, b32, m), ncc(a32, b32, m), 1e-6)
    flat = np.full((16, 16), 0.5, np.float32)
    assert ncc(flat, rng.random((16, 16)).astype(np.float32)) == 0.0 == old_ncc(flat, rng.random((16, 16)))


def test_zz_report_largest_differences(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the largest old-vs-new difference of each metric (``-s`` shows it)."""
    with capsys.disabled():
        print("\nlargest |old - new|:", {k: f"{v:.1e}" for k, v in sorted(MAX_DIFF.items())})
