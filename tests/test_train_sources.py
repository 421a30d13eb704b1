"""Sources on tiny fixtures in the real layouts, journeys (pairing, filtering) and ``prepare``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError
from engine.io import write_png
from train.journeys import apply_registration, make_pairs, order_studies
from train.manifest import read_images, read_pairs
from train.sources import load_chexpert, load_dicom_folder, load_folder_csv, load_hannover, load_mimic, prism_caption

MIMIC_LABELS = ("Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,"
                "Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices")


def _png(path: Path, seed: int = 0, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.random.default_rng(seed).uniform(0.2, 0.8, (size, size)).astype(np.float32))


def _gz(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode()))


@pytest.fixture()
def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    root.mkdir()
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
            "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
            "PatientOrientationCodeSequence_CodeMeaning"]
    rows = [  # (dicom, subject, study, view, date, time)
        ("d1", "10000032", "50414267", "PA", "21800506", "213014.531"),
        ("d2", "10000032", "50414267", "LATERAL", "21800506", "213014.531"),
        ("d3", "10000032", "53189527", "PA", "21800626", "165500.312"),
        ("d4", "10000032", "53911762", "PA", "21800507", "101010"),  # between the two: ordering by date
        ("d5", "19000001", "57000001", "PA", "21900101", "0"),  # p19: test split
        ("d6", "19000001", "57000002", "PA", "21900201", "0"),
    ]
    for dicom, subject, study, view, date, time in rows:
        meta.append(f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,{date},{time},"
                    f"Chest 2 Views,postero-anterior,Erect")
        _png(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", seed=len(meta))
    _gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", "\n".join(meta) + "\n")
    split = ["dicom_id,study_id,subject_id,split"] + [f"{d},{st},{su},{'validate' if d == 'd3' else 'train'}"
                                                       for d, su, st, *_ in rows]
    _gz(root / "mimic-cxr-2.0.0-split.csv.gz", "\n".join(split) + "\n")
    labels = {"50414267": {"No Finding": "1.0"}, "53911762": {"Pleural Effusion": "1.0", "Edema": "-1.0"},
              "53189527": {"Pleural Effusion": "0.0", "Support Devices": "1.0"}, "57000001": {"No Finding": "1.0"},
              "57000002": {"No Finding": "1.0"}}
    names = MIMIC_LABELS.split(",")
    lines = [f"subject_id,study_id,{MIMIC_LABELS}"]
    for study, values in labels.items():
        subject = "19000001" if study.startswith("57") else "10000032"
        lines.append(f"{subject},{study}," + ",".join(values.get(n, "") for n in names))
    _gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "\n".join(lines) + "\n")
    reports = {"50414267": "FINAL REPORT\n EXAMINATION: CHEST\n\n FINDINGS: No acute process.\n\n IMPRESSION: Normal.",
               "53911762": "FINAL REPORT\n FINDINGS: Moderate right pleural effusion.\n IMPRESSION: Right effusion.",
               "53189527": "FINAL REPORT\n FINDINGS: Right effusion has resolved. Right PICC line.\n IMPRESSION: Resolved."}
    for study, text in reports.items():
        (root / "files" / "p10" / "p10000032" / f"s{study}.txt").write_text(text)
    return root


def test_mimic_layout(mimic_root):
    records = load_mimic(mimic_root)
    assert {r.image_id for r in records} == {"d1", "d3", "d4", "d5", "d6"}  # PA only
    by_id = {r.image_id: r for r in records}
    assert by_id["d1"].study_date == "2180-05-06" and by_id["d1"].order == 0
    assert by_id["d4"].order == 1 and by_id["d3"].order == 2  # by date, not by file order
    assert by_id["d3"].extra["split"] == "validate" and by_id["d5"].extra["split"] == "test"
    assert by_id["d4"].labels["Pleural Effusion"] == 1.0 and by_id["d4"].labels["Edema"] == -1.0
    assert by_id["d4"].labels["Atelectasis"] is None
    assert by_id["d4"].report == "Moderate right pleural effusion. Right effusion."
    assert by_id["d5"].report == ""
    assert len(load_mimic(mimic_root, views=())) == 6
    assert {r.image_id for r in load_mimic(mimic_root, subsets=("p19",))} == {"d5", "d6"}


def test_mimic_pairs_follow_the_paper(mimic_root):
    pairs = make_pairs(load_mimic(mimic_root))
    # p10: d1 -> d4 -> d3 (both with a finding); p19: normal -> normal dropped (no finding)
    assert [(p.prior_id, p.followup_id) for p in pairs] == [("d1", "d4"), ("d4", "d3")]
    assert pairs[0].description == "new pulmonary edema, new moderate right pleural effusion"
    assert pairs[1].description == "resolved right pleural effusion, new support device"
    assert pairs[0].extra["interval_days"] == 1
    assert len(make_pairs(load_mimic(mimic_root), require_finding="none")) == 3
    assert len(make_pairs(load_mimic(mimic_root), max_days=10)) == 1


def test_mimic_missing_csv_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="metadata CSV"):
        load_mimic(tmp_path)


def _xrv_chexpert_rows(n: int) -> list[str]:
    import torchxrayvision

    path = Path(torchxrayvision.__file__).parent / "data" / "chexpert_train.csv.gz"
    with gzip.open(path, "rt") as fh:
        return [next(fh).rstrip("\n") for _ in range(n + 1)]


def test_chexpert_real_rows_and_prism_captions(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    rows = _xrv_chexpert_rows(12)  # the real train.csv header and first rows (shipped in torchxrayvision)
    (root).mkdir()
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "valid.csv").write_text(rows[0] + "\n" + rows[1].replace("/train/", "/valid/") + "\n")
    for line in rows[1:]:
        rel = line.split(",")[0]
        _png(tmp_path / rel)
        _png(tmp_path / rel.replace("/train/", "/valid/"))
    records = load_chexpert(root)
    frontal = [line for line in rows[1:] if ",Frontal," in line]
    assert len(records) == len(frontal) + 1
    first = records[0]
    assert first.patient_id == "patient00001" and first.order == 1 and first.view == "AP"
    assert first.report == "Chest X-ray showing support devices"  # No Finding=1, Support Devices=1
    p2 = next(r for r in records if r.image_id == "patient00002/study2/view1_frontal")
    assert p2.report == "Chest X-ray showing lung opacity and fracture"  # uncertain -> negative
    positive = load_chexpert(root, uncertain="positive")
    p2u = next(r for r in positive if r.image_id == "patient00002/study2/view1_frontal")
    assert p2u.report.startswith("Chest X-ray showing cardiomegaly, lung opacity, edema, consolidation")
    assert records[-1].extra["split"] == "validate"
    assert prism_caption({"No Finding": 1.0}) == "Normal chest X-ray with no significant findings"
    assert len(load_chexpert(root, frontal_only=False)) > len(records) - 1


def test_dicom_folder_journeys(tmp_path, rg1_dicom):
    import pydicom

    for patient, date, name in (("P1", "20200105", "b"), ("P1", "20200101", "a"), ("P2", "20200101", "c")):
        ds = pydicom.dcmread(rg1_dicom)
        ds.PatientID, ds.StudyDate = patient, date
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        folder = tmp_path / patient
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / f"{name}.dcm")
    (tmp_path / "P1" / "b.txt").write_text("FINDINGS: Large left pneumothorax.\nIMPRESSION: Pneumothorax.")
    (tmp_path / "notes.txt").write_text("not a dicom")
    records = load_dicom_folder(tmp_path)
    assert len(records) == 3
    p1 = sorted((r for r in records if r.patient_id == "P1"), key=lambda r: r.order)
    assert [r.study_date for r in p1] == ["2020-01-01", "2020-01-05"] and p1[0].view == "PA"
    assert p1[1].labels["Pneumothorax"] == 1.0 and p1[1].report.startswith("Large left pneumothorax")
    pairs = make_pairs(records, views=("PA",), require_finding="followup")
    assert len(pairs) == 1 and pairs[0].description == "new large left pneumothorax"
    with pytest.raises(InputError, match="no CT DICOM"):
        load_dicom_folder(tmp_path / "P2", modalities=("CT",))


def test_folder_csv(tmp_path):
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "list.csv").write_text(
        "path,patient_id,study_date,view,report,Edema,site\n"
        "img/1.png,A,2021-03-02,PA,FINDINGS: Mild pulmonary edema.,1,x\n"
        "img/0.png,A,20210301,pa,FINDINGS: Clear lungs.,0,x\n"
        "img/2.png,B,,AP,FINDINGS: Small right effusion.,,y\n")
    records = load_folder_csv(tmp_path / "list.csv")
    a = sorted((r for r in records if r.patient_id == "A"), key=lambda r: r.order)
    assert [Path(r.path).name for r in a] == ["0.png", "1.png"]
    assert a[0].view == "PA" and a[1].labels["Edema"] == 1.0 and a[1].extra["site"] == "x"
    b = next(r for r in records if r.patient_id == "B")
    assert b.labels["Pleural Effusion"] == 1.0  # from the report when no label column is set
    assert make_pairs(records)[0].description == "new mild pulmonary edema"
    (tmp_path / "bad.csv").write_text("path,patient_id\nimg/9.png,A\n")
    with pytest.raises(InputError, match="does not exist"):
        load_folder_csv(tmp_path / "bad.csv")


HANNOVER_HEADER = ("patient_id,image_id,sex,age,size,weight,admission_offset,icu_admission_offset,icu_release_offset,"
                   "death_offset,modality,projection,crp_offset,crp_val,d-dimer_offset,d-dimer_val,factor_xii_offset,"
                   "factor_xii_val,ldh_offset,ldh_val,lymphocytes_offset,lymphocytes_val,neutrophils_offset,"
                   "neutrophils_val,pco2_offset,pco2_val,po2_offset,po2_val")


def test_hannover_layout(tmp_path):
    rows = [("aa", "i1", 0, "ap"), ("aa", "i2", -2, "ap"), ("aa", "i3", -2, "pa"), ("aa", "i4", -5, "ap"),
            ("bb", "i5", 0, "pa")]
    lines = [HANNOVER_HEADER]
    for patient, image, offset, view in rows:
        lines.append(f"{patient},{image},m,,,,{offset},,,,CR,{view}" + ",," * 8)
        _png(tmp_path / "png" / f"{image}.png")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    records = load_hannover(tmp_path)
    studies = order_studies(records)["aa"]
    assert [[r.image_id for r in s] for s in studies] == [["i1"], ["i2", "i3"], ["i4"]]  # exam day = -offset
    pairs = make_pairs(records, views=("PA", "AP"), require_finding="none")
    assert [(p.prior_id, p.followup_id) for p in pairs] == [("i1", "i3"), ("i3", "i4")]  # PA preferred
    assert pairs[0].description == "" and pairs[0].extra["source"] == "hannover"
    assert make_pairs(records, views=("PA", "AP")) == []  # no labels: the finding filter drops all


def test_real_hannover_gives_148_pairs():
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "hannover-covid19"
    if not (root / "data.csv").is_file():
        pytest.skip("the shared Hannover copy is not on this machine")
    pairs = make_pairs(load_hannover(root), views=("PA", "AP"), require_finding="none")
    assert len(pairs) == 148


def test_prepare_cli_and_registration_filter(tmp_path, mimic_root):
    from train.__main__ import main
    from engine.registration import RegistrationResult

    out = tmp_path / "manifests"
    assert main(["prepare", "mimic", "--root", str(mimic_root), "--out", str(out)]) == 0
    images, pairs = read_images(out / "images.jsonl"), read_pairs(out / "pairs.jsonl")
    assert len(images) == 5 and len(pairs) == 2
    assert (out / pairs[0].prior_path).resolve().is_file() and not Path(pairs[0].prior_path).is_absolute()
    assert json.loads((out / "source.json").read_text())["license"].startswith("PhysioNet")
    fake = [RegistrationResult("affine", (1, 0, 0, 1), (0, 0), (0.5, 0.5), s, 0.1, 0.0, 64) for s in (0.9, 0.3)]
    kept = apply_registration(pairs, fake, min_score=0.5)
    assert [p.registration_score for p in kept] == [0.9]
    assert main(["prepare", "mimic", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
