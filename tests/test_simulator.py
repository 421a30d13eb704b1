"""The chest radiograph simulator: masks match what is drawn, severity acts monotonically and
locally, counterfactuals are exact, text agrees with the truth, and the writer is reproducible.

All renders are 128 x 128 so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from train.manifest import CHEXPERT_LABELS, read_images, read_pairs
from train.simulator import (
    MASK_BITS,
    PSF_RADIUS,
    WORD_GRADES,
    Device,
    Findings,
    Nuisance,
    Severity,
    Visit,
    change_mask,
    decode_bits,
    describe_progression,
    encode_bits,
    read_masks,
    read_png,
    render,
    render_counterfactual,
    render_visit,
    report,
    sample_journey,
    sample_patient,
    severity_grade,
    severity_word,
)
from train.simulator.writer import SimulationConfig, write_dataset

S = 128


@pytest.fixture(scope="module")
def patients():
    rng = np.random.default_rng(1234)
    return [sample_patient(rng) for _ in range(4)]


@pytest.fixture(scope="module")
def patient(patients):
    return patients[0]


def centroid_x(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def centroid_y(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[0].mean())


# --------------------------------------------------------------------------------------------
# Contract and determinism


def test_render_contract(patient):
    r = render(patient, size=S)
    assert r.image.dtype == np.float32 and r.image.shape == (S, S)
    assert 0.0 <= r.image.min() and r.image.max() <= 1.0
    assert set(r.masks) == set(MASK_BITS)
    assert all(m.dtype == bool and m.shape == (S, S) for m in r.masks.values())
    assert tuple(r.labels) == CHEXPERT_LABELS
    assert r.labels["No Finding"] == 1.0 and r.labels["Support Devices"] == 0.0
    json.dumps(r.params)  # JSON-friendly
    assert r.params["patient"]["patient_id"] == patient.patient_id


def test_same_inputs_same_pixels_and_noise_seed_matters(patient):
    findings = Findings(effusion=Severity(0.5, side="left"))
    a = render(patient, findings, Nuisance(rotation_deg=3.0), size=S, noise_seed=7)
    b = render(patient, findings, Nuisance(rotation_deg=3.0), size=S, noise_seed=7)
    c = render(patient, findings, Nuisance(rotation_deg=3.0), size=S, noise_seed=8)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.bits, b.bits)
    assert not np.array_equal(a.image, c.image)


def test_sample_patient_uses_only_the_given_generator():
    a = sample_patient(np.random.default_rng(5))
    b = sample_patient(np.random.default_rng(5))
    c = sample_patient(np.random.default_rng(6))
    assert a == b and a != c


@pytest.mark.parametrize("size", [128, 200])
def test_sizes(patient, size):
    r = render(patient, size=size)
    assert r.image.shape == (size, size)
    assert r.masks["left_lung"].any()


def test_bad_size_is_rejected(patient):
    with pytest.raises(ValueError, match="between 128 and 1024"):
        render(patient, size=64)


def test_lateral_finding_needs_a_side():
    with pytest.raises(ValueError, match="needs a side"):
        Findings(effusion=Severity(0.5))


# --------------------------------------------------------------------------------------------
# Masks match what is drawn


def test_masks_match_what_is_drawn(patients):
    for patient in patients:
        r = render(patient, size=S)
        m, img = r.masks, r.image
        area = {name: mask.mean() for name, mask in m.items()}
        assert 0.06 < area["left_lung"] < 0.25 and 0.06 < area["right_lung"] < 0.25
        assert 0.02 < area["heart"] < 0.12
        assert 0.003 < area["diaphragm"] < 0.05
        assert 0.03 < area["spine"] < 0.2
        assert area["finding"] == 0.0 and area["devices"] == 0.0
        # Patient's left lung on the image's right (PA view), right lung on the image's left.
        assert centroid_x(m["left_lung"]) > S / 2 > centroid_x(m["right_lung"])
        # The heart's bulk is to the patient's left (image right of the midline).
        assert centroid_x(m["heart"]) > S / 2
        # Air is dark, the heart (no air) is bright.
        assert img[m["left_lung"]].mean() + 0.2 < img[m["heart"]].mean()
        assert img[m["right_lung"]].mean() + 0.2 < img[m["heart"]].mean()
        # Structures nest and stack as in anatomy.
        assert not (m["heart"] & ~m["mediastinum"]).any()
        assert not (m["left_lung"] & m["right_lung"]).any()
        assert not (m["left_lung"] & m["heart"]).any()
        assert centroid_y(m["diaphragm"]) > centroid_y(m["left_lung"])
        assert abs(centroid_x(m["spine"]) - S / 2) < 0.05 * S
        # The right hemidiaphragm is higher than the left.
        right_cols = m["diaphragm"][:, : S // 3]
        left_cols = m["diaphragm"][:, 2 * S // 3:]
        assert centroid_y(right_cols) < centroid_y(left_cols)


def test_mask_bits_round_trip(patient):
    r = render(patient, Findings(pneumothorax=Severity(0.4, side="left")), devices=(Device("ett"),), size=S)
    assert np.array_equal(encode_bits(r.masks), r.bits)
    assert all(np.array_equal(decode_bits(r.bits)[k], r.masks[k]) for k in MASK_BITS)


def test_nuisance_moves_the_anatomy(patient):
    base = render(patient, size=S)
    shifted = render(patient, nuisance=Nuisance(shift_x=0.1), size=S)
    dx = centroid_x(shifted.masks["right_lung"]) - centroid_x(base.masks["right_lung"])
    assert dx == pytest.approx(0.1 * S / 2, abs=1.5)
    shallow = render(patient, nuisance=Nuisance(inspiration=0.0), size=S)
    deep = render(patient, nuisance=Nuisance(inspiration=1.0), size=S)
    assert centroid_y(deep.masks["diaphragm"]) > centroid_y(shallow.masks["diaphragm"]) + 2
    assert deep.masks["right_lung"].sum() > shallow.masks["right_lung"].sum()


# --------------------------------------------------------------------------------------------
# Findings: monotone inside their region, nothing outside


def _cp_angle(mask: np.ndarray, side: str) -> np.ndarray:
    """The lowest, most lateral eighth of a lung mask (around the costophrenic angle)."""
    rows, cols = np.nonzero(mask)
    low = rows >= np.percentile(rows, 80)
    lateral = cols <= np.percentile(cols, 40) if side == "right" else cols >= np.percentile(cols, 60)
    region = np.zeros_like(mask)
    region[rows[low & lateral], cols[low & lateral]] = True
    return region


def test_effusion_raises_attenuation_at_the_costophrenic_angle_only(patient):
    nuisance = Nuisance(rotation_deg=-2.0)
    none = render(patient, nuisance=nuisance, size=S, noise_seed=3)
    lung = none.masks["right_lung"]
    angle = _cp_angle(lung, "right")
    at_angle, in_lung, images = [], [], []
    for v in (0.15, 0.4, 0.7, 1.0):
        r = render(patient, Findings(effusion=Severity(v, side="right")), nuisance, size=S, noise_seed=3)
        at_angle.append(float(r.image[angle].mean()))
        in_lung.append(float(r.attenuation[lung].mean()))
        images.append(r)
        outside = ~r.finding_mask
        assert np.array_equal(r.image[outside], none.image[outside])
        # The effusion stays on the patient's right (image left).
        assert not r.finding_mask[:, S // 2 + 8:].any()
    # Even a small effusion blunts the angle; fluid then fills it (plateau) and rises.
    assert none.image[angle].mean() + 0.03 < at_angle[0]
    assert all(a <= b for a, b in zip(at_angle, at_angle[1:]))
    assert float(none.attenuation[lung].mean()) < in_lung[0]
    assert all(a < b for a, b in zip(in_lung, in_lung[1:]))
    areas = [r.finding_mask.sum() for r in images]
    assert all(a <= b for a, b in zip(areas, areas[1:]))


def test_cardiomegaly_grows_the_heart_mask(patient):
    none = render(patient, size=S, noise_seed=1)
    areas, ctrs = [none.masks["heart"].sum()], [none.cardiothoracic_ratio]
    for v in (0.25, 0.5, 0.75, 1.0):
        r = render(patient, Findings(cardiomegaly=Severity(v)), size=S, noise_seed=1)
        areas.append(r.masks["heart"].sum())
        ctrs.append(r.cardiothoracic_ratio)
        assert np.array_equal(r.image[~r.finding_mask], none.image[~r.finding_mask])
        assert r.image[r.finding_mask].mean() > none.image[r.finding_mask].mean()
    assert all(a < b for a, b in zip(areas, areas[1:]))
    assert all(a < b for a, b in zip(ctrs, ctrs[1:]))
    assert 0.35 < ctrs[0] < 0.52 and ctrs[-1] > 0.58


@pytest.mark.parametrize("name", ["atelectasis", "consolidation", "edema", "pneumothorax", "effusion"])
def test_each_finding_is_local_and_monotone(patient, name):
    nuisance = Nuisance(shift_x=0.02, inspiration=0.8)
    none = render(patient, nuisance=nuisance, size=S, noise_seed=11)
    changes = []
    for v in (0.3, 0.9):
        sev = Severity(v, side="right", seed=5, zone="lower")
        r = render(patient, Findings(**{name: sev}), nuisance, size=S, noise_seed=11)
        inside = r.finding_mask
        assert inside.any()
        assert np.array_equal(r.image[~inside], none.image[~inside])
        delta = r.attenuation[inside] - none.attenuation[inside]
        changes.append(float(delta.mean()))
        if name != "edema":  # edema is bilateral; the rest stays on the patient's right
            assert centroid_x(inside) < S / 2
    if name == "pneumothorax":  # air: less attenuation, more with severity
        assert changes[1] < 0
        assert abs(changes[1]) > abs(changes[0]) * 0.9
    else:
        assert 0 < changes[0] < changes[1]


def test_pneumothorax_shows_a_pleural_line_and_no_markings(patient):
    none = render(patient, size=S, noise_seed=2)
    r = render(patient, Findings(pneumothorax=Severity(0.8, side="left")), size=S, noise_seed=2)
    change = r.attenuation - none.attenuation
    assert change.max() > 0.3  # the visceral pleural line
    assert change.min() < -0.3  # air and lost vascular markings beyond it
    assert centroid_x(r.finding_mask) > S / 2


def test_devices_are_bright_and_local(patient):
    none = render(patient, size=S, noise_seed=4)
    for device in (Device("ett"), Device("ng_tube"), Device("cvc", side="right"), Device("pacemaker", side="left"),
                   Device("icd", side="left"), Device("ecg", seed=3), Device("chest_tube", side="right"),
                   Device("sternal_wires", seed=1)):
        r = render(patient, devices=(device,), size=S, noise_seed=4)
        inside = r.device_mask
        assert inside.any(), device.kind
        assert np.array_equal(r.image[~inside], none.image[~inside]), device.kind
        # Radio-opaque: the brightest device pixels are far above what was there.
        assert np.max(r.image[inside] - none.image[inside]) > 0.1, device.kind
        assert r.labels["Support Devices"] == 1.0


# --------------------------------------------------------------------------------------------
# Exact counterfactuals


def test_counterfactual_differs_from_prior_only_in_the_change_region(patients):
    rng = np.random.default_rng(99)
    checked = 0
    for patient in patients:
        visits = sample_journey(patient, 4, rng)
        for prior, followup in zip(visits, visits[1:]):
            a = render_visit(patient, prior, S)
            b = render_visit(patient, followup, S)
            cf = render_counterfactual(patient, prior, followup, S)
            region = change_mask(a, cf)
            assert np.array_equal(a.image[~region], cf.image[~region])
            union = a.finding_mask | a.device_mask | cf.finding_mask | cf.device_mask
            assert not (region & ~union).any()
            assert cf.labels == b.labels
            if prior.findings != followup.findings or set(prior.devices) != set(followup.devices):
                assert region.any() and (a.image[region] != cf.image[region]).any()
            checked += 1
    assert checked == 12


def test_change_mask_is_tight(patient):
    prior = Visit(nuisance=Nuisance(rotation_deg=4.0), noise_seed=5)
    followup = Visit(findings=Findings(effusion=Severity(0.5, side="left")), noise_seed=6)
    a = render_visit(patient, prior, S)
    cf = render_counterfactual(patient, prior, followup, S)
    region = change_mask(a, cf)
    # The allowance is the blur radius: eroding by it leaves only pixels that really changed.
    from scipy import ndimage

    core = ndimage.binary_erosion(region, np.ones((2 * PSF_RADIUS + 1,) * 2))
    assert (a.image[core] != cf.image[core]).mean() > 0.9
    with pytest.raises(ValueError, match="render_counterfactual"):
        change_mask(a, render_visit(patient, followup, S))


# --------------------------------------------------------------------------------------------
# Text


def test_severity_words_map_to_grades():
    for v in np.linspace(0.01, 1.0, 100):
        for name in ("effusion", "pneumothorax", "cardiomegaly", "edema", "atelectasis", "consolidation"):
            word = severity_word(name, float(v), np.random.default_rng(int(v * 1000)))
            assert WORD_GRADES[word] == severity_grade(float(v))
    assert severity_grade(0.33) == "slight" and severity_grade(0.34) == "moderate"
    assert severity_grade(0.66) == "moderate" and severity_grade(0.67) == "large"
    assert severity_word("effusion", 0.5) == "moderate" and severity_word("effusion", 0.9) == "large"
    assert severity_word("cardiomegaly", 0.9) == "severe"


def test_report_states_findings_with_side_and_severity():
    rng = np.random.default_rng(0)
    text, labels = report(Findings(effusion=Severity(0.8, side="right"), pneumothorax=Severity(0.05, side="left")),
                          (Device("ett"),), rng)
    assert text.startswith("FINDINGS:") and "\n\nIMPRESSION:" in text
    assert "large right pleural effusion" in text.lower()
    assert "possible" in text.lower() and "left pneumothorax" in text.lower()
    assert labels["Pleural Effusion"] == 1.0 and labels["Pneumothorax"] == -1.0
    assert labels["Support Devices"] == 1.0 and labels["No Finding"] is None
    text, labels = report(Findings(), (), rng)
    assert labels["No Finding"] == 1.0 and "no acute cardiopulmonary" in text.lower()
    assert all(labels[k] in (0.0, None) for k in labels if k != "No Finding")


def test_progression_descriptions():
    rng = np.random.default_rng(1)
    none = Visit()
    small_right = Visit(findings=Findings(effusion=Severity(0.2, side="right")))
    d = describe_progression(none, small_right, rng).lower()
    assert "right pleural effusion" in d and any(w in d for w in ("small", "trace"))
    assert any(w in d for w in ("new", "development", "developed"))
    worse = Visit(findings=Findings(effusion=Severity(0.8, side="right")))
    d = describe_progression(small_right, worse, rng).lower()
    assert "increase" in d or "worsening" in d or "increased" in d
    assert "large" in d
    ptx = Visit(findings=Findings(pneumothorax=Severity(0.5, side="left")))
    d = describe_progression(ptx, none, rng).lower()
    assert "left pneumothorax" in d and any(w in d for w in ("resolved", "resolution", "no longer"))
    tubes = Visit(devices=(Device("ett"), Device("ng_tube"), Device("cvc", side="right")))
    d = describe_progression(tubes, none, rng).lower()
    assert any(w in d for w in ("removed", "removal", "without support devices", "no support devices"))
    phrasings = {describe_progression(tubes, none, np.random.default_rng(s)).lower() for s in range(60)}
    assert any(p.startswith("without support devices") for p in phrasings)  # what users type
    bilateral = Visit(findings=Findings(effusion=Severity(0.5, side="bilateral")))
    phrasings = {describe_progression(none, bilateral, np.random.default_rng(s)) for s in range(60)}
    assert any("effusions have developed" in p for p in phrasings)
    assert not any("effusions has" in p for p in phrasings)
    d = describe_progression(small_right, small_right, rng).lower()
    assert any(w in d for w in ("no significant interval change", "stable", "unchanged"))


def test_descriptions_of_random_journeys_are_short_sentences(patients):
    rng = np.random.default_rng(7)
    lengths = []
    for k in range(40):
        visits = sample_journey(patients[k % len(patients)], 3, rng)
        for prior, followup in zip(visits, visits[1:]):
            d = describe_progression(prior, followup, rng)
            assert d[0].isupper() and d.endswith(".")
            lengths.append(len(d))
    assert 20 <= min(lengths) and max(lengths) <= 300
    assert 50 <= np.mean(lengths) <= 200


# --------------------------------------------------------------------------------------------
# Dataset writer


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    a = SimulationConfig(out=str(root / "a"), patients=3, visits=3, size=S, seed=5, dicom=True, workers=1)
    write_dataset(a)
    return root, a


def test_writer_same_seed_same_bytes_different_seed_different_patients(dataset):
    root, a = dataset
    from train.__main__ import main

    # Same settings through the CLI with two worker processes: identical bytes, DICOM included.
    rc = main(["simulate", "--out", str(root / "b"), "--patients", "3", "--visits", "3", "--size", str(S),
               "--seed", "5", "--dicom", "--workers", "2", "--quiet"])
    assert rc == 0
    ha, hb = _hashes(Path(a.out)), _hashes(root / "b")
    assert any(name.endswith(".dcm") for name in ha)
    assert ha == hb
    write_dataset(SimulationConfig(out=str(root / "c"), patients=3, visits=3, size=S, seed=6, dicom=True))
    hc = _hashes(root / "c")
    images_a = {v for k, v in ha.items() if k.startswith(("images/", "dicom/"))}
    images_c = {v for k, v in hc.items() if k.startswith(("images/", "dicom/"))}
    assert images_a.isdisjoint(images_c)
    ids_a = {r.patient_id for r in read_images(Path(a.out) / "images.jsonl")}
    ids_c = {r.patient_id for r in read_images(root / "c" / "images.jsonl")}
    assert ids_a.isdisjoint(ids_c)


def test_writer_manifest_and_files(dataset):
    root, a = dataset
    out = Path(a.out)
    images = read_images(out / "images.jsonl")
    pairs = read_pairs(out / "pairs.jsonl")
    assert len(images) == 9 and len(pairs) == 6
    by_id = {r.image_id: r for r in images}
    for r in images:
        assert r.source == "simulator" and r.view == "PA" and set(r.labels) == set(CHEXPERT_LABELS)
        assert (out / r.path).is_file() and (out / r.extra["mask_path"]).is_file()
        assert r.report.startswith("FINDINGS:")
        masks = read_masks(out / r.extra["mask_path"])
        assert masks["left_lung"].any() and centroid_x(masks["left_lung"]) > S / 2
        params = json.loads((out / r.extra["params_path"]).read_text())
        assert params["patient"]["patient_id"] == r.patient_id
    for p in pairs:
        assert p.split in ("train", "validate", "test")
        assert {by_id[p.prior_id].patient_id, by_id[p.followup_id].patient_id} == {p.patient_id}
        assert by_id[p.followup_id].order == by_id[p.prior_id].order + 1
        prior = read_png(out / p.prior_path)
        cf = read_png(out / p.counterfactual_path)
        region = read_png(out / p.extra["change_mask_path"]) > 0.5
        assert np.array_equal(prior[~region], cf[~region])
        assert 20 <= len(p.description) <= 300
    assert len({p.split for p in pairs if p.patient_id == pairs[0].patient_id}) == 1


def test_writer_dicom(dataset):
    pydicom = pytest.importorskip("pydicom")
    root, a = dataset
    out = Path(a.out)
    record = read_images(out / "images.jsonl")[0]
    ds = pydicom.dcmread(out / record.extra["dicom_path"])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Modality == "CR" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.ViewPosition == "PA" and ds.PatientID == record.patient_id
    assert ds.StudyDate == record.study_date.replace("-", "")
    assert ds.BitsStored == 8 and float(ds.PixelSpacing[0]) == pytest.approx(400.0 / S)
    assert ds.StudyInstanceUID.startswith("2.25.")
    png = np.rint(read_png(out / record.path) * 255).astype(np.uint8)
    assert np.array_equal(ds.pixel_array, png)


def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    from train.__main__ import main

    for argv in (["simulate", "--out", str(tmp_path), "--size", "100"],
                 ["simulate", "--out", str(tmp_path), "--patients", "zero"],
                 ["simulate", "--out", str(tmp_path), "--bits", "12"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error" in err


# --------------------------------------------------------------------------------------------
# Single-edit pairs (simulate --edits)


def test_severity_edits_differ_only_in_grade_and_use_the_workstations_words():
    from engine.severity import apply_severity
    from train.simulator.edits import GRADE_VALUES, sample_edits

    rng, text_rng = np.random.default_rng(0), np.random.default_rng(1)
    sides, user_style = [], 0
    for _ in range(60):
        prior, edits = sample_edits(sample_patient(rng), rng, text_rng, kind="severity")
        assert [e.kind for e in edits] == ["severity"] * 3
        added = [{n: s for n, s in e.target.findings.present().items() if n not in prior.findings.present()}
                 for e in edits]
        assert all(len(a) == 1 for a in added)
        (name,) = {next(iter(a)) for a in added}
        sevs = [a[name] for a in added]
        assert len({(s.side, s.seed, s.zone) for s in sevs}) == 1  # the same lesion, three sizes
        assert [severity_grade(s.value) for s in sevs] == list(GRADE_VALUES)
        for edit, grade in zip(edits, GRADE_VALUES):
            assert edit.target.nuisance == prior.nuisance and edit.target.noise_seed == prior.noise_seed
            assert edit.target.devices == prior.devices
            if edit.description.startswith("new "):  # the user's form: what the severity rule writes
                user_style += 1
                assert apply_severity(edit.description, grade) == edit.description
        if sevs[0].side in ("left", "right"):
            sides.append(sevs[0].side)
            assert all(sevs[0].side in e.description.lower() or "lingul" in e.description for e in edits)
    assert user_style > 60
    assert 0.35 < sides.count("left") / len(sides) < 0.65  # left and right taught equally


def test_device_progress_and_no_change_edits():
    from train.simulator.edits import EDIT_KINDS, sample_edits

    rng, text_rng = np.random.default_rng(2), np.random.default_rng(3)
    for _ in range(10):
        prior, (edit,) = sample_edits(sample_patient(rng), rng, text_rng, kind="devices")
        assert prior.devices and edit.target.devices == () and edit.target.findings == prior.findings
        prior, (edit,) = sample_edits(sample_patient(rng), rng, text_rng, kind="progress")
        changed = [n for n in prior.findings.present() if getattr(edit.target.findings, n) != getattr(prior.findings, n)]
        assert len(changed) == 1
        after = getattr(edit.target.findings, changed[0])
        before = getattr(prior.findings, changed[0])
        assert after is None or severity_grade(after.value) != severity_grade(before.value)
        prior, (edit,) = sample_edits(sample_patient(rng), rng, text_rng, kind="none")
        assert edit.target == prior
    with pytest.raises(ValueError, match="kind must be one of"):
        sample_edits(sample_patient(rng), rng, text_rng, kind="swap")
    assert len(EDIT_KINDS) == 4
    from train.simulator import FINDING_NAMES
    from train.simulator.edits import _FINDING_WEIGHTS
    assert set(_FINDING_WEIGHTS) == set(FINDING_NAMES)  # a new simulated finding gets edit pairs too


def test_writer_edits_mode(tmp_path):
    from train.__main__ import main

    out = tmp_path / "edits"
    assert main(["simulate", "--out", str(out), "--patients", "8", "--size", str(S), "--seed", "4",
                 "--edits", "--quiet"]) == 0
    pairs = read_pairs(out / "pairs.jsonl")
    images = {r.image_id: r for r in read_images(out / "images.jsonl")}
    assert len(images) == 8 + len(pairs) and len(pairs) >= 8
    assert {p.extra["edit"] for p in pairs} <= {"severity", "progress", "devices", "none"}
    assert json.loads((out / "simulation.json").read_text())["settings"]["edits"] is True
    for p in pairs:
        prior, cf = read_png(out / p.prior_path), read_png(out / p.counterfactual_path)
        # the edit's target image is the exact counterfactual, and only the edit region differs
        assert np.array_equal(read_png(out / p.followup_path), cf)
        region = read_png(out / p.extra["change_mask_path"]) > 0.5
        assert np.array_equal(prior[~region], cf[~region])
        assert images[p.prior_id].order == 0 and images[p.followup_id].patient_id == p.patient_id
        if p.extra["edit"] == "none":
            assert np.array_equal(prior, cf)
    # journeys written before edits existed keep their settings file
    write_dataset(SimulationConfig(out=str(tmp_path / "j"), patients=1, visits=2, size=S, seed=4))
    assert "edits" not in json.loads((tmp_path / "j" / "simulation.json").read_text())["settings"]


def test_edit_kinds_restrict_the_edits_drawn(tmp_path, capsys):
    from train.__main__ import main
    from train.simulator.edits import sample_edits

    # the default draws are those of folders written before --edit-kinds existed
    a = sample_edits(sample_patient(np.random.default_rng(5)), np.random.default_rng(6), np.random.default_rng(7))
    b = sample_edits(sample_patient(np.random.default_rng(5)), np.random.default_rng(6), np.random.default_rng(7),
                     kinds=None)
    assert a == b
    out = tmp_path / "devices"
    assert main(["simulate", "--out", str(out), "--patients", "4", "--size", str(S), "--seed", "4",
                 "--edits", "--edit-kinds", "devices", "--quiet"]) == 0
    pairs = read_pairs(out / "pairs.jsonl")
    assert len(pairs) == 4 and {p.extra["edit"] for p in pairs} == {"devices"}
    assert json.loads((out / "simulation.json").read_text())["settings"]["edit_kinds"] == ["devices"]
    for bad in (["--edit-kinds", "devices,swap", "--edits"], ["--edit-kinds", "devices"], ["--edit-kinds", ",", "--edits"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["simulate", "--out", str(tmp_path / "bad"), "--patients", "1", "--quiet", *bad])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "edit kinds must be distinct names among severity, progress, devices, none" in err
    assert "--edit-kinds needs --edits" in err
    assert not (tmp_path / "bad").exists()


def test_removal_devices_widen_what_a_removal_edit_adds(tmp_path, capsys):
    from train.__main__ import main
    from train.simulator.edits import sample_edits

    def devices(i: int, **kw) -> tuple:
        prior, edits = sample_edits(sample_patient(np.random.default_rng(i)), np.random.default_rng(100 + i),
                                    np.random.default_rng(200 + i), kind="devices", **kw)
        assert all(e.target.devices == () for e in edits)
        return tuple((d.kind, d.side, d.seed) for d in prior.devices)

    # the default keeps the draws of folders written before the option existed (values from that code)
    assert [devices(i) for i in range(3)] == [
        (("ett", None, 589641002), ("cvc", "right", 1781282635)), (("ng_tube", None, 531566554),),
        (("ng_tube", None, 2135383847), ("ecg", None, 646773875))]
    wide = [devices(i, removal_devices=("pacemaker", "chest_tube")) for i in range(12)]
    assert all({"pacemaker", "chest_tube"} & {k for k, _, _ in d} for d in wide)
    assert all(side in ("left", "right") for d in wide for k, side, _ in d if k in ("pacemaker", "chest_tube"))

    out = tmp_path / "cardiac"
    assert main(["simulate", "--out", str(out), "--patients", "3", "--size", str(S), "--seed", "4", "--edits",
                 "--edit-kinds", "devices", "--removal-devices", "pacemaker,icd", "--quiet"]) == 0
    settings = json.loads((out / "simulation.json").read_text())["settings"]
    assert settings["removal_devices"] == ["pacemaker", "icd"]
    for p in read_pairs(out / "pairs.jsonl"):
        removed = {c["name"] for c in p.extra["changes"] if c["kind"] == "device" and c["change"] == "removed"}
        assert removed & {"pacemaker", "icd"}
    for bad in (["--removal-devices", "pacemaker,stent", "--edits"], ["--removal-devices", "pacemaker"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["simulate", "--out", str(tmp_path / "bad"), "--patients", "1", "--quiet", *bad])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "removal devices must be distinct names among ett, ng_tube" in err
    assert "--removal-devices needs --edits" in err
    assert not (tmp_path / "bad").exists()
