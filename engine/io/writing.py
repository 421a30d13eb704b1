"""Writing: the intensity contract back to files.

:func:`encode_png` and :func:`write_png` make greyscale PNGs (8 or 16 bit) that
:func:`~engine.io.read_xray` reads back within half a quantisation step;
:func:`atomic_write_bytes` writes any bytes the same way (a temporary file in the same folder,
then a rename), so a reader never sees a half-written file; :mod:`engine.export` writes
through it.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from engine.errors import InputError
from engine.io.xray import check_intensity


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
