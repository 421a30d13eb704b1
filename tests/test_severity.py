"""The severity rule, case by case."""

import pytest

from engine.severity import apply_severity


@pytest.mark.parametrize(
    ("text", "severity", "expected"),
    [
        ("new right pleural effusion", "moderate", "new moderate right pleural effusion"),
        ("new right pleural effusion", "slight", "new small right pleural effusion"),
        ("small left pneumothorax", "large", "large left pneumothorax"),
        ("interval increase in cardiomegaly", "slight", "interval increase in mild cardiomegaly"),
        ("worsening moderate pulmonary edema", "large", "worsening severe pulmonary edema"),
        ("Large Right Pleural Effusion", "slight", "small Right Pleural Effusion"),
        ("new left lower lobe consolidation", "moderate", "new moderate left lower lobe consolidation"),
        ("bilateral effusions and cardiomegaly", "large", "large bilateral effusions and severe cardiomegaly"),
        # the simulator's location words: replaced before them, never doubled after them
        ("new moderate bibasilar atelectasis", "large", "new severe bibasilar atelectasis"),
        ("new mild lingular consolidation", "moderate", "new moderate lingular consolidation"),
        ("new bilateral mid-lung consolidation", "slight", "new mild bilateral mid-lung consolidation"),
    ],
)
def test_rewrites_findings(text, severity, expected):
    assert apply_severity(text, severity) == expected


@pytest.mark.parametrize(
    "text",
    [
        "without support devices",
        "no pneumothorax",
        "no new pleural effusion",
        "left pneumothorax has resolved",
        "heart size unchanged",
        "lines and tubes removed",
    ],
)
def test_leaves_negations_and_devices_alone(text):
    for severity in ("slight", "moderate", "large"):
        assert apply_severity(text, severity) == text


def test_none_is_identity_and_idempotent():
    text = "new small right pleural effusion; heart size unchanged"
    assert apply_severity(text, "none") == text
    once = apply_severity(text, "large")
    assert apply_severity(once, "large") == once == "new large right pleural effusion; heart size unchanged"


def test_unknown_severity_rejected():
    with pytest.raises(ValueError, match="severity must be one of"):
        apply_severity("effusion", "huge")


def test_the_severity_benchmark_measures_true_sizes_in_order_and_rejects_a_flat_edit():
    """benchmarks/eval_severity.py's finding size, on the simulator's exact renders at each grade."""
    import numpy as np

    from benchmarks.eval_severity import GRADE_VALUES, finding_size, is_monotonic
    from engine.analysis.segmentation import load_segmenter
    from train.simulator import Findings, render, sample_nuisance, sample_patient
    from train.simulator.params import Severity

    seg = load_segmenter("auto")  # the bundled segmenter
    rng = np.random.default_rng(5)
    patient, nuisance = sample_patient(rng), sample_nuisance(rng)
    prior = render(patient, Findings(), nuisance, size=256, noise_seed=0).image
    masks = seg.segment(prior[None, None])[0]
    for finding, side in (("effusion", "left"), ("pneumothorax", "right"), ("edema", None), ("cardiomegaly", None)):
        sizes = {g: finding_size(finding, side, prior, render(patient, Findings(**{finding: Severity(v, side=side)}),
                                                             nuisance, size=256, noise_seed=0).image, masks, seg)
                 for g, v in GRADE_VALUES.items()}
        assert is_monotonic(sizes), (finding, sizes)
    # Effusion on the other side does not count for the asked side.
    other = render(patient, Findings(effusion=Severity(0.8, side="right")), nuisance, size=256, noise_seed=0).image
    assert abs(finding_size("effusion", "left", prior, other, masks, seg)) < 0.005
    assert not is_monotonic({"slight": 0.3, "moderate": 0.3, "large": 0.3})
    assert not is_monotonic({"slight": 0.1, "moderate": 0.3, "large": 0.2})
