"""A folder of DICOM radiographs: patient, study and date tags give the journeys.

Every ``*.dcm`` (or extension-less DICOM) file below ROOT with modality CR or DX is one image.
A report may sit next to it as ``<same name>.txt``, or per study as ``report.txt`` in the
file's folder; its Findings + Impression become the text and the rule-based labeller
(:func:`train.reports.findings_from_text`) gives the labels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.errors import InputError
from train.manifest import ImageRecord
from train.reports import findings_from_text, labels_from_findings, report_text
from train.sources._common import iso_date, normalize_view
from train.sources.mimic import rank_studies

log = logging.getLogger(__name__)


def load_dicom_folder(
    root: str | os.PathLike[str],
    *,
    modalities: tuple[str, ...] = ("CR", "DX"),
    views: tuple[str, ...] = (),
) -> list[ImageRecord]:
    """Reads the headers (not the pixels) of every DICOM below ``root``.

    Args:
        root: folder searched recursively.
        modalities: modalities to keep.
        views: ViewPosition values to keep (empty: all).

    Returns:
        One record per image; studies ranked in time by StudyDate + StudyTime.

    Raises:
        InputError: ``root`` is not a folder or holds no usable DICOM.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder of DICOM files")
    records: list[ImageRecord] = []
    skipped = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", "")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            skipped += 1
            continue
        modality = str(ds.get("Modality", "")).upper()
        view = normalize_view(str(ds.get("ViewPosition", "")))
        if modality not in modalities or (views and view not in views):
            skipped += 1
            continue
        patient = str(ds.get("PatientID", "")) or path.parent.name
        study = str(ds.get("StudyInstanceUID", "")) or f"{patient}/{ds.get('StudyDate', '')}"
        report_file = next((p for p in (path.with_suffix(".txt"), path.parent / "report.txt") if p.is_file()), None)
        full = report_file.read_text(encoding="utf-8", errors="replace") if report_file else ""
        text = report_text(full) if full else ""
        labels = labels_from_findings(findings_from_text(text)) if text else {}
        try:
            date = iso_date(str(ds.get("StudyDate", "")))
        except InputError:
            date = None
        records.append(ImageRecord(
            image_id=str(ds.get("SOPInstanceUID", "")) or path.stem,
            patient_id=patient,
            study_id=study,
            order=0,
            study_date=date,
            view=view,
            path=str(path),
            report=text,
            labels=labels,
            source="dicom",
            extra={"study_time": str(ds.get("StudyTime", "")), "modality": modality, "report_full": full},
        ))
    if skipped:
        log.info("skipped %d files below %s (not DICOM, or not a %s radiograph)", skipped, root, "/".join(modalities))
    if not records:
        raise InputError(f"no {'/'.join(modalities)} DICOM radiographs found below {root}")
    return rank_studies(records, time_key=lambda r: (r.study_date or "", r.extra["study_time"]))
