"""Region-constrained editing: where an edit may change the image, and what must not change.

RadEdit's recipe, for both methods: an *edit mask* (change allowed) and a *keep mask* (must not
change) combine into one "allowed" mask ``edit * (1 - keep)``. In latent space, at every
denoising step, the edited latent is reset outside the allowed region to the input's latent at
the same noise level (the inverted trajectory for ``invert``; the forward-noised input for
``instruct``), so the model fills the allowed region in harmony with what is kept. Because a
VAE never reproduces pixels exactly, the decoded image is finally composited in pixel space:
outside the allowed region the output *is* the input.

Masks come from a painted image (:class:`Regions` takes one as it is), from an anatomical structure
name through a segmenter (:func:`structure_mask`), from the findings an instruction names
(:func:`anatomy_regions`: an effusion on the left confines the edit to the left lung, grown and
feathered; cardiomegaly to the heart and its surroundings), or from a result's cross-attention
maps (:func:`attention_mask`). Masks are given in the input's geometry (like the image) and
follow it onto the model canvas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError
from engine.io import SquareTransform, to_square

STRUCTURE_CANVAS = 512
"""Square canvas a non-square image is letterboxed onto for segmentation."""

LUNG_FINDINGS = ("effusion", "pneumothorax", "edema", "atelectasis", "consolidation")
"""Findings that live inside the lungs' outline (:func:`finding_structures`)."""
ANATOMY_GROW = {"lung": 0.03, "heart": 0.08}
"""How far an instruction's anatomy is grown, as a fraction of the canvas side: a lung by 3 %
(8 px at 256: the costophrenic recess and the segmenter's error at the lung's edge), the heart by
8 % (an enlarging heart pushes its borders into the lungs by up to about that much)."""
ANATOMY_FEATHER = 0.01
"""Edge softness of an instruction's anatomy (Gaussian sigma, fraction of the canvas side)."""


@dataclass(frozen=True)
class Regions:
    """Edit and keep masks in the input's geometry, either may be None.

    Give bool masks or painted images (grey or RGB(A), any numeric type; see :func:`as_mask`);
    they are stored as bool ``(H, W)`` arrays.

    Attributes:
        edit: where change is allowed (None: everywhere).
        keep: what must not change (None: nothing).
        feather: on the canvas, the allowed region is softened at its edge (Gaussian sigma,
            fraction of the side), so the edit fades out instead of stopping at a line.
        source: what the masks are (provenance), e.g. ``"anatomy: left_lung"``.

    Raises:
        InputError: a mask that is not a 2-D image or not finite.
    """

    edit: np.ndarray | None = None
    keep: np.ndarray | None = None
    feather: float = 0.0
    source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.feather, (int, float)) or not 0.0 <= self.feather <= 0.25:
            raise InputError(f"feather must be a fraction of the canvas from 0 to 0.25, not {self.feather!r}")
        object.__setattr__(self, "edit", as_mask(self.edit, "edit mask"))
        object.__setattr__(self, "keep", as_mask(self.keep, "keep mask"))

    def allowed(self, shape: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` float32: 1 where change is allowed (edit minus keep).

        Raises:
            InputError: a mask's shape differs from the image's.
        """
        out = np.ones(shape, np.float32)
        for name, mask in (("edit", self.edit), ("keep", self.keep)):
            if mask is None:
                continue
            if mask.shape != tuple(shape):
                raise InputError(f"the {name} mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                                 f"{shape[1]}x{shape[0]}; paint it on the same image")
            out *= mask if name == "edit" else ~mask
        return out

    def canvas(self, transform: SquareTransform) -> np.ndarray:
        """``(S, S)`` float32 allowed mask on the model canvas (the padding counts as kept),
        feathered as set (values in [0, 1])."""
        allowed = self.allowed(transform.input_shape)
        mask = (transform.apply(allowed) > 0.5).astype(np.float32)
        if not self.feather:
            return mask
        from scipy import ndimage

        soft = ndimage.gaussian_filter(mask, self.feather * mask.shape[0])
        inside = transform.apply(np.ones(transform.input_shape, np.float32)) > 0.5
        return np.clip(soft * inside, 0.0, 1.0).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        """Area fractions and settings for provenance (no pixels)."""
        extra: dict[str, Any] = {}
        if self.feather:
            extra["feather"] = self.feather
        if self.source:
            extra["source"] = self.source
        return {
            **extra,
            "edit_fraction": None if self.edit is None else round(float(self.edit.mean()), 4),
            "keep_fraction": None if self.keep is None else round(float(self.keep.mean()), 4),
        }


def as_mask(mask: Any, what: str = "mask") -> np.ndarray | None:
    """A painted image as a bool mask (None stays None).

    Bool arrays are taken as they are; other arrays count as in where above half their maximum
    (an RGB(A) image by its brightest channel, where not transparent).

    Raises:
        InputError: not 2-D, or not finite.
    """
    if mask is None:
        return None
    if isinstance(mask, np.ndarray) and mask.dtype == bool and mask.ndim == 2 and mask.size:
        return mask
    arr = np.asarray(mask, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):  # a painted RGB(A) image
        arr = arr[..., :3].max(-1) if arr.shape[-1] != 4 else np.where(arr[..., 3] > 0, arr[..., :3].max(-1), 0)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"the {what} must be a 2-D image, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"the {what} has non-finite values")
    top = arr.max()
    return arr > (top / 2 if top > 0 else 0.5)


def latent_mask(canvas_mask: np.ndarray | torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``(S, S)`` allowed mask to ``(1, 1, h, w)``: the allowed fraction of each latent cell."""
    m = torch.as_tensor(np.asarray(canvas_mask, np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, latent_hw)


def blend_region(latents: torch.Tensor, reference: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``reference + allowed * (latents - reference)``: the reference wherever change is not allowed."""
    return reference + allowed.to(latents) * (latents - reference)


def composite(edited: np.ndarray, original: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Pixel-space composite: the edit where allowed, the original elsewhere (float32, same shape)."""
    return (original + allowed * (edited - original)).astype(np.float32)


def structure_mask(segmenter: Any, image: np.ndarray, names: str | list[str], *, dilate: int = 0) -> np.ndarray:
    """The union of named anatomical structures as a bool mask on ``image``'s geometry.

    Args:
        segmenter: an :class:`engine.analysis.segmentation.Segmenter`.
        image: ``(H, W)`` float32 in [0, 1].
        names: structure name(s), e.g. ``"right_lung"`` or ``"right lung"`` (the patient's side).
        dilate: grow the mask by this many pixels.

    Raises:
        InputError: an unknown structure name (the message lists the known ones).
    """
    wanted = [names] if isinstance(names, str) else list(names)
    out = np.zeros(image.shape, bool)
    for mask in structure_masks(segmenter, image, wanted, dilate=dilate).values():
        out |= mask
    return out


def structure_masks(segmenter: Any, image: np.ndarray, names: list[str], *, dilate: int = 0) -> dict[str, np.ndarray]:
    """Each named structure as a bool mask on ``image``'s geometry, from one segmentation.

    Arguments and errors as :func:`structure_mask`; the keys are the names as given.
    """
    h, w = image.shape
    transform = None
    if h != w:  # segmenters take square images: letterbox, segment, map the masks back
        image, transform = to_square(image, STRUCTURE_CANVAS)
    masks = segmenter.segment(image[None])[0]
    out: dict[str, np.ndarray] = {}
    for name in names:
        key = name.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in masks:
            raise InputError(f"unknown structure {name!r}; the segmenter knows {', '.join(sorted(masks))}")
        m = np.asarray(masks[key], bool)
        if m.shape != image.shape:
            t = torch.from_numpy(m.astype(np.float32))[None, None]
            m = F.interpolate(t, size=image.shape, mode="nearest")[0, 0].numpy() > 0.5
        if dilate > 0:
            t = torch.from_numpy(m.astype(np.float32))[None, None]
            m = F.max_pool2d(t, 2 * dilate + 1, stride=1, padding=dilate)[0, 0].numpy() > 0.5
        out[name] = m if transform is None else transform.invert(m.astype(np.float32)) > 0.5
    return out


def attention_mask(maps: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """A bool mask from a cross-attention map (e.g. :meth:`engine.engine.AttentionMaps.word_map`).

    The map is normalised to its maximum and thresholded, as prompt-to-prompt's local blend does.
    """
    m = np.asarray(maps, np.float64)
    if not 0.0 < threshold < 1.0:
        raise InputError(f"the attention threshold must be between 0 and 1, not {threshold!r}")
    top = m.max()
    return m > threshold * top if top > 0 else np.zeros(m.shape, bool)


def finding_structures(instruction: str) -> dict[str, tuple[str, ...]] | None:
    """The anatomy an instruction's findings live in, as ``{"lung" | "heart": structures}``.

    A left effusion lives in the left lung, bilateral edema (or edema without a side) in both,
    cardiomegaly in the heart; negated findings count too (a resolving effusion changes its lung).
    None when the edit may reach anywhere: the instruction names no finding ("no interval
    change"), or it names a device (lines and tubes cross the whole chest).

    Example:
        >>> finding_structures("new large left pleural effusion; heart size unchanged")
        {'lung': ('left_lung',)}
        >>> finding_structures("without support devices") is None
        True
    """
    from engine.severity import mentions

    if _DEVICE_WORDS.search(instruction):
        return None
    found: dict[str, list[str]] = {}
    for m in mentions(instruction):
        if m.finding == "cardiomegaly":
            found.setdefault("heart", []).append("heart")
        elif m.finding in LUNG_FINDINGS:
            sides = ("left", "right") if m.side in (None, "bilateral") else (m.side,)
            found.setdefault("lung", []).extend(f"{side}_lung" for side in sides)
    if not found:
        return None
    return {kind: tuple(dict.fromkeys(names)) for kind, names in found.items()}


_DEVICE_WORDS = re.compile(
    r"\b(?:devices?|tubes?|lines?|catheters?|pacemakers?|pacer|icd|leads?|wires?|drains?|clips?|ports?"
    r"|electrodes?|ecg|ett|ng|picc|cvc|hardware|sutures?|stents?|valves?)\b",
    re.IGNORECASE,
)


def anatomy_regions(segmenter: Any, image: np.ndarray, instruction: str) -> Regions | None:
    """The edit region of ``instruction``'s findings on ``image`` (:func:`finding_structures`).

    Each kind of anatomy is segmented, grown by its :data:`ANATOMY_GROW` and the union feathered
    by :data:`ANATOMY_FEATHER`; None where the instruction confines nothing, or where the
    segmenter finds none of the structures on this image (the edit then reaches everywhere, as
    without confinement).

    Args:
        segmenter: an :class:`engine.analysis.segmentation.Segmenter` with lungs and heart.
        image: ``(H, W)`` float32 in [0, 1], the prior in its own geometry.
        instruction: the instruction as applied.
    """
    wanted = finding_structures(instruction)
    if wanted is None:
        return None
    masks = structure_masks(segmenter, image, [name for structures in wanted.values() for name in structures])
    edit = np.zeros(image.shape, bool)
    names: list[str] = []
    for kind, structures in wanted.items():
        mask = np.logical_or.reduce([masks[name] for name in structures])
        if not mask.any():
            continue
        edit |= _grown(mask, ANATOMY_GROW[kind])
        names.extend(structures)
    if not names:
        return None
    return Regions(edit=edit, feather=ANATOMY_FEATHER, source="anatomy: " + ", ".join(names))


def _grown(mask: np.ndarray, fraction: float, work: int = STRUCTURE_CANVAS) -> np.ndarray:
    """``mask`` grown by a disk of ``fraction`` of its longer side (dilated at most ``work`` px wide)."""
    from scipy import ndimage

    h, w = mask.shape
    scale = min(1.0, work / max(h, w))
    small_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    small = F.interpolate(t, size=small_hw, mode="area")[0, 0].numpy() > 0.0 if scale < 1 else mask
    radius = max(1, round(fraction * max(small_hw)))
    disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    grown = ndimage.binary_dilation(small, structure=disk)
    if scale < 1:
        up = F.interpolate(torch.from_numpy(grown.astype(np.float32))[None, None], size=(h, w), mode="nearest")
        grown = up[0, 0].numpy() > 0.5
    return grown | mask
