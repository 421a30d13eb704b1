"""The letterbox geometry: an image of any aspect ratio onto a square model canvas and back.

:func:`to_square` maps an image onto a ``size x size`` canvas (uniform Lanczos resize, centred
zero padding); the :class:`SquareTransform` it returns maps a canvas back to the input's
geometry and serialises to JSON for provenance records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import InputError
from engine.io.xray import XRay, check_intensity


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


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Antialiased float32 resize (Pillow mode ``F``, Lanczos), clipped to [0, 1]."""
    h, w = (int(v) for v in shape)
    src = np.ascontiguousarray(image, dtype=np.float32)
    if src.shape == (h, w):
        return src.copy()
    out = Image.fromarray(src).resize((w, h), resample=Image.Resampling.LANCZOS)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)
