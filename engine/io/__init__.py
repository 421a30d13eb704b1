"""Radiograph I/O: DICOM, PNG and JPEG in, one intensity contract out.

Everything inside the engine works on float32 images in [0, 1] with shape ``(H, W)``, bone
bright (the display convention of a chest film). This package is the one place where files
become that contract (:func:`read_xray`) and where the contract becomes files again
(:func:`encode_png`, :func:`write_png`). It also owns the letterbox geometry that maps an
image of any aspect ratio onto a square model canvas and back (:func:`to_square`,
:class:`SquareTransform`).

The format is detected from the content (magic bytes), never from the file name
(:mod:`engine.io.reading`); each format's intensity pipeline is described in its reader,
:mod:`engine.io.dicom` and :mod:`engine.io.raster`.

Size guards: images smaller than :data:`MIN_SIDE` px on a side are rejected, and the pixel
count is checked against ``max_pixels`` from the header *before* any pixel is decoded.
Pillow's own decompression-bomb warning/error is turned into :class:`InputError` inside a
local ``warnings.catch_warnings()`` block (no global filter). Non-fatal warnings raised while
reading (e.g. a malformed header value) are captured and kept in ``meta.notes`` instead of
being printed.

This package must stay cheap to import: it imports neither torch nor (until a DICOM is read)
pydicom.

Where the parts live (every name below is importable from ``engine.io`` itself):

* :mod:`engine.io.xray`: the contract (:class:`XRay`, :class:`XRayMeta`,
  :func:`check_intensity`, :data:`MIN_SIDE`) and the checks every reader ends with.
* :mod:`engine.io.reading`: :func:`read_xray`, which detects the format and hands the bytes to
  a reader.
* :mod:`engine.io.dicom`: the DICOM reader and its intensity pipeline
  (:func:`xray_from_dataset`, :data:`ACCEPTED_MODALITIES`).
* :mod:`engine.io.raster`: the PNG and JPEG reader (Pillow) and its intensity mapping.
* :mod:`engine.io.letterbox`: the square model canvas (:class:`SquareTransform`,
  :func:`to_square`).
* :mod:`engine.io.writing`: the contract back to files (:func:`encode_png`, :func:`write_png`,
  :func:`atomic_write_bytes`).
"""

from __future__ import annotations

from engine.io.dicom import ACCEPTED_MODALITIES, xray_from_dataset
from engine.io.letterbox import SquareTransform, to_square
from engine.io.reading import read_xray
# atomic_write_bytes is public too (engine.export writes through it), but was never in __all__.
from engine.io.writing import atomic_write_bytes, encode_png, write_png
from engine.io.xray import MIN_SIDE, XRay, XRayMeta, check_intensity

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
