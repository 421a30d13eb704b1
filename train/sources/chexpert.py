"""CheXpert (train.csv / valid.csv) with PRISM's label captions.

Layout (as downloaded)::

    ROOT/train.csv, ROOT/valid.csv    Path, Sex, Age, Frontal/Lateral, AP/PA, No Finding, ..., Support Devices
    ROOT/train/patient00001/study1/view1_frontal.jpg

The CSV's ``Path`` column starts with the dataset folder's name (``CheXpert-v1.0-small/train/...``);
it is resolved against ROOT's parent, or against ROOT when the first component differs.

PRISM fine-tunes Stable Diffusion on captions built from the labels: "Chest X-ray showing
pleural effusion and support devices", or "Normal chest X-ray with no significant findings"
when no finding is positive. CheXpert has no dates: ``order`` is the study number.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from engine.errors import InputError
from train.manifest import CHEXPERT_LABELS, ImageRecord
from train.sources._common import normalize_view, parse_label, read_csv

CHEXPERT_ALL_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
NORMAL_CAPTION = "Normal chest X-ray with no significant findings"
UNCERTAIN_POLICIES = ("negative", "positive", "ignore")


def prism_caption(labels: dict[str, float | None], *, uncertain: str = "negative",
                  findings: tuple[str, ...] = CHEXPERT_ALL_LABELS[1:]) -> str:
    """PRISM's caption for one image's labels.

    Args:
        labels: label -> 1, 0, -1 or None.
        uncertain: how -1 counts: ``negative`` (U-Zeros), ``positive`` (U-Ones) or ``ignore``
            (left out of the caption, like a negative).
        findings: labels that may be named, in caption order.

    Returns:
        ``"Chest X-ray showing a, b and c"`` or :data:`NORMAL_CAPTION`.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, not {uncertain!r}")
    positive = [name for name in findings
                if labels.get(name) == 1 or (labels.get(name) == -1 and uncertain == "positive")]
    if not positive:
        return NORMAL_CAPTION
    names = [p.lower() for p in positive]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"Chest X-ray showing {listed}"


def _resolve(root: Path, csv_path: str) -> Path:
    parts = Path(csv_path).parts
    if parts and parts[0] == root.name:
        return root.parent / csv_path
    return root / csv_path


def load_chexpert(
    root: str | os.PathLike[str],
    *,
    csvs: tuple[str, ...] = ("train.csv", "valid.csv"),
    frontal_only: bool = True,
    uncertain: str = "negative",
    require_files: bool = True,
) -> list[ImageRecord]:
    """Reads CheXpert CSVs into image records whose ``report`` is PRISM's caption.

    Args:
        root: the dataset folder (holding the CSVs).
        csvs: CSV files to read; ``train.csv`` rows get split ``train``, others ``validate``.
        frontal_only: keep frontal views only (PRISM trains on frontal images).
        uncertain: uncertain-label policy for captions (see :func:`prism_caption`).
        require_files: skip rows whose image is missing.

    Raises:
        InputError: a CSV is missing or lacks the expected columns.
    """
    root = Path(root)
    records: list[ImageRecord] = []
    for name in csvs:
        csv_path = root / name
        if not csv_path.is_file():
            raise InputError(f"{root} has no {name}; point --root at the CheXpert folder holding train.csv/valid.csv")
        split = "train" if name.startswith("train") else "validate"
        for row in read_csv(csv_path):
            if "Path" not in row:
                raise InputError(f"{csv_path} has no Path column; is it a CheXpert CSV?")
            if frontal_only and row.get("Frontal/Lateral", "Frontal") != "Frontal":
                continue
            path = _resolve(root, row["Path"])
            if require_files and not path.is_file():
                continue
            match = re.search(r"(patient\d+)/(study(\d+))/(view\d+_\w+)", row["Path"])
            if not match:
                raise InputError(f"{csv_path}: path {row['Path']!r} is not patientN/studyN/viewN_*.jpg")
            patient, study, number, view_name = match.groups()
            labels = {k: parse_label(row.get(k)) for k in CHEXPERT_ALL_LABELS}
            records.append(ImageRecord(
                image_id=f"{patient}/{study}/{view_name}",
                patient_id=patient,
                study_id=f"{patient}/{study}",
                order=int(number),
                study_date=None,
                view=normalize_view(row.get("AP/PA")) or ("LATERAL" if row.get("Frontal/Lateral") == "Lateral" else None),
                path=str(path),
                report=prism_caption(labels, uncertain=uncertain),
                labels={k: labels.get(k) for k in CHEXPERT_LABELS},
                source="chexpert",
                extra={"split": split, "all_labels": labels, "sex": row.get("Sex", ""),
                       "age": row.get("Age", ""), "uncertain_policy": uncertain},
            ))
    return records
