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
