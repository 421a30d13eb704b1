"""Helpers shared by the sources: CSV reading, label parsing, dates."""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterator
from pathlib import Path

from engine.errors import InputError


def find_file(root: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` (also tried with ``.gz``) that exists in ``root``.

    Raises:
        InputError: none exists, naming what was looked for.
    """
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise InputError(f"{root} has no {what} (looked for {', '.join(names)}, also .gz)")


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a (possibly gzipped) CSV as dicts of stripped strings."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    for row in reader:
        yield {(k or "").strip(): (v or "").strip() for k, v in row.items()}


def parse_label(value: str | None) -> float | None:
    """A CheXpert cell: ``1.0``/``0.0``/``-1.0`` or empty (unmentioned) -> 1, 0, -1 or None.

    Raises:
        InputError: anything else.
    """
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise InputError(f"label value {value!r} is not 1, 0, -1 or empty") from exc
    if number not in (1.0, 0.0, -1.0):
        raise InputError(f"label value {value!r} is not 1, 0, -1 or empty")
    return number


def iso_date(value: str | None) -> str | None:
    """``YYYYMMDD``, ``YYYY-MM-DD`` or ``YYYY/MM/DD`` (DICOM, MIMIC, CSVs) to ISO ``YYYY-MM-DD``.

    Raises:
        InputError: a non-empty value in no known form.
    """
    if value is None or not value.strip():
        return None
    value = value.strip().split(" ")[0].split("T")[0]
    match = re.fullmatch(r"(\d{4})[-/]?(\d{2})[-/]?(\d{2})", value)
    if not match:
        raise InputError(f"date {value!r} is not YYYYMMDD or YYYY-MM-DD")
    return "-".join(match.groups())


def normalize_view(value: str | None) -> str | None:
    """A view name as the manifest stores it: ``PA``, ``AP``, ``LATERAL`` (LL, RL, LATERAL) or None."""
    text = (value or "").strip().upper()
    if text in ("PA", "AP"):
        return text
    if text in ("LATERAL", "LL", "RL", "LAT"):
        return "LATERAL"
    return None
