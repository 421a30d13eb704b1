"""The Hannover COVID-19 chest X-ray repository layout (real journeys, no report text).

Layout::

    ROOT/data.csv     patient_id, image_id, sex, age, ..., admission_offset, ..., modality, projection, labs
    ROOT/png/<image_id>.png

``admission_offset`` is the admission day relative to the exam (in days), so the exam day
relative to admission is ``-admission_offset``; it orders each patient's images. Images of one
patient on the same day form one study. There are no reports or labels: descriptions of these
pairs are empty, and pairing keeps them only with ``require_finding=none``.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import InputError
from train.manifest import CHEXPERT_LABELS, ImageRecord
from train.sources._common import find_file, normalize_view, read_csv
from train.sources.mimic import rank_studies


def load_hannover(root: str | os.PathLike[str], *, require_files: bool = True) -> list[ImageRecord]:
    """Reads ``data.csv`` into image records (one study per patient and exam day).

    Raises:
        InputError: no data.csv, or a row without patient_id/image_id/admission_offset.
    """
    root = Path(root)
    csv_path = find_file(root, ("data.csv",), "Hannover data.csv")
    records: list[ImageRecord] = []
    for line, row in enumerate(read_csv(csv_path), start=2):
        try:
            patient, image, offset = row["patient_id"], row["image_id"], row["admission_offset"]
            day = -int(float(offset))
        except (KeyError, ValueError) as exc:
            raise InputError(f"{csv_path}:{line}: needs patient_id, image_id and a numeric admission_offset") from exc
        path = root / "png" / f"{image}.png"
        if require_files and not path.is_file():
            continue
        records.append(ImageRecord(
            image_id=image,
            patient_id=patient,
            study_id=f"{patient}/day{day}",
            order=day,
            study_date=None,
            view=normalize_view(row.get("projection")),
            path=str(path),
            report="",
            labels={k: None for k in CHEXPERT_LABELS},
            source="hannover",
            extra={"day": day, "modality": row.get("modality", ""), "sex": row.get("sex", "")},
        ))
    return rank_studies(records, time_key=lambda r: r.extra["day"])

