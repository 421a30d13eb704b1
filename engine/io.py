"""Radiograph I/O: DICOM, PNG and JPEG in, one intensity contract out.

Everything inside the engine works on float32 images in [0, 1] with shape ``(H, W)``, bone
bright (the display convention of a chest film). This module is the one place where files
become that contract (:func:`read_xray`) and where the contract becomes files again
(:func:`encode_png`, :func:`write_png`). It also owns the letterbox geometry that maps an
image of any aspect ratio onto a square model canvas and back (:func:`to_square`,
:class:`SquareTransform`).

The format is detected from the content (magic bytes), never from the file name:

* DICOM: ``DICM`` at offset 128, or a file without preamble that pydicom reads (with
  ``force``) into a dataset that has *Pixel Data*.
* PNG: the 8-byte PNG signature.
* JPEG: the SOI marker ``FF D8 FF``.

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

PNG/JPEG intensity mapping (Pillow):

* 8-bit samples are divided by 255; 16-bit grey (mode ``I;16``/``I``) by 65535. The PNG
  specification requires samples of lower precision (e.g. 12-bit) to be scaled up to the full
  16-bit range when written (``sBIT`` only records the original depth), so ``value / 65535``
  is the spec-correct mapping. A non-conforming file that stores raw 12-bit values in a
  16-bit PNG will therefore look dark; convert it properly rather than guessing here.
* Colour (RGB, palette) becomes ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``, computed in
  float (so a grey image stored as RGB reads back exactly).
* Alpha is composited onto black (``value * alpha``): transparent areas read as air, the same
  value the letterbox padding uses.
* JPEG EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`).

Size guards: images smaller than :data:`MIN_SIDE` px on a side are rejected, and the pixel
count is checked against ``max_pixels`` from the header *before* any pixel is decoded.
Pillow's own decompression-bomb warning/error is turned into :class:`InputError` inside a
local ``warnings.catch_warnings()`` block (no global filter). Non-fatal warnings raised while
reading (e.g. a malformed header value) are captured and kept in ``meta.notes`` instead of
being printed.

This module must stay cheap to import: it imports neither torch nor (until a DICOM is read)
pydicom.
"""

from __future__ import annotations

import copy
import datetime
import io
import math
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from engine.errors import InputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "ACCEPTED_MODALITIES",
    "MIN_SIDE",
    "SquareTransform",
    "XRay",
    "XRayMeta",
    "check_intensity",
    "encode_png",
    "read_xray",
    "to_square",
    "write_png",
    "xray_from_dataset",
]

#: Smallest accepted image side in pixels; anything smaller is not a usable radiograph.
MIN_SIDE = 32

#: DICOM modalities accepted as projection radiographs. A missing/empty modality is accepted too.
ACCEPTED_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})

#: Tolerance for values marginally outside [0, 1] (float rounding in resampling) that are clipped.
_RANGE_TOLERANCE = 1e-4

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"

#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses, but applied in float).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

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


# ----------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class SquareTransform:
    """How an ``(H, W)`` image was mapped onto a ``size x size`` model canvas.

    Uniform scale so the longer side equals ``size`` (aspect ratio preserved), then centred
    zero padding (letterbox).

    Attributes:
        input_shape: ``(H, W)`` of the original image.
        size: side of the square canvas in px.
        scale: canvas px per input px (``size / max(H, W)``).
        resized_shape: ``(h, w)`` of the image content on the canvas.
        offset: ``(top, left)`` of the content on the canvas, in canvas px.
    """

    input_shape: tuple[int, int]
    size: int
    scale: float
    resized_shape: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def fit(cls, input_shape: tuple[int, int], size: int) -> SquareTransform:
        """The letterbox transform of an ``input_shape`` image onto a ``size`` canvas.

        Raises:
            InputError: non-positive shape or size.
        """
        h, w = (int(v) for v in input_shape)
        size = int(size)
        if h < 1 or w < 1:
            raise InputError(f"Cannot letterbox an image of shape {input_shape}; both sides must be >= 1 px")
        if size < 1:
            raise InputError(f"Canvas size must be a positive number of pixels, got {size}")
        scale = size / max(h, w)
        rh = size if h >= w else min(size, max(1, round(h * scale)))
        rw = size if w >= h else min(size, max(1, round(w * scale)))
        return cls(
            input_shape=(h, w),
            size=size,
            scale=float(scale),
            resized_shape=(rh, rw),
            offset=((size - rh) // 2, (size - rw) // 2),
        )

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Maps an ``input_shape`` image onto the canvas.

        Args:
            image: float ``(H, W)`` in [0, 1] with ``(H, W) == input_shape``.

        Returns:
            float32 ``(size, size)`` in [0, 1], zero outside :meth:`content_mask`.

        Raises:
            InputError: wrong shape or not a valid intensity image.
        """
        image = check_intensity(image, what="image to letterbox")
        if image.shape != self.input_shape:
            raise InputError(
                f"This transform was made for images of shape {self.input_shape}, got {image.shape}"
            )
        canvas = np.zeros((self.size, self.size), dtype=np.float32)
        top, left = self.offset
        rh, rw = self.resized_shape
        canvas[top : top + rh, left : left + rw] = _resize(image, (rh, rw))
        return canvas

    def invert(self, image: np.ndarray) -> np.ndarray:
        """Maps a canvas back to the input geometry: crop the padding, resize back.

        Args:
            image: float ``(size, size)`` in [0, 1].

        Returns:
            float32 ``input_shape`` in [0, 1].

        Raises:
            InputError: wrong shape or not a valid intensity image.
        """
        image = check_intensity(image, what="canvas to map back")
        if image.shape != (self.size, self.size):
            raise InputError(f"Expected a ({self.size}, {self.size}) canvas, got {image.shape}")
        top, left = self.offset
        rh, rw = self.resized_shape
        return _resize(image[top : top + rh, left : left + rw], self.input_shape)

    def content_mask(self) -> np.ndarray:
        """``(size, size)`` bool: True where real image content is, False on the padding."""
        mask = np.zeros((self.size, self.size), dtype=bool)
        top, left = self.offset
        rh, rw = self.resized_shape
        mask[top : top + rh, left : left + rw] = True
        return mask

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe dict; :meth:`from_dict` rebuilds the transform."""
        return {
            "input_shape": list(self.input_shape),
            "size": self.size,
            "scale": self.scale,
            "resized_shape": list(self.resized_shape),
            "offset": list(self.offset),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SquareTransform:
        """Rebuilds a transform from :meth:`as_dict` output (validated against :meth:`fit`).

        Raises:
            InputError: missing keys or values that are not the letterbox of ``input_shape``.
        """
        try:
            expected = cls.fit(tuple(data["input_shape"]), int(data["size"]))  # type: ignore[arg-type]
            given = cls(
                input_shape=tuple(int(v) for v in data["input_shape"]),  # type: ignore[arg-type]
                size=int(data["size"]),
                scale=float(data["scale"]),
                resized_shape=tuple(int(v) for v in data["resized_shape"]),  # type: ignore[arg-type]
                offset=tuple(int(v) for v in data["offset"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"Not a valid square-transform record ({exc!r}); expected the output of as_dict()") from exc
        if (given.resized_shape, given.offset) != (expected.resized_shape, expected.offset) or not math.isclose(
            given.scale, expected.scale, rel_tol=1e-9
        ):
            raise InputError(
                f"Square-transform record is inconsistent: {given.as_dict()} is not the letterbox of "
                f"{given.input_shape} on a {given.size} px canvas ({expected.as_dict()})"
            )
        return expected


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def read_xray(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    name: str | None = None,
    max_pixels: int = 50_000_000,
) -> XRay:
    """Reads a radiograph (DICOM, PNG or JPEG) into the engine's intensity contract.

    The format is detected from the content, not the file name. See the module docstring for
    the intensity pipeline of each format.

    Args:
        source: a file path, or the file's bytes.
        name: the file name to record in the metadata and use in messages (defaults to the
            path's basename).
        max_pixels: largest accepted ``H * W``, checked from the header before decoding.

    Returns:
        An :class:`XRay` with float32 ``(H, W)`` pixels in [0, 1], bone bright.

    Raises:
        InputError: missing/unreadable file, unknown format, corrupt or truncated data, a
            non-radiograph or multi-frame DICOM, an undecodable transfer syntax, or an image
            that is too small or too large.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "the uploaded data"
        if not data:
            raise InputError(f"{_quote(label)} is empty; choose a DICOM, PNG or JPEG radiograph")
        head = data[: _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)]
        opener: Callable[[], BinaryIO] = partial(io.BytesIO, data)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        label = name  # never the folder: an upload's is the server's temporary path
        if not path.exists():
            raise InputError(f"File not found: {label}; check the path")
        if not path.is_file():
            raise InputError(f"{_quote(label)} is not a file; choose a DICOM, PNG or JPEG radiograph")
        try:
            with path.open("rb") as f:
                head = f.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
        except OSError as exc:
            raise InputError(f"Cannot read {_quote(label)}: {exc.strerror or exc}; check its permissions") from exc
        if not head:
            raise InputError(f"{_quote(label)} is empty; choose a DICOM, PNG or JPEG radiograph")
        opener = partial(path.open, "rb")
    else:
        raise InputError(f"read_xray expects a file path or bytes, got {type(source).__name__}")

    if max_pixels < 1:
        raise InputError(f"max_pixels must be positive, got {max_pixels}")

    if head.startswith(_PNG_SIGNATURE):
        with opener() as fp:
            return _read_pillow(fp, "png", label, name, max_pixels)
    if head.startswith(_JPEG_SOI):
        with opener() as fp:
            return _read_pillow(fp, "jpeg", label, name, max_pixels)
    if head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC:
        with opener() as fp:
            return _read_dicom(fp, label, name, max_pixels, forced=False)
    # Maybe a DICOM without the 128-byte preamble: accept only if a forced read yields an image.
    with opener() as fp:
        return _read_dicom(fp, label, name, max_pixels, forced=True)


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


def to_square(image: XRay | np.ndarray, size: int) -> tuple[np.ndarray, SquareTransform]:
    """Letterboxes an image onto a ``size x size`` canvas.

    Uniform antialiased resize (Lanczos on float32) so the longer side equals ``size``, then
    centred zero padding. :meth:`SquareTransform.invert` maps a canvas back to the input
    geometry.

    Args:
        image: an :class:`XRay` or a float ``(H, W)`` array in [0, 1].
        size: side of the square canvas in px.

    Returns:
        ``(canvas, transform)``: float32 ``(size, size)`` in [0, 1] and the transform used.

    Raises:
        InputError: not a valid intensity image, or a non-positive size.
    """
    pixels = image.pixels if isinstance(image, XRay) else image
    pixels = check_intensity(pixels, what="image to letterbox")
    transform = SquareTransform.fit(pixels.shape, size)  # type: ignore[arg-type]
    return transform.apply(pixels), transform


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


def encode_png(image: np.ndarray, *, bits: int = 8, text: Mapping[str, str] | None = None) -> bytes:
    """Encodes a float ``(H, W)`` image in [0, 1] as a greyscale PNG.

    Values are rounded to the nearest level (``round(x * 255)`` or ``round(x * 65535)``), so
    :func:`read_xray` reads them back within half a quantisation step.

    Args:
        image: float ``(H, W)`` in [0, 1].
        bits: 8 (mode ``L``) or 16 (mode ``I;16``).
        text: optional PNG text chunks (key -> value); long values are compressed (zTXt), values
            that are not Latin-1 become iTXt.

    Returns:
        The PNG file's bytes.

    Raises:
        InputError: bad ``bits`` or not a valid intensity image.
    """
    if bits not in (8, 16):
        raise InputError(f"PNG bit depth must be 8 or 16, got {bits}")
    arr = check_intensity(image, what="image to save").astype(np.float64)
    if bits == 8:
        img = Image.fromarray(np.rint(arr * 255.0).astype(np.uint8))
    else:
        img = Image.fromarray(np.rint(arr * 65535.0).astype(np.uint16))
    pnginfo = None
    if text:
        pnginfo = PngImagePlugin.PngInfo()
        for key, value in text.items():
            pnginfo.add_text(str(key), str(value), zip=len(str(value)) > 1024)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def write_png(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    bits: int = 8,
    text: Mapping[str, str] | None = None,
) -> None:
    """Writes a greyscale PNG atomically (temporary file in the same folder, then rename).

    A reader never sees a half-written file, and a failure leaves no temporary file behind.

    Args:
        path: where to write; the folder must exist.
        image: float ``(H, W)`` in [0, 1].
        bits: 8 or 16.
        text: optional PNG text chunks, see :func:`encode_png`.

    Raises:
        InputError: bad image or bits, a missing folder, or an unwritable location.
    """
    data = encode_png(image, bits=bits, text=text)  # encode first: a bad image creates nothing
    atomic_write_bytes(path, data)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` via a temporary file in the same folder and a rename.

    A reader never sees a half-written file; a failure leaves no temporary file behind. The
    result gets the mode a plain ``open()`` would give it (an existing file's mode is kept).

    Returns:
        The path written.

    Raises:
        InputError: the folder does not exist or the file cannot be written.
    """
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"Cannot write {target}: the folder {folder} does not exist; create it first")
    tmp_name: str | None = None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".tmp", delete=False) as tmp:
            tmp_name = tmp.name
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, _file_mode(target))  # NamedTemporaryFile is private (0600)
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        raise InputError(f"Cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return target


def _file_mode(target: Path) -> int:
    """Permission bits for a written file: the existing file's, else ``0o666`` minus the umask."""
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        pass
    umask = 0o022
    try:  # read the umask without changing it (os.umask would, racing other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    return 0o666 & ~umask


# ----------------------------------------------------------------------------------------------
# Pillow (PNG / JPEG)
# ----------------------------------------------------------------------------------------------


def _read_pillow(fp: BinaryIO, fmt: str, label: str, name: str | None, max_pixels: int) -> XRay:
    """PNG or JPEG -> XRay. ``fmt`` is ``"png"`` or ``"jpeg"``."""
    kind = fmt.upper()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=[kind])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{_quote(label)} is too large to open safely ({_reason(exc)}); downsample it first") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(f"{_quote(label)} looks like a {kind} but cannot be read ({_reason(exc)}); the file may be corrupt") from exc
        with img:
            w, h = img.size
            _check_size(h, w, label, max_pixels)
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            if n_frames > 1:
                raise InputError(f"{_quote(label)} is an animated {kind} with {n_frames} frames; export one frame as a still image")
            mode_in = img.mode
            try:
                if fmt == "jpeg":
                    img = ImageOps.exif_transpose(img)  # loads the pixels
                img.load()
                pixels, bits, windowing = _pil_to_unit(img, label)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InputError(f"{_quote(label)} is too large to open safely ({_reason(exc)}); downsample it first") from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                if isinstance(exc, InputError):
                    raise
                raise InputError(
                    f"{_quote(label)} could not be decoded as {kind} ({_reason(exc)}); the file may be truncated or corrupt"
                ) from exc
    meta = XRayMeta(source_format=fmt, name=name, photometric=mode_in, inverted=False, windowing=windowing, bits_stored=bits)
    return _with_notes(_finish(pixels, meta, label), [], caught)


def _pil_to_unit(img: Image.Image, label: str) -> tuple[np.ndarray, int, str]:
    """A loaded Pillow image -> (float64 (H, W) in [0, 1], sample bits, description)."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.float64) / 65535.0, 16, "full range 16-bit (value/65535)"
    if mode == "I":  # 16-bit PNGs on older Pillow; PNG samples never exceed 16 bits
        arr = np.asarray(img).astype(np.float64)
        return np.clip(arr, 0.0, 65535.0) / 65535.0, 16, "full range 16-bit (value/65535)"
    if mode == "1":
        return np.asarray(img.convert("L")).astype(np.float64) / 255.0, 1, "bilevel (0/1)"
    if mode == "L":
        return np.asarray(img).astype(np.float64) / 255.0, 8, "full range 8-bit (value/255)"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        rgb = img.convert("RGBA" if has_alpha else "RGB")
        pixels, _, desc = _pil_to_unit(rgb, label)
        return pixels, 8, f"palette -> {desc}"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        pixels, _, desc = _pil_to_unit(img.convert("RGB"), label)
        return pixels, 8, f"{mode} -> {desc}"
    if mode in ("LA", "La"):
        arr = np.asarray(img).astype(np.float64) / 255.0
        grey, alpha = arr[..., 0], arr[..., 1]
        if mode == "La":  # already premultiplied
            return grey, 8, "full range 8-bit (value/255), premultiplied alpha"
        return grey * alpha, 8, "full range 8-bit (value/255), alpha composited on black"
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        arr = np.asarray(img).astype(np.float64) / 255.0
        luma = arr[..., :3] @ _LUMA
        if mode == "RGBA":
            return luma * arr[..., 3], 8, "luminance (BT.601) of RGB, full range 8-bit, alpha composited on black"
        return luma, 8, "luminance (BT.601) of RGB, full range 8-bit"
    raise InputError(f"{_quote(label)} uses the image mode {mode!r}, which this tool cannot read; save it as a greyscale PNG")


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _finish(pixels: np.ndarray, meta: XRayMeta, label: str) -> XRay:
    """Final contract check: finite float32 (H, W) in [0, 1]."""
    if not np.isfinite(pixels).all():
        raise InputError(f"{_quote(label)} produced non-finite pixel values; the file is corrupt")
    out = np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)
    return XRay(pixels=out, meta=meta)


def _is_bad_data_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a reader or decoder failing on bad data, not an interrupt or an exit.

    Besides ordinary exceptions this includes the ``PanicException`` that decoders written in
    Rust (pylibjpeg-rle, through PyO3) raise on malformed input: it derives from
    ``BaseException``, so ``except Exception`` would let a corrupt RLE DICOM escape.
    """
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _with_notes(xray: XRay, notes: list[str], caught: list[warnings.WarningMessage]) -> XRay:
    """Adds captured warning messages to ``meta.notes`` (deduplicated, order kept)."""
    extra = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    merged = list(dict.fromkeys([*xray.meta.notes, *notes, *extra]))
    if tuple(merged) == xray.meta.notes:
        return xray
    return XRay(pixels=xray.pixels, meta=replace(xray.meta, notes=tuple(merged)))


def _normalise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 1] with clipping; a degenerate range gives zeros."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi == lo:
        return np.zeros(values.shape, dtype=np.float64)
    out = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0)


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


def _quote(label: str) -> str:
    return f"'{label}'"


def _reason(exc: BaseException) -> str:
    """One line describing an exception, for embedding in a message."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Antialiased float32 resize (Pillow mode ``F``, Lanczos), clipped to [0, 1]."""
    h, w = (int(v) for v in shape)
    src = np.ascontiguousarray(image, dtype=np.float32)
    if src.shape == (h, w):
        return src.copy()
    out = Image.fromarray(src).resize((w, h), resample=Image.Resampling.LANCZOS)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)
