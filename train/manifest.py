"""The dataset manifest: one schema for every image source (simulator, MIMIC-CXR, CheXpert, DICOM
folders).

A dataset folder holds ``images.jsonl`` (one :class:`ImageRecord` per line) and ``pairs.jsonl``
(one :class:`PairRecord` per consecutive pair of one patient's studies). Paths inside records are
relative to the folder that holds the manifest. Labels follow CheXpert: 1.0 positive, 0.0
negative, -1.0 uncertain, None not mentioned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
    "Pneumothorax",
    "Support Devices",
)
VIEWS = ("PA", "AP", "LATERAL")
SPLITS = ("train", "validate", "test")
LABEL_VALUES = (1.0, 0.0, -1.0, None)


@dataclass
class ImageRecord:
    """One radiograph.

    Attributes:
        image_id: unique within the dataset.
        patient_id: the patient.
        study_id: the study (one or more images).
        order: position in the patient's series, 0-based, chronological.
        study_date: ISO date YYYY-MM-DD, or None when unknown.
        view: "PA", "AP", "LATERAL" or None.
        path: image file, relative to the manifest's folder.
        report: the radiology report (may be empty).
        labels: CheXpert label -> 1.0 / 0.0 / -1.0 / None.
        source: "simulator", "mimic-cxr", "chexpert", "dicom", ...
        extra: source-specific data (simulator: severities, mask paths, params path, nuisance).
    """

    image_id: str
    patient_id: str
    study_id: str
    order: int
    study_date: str | None
    view: str | None
    path: str
    report: str
    labels: dict[str, float | None]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairRecord:
    """Two consecutive studies of one patient, with what changed between them.

    Attributes:
        pair_id: unique within the dataset.
        patient_id: the patient.
        prior_id, followup_id: ``image_id`` of the two images.
        prior_path, followup_path: image files, relative to the manifest's folder.
        description: progression description (the instruction a model learns to follow).
        registration_score: quality of the prior-to-follow-up registration, or None.
        split: "train", "validate" or "test" (by patient, never mixed).
        counterfactual_path: exact counterfactual (simulator only): the follow-up's findings
            rendered with the prior's acquisition; None for real data.
        labels_prior, labels_followup: CheXpert labels of the two images.
        extra: source-specific data (simulator: change list, finding-region mask path).
    """

    pair_id: str
    patient_id: str
    prior_id: str
    followup_id: str
    prior_path: str
    followup_path: str
    description: str
    registration_score: float | None
    split: str
    counterfactual_path: str | None
    labels_prior: dict[str, float | None]
    labels_followup: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)


Record = TypeVar("Record", ImageRecord, PairRecord)


REAL_FILM_FRACTIONS = (0.6, 0.1, 0.3)
"""Train / validate / test fractions of patients for everything trained or measured on real films
(real-anatomy pairs, real lung masks, the real-film reports): more held out than for simulated
data, where patients are free. On the 71 Hannover patients: 46 / 8 / 17 patients, 165 / 17 / 61
films (48 / 10 / 19 with a V7 lung mask)."""


def split_for(patient_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split of a patient from a hash of its id (80/10/10 by default).

    Args:
        patient_id: the patient.
        fractions: train, validate, test fractions (sum to 1).

    Returns:
        "train", "validate" or "test"; the same id always gets the same split.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "validate" if u < fractions[0] + fractions[1] else "test"


def write_jsonl(path: str | os.PathLike[str], records: Iterable[ImageRecord | PairRecord | dict[str, Any]]) -> None:
    """Writes records as JSON lines, atomically (temporary file + ``os.replace``).

    Keys are sorted and floats written by ``json`` so the same records give the same bytes.

    Args:
        path: destination file.
        records: dataclass records or plain dicts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                row = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record
                f.write(json.dumps(row, sort_keys=True, ensure_ascii=False, allow_nan=False))
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_labels(labels: Any, where: str, key: str) -> dict[str, float | None]:
    if not isinstance(labels, dict):
        raise ValueError(f"{where}: '{key}' must be an object of CheXpert labels, got {type(labels).__name__}")
    out: dict[str, float | None] = {}
    for name, value in labels.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: label {name!r} must be 1, 0, -1 or null, got {value!r}")
        value = None if value is None else float(value)
        if value not in LABEL_VALUES:
            raise ValueError(f"{where}: label {name!r} must be 1, 0, -1 or null, got {value!r}")
        out[str(name)] = value
    return out


def _read(path: str | os.PathLike[str], cls: type[Record]) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist; create it with 'python -m train simulate' or prepare")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = {n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    records: list[Record] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = sorted(required - set(row))
            if missing:
                raise ValueError(f"{where}: missing field(s) {', '.join(missing)} for {cls.__name__}")
            unknown = sorted(set(row) - set(fields))
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                                 "put source-specific data under 'extra'")
            records.append(cls(**_validate(row, cls, where)))
    return records


def _validate(row: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    def text(key: str, optional: bool = False) -> None:
        value = row.get(key)
        if value is None and optional:
            return
        if not isinstance(value, str) or (not optional and key.endswith("id") and not value):
            raise ValueError(f"{where}: '{key}' must be a{' non-empty' if key.endswith('id') else ''} string, got {value!r}")

    if cls is ImageRecord:
        for key in ("image_id", "patient_id", "study_id", "path", "report", "source"):
            text(key)
        text("study_date", optional=True)
        text("view", optional=True)
        if isinstance(row["order"], bool) or not isinstance(row["order"], int) or row["order"] < 0:
            raise ValueError(f"{where}: 'order' must be a non-negative integer, got {row['order']!r}")
        if row["view"] is not None and row["view"] not in VIEWS:
            raise ValueError(f"{where}: 'view' must be one of {VIEWS} or null, got {row['view']!r}")
        row["labels"] = _check_labels(row["labels"], where, "labels")
    else:
        for key in ("pair_id", "patient_id", "prior_id", "followup_id", "prior_path", "followup_path",
                    "description", "split"):
            text(key)
        text("counterfactual_path", optional=True)
        if row["split"] not in SPLITS:
            raise ValueError(f"{where}: 'split' must be one of {SPLITS}, got {row['split']!r}")
        score = row["registration_score"]
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ValueError(f"{where}: 'registration_score' must be a number or null, got {score!r}")
        row["labels_prior"] = _check_labels(row["labels_prior"], where, "labels_prior")
        row["labels_followup"] = _check_labels(row["labels_followup"], where, "labels_followup")
    if not isinstance(row.get("extra", {}), dict):
        raise ValueError(f"{where}: 'extra' must be an object, got {type(row['extra']).__name__}")
    return row


def read_images(path: str | os.PathLike[str]) -> list[ImageRecord]:
    """Reads ``images.jsonl``.

    Raises:
        ValueError: naming the file and line of the first bad row, and what is wrong with it.
    """
    return _read(path, ImageRecord)


def read_pairs(path: str | os.PathLike[str]) -> list[PairRecord]:
    """Reads ``pairs.jsonl``.

    Raises:
        ValueError: naming the file and line of the first bad row, and what is wrong with it.
    """
    return _read(path, PairRecord)
