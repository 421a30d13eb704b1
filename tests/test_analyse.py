"""The analysis service behind the workstation's panels: numpy-only results from the bundled
classifier and segmenter, graceful degradation without them, and the follow-up comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from engine.analyse import Analyst, EditAnalysis, FollowupComparison
from engine.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256


@pytest.fixture(scope="module")
def analyst() -> Analyst:
    """The bundled small classifier and segmenter (a few seconds to load, once)."""
    a = Analyst("auto", "auto")
    status = a.status()
    if not (a.findings and a.structures):
        pytest.skip(f"the bundled analysis models are not installed: {status}")
    return a


@pytest.fixture(scope="module")
def prior() -> np.ndarray:
    """A simulated 256 px radiograph (the bundled models were trained on these)."""
    from train.simulator.anatomy import sample_patient
    from train.simulator.render import render

    return render(sample_patient(np.random.default_rng(11)), size=SIZE, noise_seed=1).image


@pytest.fixture(scope="module")
def blob_edit(analyst, prior) -> tuple[np.ndarray, np.ndarray]:
    """``(counterfactual, blob mask)``: a bright Gaussian blob added inside the right lung only."""
    lung = ndimage.binary_erosion(analyst.structure_mask(prior, "right_lung"), iterations=6)
    assert lung.sum() > 2000, "the bundled segmenter did not find the right lung"
    cy, cx = (float(v) for v in np.argwhere(lung).mean(axis=0))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    blob = 0.35 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 12.0**2)) * lung
    cf = np.clip(prior + blob, 0.0, 1.0).astype(np.float32)
    return cf, (cf - prior) > 0


def _check_rgb(rgb: np.ndarray | None) -> None:
    assert rgb is not None and rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8


def test_identical_images_show_no_change(analyst, prior):
    r = analyst.analyse(prior, prior.copy(), structure="right_lung")
    assert isinstance(r, EditAnalysis)
    assert r.delta.shape == (SIZE, SIZE) and r.delta.dtype == np.float32 and not r.delta.any()
    assert r.delta_limit > 0
    for rgb in (r.delta_rgb, r.attention_rgb, r.attention_prior_rgb, r.segmentation_rgb):
        _check_rgb(rgb)
    assert set(r.dice) == set(analyst.structures) and all(v == 1.0 for v in r.dice.values())
    assert set(r.probabilities) == set(analyst.findings)
    for before, after in r.probabilities.values():
        assert before == pytest.approx(after, abs=1e-6)
    assert r.finding in analyst.findings and "no probability changed" in r.notes[0]
    assert r.change_inside == 0.0 and r.change_outside == 0.0 and r.change_fraction_inside == 0.0


def test_a_blob_in_the_right_lung_is_measured_inside_it(analyst, prior, blob_edit):
    cf, blob = blob_edit
    r = analyst.analyse(prior, cf, structure="Right lung", finding="effusion")
    assert r.structure == "right_lung" and r.finding == "Pleural Effusion"
    assert r.change_inside > 10 * r.change_outside
    assert r.change_fraction_inside > 0.9
    assert (r.delta[blob] > 0).all() and (r.delta[~blob] == 0).all()
    # the overlay is red (brighter) at the blob's peak and plain grey far from it
    peak = np.unravel_index(int(np.argmax(r.delta)), r.delta.shape)
    red, green, blue = (int(v) for v in r.delta_rgb[peak])
    assert red > blue + 40
    assert r.delta_rgb[0, 0, 0] == r.delta_rgb[0, 0, 1] == r.delta_rgb[0, 0, 2]
    assert r.delta_limit == pytest.approx(np.percentile(r.delta[blob], 99.5), rel=1e-4)
    # attention maps share one scale: different images, different maps
    assert not np.array_equal(r.attention_rgb, r.attention_prior_rgb)
    assert min(r.dice.values()) > 0.8


def test_the_finding_defaults_to_the_largest_probability_change(analyst, prior, blob_edit):
    cf, _ = blob_edit
    r = analyst.analyse(prior, cf)
    changes = {f: abs(b - a) for f, (a, b) in r.probabilities.items()}
    assert r.finding == max(changes, key=changes.get)
    assert r.structure is None and r.change_inside is None and r.change_fraction_inside is None


def test_unknown_names_and_bad_images_are_input_errors(analyst, prior):
    with pytest.raises(InputError, match="does not predict 'Fracture'; it predicts Atelectasis, Cardiomegaly"):
        analyst.analyse(prior, prior, finding="Fracture")
    with pytest.raises(InputError, match="unknown structure 'liver'; the segmenter knows left_lung, right_lung"):
        analyst.analyse(prior, prior, structure="liver")
    with pytest.raises(InputError, match="unknown structure 'liver'; the segmenter knows"):
        analyst.structure_mask(prior, ["right_lung", "liver"])
    with pytest.raises(InputError, match="different grids"):
        analyst.analyse(prior, prior[:128, :128])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        analyst.analyse(prior, prior * 3)
    mask = analyst.structure_mask(prior, ("left lung", "right_lung"))
    assert mask.dtype == bool and mask.shape == prior.shape and mask.mean() > 0.2


def test_metrics_are_json_ready(analyst, prior, blob_edit):
    cf, _ = blob_edit
    m = analyst.analyse(prior, cf, structure="right_lung").metrics()
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    assert m["structure"] == "right_lung" and m["change_fraction_inside"] > 0.9
    assert set(m["probabilities"]) == set(analyst.findings) and m["dice_mean"] > 0.8
    assert m["delta"]["max_increase"] > 0 and m["delta"]["max_decrease"] == 0.0


def test_the_cardiothoracic_ratio_follows_the_heart_not_a_lung_opacity(analyst, prior, blob_edit):
    from train.simulator.anatomy import sample_patient
    from train.simulator.params import Findings, Severity
    from train.simulator.render import render

    cf, _ = blob_edit
    before, after = analyst.analyse(prior, cf).cardiothoracic_ratio
    assert 0.3 < before < 0.55 and abs(after - before) < 0.01  # a right-lung opacity leaves the heart alone
    enlarged = render(sample_patient(np.random.default_rng(11)), Findings(cardiomegaly=Severity(0.8)),
                      size=SIZE, noise_seed=1).image
    m = analyst.analyse(prior, enlarged).metrics()["cardiothoracic_ratio"]
    assert m["prior"] == pytest.approx(before, abs=1e-4) and m["counterfactual"] > before + 0.08


def test_without_models_the_analysis_degrades_and_says_why(prior, blob_edit):
    cf, _ = blob_edit
    a = Analyst(classifier=None, segmenter=None)
    assert a.findings == () and a.structures == ()
    assert a.status() == {"classifier": "no classifier: turned off", "segmenter": "no segmenter: turned off"}
    r = a.analyse(prior, cf, finding="effusion", structure="right_lung")
    assert r.probabilities == {} and r.dice == {} and r.finding is None and r.structure is None
    assert r.attention_rgb is None and r.attention_prior_rgb is None and r.segmentation_rgb is None
    assert r.change_inside is None and r.change_outside is None and r.change_fraction_inside is None
    assert r.cardiothoracic_ratio is None and r.metrics()["cardiothoracic_ratio"] is None
    assert r.delta.any() and r.delta_rgb.shape == (SIZE, SIZE, 3)
    text = " ".join(r.notes)
    assert "'effusion' is not shown: no classifier: turned off" in text
    assert "No anatomy overlay or Dice: no segmenter: turned off" in text
    json.dumps(r.metrics(), allow_nan=False)
    with pytest.raises(InputError, match="need an anatomy segmenter"):
        a.structure_mask(prior, "right_lung")


def test_a_model_that_fails_to_load_is_reported_not_raised(tmp_path, prior):
    a = Analyst(classifier=tmp_path / "missing", segmenter=tmp_path)
    r = a.analyse(prior, prior)
    status = a.status()
    assert status["classifier"].startswith("no classifier:") and "Unknown classifier" in status["classifier"]
    assert status["segmenter"].startswith("no segmenter:") and "config.json is missing" in status["segmenter"]
    assert r.probabilities == {} and r.dice == {} and any("config.json is missing" in n for n in r.notes)


def test_loaded_models_are_taken_as_they_are_and_grad_cam_works_under_no_grad(prior):
    import torch

    from engine.analysis import smallnet
    from engine.analysis.classifier import SmallClassifier
    from engine.analysis.segmentation import SmallSegmenter

    g = torch.Generator().manual_seed(0)
    clf = SmallClassifier(smallnet.build(smallnet.SmallNetConfig(
        kind="classifier", targets=("Cardiomegaly", "Pleural Effusion"), input_resolution=32, widths=(8, 16), groups=4), g),
        smallnet.SmallNetCard(name="tiny-clf"))
    seg = SmallSegmenter(smallnet.build(smallnet.SmallNetConfig(
        kind="segmenter", targets=("right_lung", "heart"), input_resolution=32, widths=(8, 16), groups=4), g),
        smallnet.SmallNetCard(name="tiny-seg"))
    a = Analyst(clf, seg)
    assert a.status() == {"classifier": "tiny-clf on cpu", "segmenter": "tiny-seg on cpu"}
    cf = np.clip(prior + 0.1, 0, 1).astype(np.float32)
    reference = a.analyse(prior, cf, finding="Pleural_Effusion")
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            r = a.analyse(prior, cf, finding="Pleural_Effusion")
        assert r.finding == "Pleural Effusion" and set(r.dice) == {"right_lung", "heart"}
        np.testing.assert_array_equal(r.attention_rgb, reference.attention_rgb)
    assert r.attention_rgb.shape == (SIZE, SIZE, 3) and r.attention_rgb.dtype == np.uint8
    assert a.simulated_only() == [] and not any("simulated" in n for n in r.notes)  # their cards name no data


def test_the_priors_masks_are_made_once_for_every_edit_of_it(prior):
    """Each edit of a film analyses the same prior: its segmentation is kept, not redone."""
    import torch

    from engine.analysis import smallnet
    from engine.analysis.segmentation import SmallSegmenter

    seg = SmallSegmenter(smallnet.build(smallnet.SmallNetConfig(
        kind="segmenter", targets=("right_lung", "heart"), input_resolution=32, widths=(8, 16), groups=4),
        torch.Generator().manual_seed(0)), smallnet.SmallNetCard(name="tiny-seg"))
    segmented = []
    real_segment = seg.segment
    seg.segment = lambda images, *a, **k: segmented.append(len(images)) or real_segment(images, *a, **k)
    a = Analyst(None, seg)
    edits = [np.clip(prior + d, 0, 1).astype(np.float32) for d in (0.05, 0.1, 0.05)]
    results = [a.analyse(prior, cf) for cf in edits]
    assert segmented == [2, 1]  # the prior and the first edit, then the second edit alone (the third: both kept)
    assert results[0].dice == results[2].dice
    fresh = Analyst(None, seg).analyse(prior, edits[1])
    assert fresh.dice == results[1].dice
    np.testing.assert_array_equal(fresh.segmentation_rgb, results[1].segmentation_rgb)
    masks = a._segment(seg, prior)[0]
    assert not masks["heart"].flags.writeable  # kept masks cannot be changed by a caller

def test_each_networks_stated_limits_go_beside_its_numbers(prior):
    import torch

    from engine.analysis import smallnet
    from engine.analysis.classifier import SmallClassifier
    from engine.analysis.segmentation import SmallSegmenter

    g = torch.Generator().manual_seed(0)
    real = ({"name": "hannover (real films)", "license": "CC BY 3.0"},)
    clf = SmallClassifier(smallnet.build(smallnet.SmallNetConfig(
        kind="classifier", targets=("Pleural Effusion",), input_resolution=32, widths=(8, 16), groups=4), g),
        smallnet.SmallNetCard(name="clf", training_data=real, limits="validated on rendered findings only."))
    seg = SmallSegmenter(smallnet.build(smallnet.SmallNetConfig(
        kind="segmenter", targets=("right_lung", "left_lung", "heart"), input_resolution=32, widths=(8, 16), groups=4),
        g), smallnet.SmallNetCard(name="seg", training_data=({"name": "simulated radiographs", "license": "MIT"},),
                                  limits="never shown"))
    r = Analyst(clf, seg).analyse(prior, prior)
    assert "clf: validated on rendered findings only." in r.notes
    assert any("seg was trained on simulated radiographs only" in n for n in r.notes)
    assert not any("never shown" in n for n in r.notes)  # the simulated-only note says it already


def test_bundled_models_say_what_their_numbers_cannot_be_trusted_for(analyst, prior):
    """The bundled networks learned real films too (journey-mini v8's issue), but not everything on
    them: each analysis carries each card's own limits beside its numbers, and the segmenter's says
    that the CTR on a real film is approximate."""
    assert analyst.simulated_only() == []
    r = analyst.analyse(prior, prior)
    for model in (analyst.classifier, analyst.segmenter):
        assert model.card.limits and f"{model.name}: {model.card.limits}" in r.notes
    assert any("CTR are approximate" in n for n in r.notes)


def test_compare_followup_registers_a_shifted_followup(analyst, prior, blob_edit):
    cf, _ = blob_edit
    followup = np.clip(ndimage.shift(cf, (3.0, -4.0), order=1, mode="nearest"), 0, 1).astype(np.float32)
    c = analyst.compare_followup(prior, cf, followup)
    assert isinstance(c, FollowupComparison)
    for arr in (c.registered_followup, c.delta_real, c.delta_counterfactual):
        assert arr.shape == (SIZE, SIZE) and arr.dtype == np.float32
    for rgb in (c.real_rgb, c.counterfactual_rgb):
        _check_rgb(rgb)
    assert c.psnr > 25 and c.ssim > 0.8
    assert c.ncc > 0.9 and c.ncc > c.ncc_before
    assert c.delta_correlation > 0.8
    assert c.coverage.mean() > 0.9 and min(c.dice.values()) > 0.8
    # one colour scale for both: a high percentile of the changed pixels of the two deltas together
    both = np.abs(np.concatenate([c.delta_real[c.coverage], c.delta_counterfactual[c.coverage]]))
    assert c.delta_limit == pytest.approx(np.percentile(both[both > 0], 99.5), rel=1e-4)
    m = c.metrics()
    assert json.loads(json.dumps(m, allow_nan=False)) == m and m["psnr_db"] > 25


def test_compare_followup_letterboxes_a_followup_of_another_size(prior, blob_edit):
    from engine.io import to_square

    cf, _ = blob_edit
    bigger, _ = to_square(cf, 320)
    c = Analyst(None, None).compare_followup(prior, cf, (bigger * 65535).round().astype(np.uint16))
    assert c.registered_followup.shape == (SIZE, SIZE) and c.dice == {}
    assert c.psnr > 25 and c.ncc > 0.9
    assert any("letterboxed" in n for n in c.notes) and any("No anatomy Dice" in n for n in c.notes)


def test_importing_and_building_the_service_does_not_import_torch():
    code = ("import sys, engine.analyse; engine.analyse.Analyst(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
