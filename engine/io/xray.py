"""The intensity contract: a radiograph as float32 ``(H, W)`` in [0, 1], bone bright.

:class:`XRay` (pixels and :class:`XRayMeta`) is what every reader returns, and
:func:`check_intensity` is the one check of the contract for arrays from anywhere else. The
private helpers below are what the readers (:mod:`engine.io.dicom`, :mod:`engine.io.raster`)
share: the size guard, the final contract check, warning notes and message formatting.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from engine.errors import InputError

#: Smallest accepted image side in pixels; anything smaller is not a usable radiograph.
MIN_SIDE = 32

#: Tolerance for values marginally outside [0, 1] (float rounding in resampling) that are clipped.
_RANGE_TOLERANCE = 1e-4

#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses, but applied in float).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@dataclass(frozen=True)
class XRayMeta:
    """Where an image came from and how its intensities were mapped to [0, 1].

    Attributes:
        source_format: ``"dicom"``, ``"png"`` or ``"jpeg"``.
        name: the file name if known (the basename of a path, or the ``name`` argument).
        photometric: DICOM *Photometric Interpretation* (``"MONOCHROME1"``, ``"MONOCHROME2"``,
            ``"RGB"``, ...) or the Pillow mode of a PNG/JPEG (``"L"``, ``"I;16"``, ``"RGB"``,
            ``"P"``, ...).
        inverted: True if the stored values were flipped (``1 - x``) to the display
            convention (bone white), i.e. for MONOCHROME1 or *Presentation LUT Shape* INVERSE.
        windowing: the intensity mapping that was applied, human readable, e.g.
            ``"window C=15000, W=30000"``, ``"VOI LUT (…)"``, ``"percentiles 0.5–99.5"``,
            ``"full range 16-bit (value/65535)"``.
        modality: DICOM *Modality* (``"CR"``, ``"DX"``, ...), None for PNG/JPEG or if absent.
        view_position: DICOM *View Position* (``"PA"``, ``"AP"``, ``"LL"``, ...).
        pixel_spacing: ``(row, col)`` spacing in mm from *Pixel Spacing* or, failing that,
            *Imager Pixel Spacing*; None if absent or not positive.
        bits_stored: DICOM *Bits Stored*, or the sample depth of a PNG/JPEG (8 or 16).
        transfer_syntax: the DICOM *Transfer Syntax UID* (e.g. ``"1.2.840.10008.1.2.1"``).
        patient_id: DICOM *Patient ID* (identifying: not in :meth:`public_dict`).
        patient_name: DICOM *Patient's Name* as written in the file (PN, e.g.
            ``"Doe^Jane"``; identifying).
        study_id: DICOM *Study ID* (identifying).
        study_instance_uid: DICOM *Study Instance UID* (identifying).
        study_date: DICOM *Study Date* as ISO ``YYYY-MM-DD`` (identifying).
        notes: non-fatal warnings raised while reading (e.g. malformed header values).
    """

    source_format: str
    name: str | None = None
    photometric: str | None = None
    inverted: bool = False
    windowing: str = ""
    modality: str | None = None
    view_position: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    bits_stored: int | None = None
    transfer_syntax: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_id: str | None = None
    study_instance_uid: str | None = None
    study_date: str | None = None
    notes: tuple[str, ...] = field(default=())

    #: Fields that identify a patient or a study (or may, like a file name): left out of
    #: :meth:`public_dict`.
    IDENTIFYING_FIELDS = ("name", "patient_id", "patient_name", "study_id", "study_instance_uid", "study_date")

    def as_dict(self) -> dict[str, Any]:
        """All fields as a JSON-safe dict (tuples become lists)."""
        out = asdict(self)
        if out["pixel_spacing"] is not None:
            out["pixel_spacing"] = list(out["pixel_spacing"])
        out["notes"] = list(out["notes"])
        return out

    def public_dict(self) -> dict[str, Any]:
        """Like :meth:`as_dict` without patient/study identifiers, for exports and display.

        The file name is dropped too, because file names often carry patient names or
        accession numbers.
        """
        out = self.as_dict()
        for key in self.IDENTIFYING_FIELDS:
            out.pop(key, None)
        return out


@dataclass(frozen=True, eq=False)
class XRay:
    """A radiograph in the engine's intensity contract.

    Attributes:
        pixels: float32 ``(H, W)`` in [0, 1], bone bright. Treat as read-only.
        meta: where it came from and how intensities were mapped.
    """

    pixels: np.ndarray  # (H, W) float32 in [0, 1]
    meta: XRayMeta

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of :attr:`pixels`."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


def check_intensity(image: Any, *, what: str = "image") -> np.ndarray:
    """Checks the intensity contract and returns the image as float32 ``(H, W)`` in [0, 1].

    Values within 1e-4 outside [0, 1] (resampling round-off) are clipped; anything further out
    is an error. The input is never modified.

    Args:
        image: array-like ``(H, W)``.
        what: how to call the image in error messages.

    Raises:
        InputError: not 2-D, empty, non-finite, or outside [0, 1].
    """
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"The {what} must be a non-empty 2-D (H, W) greyscale array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"The {what} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(f"The {what} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        raise InputError(f"The {what} must have values in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    if lo < 0.0 or hi > 1.0:
        arr = np.clip(arr, 0.0, 1.0)
    return arr


def _finish(pixels: np.ndarray, meta: XRayMeta, label: str) -> XRay:
    """Final contract check: finite float32 (H, W) in [0, 1]."""
    if not np.isfinite(pixels).all():
        raise InputError(f"{_quote(label)} produced non-finite pixel values; the file is corrupt")
    out = np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)
    return XRay(pixels=out, meta=meta)


def _with_notes(xray: XRay, notes: list[str], caught: list[warnings.WarningMessage]) -> XRay:
    """Adds captured warning messages to ``meta.notes`` (deduplicated, order kept)."""
    extra = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    merged = list(dict.fromkeys([*xray.meta.notes, *notes, *extra]))
    if tuple(merged) == xray.meta.notes:
        return xray
    return XRay(pixels=xray.pixels, meta=replace(xray.meta, notes=tuple(merged)))


def _check_size(h: int, w: int, label: str, max_pixels: int) -> None:
    if h < MIN_SIDE or w < MIN_SIDE:
        raise InputError(
            f"{_quote(label)} is only {w}x{h} px; a radiograph needs at least {MIN_SIDE} px on each side"
        )
    if h * w > max_pixels:
        raise InputError(
            f"{_quote(label)} is {w}x{h} px ({h * w:,} pixels), more than the limit of {max_pixels:,}; "
            "downsample it first"
        )


def _quote(label: str) -> str:
    return f"'{label}'"


def _reason(exc: BaseException) -> str:
    """One line describing an exception, for embedding in a message."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
