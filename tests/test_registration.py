"""engine.registration recovers a known affine transform and scores the fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from engine.registration import RegistrationParams, _image, ncc, register, resample


def phantom(n: int) -> np.ndarray:
    """A smooth chest-like test image: two lungs, a heart, a few rib arcs."""
    y, x = np.mgrid[0:n, 0:n] / n
    img = 0.2 + 0.5 * np.exp(-((x - 0.33) ** 2 / 0.02 + (y - 0.5) ** 2 / 0.08))
    img += 0.5 * np.exp(-((x - 0.67) ** 2 / 0.02 + (y - 0.5) ** 2 / 0.08))
    img += 0.3 * np.exp(-((x - 0.5) ** 2 / 0.005 + (y - 0.6) ** 2 / 0.02))
    for k in range(6):
        img += 0.08 * np.exp(-((y - 0.25 - 0.1 * k - 0.1 * (x - 0.5) ** 2) ** 2) / 0.0004)
    return np.clip(img, 0, 1).astype(np.float32)


def known_pair(n: int = 128) -> tuple[np.ndarray, np.ndarray, sitk.AffineTransform]:
    """(prior, follow-up, true transform prior->follow-up): rotation 4 deg, scale 1.05, shear, shift."""
    fixed = phantom(n)
    truth = sitk.AffineTransform(2)
    truth.SetCenter((0.5, 0.5))
    a, s = math.radians(4), 1.05
    truth.SetMatrix((s * math.cos(a), -s * math.sin(a) + 0.02, s * math.sin(a), s * math.cos(a)))
    truth.SetTranslation((0.03, -0.02))
    # follow-up(q) = prior(truth^-1(q)): the prior's point p appears at truth(p) in the follow-up
    moving = sitk.GetArrayFromImage(sitk.Resample(_image(fixed), _image(fixed), truth.GetInverse(), sitk.sitkLinear, 0.0))
    return fixed, moving, truth


def _max_point_error_px(result, truth, n: int) -> float:
    pts = np.random.default_rng(0).uniform(0.2, 0.8, (50, 2))
    est = np.array([result.to_sitk().TransformPoint(tuple(p)) for p in pts])
    true = np.array([truth.TransformPoint(tuple(p)) for p in pts])
    return float(np.abs(est - true).max() * n)


def test_affine_registration_recovers_known_transform():
    fixed, moving, truth = known_pair(128)
    result = register(fixed, moving, RegistrationParams(transform="affine", size=128))
    assert _max_point_error_px(result, truth, 128) < 1.0
    assert result.score > 0.99 and result.score_before < 0.95
    warped = resample(moving, result)
    inside = warped > 0
    assert ncc(fixed, warped, inside) == pytest.approx(result.score, abs=0.01)


def test_rigid_is_worse_than_affine_on_a_scaled_pair():
    fixed, moving, truth = known_pair(128)
    rigid = register(fixed, moving, RegistrationParams(transform="rigid", size=128))
    affine = register(fixed, moving, RegistrationParams(transform="affine", size=128))
    assert np.linalg.det(np.reshape(rigid.matrix, (2, 2))) == pytest.approx(1.0, abs=1e-6)
    assert _max_point_error_px(rigid, truth, 128) > _max_point_error_px(affine, truth, 128)


def test_params_are_checked():
    with pytest.raises(ValueError, match="transform must be one of"):
        RegistrationParams(transform="bspline")
    with pytest.raises(ValueError, match="at least 32 px"):
        RegistrationParams(size=16)
