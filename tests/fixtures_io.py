"""Builders of synthetic radiograph inputs (DICOM, PNG, JPEG) for the I/O tests.

Everything is built in memory or under pytest's ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: SOP Class UID of Computed Radiography Image Storage.
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def dicom_test_file(name: str) -> Path:
    """Path of a DICOM shipped by pydicom or the pydicom-data package, found locally (never downloads).

    ``get_testdata_file(..., download=False)`` searches pydicom's bundled files and the
    installed ``pydicom-data`` package (module ``data_store``).
    """
    import pytest
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} is not in pydicom's or pydicom-data's local files (is pydicom-data installed?)")
    return Path(path)


def smooth_image(h: int, w: int, *, seed: int = 0) -> np.ndarray:
    """A smooth float32 ``(h, w)`` test image in [0.05, 0.95]: a gradient plus a few wide blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy /= max(h - 1, 1)
    xx /= max(w - 1, 1)
    img = 0.3 * xx + 0.2 * yy
    for _ in range(4):
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        sigma = rng.uniform(0.15, 0.3)
        img += 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    img = (img - img.min()) / (img.max() - img.min())
    return (0.05 + 0.9 * img).astype(np.float32)


def grey_u8(h: int = 64, w: int = 48, *, seed: int = 0) -> np.ndarray:
    """A smooth uint8 ``(h, w)`` image using most of the 8-bit range."""
    return np.rint(smooth_image(h, w, seed=seed) * 255).astype(np.uint8)


def make_dicom(
    pixels: np.ndarray | None,
    *,
    modality: str | None = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    preamble: bool = True,
    compress_with: str | None = None,
    transfer_syntax: str | None = None,
    **attrs: Any,
) -> bytes:
    """A single-frame greyscale DICOM as bytes.

    Args:
        pixels: unsigned integer ``(H, W)`` stored values, or None for a dataset without
            *Pixel Data* (in which case Rows/Columns are 64).
        modality: the *Modality* value, or None to leave it out.
        photometric: MONOCHROME1 or MONOCHROME2.
        bits_stored: *Bits Stored* (16 bits allocated).
        preamble: False writes a bare implicit-VR dataset without preamble or file meta.
        compress_with: a Transfer Syntax UID to compress the pixel data with (pydicom's
            encoders: RLE Lossless natively, JPEG 2000 via pylibjpeg-openjpeg).
        transfer_syntax: override the Transfer Syntax UID (the pixel data is then written
            encapsulated as-is; used to fake undecodable syntaxes).
        **attrs: further DICOM keywords to set (e.g. ``WindowCenter=40``).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    ds.PatientID = "SYNTH-001"
    ds.StudyID = "S1"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240229"
    rows, cols = (64, 64) if pixels is None else pixels.shape
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        if compress_with is not None:
            ds.compress(UID(compress_with))
        elif transfer_syntax is not None:
            ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
            ds.PixelData = encapsulate([b"\x00\x01" * 64])
            ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    if preamble:
        ds.preamble = b"\x00" * 128
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        del ds.file_meta
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def png_bytes(img: Image.Image, **save_args: Any) -> bytes:
    """Encodes a Pillow image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save_args)
    return buf.getvalue()


def grey_variants(grey: np.ndarray) -> dict[str, Image.Image]:
    """The same uint8 grey image in every PNG layout the reader must handle.

    Keys are Pillow modes: ``L``, ``I;16`` (value * 257, exactly the same intensity), ``LA``
    and ``RGBA`` (opaque alpha), ``RGB`` (R = G = B) and ``P`` (a 256-entry grey palette).
    """
    l_img = Image.fromarray(grey)
    i16 = Image.fromarray(grey.astype(np.uint16) * 257)
    la = _merge("LA", grey, alpha=True)
    rgb = _merge("RGB", grey)
    rgba = _merge("RGBA", grey, alpha=True)
    # An explicit identity grey palette, so the round trip is exact.
    pal = Image.frombytes("P", l_img.size, grey.tobytes())
    pal.putpalette(bytes(v for i in range(256) for v in (i, i, i)))
    assert i16.mode == "I;16"
    return {"L": l_img, "I;16": i16, "LA": la, "RGB": rgb, "RGBA": rgba, "P": pal}


def _merge(mode: str, grey: np.ndarray, *, alpha: bool = False) -> Image.Image:
    band = Image.fromarray(grey)
    bands = [band] * (1 if mode.startswith("L") else 3)
    if alpha:
        bands.append(Image.new("L", band.size, 255))
    return Image.merge(mode, bands)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` 8-bit grey but whose pixel data is a stub.

    Opening it must fail fast from the header alone, without allocating the pixels.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def jpeg_bytes(img: Image.Image, *, orientation: int | None = None, quality: int = 95) -> bytes:
    """Encodes a Pillow image as JPEG, optionally with an EXIF Orientation tag."""
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"format": "JPEG", "quality": quality}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, **kwargs)
    return buf.getvalue()
