"""The DICOM reader: a file or a pydicom dataset to an :class:`~engine.io.xray.XRay`.

DICOM intensity pipeline (PS3.4 N.2, in order):

1. Modality LUT: *Modality LUT Sequence* or *Rescale Slope/Intercept*
   (:func:`pydicom.pixels.apply_modality_lut`).
2. VOI: the first item of the *VOI LUT Sequence* if present, else the first *Window
   Center/Width* pair (:func:`pydicom.pixels.apply_voi_lut`, honouring *VOI LUT Function*),
   else robust percentiles 0.5-99.5 of the image. The VOI output is normalised to [0, 1]
   using the VOI's own output range (the window's ``[y_min, y_max]``; the LUT data's
   ``[min, max]``), so values outside the window saturate as on a viewer.
3. Presentation: MONOCHROME1 (and a *Presentation LUT Shape* of ``INVERSE``) is displayed
   inverted, so the image is flipped to ``1 - x`` and ``meta.inverted`` is True. The two are
   combined with OR, not XOR: the DX IOD pairs MONOCHROME1 with ``INVERSE`` to describe the
   *same* inversion, so an image is never inverted twice.

Compressed pixel data is decoded by whichever pydicom plugin is installed, except RLE Lossless,
which always uses pydicom's own decoder (pylibjpeg-rle panics on malformed segments). Anything a
corrupt header or decoder raises becomes an :class:`InputError` naming the file.

pydicom is imported when a DICOM is read, not when this module is.
"""

from __future__ import annotations

import copy
import datetime
import math
import re
import struct
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from engine.errors import InputError
from engine.io.xray import _LUMA, XRay, XRayMeta, _check_size, _finish, _quote, _reason, _with_notes

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: DICOM modalities accepted as projection radiographs. A missing/empty modality is accepted too.
ACCEPTED_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})

_RLE_LOSSLESS = "1.2.840.10008.1.2.5"

#: Which package decodes which compressed transfer syntax (Transfer Syntax UID -> advice).
_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg (or Pillow with OpenJPEG)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg (or Pillow with OpenJPEG)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (pydicom also has a built-in RLE decoder)",
}


def xray_from_dataset(ds: Dataset, *, name: str | None = None, max_pixels: int = 50_000_000) -> XRay:
    """Converts an already-read pydicom dataset into an :class:`XRay`.

    The dataset's pixel data is not modified (the pipeline never writes into the decoded
    array).

    Args:
        ds: a single-frame radiograph dataset.
        name: the file name to record and use in messages.
        max_pixels: largest accepted ``Rows * Columns``.

    Raises:
        InputError: see :func:`read_xray`.
    """
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xray = _dataset_to_xray(ds, name or "the DICOM dataset", name, max_pixels, notes)
    return _with_notes(xray, notes, caught)


def _read_dicom(fp: BinaryIO, label: str, name: str | None, max_pixels: int, *, forced: bool) -> XRay:
    """DICOM bytes -> XRay. ``forced``: no ``DICM`` magic; only accept a dataset with pixel data."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    not_an_image = (
        f"{_quote(label)} is not a DICOM, PNG or JPEG image (its content matches none of these formats, "
        "whatever its file name says); choose a radiograph file"
    )
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fp, force=forced)
        except InvalidDicomError as exc:
            if forced:
                raise InputError(not_an_image) from exc
            raise InputError(f"{_quote(label)} is not a valid DICOM file ({_reason(exc)})") from exc
        except Exception as exc:  # pydicom raises many types on corrupt input
            if forced:
                raise InputError(not_an_image) from exc
            raise InputError(
                f"{_quote(label)} could not be read as DICOM ({_reason(exc)}); the file may be truncated or corrupt"
            ) from exc
        if forced:
            # A forced read "succeeds" on almost anything; trust it only if it found an image.
            if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
                raise InputError(not_an_image)
            caught.clear()  # warnings about the missing preamble/meta are expected here
            notes.append("DICOM file without preamble/file meta header (read with force)")
        xray = _dataset_to_xray(ds, label, name, max_pixels, notes)
    return _with_notes(xray, notes, caught)


def _dataset_to_xray(ds: Dataset, label: str, name: str | None, max_pixels: int, notes: list[str]) -> XRay:
    """The checks and intensity pipeline shared by files and in-memory datasets.

    pydicom converts header values lazily, so a corrupt element (an unknown VR, a value that
    does not parse) can raise from any access; whatever the specific checks do not catch becomes
    an :class:`InputError` naming the file.
    """
    try:
        return _convert_dataset(ds, label, name, max_pixels, notes)
    except InputError:
        raise
    except BaseException as exc:
        if not _is_bad_data_failure(exc):
            raise
        raise InputError(
            f"{_quote(label)} could not be read as DICOM ({_reason(exc)}); the file may be truncated or corrupt"
        ) from exc


def _convert_dataset(ds: Dataset, label: str, name: str | None, max_pixels: int, notes: list[str]) -> XRay:
    """The body of :func:`_dataset_to_xray`."""
    modality = (_get_str(ds, "Modality") or "").upper() or None

    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InputError(f"{_quote(label)} has floating-point pixel data, which is not a radiograph; export it as integer DICOM")
        kind = f" (modality {modality})" if modality else ""
        raise InputError(
            f"{_quote(label)} is a DICOM file without pixel data{kind}: it is not an image, or the file is truncated; "
            "choose the radiograph itself"
        )
    if modality is not None and modality not in ACCEPTED_MODALITIES:
        raise InputError(f"DICOM modality is {modality}; this tool expects a chest radiograph (CR/DX)")

    frames = _get_int(ds, "NumberOfFrames") or 1
    if frames > 1:
        raise InputError(
            f"{_quote(label)} has {frames} frames; this tool expects a single radiograph, so export the frame you want as its own file"
        )

    photometric = (_get_str(ds, "PhotometricInterpretation") or "").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR") and not photometric.startswith("YBR"):
        shown = photometric or "missing"
        raise InputError(
            f"{_quote(label)} has Photometric Interpretation {shown}; expected MONOCHROME1/MONOCHROME2 (or RGB)"
        )

    rows, cols = _get_int(ds, "Rows"), _get_int(ds, "Columns")
    if not rows or not cols:
        raise InputError(f"{_quote(label)} lacks valid Rows/Columns in its header; the file is corrupt")
    _check_size(rows, cols, label, max_pixels)

    tsyntax = _transfer_syntax(ds)
    if tsyntax is None:
        # Files without file meta (old ACR-NEMA style, forced reads): decode with the encoding
        # pydicom read the dataset in, on a shallow copy so the caller's dataset is untouched.
        tsyntax = _inferred_transfer_syntax(ds)
        if tsyntax is None:
            raise InputError(
                f"{_quote(label)} has no Transfer Syntax UID and its encoding is unknown; "
                "re-save it as a standard DICOM file (with file meta information)"
            )
        from pydicom.dataset import FileMetaDataset

        ds = copy.copy(ds)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = tsyntax
        notes.append(f"no Transfer Syntax UID in the file; decoded as {tsyntax.name}")
    _check_decoder(tsyntax, label)
    _check_codestream_size(ds, rows, cols, label)

    try:
        if str(tsyntax) == _RLE_LOSSLESS:
            # pydicom's own RLE decoder rather than pylibjpeg-rle's: on malformed segments the
            # latter (Rust) panics and prints a backtrace on stderr before the error reaches us.
            from pydicom.pixels.decoders.base import get_decoder

            decoded = get_decoder(str(tsyntax)).as_array(ds, decoding_plugin="pydicom")[0]
        else:
            decoded = ds.pixel_array
    except InputError:
        raise
    except BaseException as exc:  # pydicom / plugin errors of many types
        if not _is_bad_data_failure(exc):
            raise
        ts_name = getattr(tsyntax, "name", None) or "unknown transfer syntax"
        raise InputError(
            f"The pixel data of {_quote(label)} could not be decoded ({ts_name}: {_reason(exc)}); "
            "the file may be truncated or corrupt"
        ) from exc

    arr = np.asarray(decoded)
    if photometric.startswith("MONOCHROME"):
        if arr.shape != (rows, cols):
            raise InputError(f"{_quote(label)} decoded to shape {arr.shape}, expected ({rows}, {cols}); the file is corrupt")
        pixels, windowing = _grey_pipeline(arr, ds, label)
        inverted = photometric == "MONOCHROME1" or (_get_str(ds, "PresentationLUTShape") or "").upper() == "INVERSE"
        if inverted:
            pixels = 1.0 - pixels
    else:
        pixels, windowing = _colour_pipeline(arr, ds, photometric, rows, cols, label)
        inverted = False

    meta = XRayMeta(
        source_format="dicom",
        name=name,
        photometric=photometric,
        inverted=inverted,
        windowing=windowing,
        modality=modality,
        view_position=_get_str(ds, "ViewPosition"),
        pixel_spacing=_pixel_spacing(ds),
        bits_stored=_get_int(ds, "BitsStored"),
        transfer_syntax=str(tsyntax) if tsyntax else None,
        patient_id=_get_str(ds, "PatientID"),
        patient_name=_get_str(ds, "PatientName"),
        study_id=_get_str(ds, "StudyID"),
        study_instance_uid=_get_str(ds, "StudyInstanceUID"),
        study_date=_iso_date(_get_str(ds, "StudyDate")),
        notes=tuple(notes),
    )
    return _finish(pixels, meta, label)


def _grey_pipeline(arr: np.ndarray, ds: Dataset, label: str) -> tuple[np.ndarray, str]:
    """Stored values -> [0, 1] via Modality LUT then VOI (LUT, window, or percentiles).

    Never writes into ``arr`` (the dataset's cached pixel array).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    try:
        values = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise InputError(f"The Modality LUT / rescale of {_quote(label)} could not be applied ({_reason(exc)})") from exc
    values = np.asarray(values)

    problems: list[str] = []
    voi_seq = _header_value(ds, "VOILUTSequence", problems)
    if voi_seq and voi_seq[0].get("LUTDescriptor") is not None and voi_seq[0].get("LUTData") is not None:
        try:
            item = voi_seq[0]
            # LUT input is an integer index; a float rescale output is rounded, not truncated.
            lut_input = values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int64)
            out = np.asarray(apply_voi(lut_input, ds, index=0), dtype=np.float64)
            # Normalise by the LUT's own output range (robust to LUTs that declare 16 bits per
            # entry but hold 12-bit values): map every LUT input through the LUT.
            first, count = int(item.LUTDescriptor[1]), int(item.LUTDescriptor[0]) or 2**16
            lut = np.asarray(apply_voi(np.arange(first, first + count), ds, index=0))
            explanation = _get_str(item, "LUTExplanation")
            detail = explanation or (f"first of {len(voi_seq)}" if len(voi_seq) > 1 else "from header")
            return _normalise(out, float(lut.min()), float(lut.max())), f"VOI LUT ({detail})"
        except Exception as exc:  # malformed LUT: fall through to window / percentiles
            problems.append(f"header VOI LUT unusable: {_reason(exc)}")

    if (_header_value(ds, "WindowCenter", problems) is not None
            and _header_value(ds, "WindowWidth", problems) is not None):
        try:
            out = np.asarray(apply_windowing(values, ds, index=0), dtype=np.float64)
            # The window's output range [y_min, y_max] exactly as pydicom defines it (it depends
            # on Bits Stored, Pixel Representation and the rescale): probe far below and above.
            probe = np.array([-1e30, 1e30], dtype=np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                y_min, y_max = (float(v) for v in apply_windowing(probe, ds, index=0))
            if not (math.isfinite(y_min) and math.isfinite(y_max)) or y_min == y_max:
                raise ValueError("the window's output range is degenerate")
            center, width = _first_value(ds, "WindowCenter"), _first_value(ds, "WindowWidth")
            func = (_get_str(ds, "VOILUTFunction") or "LINEAR").upper()
            explanation = _get_str(ds, "WindowCenterWidthExplanation")
            desc = f"window C={_fmt(center)}, W={_fmt(width)}"
            if func != "LINEAR":
                desc += f" ({func})"
            if explanation:
                desc += f" [{explanation}]"
            if problems:
                desc += f" ({problems[0]})"
            return _normalise(out, y_min, y_max), desc
        except Exception as exc:  # e.g. width < 1: fall back to percentiles
            problems.append(f"header window unusable: {_reason(exc)}")

    values = values.astype(np.float64)  # a copy: the dataset's array is never touched
    if not np.isfinite(values).all():
        raise InputError(f"{_quote(label)} has non-finite values after its rescale; the header is corrupt")
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    desc = "percentiles 0.5–99.5"
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
        desc = "full range (min–max)"
    if problems:
        desc += f" ({'; '.join(problems)})"
    return _normalise(values, lo, hi), desc


def _colour_pipeline(
    arr: np.ndarray, ds: Dataset, photometric: str, rows: int, cols: int, label: str
) -> tuple[np.ndarray, str]:
    """RGB / YBR / PALETTE COLOR DICOM -> luminance in [0, 1]."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            rgb = np.asarray(apply_color_lut(arr, ds))
        except Exception as exc:
            raise InputError(f"The palette of {_quote(label)} could not be applied ({_reason(exc)})") from exc
        full = float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else 1.0
        source = "palette"
    else:
        rgb = arr  # pydicom converts YBR to RGB when decoding
        bits = _get_int(ds, "BitsStored") or 8
        full = float(2**bits - 1)
        source = "RGB" if photometric == "RGB" else f"{photometric} (as RGB)"
    if rgb.shape != (rows, cols, 3):
        raise InputError(f"{_quote(label)} decoded to shape {rgb.shape}, expected ({rows}, {cols}, 3); the file is corrupt")
    luma = (rgb.astype(np.float64) / full) @ _LUMA
    return np.clip(luma, 0.0, 1.0), f"luminance (BT.601) of {source}, full range"


def _check_decoder(tsyntax: Any, label: str) -> None:
    """Raises InputError naming the transfer syntax and a package if nothing can decode it."""
    if tsyntax is None:
        return
    from pydicom.pixels.decoders.base import get_decoder

    uid = str(tsyntax)
    ts_name = getattr(tsyntax, "name", uid)
    ts_shown = ts_name if ts_name == uid else f"{ts_name} ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise InputError(
            f"{_quote(label)} uses the transfer syntax {ts_shown}, which no installed pixel-data decoder supports; "
            "convert it to an uncompressed DICOM (e.g. `gdcmconv --raw` or `dcmdjpeg`) and try again"
        ) from None
    if not decoder.is_available:
        hint = _DECODER_HINTS.get(uid)
        missing = "; ".join(decoder.missing_dependencies)
        what = f"install {hint}" if hint else "install a decoder plugin"
        if missing:
            what += f" (pydicom reports: {missing})"
        raise InputError(f"{_quote(label)} uses the compressed transfer syntax {ts_shown}, which cannot be decoded here; {what}")


def _check_codestream_size(ds: Dataset, rows: int, cols: int, label: str) -> None:
    """Refuses JPEG / JPEG 2000 pixel data whose own header claims a size other than Rows x Columns.

    The pixel-count guard reads Rows/Columns, but a decoder allocates what the codestream says:
    a 2 KB DICOM whose JPEG 2000 header claims 36 x 2,097,192 px made OpenJPEG allocate ~1 GB
    before pydicom noticed the mismatch. A decoded frame must have the header's size anyway.
    """
    if not getattr(_transfer_syntax(ds) or "", "is_encapsulated", False):
        return
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception:  # unreadable encapsulation: the decoder refuses it
        return
    claimed = _codestream_size(frame)
    if claimed is not None and claimed != (rows, cols):
        raise InputError(
            f"{_quote(label)} holds compressed pixel data of {claimed[1]}x{claimed[0]} px, but its header says "
            f"{cols}x{rows} px; the file is corrupt"
        )


#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic; JPEG-LS).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """``(rows, cols)`` from a JPEG / JPEG-LS SOF or a JPEG 2000 SIZ marker; None if not found."""
    siz = frame.find(b"\xff\x4f\xff\x51", 0, 65536)  # JPEG 2000: SOC then SIZ (also inside a JP2 box)
    if siz >= 0 and len(frame) >= siz + 24:
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[siz + 8 : siz + 24])
        return (ysiz - yo, xsiz - xo) if xsiz > xo and ysiz > yo else (0, 0)
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= min(len(frame), 1 << 20):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        if marker in _JPEG_SOF and len(frame) >= pos + 9:
            height, width = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return (height, width) if height else None  # height 0: given later by a DNL marker
        pos += 2 + struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
    return None


def _inferred_transfer_syntax(ds: Dataset) -> Any:
    """The uncompressed transfer syntax matching the encoding pydicom read ``ds`` in, or None."""
    from pydicom import uid

    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    if implicit:
        return uid.ImplicitVRLittleEndian if little else None
    return uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian


def _transfer_syntax(ds: Dataset) -> Any:
    """The dataset's Transfer Syntax UID, or None if it has no file meta (e.g. forced reads)."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return uid or None


def _is_bad_data_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a reader or decoder failing on bad data, not an interrupt or an exit.

    Besides ordinary exceptions this includes the ``PanicException`` that decoders written in
    Rust (pylibjpeg-rle, through PyO3) raise on malformed input: it derives from
    ``BaseException``, so ``except Exception`` would let a corrupt RLE DICOM escape.
    """
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _normalise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 1] with clipping; a degenerate range gives zeros."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi == lo:
        return np.zeros(values.shape, dtype=np.float64)
    out = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0)


def _get_str(ds: Dataset, keyword: str) -> str | None:
    """A header value as a stripped string, None if absent/empty/unreadable (never raises)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not len(value):
            return None
        value = value[0]
    text = str(value).strip()
    return text or None


def _get_int(ds: Dataset, keyword: str) -> int | None:
    text = _get_str(ds, keyword)
    if text is None:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def _header_value(ds: Dataset, keyword: str, problems: list[str]) -> Any:
    """``ds.get(keyword)``, or None (noted in ``problems``) if the element cannot be read."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # e.g. an unknown VR in a corrupt file: pydicom converts lazily
        problems.append(f"header {keyword} unreadable: {_reason(exc)}")
        return None


def _first_value(ds: Dataset, keyword: str) -> float:
    value = ds.get(keyword)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is None or len(value) != 2:
                continue
            row, col = float(value[0]), float(value[1])
        except Exception:
            continue
        if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
            return (row, col)
    return None


_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


def _iso_date(value: str | None) -> str | None:
    """DICOM DA (``YYYYMMDD``, or the old ``YYYY.MM.DD``) -> ``YYYY-MM-DD``; None if invalid."""
    if not value:
        return None
    match = _DATE.match(value.replace(".", "-"))
    if not match:
        return None
    year, month, day = (int(g) for g in match.groups())
    try:
        return datetime.date(year, month, day).isoformat()
    except ValueError:
        return None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
