"""MIMIC-CXR-JPG (and its reports) in the PhysioNet layout.

Expected files (as downloaded; ``.csv.gz`` or ``.csv``)::

    ROOT/mimic-cxr-2.0.0-metadata.csv    dicom_id, subject_id, study_id, ViewPosition, StudyDate, StudyTime, ...
    ROOT/mimic-cxr-2.0.0-split.csv       dicom_id, study_id, subject_id, split (train/validate/test)
    ROOT/mimic-cxr-2.0.0-chexpert.csv    subject_id, study_id, Atelectasis, ..., Support Devices
    ROOT/files/p10/p10000032/s50414267/02aa804e-....jpg
    REPORTS/files/p10/p10000032/s50414267.txt    (mimic-cxr-reports.zip; REPORTS defaults to ROOT)

BiomedJourney keeps frontal PA images only and uses subsets p10-p18 for training/validation
and p19 for testing; both are options here. Image split: ``test`` for the test subsets; else
``validate`` where the official split says validate (or test), and ``train`` otherwise.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from engine.errors import InputError
from train.manifest import CHEXPERT_LABELS, ImageRecord
from train.reports import report_text
from train.sources._common import find_file, iso_date, normalize_view, parse_label, read_csv

MIMIC_SUBSETS = tuple(f"p{i}" for i in range(10, 20))


def load_mimic(
    root: str | os.PathLike[str],
    *,
    reports_root: str | os.PathLike[str] | None = None,
    views: tuple[str, ...] = ("PA",),
    subsets: tuple[str, ...] = MIMIC_SUBSETS,
    test_subsets: tuple[str, ...] = ("p19",),
    image_ext: str = ".jpg",
    require_files: bool = True,
) -> list[ImageRecord]:
    """Reads MIMIC-CXR-JPG metadata, split, CheXpert labels and reports into image records.

    Args:
        root: folder with the three CSVs and ``files/``.
        reports_root: folder holding ``files/pXX/pSUBJECT/sSTUDY.txt`` (default ``root``).
        views: ViewPosition values to keep (paper: PA only); empty keeps all.
        subsets: patient folders to read (``p10`` .. ``p19``).
        test_subsets: subsets whose images are the test split (paper: ``p19``).
        image_ext: ``.jpg`` (MIMIC-CXR-JPG) or ``.dcm`` (MIMIC-CXR).
        require_files: skip images whose file is missing (else keep the record).

    Returns:
        One record per kept image; ``report`` is the Findings + Impression text, the full
        report is in ``extra["report_full"]``; ``order`` ranks the patient's studies in time.

    Raises:
        InputError: a CSV is missing or a row is malformed.
    """
    root = Path(root)
    reports = Path(reports_root) if reports_root else root
    meta_csv = find_file(root, ("mimic-cxr-2.0.0-metadata.csv",), "MIMIC-CXR metadata CSV")
    split_csv = find_file(root, ("mimic-cxr-2.0.0-split.csv",), "MIMIC-CXR split CSV")
    label_csv = find_file(root, ("mimic-cxr-2.0.0-chexpert.csv",), "MIMIC-CXR CheXpert label CSV")

    splits = {row["dicom_id"]: row["split"] for row in read_csv(split_csv)}
    labels: dict[str, dict[str, float | None]] = {}
    for row in read_csv(label_csv):
        labels[row["study_id"]] = {k: parse_label(v) for k, v in row.items() if k not in ("subject_id", "study_id")}

    records: list[ImageRecord] = []
    report_cache: dict[str, str] = {}
    keep_views = {v.upper() for v in views}
    for row in read_csv(meta_csv):
        try:
            subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        except KeyError as exc:
            raise InputError(f"{meta_csv} lacks column {exc}") from exc
        subset = f"p{subject[:2]}"
        view = normalize_view(row.get("ViewPosition"))
        if subset not in subsets or (keep_views and view not in keep_views):
            continue
        folder = Path("files") / subset / f"p{subject}"
        path = root / folder / f"s{study}" / f"{dicom}{image_ext}"
        if require_files and not path.is_file():
            continue
        if study not in report_cache:
            report_file = reports / folder / f"s{study}.txt"
            report_cache[study] = report_file.read_text(encoding="utf-8", errors="replace") if report_file.is_file() else ""
        full = report_cache[study]
        study_labels = labels.get(study, {})
        official = splits.get(dicom, "train")
        split = "test" if subset in test_subsets else ("validate" if official in ("validate", "test") else "train")
        records.append(ImageRecord(
            image_id=dicom,
            patient_id=subject,
            study_id=study,
            order=0,
            study_date=iso_date(row.get("StudyDate")),
            view=view,
            path=str(path),
            report=report_text(full) if full else "",
            labels={k: study_labels.get(k) for k in CHEXPERT_LABELS},
            source="mimic",
            extra={"split": split, "official_split": official, "study_time": row.get("StudyTime", ""),
                   "report_full": full, "all_labels": study_labels,
                   "view_position": row.get("ViewPosition", "")},
        ))
    return rank_studies(records, time_key=lambda r: (r.study_date or "", float(r.extra.get("study_time") or 0)))


def rank_studies(records: list[ImageRecord], time_key) -> list[ImageRecord]:
    """Sets each record's ``order`` to its study's rank (0, 1, ...) within the patient, by ``time_key``."""
    first: dict[tuple[str, str], tuple] = {}
    for r in records:
        key = (r.patient_id, r.study_id)
        k = (time_key(r), r.study_id)
        first[key] = min(first.get(key, k), k)
    by_patient: dict[str, list[tuple]] = {}
    for (patient, study), k in first.items():
        by_patient.setdefault(patient, []).append((k, study))
    rank = {(p, s): i for p, items in by_patient.items() for i, (_, s) in enumerate(sorted(items))}
    return [replace(r, order=rank[(r.patient_id, r.study_id)]) for r in records]
