"""Every metric of engine.analysis.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.analysis import metrics
from engine.errors import InputError


# -- CMIG ------------------------------------------------------------------------------------


def test_cmig_on_biomedjourney_table1_row_follows_the_stated_formula():
    # Section 4.3: CMIG = G(G(accuracy), G(retention)). Table 1, BiomedJourney: pathology AUROC
    # 80.54; race AUROC 97.22, age Pearson 79.38. The formula gives 84.11; the table prints 83.23.
    score = metrics.cmig([80.54], [97.22, 79.38])
    assert round(score, 2) == 84.11
    assert math.isclose(score, math.sqrt(80.54 * math.sqrt(97.22 * 79.38)), rel_tol=1e-12)
    assert round(score, 2) != 83.23  # the printed value does not follow from the formula


def test_cmig_score_parts_and_clipping():
    s = metrics.cmig_score({"pathology_auroc": 64.0}, {"race_auroc": 100.0, "age_pearson": 25.0})
    assert s.accuracy == pytest.approx(64.0)
    assert s.retention == pytest.approx(50.0)  # sqrt(100 * 25)
    assert s.cmig == pytest.approx(math.sqrt(64.0 * 50.0))
    assert s.components == {"pathology_auroc": 64.0, "race_auroc": 100.0, "age_pearson": 25.0}
    clipped = metrics.cmig_score({"a": 80.0}, {"race": 90.0, "age": -10.0})
    assert clipped.clipped == ("age",) and clipped.retention == 0.0 and clipped.cmig == 0.0
    assert math.isnan(metrics.cmig([float("nan")], [90.0]))
    with pytest.raises(InputError, match="at least one"):
        metrics.cmig([], [90.0])


def test_geometric_mean_by_hand():
    assert metrics.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert metrics.geometric_mean([1.0, 10.0, 100.0]) == pytest.approx(10.0)
    assert metrics.geometric_mean([0.0, 5.0]) == 0.0
    with pytest.raises(InputError, match="non-negative"):
        metrics.geometric_mean([-1.0, 4.0])


# -- AUROC, Pearson, KL, CPG -------------------------------------------------------------------


def test_auroc_by_hand_with_ties():
    # positives 0.8, 0.4; negatives 0.4, 0.1, 0.3. Pairs (pos > neg): 0.8 beats all 3 (3),
    # 0.4 beats 0.1 and 0.3 (2) and ties 0.4 (0.5) -> 5.5 / 6.
    assert metrics.auroc([1, 1, 0, 0, 0], [0.8, 0.4, 0.4, 0.1, 0.3]) == pytest.approx(5.5 / 6)
    assert metrics.auroc([0, 1], [0.2, 0.9]) == 1.0
    assert metrics.auroc([0, 1], [0.9, 0.2]) == 0.0
    assert math.isnan(metrics.auroc([1, 1], [0.2, 0.3]))
    with pytest.raises(InputError, match="0 or 1"):
        metrics.auroc([2, 0], [0.1, 0.2])


def test_multilabel_auroc_over_five_findings_skips_undefined():
    labels = np.array([[1, 0, 1, 0, 0], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.8, 0.2, 0.5], [0.2, 0.2, 0.6, 0.7, 0.5], [0.7, 0.3, 0.7, 0.1, 0.5], [0.1, 0.4, 0.1, 0.9, 0.5]])
    s = metrics.multilabel_auroc(labels, scores)
    assert s.per_target["Atelectasis"] == 1.0
    assert s.per_target["Edema"] == 0.75  # pos 0.8, 0.6 vs neg 0.7, 0.1: 3 of 4
    assert s.per_target["Pleural Effusion"] == 1.0
    assert s.undefined == ("Cardiomegaly", "Pneumothorax")
    assert s.mean == pytest.approx((1.0 + 0.75 + 1.0) / 3)


def test_multiclass_auroc_one_vs_rest():
    labels = [0, 1, 2, 0]
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    # class 0: pos .7,.3 vs neg .2,.1 -> 1.0; class 1: pos .7 vs .2,.2,.4 -> 1.0; class 2: pos .7 vs .1,.1,.3 -> 1.0
    assert metrics.multiclass_auroc(labels, probs) == 1.0
    probs[3] = [0.1, 0.8, 0.1]  # class 0: .7 > .2,.1 ; .1 ties .1, < .2 -> (2 + 0.5)/4
    assert metrics.multiclass_auroc(labels, probs) == pytest.approx((2.5 / 4 + 2 / 3 + 1.0) / 3)


def test_pearson_by_hand():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (1, 2, 3, 4), y = (1, 3, 2, 4): sum of deviation products 4, sums of squares 5 and 5 -> 0.8
    assert metrics.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))


def test_kl_divergences_by_hand():
    p = np.array([[0.5, 0.9]])
    q = np.array([[0.5, 0.5]])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert metrics.bernoulli_kl(p, q)[0] == pytest.approx(expected)
    assert metrics.bernoulli_kl(p, p)[0] == pytest.approx(0.0, abs=1e-12)
    assert metrics.categorical_kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        metrics.bernoulli_kl([1.5], [0.5])


def test_counterfactual_prediction_gain():
    assert metrics.counterfactual_prediction_gain(0.2, 0.7) == pytest.approx(0.5)
    assert metrics.counterfactual_prediction_gain(0.7, 0.2) == pytest.approx(0.5)
    np.testing.assert_allclose(
        metrics.counterfactual_prediction_gain([0.2, 0.8], [0.7, 0.3], direction=[1, -1]), [0.5, 0.5])
    assert metrics.counterfactual_prediction_gain(0.7, 0.2, direction=1) == pytest.approx(-0.5)
    with pytest.raises(InputError, match="direction"):
        metrics.counterfactual_prediction_gain(0.1, 0.2, direction=0)


# -- image metrics ---------------------------------------------------------------------------


def test_dice_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[:2, 1:3] = True  # 4 px, 2 shared
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / 8)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert metrics.dice(a, ~a) == 0.0


def test_l1_and_psnr_inside_and_outside_a_region():
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    b[0, :] = 0.5  # 4 px differ by 0.5
    region = np.zeros((4, 4), bool)
    region[0, :] = True
    assert metrics.l1_distance(a, b) == pytest.approx(2.0 / 16)
    assert metrics.l1_distance(a, b, region) == pytest.approx(0.5)
    assert metrics.psnr(a, b, region) == pytest.approx(10 * math.log10(1 / 0.25))  # 6.02 dB
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(1 / (0.25 * 4 / 16)))
    assert metrics.psnr(a, b, ~region) == math.inf
    with pytest.raises(InputError, match="at least 11x11"):  # SSIM's Gaussian window is 11x11
        metrics.region_fidelity(b, a, region)
    a, b, region = (np.kron(x, np.ones((4, 4), x.dtype)) for x in (a, b, region))  # the same on 16x16
    r = metrics.region_fidelity(b, a, region)
    assert r["psnr_out"] == math.inf and r["ssim_out"] < 1.0 and r["psnr_in"] == pytest.approx(6.0206, abs=1e-4)


def test_ssim_matches_scikit_image_and_is_one_for_identical():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((48, 48))
    b = np.clip(a + 0.1 * rng.standard_normal((48, 48)), 0, 1)
    _, ref = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, full=True)
    np.testing.assert_allclose(metrics.ssim_map(a, b), ref, atol=1e-10)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert metrics.ssim(a, b) < 0.97


def test_finite_mean_skips_nan_and_inf():
    assert metrics.finite_mean([1.0, float("nan"), 3.0, float("inf")]) == 2.0
    assert math.isnan(metrics.finite_mean([float("nan")]))


def test_degenerate_cases_are_nan_or_inf_without_a_warning():
    """Where the libraries underneath warn or raise (one class, a constant, identical images), the
    wrappers answer as documented and stay quiet, so an evaluation's log is not flooded."""
    import warnings

    from engine.registration import ncc

    rng = np.random.default_rng(0)
    a = rng.random((16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(metrics.auroc([0, 0, 0], [0.1, 0.2, 0.3]))
        assert math.isnan(metrics.pearson([0.1, 0.1, 0.1], [1.0, 2.0, 4.0]))  # mean not exact in binary
        assert math.isnan(metrics.pearson([1.0], [2.0]))
        assert metrics.psnr(a, a) == math.inf
        assert math.isnan(metrics.psnr(a, a, np.zeros((16, 16), bool)))
        assert math.isnan(metrics.ssim(a, a, np.zeros((16, 16), bool)))
        assert ncc(np.full((16, 16), 0.5, np.float32), a.astype(np.float32)) == 0.0
    assert metrics.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: chance


def test_ssim_mean_covers_the_border():
    """ssim() averages every pixel of the map; scikit-image's own mean leaves out a 5 px border."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((40, 40))
    b = a.copy()
    b[:3, :] = 0.0  # a change along the top edge only
    smap = metrics.ssim_map(a, b)
    assert metrics.ssim(a, b) == pytest.approx(smap.mean())
    cropped = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
    assert cropped == pytest.approx(smap[5:-5, 5:-5].mean()) and metrics.ssim(a, b) < cropped
