"""The dataset manifest: round trips, reproducible bytes, clear errors, patient-level splits."""

from __future__ import annotations

import dataclasses
import json

import pytest

from train.manifest import (
    CHEXPERT_LABELS,
    ImageRecord,
    PairRecord,
    read_images,
    read_pairs,
    split_for,
    write_jsonl,
)


def make_image(k: int = 0, **changes) -> ImageRecord:
    labels = {name: None for name in CHEXPERT_LABELS}
    labels.update({"Pleural Effusion": 1.0, "Pneumothorax": 0.0, "Edema": -1.0})
    record = ImageRecord(
        image_id=f"p1-v{k}", patient_id="p1", study_id=f"p1-s{k}", order=k, study_date="2020-03-0" + str(k + 1),
        view="PA", path=f"images/p1-v{k}.png", report="FINDINGS: x\n\nIMPRESSION: y\n", labels=labels,
        source="simulator", extra={"severities": {"effusion": 0.4}, "nested": [1, 2.5, None]},
    )
    return dataclasses.replace(record, **changes)


def make_pair(**changes) -> PairRecord:
    a, b = make_image(0), make_image(1)
    record = PairRecord(
        pair_id="p1-v0-v1", patient_id="p1", prior_id=a.image_id, followup_id=b.image_id, prior_path=a.path,
        followup_path=b.path, description="New small right pleural effusion.", registration_score=None,
        split="train", counterfactual_path="counterfactuals/p1-v0-v1.png", labels_prior=a.labels,
        labels_followup=b.labels, extra={"change_mask_path": "change_masks/p1-v0-v1.png"},
    )
    return dataclasses.replace(record, **changes)


def test_round_trip(tmp_path):
    images = [make_image(0), make_image(1, study_date=None, view=None, report="")]
    pairs = [make_pair(), make_pair(pair_id="x", registration_score=0.93, counterfactual_path=None, split="test")]
    write_jsonl(tmp_path / "images.jsonl", images)
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert read_images(tmp_path / "images.jsonl") == images
    assert read_pairs(tmp_path / "pairs.jsonl") == pairs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.jsonl", "pairs.jsonl"]  # no temp files left


def test_bytes_are_reproducible_and_keys_sorted(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [make_image(0), make_image(1)])
    write_jsonl(tmp_path / "b.jsonl", [dataclasses.asdict(make_image(0)), dataclasses.asdict(make_image(1))])
    data = (tmp_path / "a.jsonl").read_bytes()
    assert data == (tmp_path / "b.jsonl").read_bytes()
    lines = data.decode().splitlines()
    assert len(lines) == 2
    keys = list(json.loads(lines[0]))
    assert keys == sorted(keys)


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "images.jsonl"
    write_jsonl(path, [make_image(0)])

    def broken():
        yield make_image(1)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert [r.image_id for r in read_images(path)] == ["p1-v0"]  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.jsonl"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (None, "missing field"),
        ("labels", "label 'Edema' must be 1, 0, -1 or null"),
        ("order", "'order' must be a non-negative integer"),
        ("view", "'view' must be one of"),
        ("unknown", "unknown field"),
    ],
)
def test_bad_image_rows_name_file_and_line(tmp_path, line, message):
    good = json.dumps(dataclasses.asdict(make_image(0)))
    row = dataclasses.asdict(make_image(1))
    if line is None:
        del row["path"]
        bad = json.dumps(row)
    elif line == "labels":
        row["labels"]["Edema"] = 0.5
        bad = json.dumps(row)
    elif line == "order":
        row["order"] = -1
        bad = json.dumps(row)
    elif line == "view":
        row["view"] = "oblique"
        bad = json.dumps(row)
    elif line == "unknown":
        row["severity"] = 0.3
        bad = json.dumps(row)
    else:
        bad = line
    path = tmp_path / "images.jsonl"
    path.write_text(good + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=message) as e:
        read_images(path)
    assert f"{path}:3" in str(e.value)


def test_bad_pair_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    for key, value, message in (("split", "val", "'split' must be one of"),
                                ("registration_score", "high", "'registration_score' must be a number"),
                                ("labels_followup", [1, 0], "must be an object")):
        row = dataclasses.asdict(make_pair())
        row[key] = value
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=message) as e:
            read_pairs(path)
        assert f"{path}:1" in str(e.value)


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_images(tmp_path / "nope.jsonl")


def test_split_is_by_patient_deterministic_and_80_10_10():
    assert split_for("patient-42") == split_for("patient-42")
    splits = [split_for(f"sim0-{k:06d}") for k in range(4000)]
    fractions = {s: splits.count(s) / len(splits) for s in ("train", "validate", "test")}
    assert fractions["train"] == pytest.approx(0.8, abs=0.03)
    assert fractions["validate"] == pytest.approx(0.1, abs=0.02)
    assert fractions["test"] == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError, match="sum to 1"):
        split_for("x", (0.5, 0.2, 0.2))
