"""Reading a radiograph: :func:`read_xray` detects the format from the content and reads it.

The format is detected from the content (magic bytes), never from the file name:

* DICOM: ``DICM`` at offset 128, or a file without preamble that pydicom reads (with
  ``force``) into a dataset that has *Pixel Data*.
* PNG: the 8-byte PNG signature.
* JPEG: the SOI marker ``FF D8 FF``.

The readers themselves are :mod:`engine.io.dicom` and :mod:`engine.io.raster`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

from engine.errors import InputError
from engine.io.dicom import _read_dicom
from engine.io.raster import _read_pillow
from engine.io.xray import XRay, _quote

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"


def read_xray(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    name: str | None = None,
    max_pixels: int = 50_000_000,
) -> XRay:
    """Reads a radiograph (DICOM, PNG or JPEG) into the engine's intensity contract.

    The format is detected from the content, not the file name. See :mod:`engine.io.dicom` and
    :mod:`engine.io.raster` for the intensity pipeline of each format.

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
