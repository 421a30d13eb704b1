"""Delta maps: sign, no uint8 wrap-around, smoothing, threshold, limits, per-structure statistics
(on the simulator's images and masks)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.analysis import delta
from engine.analysis._images import integer_to_unit
from engine.errors import InputError


@pytest.fixture(scope="module")
def sim():
    """A simulated patient without findings, with a right effusion, and with a left pneumothorax
    (same acquisition and noise, so they differ only where the finding is)."""
    from train.simulator.anatomy import sample_patient
    from train.simulator.params import Findings, Severity
    from train.simulator.render import render

    patient = sample_patient(np.random.default_rng(7))
    base = render(patient, size=128, noise_seed=3)
    effusion = render(patient, Findings(effusion=Severity(0.7, side="right")), size=128, noise_seed=3)
    pneumothorax = render(patient, Findings(pneumothorax=Severity(0.7, side="left")), size=128, noise_seed=3)
    return base, effusion, pneumothorax


def test_signed_delta_sign_and_uint8_without_wraparound():
    prior = np.full((4, 4), 10, np.uint8)
    cf = np.full((4, 4), 5, np.uint8)
    d = delta.signed_delta(cf, prior)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, -5 / 255, rtol=1e-6)  # uint8 subtraction would give 251
    np.testing.assert_allclose(delta.signed_delta(prior, cf), 5 / 255, rtol=1e-6)
    assert integer_to_unit(np.array([65535], np.uint16))[0] == 1.0


def test_signed_delta_refuses_mismatched_or_out_of_range_input():
    with pytest.raises(InputError, match="different grids"):
        delta.signed_delta(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        delta.signed_delta(np.full((4, 4), 255.0, np.float32), np.zeros((4, 4), np.float32))


def test_smoothing_keeps_the_mean_and_spreads_a_spike():
    d = np.zeros((21, 21), np.float32)
    d[10, 10] = 1.0
    s = delta.smooth(d, 2.0)
    assert s.sum() == pytest.approx(1.0, rel=1e-4)
    assert s[10, 10] < 0.1 and s[10, 12] > 0
    np.testing.assert_array_equal(delta.smooth(d, 0), d)
    with pytest.raises(InputError):
        delta.smooth(d, -1)


def test_percentile_threshold_keeps_the_top_by_magnitude_with_sign():
    d = np.linspace(-1, 1, 101, dtype=np.float32).reshape(1, -1)
    kept, cutoff = delta.percentile_threshold(d, 90)
    assert cutoff == pytest.approx(0.9)
    assert (kept < 0).sum() == 6 and (kept > 0).sum() == 6  # |d| >= 0.9 on both sides, not only increases
    assert kept.min() == -1.0 and kept.max() == 1.0
    with pytest.raises(InputError, match="percentile"):
        delta.percentile_threshold(d, 100)


def test_symmetric_limit():
    d = np.array([[-0.3, 0.1, 0.2]])
    assert delta.symmetric_limit(d) == pytest.approx(0.3)
    assert delta.symmetric_limit(np.zeros((3, 3))) == delta.MIN_LIMIT


def test_structure_stats_by_hand():
    d = np.zeros((4, 4), np.float32)
    d[0, 0], d[0, 1], d[1, 0] = 0.4, -0.2, 0.1
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    r = delta.structure_stats(d, {"box": mask, "empty": np.zeros((4, 4), bool)}, threshold=0.15)
    box = r["box"]
    assert box.pixels == 4
    assert box.mean == pytest.approx((0.4 - 0.2 + 0.1) / 4)
    assert box.mean_abs == pytest.approx(0.7 / 4)
    assert (box.max_increase, box.max_decrease, box.max_abs) == pytest.approx((0.4, -0.2, 0.4))
    assert box.fraction_changed == pytest.approx(0.5)
    assert box.share_of_change == pytest.approx(1.0)
    assert r["empty"].pixels == 0
    with pytest.raises(InputError, match="resample masks"):
        delta.structure_stats(d, {"bad": np.zeros((3, 3), bool)})


def test_lung_zones_split_each_lung_by_height():
    m = np.zeros((9, 6), bool)
    m[0:9, 0:2] = True
    zones = delta.lung_zones({"right_lung": m}, zones=3)
    assert set(zones) == {"right_upper_zone", "right_middle_zone", "right_lower_zone"}
    assert zones["right_upper_zone"][:3, :2].all() and not zones["right_upper_zone"][3:].any()
    assert sum(z.sum() for z in zones.values()) == m.sum()


def test_effusion_change_is_in_the_right_lower_zone(sim):
    base, effusion, _ = sim
    masks = {k: base.masks[k] for k in ("right_lung", "left_lung", "heart", "mediastinum", "diaphragm")}
    dm = delta.delta_map(effusion.image, base.image, sigma_px=1.0, percentile=90, masks=masks)
    ranked = [r.name for r in dm.ranked("mean_abs")]
    assert ranked[0] == "right_lower_zone"
    assert dm.stats["right_lower_zone"].mean > 0  # fluid: brighter
    assert dm.stats["right_lower_zone"].mean_abs > 10 * dm.stats["left_lower_zone"].mean_abs
    # the simulator's finding mask holds (nearly) all of the change
    inside = np.abs(effusion.image - base.image)[effusion.finding_mask].sum()
    assert inside / np.abs(effusion.image - base.image).sum() > 0.99
    summary = dm.summary()
    assert summary["structures"]["right_lower_zone"]["pixels"] > 0 and summary["limit"] > 0


def test_pneumothorax_darkens_the_left_lung(sim):
    base, _, ptx = sim
    masks = {k: base.masks[k] for k in ("right_lung", "left_lung")}
    dm = delta.delta_map(ptx.image, base.image, masks=masks)
    left = [v for k, v in dm.stats.items() if k.startswith("left_")]
    right = [v for k, v in dm.stats.items() if k.startswith("right_")]
    assert min(r.max_decrease for r in left) < -0.05  # air: darker
    assert max(r.mean_abs for r in left) > 10 * max(r.mean_abs for r in right)
