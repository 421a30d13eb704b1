"""The intensity contract at the analysis package's edge: checks and the integer converter.

Everything inside :mod:`engine.analysis` works on float32 images in [0, 1], shape ``(H, W)``
or ``(B, 1, H, W)``. These helpers turn what callers pass (numpy or torch, single or batched)
into that form once, with errors that say what was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.errors import InputError
from engine.io import check_intensity

RANGE_TOLERANCE = 1e-4
"""How far outside [0, 1] a float batch may stray (as :func:`engine.io.check_intensity` allows)."""


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().float().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    return np.asarray(x)


def integer_to_unit(image: np.ndarray) -> np.ndarray:
    """Unsigned-integer pixels (uint8, uint16) to float32 in [0, 1], dividing by the type's max.

    This is the only way integer images enter the analysis code; subtracting two uint8 images
    directly wraps around (``5 - 10 == 251``), the bug in PRISM's difference maps.

    Raises:
        InputError: the array is not of an unsigned integer type.
    """
    image = np.asarray(image)
    if image.dtype.kind != "u":
        raise InputError(
            f"integer_to_unit expects uint8/uint16 pixels, got {image.dtype}; float images must "
            "already be in [0, 1]"
        )
    return (image.astype(np.float64) / np.iinfo(image.dtype).max).astype(np.float32)


def as_unit_image(image: Any, name: str = "image") -> np.ndarray:
    """One image as a float32 ``(H, W)`` array in [0, 1].

    Accepts numpy arrays or torch tensors of shape ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``;
    unsigned-integer pixels are converted with :func:`integer_to_unit`.

    Raises:
        InputError: wrong shape, non-finite values, or float values outside [0, 1].
    """
    arr = _to_numpy(image)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InputError(f"The {name} must be one 2-D greyscale image, got shape {tuple(_to_numpy(image).shape)}")
    if arr.dtype.kind == "u":
        return integer_to_unit(arr)
    if arr.dtype.kind != "f":
        raise InputError(f"The {name} has {arr.dtype} pixels; pass float32 in [0, 1] or uint8/uint16")
    return check_intensity(arr, what=name)


def as_unit_batch(images: Any, name: str = "images"):
    """Images as a float32 torch tensor ``(B, 1, H, W)`` in [0, 1].

    Accepts one ``(H, W)`` image, a ``(B, 1, H, W)`` batch (numpy or torch), or a sequence of
    ``(H, W)`` images of one size. Torch tensors keep their device and their autograd graph.

    Raises:
        InputError: wrong shape, mixed sizes or values outside [0, 1].
    """
    import torch

    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim == 2:
            x = x[None, None]
        elif x.ndim == 3 and x.shape[0] == 1:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 1:
            raise InputError(f"The {name} must be (H, W) or (B, 1, H, W), got {tuple(images.shape)}")
        x = x.float()
        with torch.no_grad():
            if not torch.isfinite(x).all():
                raise InputError(f"The {name} contain NaN or Inf values")
            lo, hi = float(x.min()), float(x.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise InputError(f"The {name}' values span [{lo:.3g}, {hi:.3g}]; expected float32 in [0, 1]")
        return x
    if isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        arrays = [as_unit_image(img, name) for img in images]
        if not arrays:
            raise InputError(f"No {name} were given")
        if len({a.shape for a in arrays}) != 1:
            raise InputError(f"The {name} have different sizes; resample them to one size first")
        return torch.from_numpy(np.stack(arrays)[:, None].copy())
    arr = _to_numpy(images)
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise InputError(f"The {name} must have one channel, got shape {arr.shape}")
        return torch.from_numpy(np.stack([as_unit_image(a[0], name) for a in arr])[:, None].copy())
    return torch.from_numpy(as_unit_image(arr, name)[None, None].copy())


def as_mask(mask: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    """A structure mask as a bool ``(H, W)`` array of the given shape.

    Raises:
        InputError: the mask's shape does not match the image's.
    """
    arr = _to_numpy(mask)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != tuple(shape):
        raise InputError(
            f"The mask {name!r} has shape {arr.shape} but the image is {tuple(shape)}; "
            "resample masks onto the image's grid first"
        )
    return arr.astype(bool)


def as_masks(masks: Mapping[str, Any], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Every mask of a name -> mask mapping as bool ``(H, W)`` (see :func:`as_mask`)."""
    return {name: as_mask(m, shape, name) for name, m in masks.items()}
