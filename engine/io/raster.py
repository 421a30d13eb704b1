"""The PNG and JPEG reader (Pillow).

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
"""

from __future__ import annotations

import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import InputError
from engine.io.xray import _LUMA, XRay, XRayMeta, _check_size, _finish, _quote, _reason, _with_notes


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
