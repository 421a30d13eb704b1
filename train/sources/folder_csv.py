"""A folder of images described by one CSV.

Columns (header names; only the first two are required)::

    path          image file, relative to the CSV's folder (or absolute)
    patient_id    who it is
    study_id      which study (default: patient_id + date/order)
    study_date    YYYY-MM-DD or YYYYMMDD
    order         integer time order within the patient (when there are no dates)
    view          PA, AP, LATERAL, ...
    report        free-text report (Findings/Impression are extracted) or a caption
    <label>       any of CheXpert's labels (1, 0, -1, empty); labels come from the report otherwise

Other columns are kept in ``extra``.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import InputError
from train.manifest import CHEXPERT_LABELS, ImageRecord
from train.reports import findings_from_text, labels_from_findings, report_text
from train.sources._common import iso_date, normalize_view, parse_label, read_csv
from train.sources.mimic import rank_studies

_KNOWN = {"path", "patient_id", "study_id", "study_date", "order", "view", "report", "image_id"}


def load_folder_csv(csv_path: str | os.PathLike[str], *, require_files: bool = True) -> list[ImageRecord]:
    """Reads a CSV-described image folder.

    Args:
        csv_path: the CSV (its folder is the image root).
        require_files: raise when an image file is missing.

    Raises:
        InputError: missing columns, bad values or missing files, naming the row.
    """
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        candidates = sorted(csv_path.glob("*.csv"))
        if len(candidates) != 1:
            raise InputError(f"{csv_path} holds {len(candidates)} CSV files; pass the CSV itself")
        csv_path = candidates[0]
    if not csv_path.is_file():
        raise InputError(f"{csv_path} does not exist")
    records: list[ImageRecord] = []
    for line, row in enumerate(read_csv(csv_path), start=2):
        where = f"{csv_path}:{line}"
        if not row.get("path") or not row.get("patient_id"):
            raise InputError(f"{where}: every row needs path and patient_id")
        path = Path(row["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        if require_files and not path.is_file():
            raise InputError(f"{where}: image {path} does not exist")
        date = iso_date(row.get("study_date"))
        try:
            order = int(row["order"]) if row.get("order") else 0
        except ValueError as exc:
            raise InputError(f"{where}: order {row['order']!r} is not an integer") from exc
        full = row.get("report", "")
        text = report_text(full) if full else ""
        labels = {k: parse_label(row[k]) for k in CHEXPERT_LABELS if k in row}
        if not any(v is not None for v in labels.values()) and text:
            labels = labels_from_findings(findings_from_text(text))
        records.append(ImageRecord(
            image_id=row.get("image_id") or path.stem,
            patient_id=row["patient_id"],
            study_id=row.get("study_id") or f"{row['patient_id']}/{date or order}",
            order=order,
            study_date=date,
            view=normalize_view(row.get("view")),
            path=str(path),
            report=text,
            labels={k: labels.get(k) for k in CHEXPERT_LABELS},
            source="csv",
            extra={k: v for k, v in row.items() if k not in _KNOWN and k not in CHEXPERT_LABELS},
        ))
    if not records:
        raise InputError(f"{csv_path} has no rows")
    return rank_studies(records, time_key=lambda r: (r.study_date or "", r.order))
