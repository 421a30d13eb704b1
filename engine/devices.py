"""Support-device removal by detection and inpainting.

The diffusion model alone does not take lines and tubes away on real films: it fades a lead here
and there and leaves every line (issue 26: 1 of 24 rendered devices removed, none of six real
films cleared). A device is a thin, bright overlay on anatomy the film also shows beside it, so
it is removed the way a reader imagines the film without it:

1. :func:`device_removal` reads what the instruction asks: every device removed ("without
   support devices", "lines and tubes removed"), one named device ("ETT removed": left to the
   model, since the detector does not tell device kinds apart), or nothing.
2. A device detector (the bundled ``cxr-devices-mini``, a small U-Net with one ``devices``
   channel trained on devices rendered on real device-free films and on simulated films; see
   ``docs/MODEL_CARD.md``) marks the device pixels on the model's canvas (:func:`device_mask`).
3. :func:`inpaint` fills them from the film around them (biharmonic inpainting,
   :func:`skimage.restoration.inpaint_biharmonic`): anatomy crossing under a thin line
   continues; under a generator box the fill is smooth.

The Engine then runs the model on the device-free canvas with the rest of the instruction (or
"no interval change"), so findings asked beside the removal are still the model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InputError

BUNDLED_DETECTOR = Path(__file__).resolve().parents[1] / "assets" / "models" / "cxr-devices-mini"
"""The bundled device detector's folder."""

DETECTION_THRESHOLD = 0.5
"""Probability from which a canvas pixel is a device's."""

DEVICE_MARGIN = 1
"""Pixels the detected devices are grown by on the canvas before inpainting (a wire's blurred
edge, and the detector's half-pixel uncertainty at 256 px)."""

NO_CHANGE = "no interval change"
"""What the model is asked when the instruction asked only for the removal."""

_REMOVAL = re.compile(
    r"\b(?:without|remov(?:e|ed|es|al|ing)|no\s+longer|withdrawn|discontinued|extubat\w*|taken\s+out|"
    r"pulled|explanted|no\s+(?:(?:support|medical)\s+)?(?:devices?|lines?|tubes?|hardware))\b",
    re.IGNORECASE,
)
_NAMED = re.compile(
    r"\b(?:endotracheal|tracheostomy|ett|nasogastric|orogastric|ng|og|feeding|gastric|central\s+venous|"
    r"cvc|picc|subclavian|jugular|swan|pacemakers?|pacer|icd|defibrillator|chest\s+tubes?|pleural\s+drains?|"
    r"drains?|ecg|ekg|electrodes?|leads?|sternal|sternotomy|wires?|clips?|ports?|stents?|valves?|"
    r"catheters?|cardiac\s+monitor)\b",
    re.IGNORECASE,
)
_GENERAL = re.compile(r"\b(?:devices?|lines?|tubes?|hardware|support|monitoring)\b", re.IGNORECASE)
_CLAUSES = re.compile(r"[;.\n]+|,\s*(?=[a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class DeviceRemoval:
    """What an instruction asks of the film's devices (:func:`device_removal`).

    Attributes:
        scope: ``all`` (every device removed: detection and inpainting), ``named`` (one or more
            named devices: left to the model) or ``none``.
        rest: the instruction without its device-removal clauses ("" when nothing else is asked).
    """

    scope: str
    rest: str


def device_removal(instruction: str) -> DeviceRemoval:
    """Whether ``instruction`` removes devices, which, and what else it asks.

    A clause removes devices when it names one (or "lines", "tubes", "devices") with a removal
    word ("without", "removed", "removal", "no longer", "no support devices", "extubated").
    It removes ``all`` when it names no particular device: "without support devices", "lines and
    tubes removed", "interval removal of all lines and tubes".

    Example:
        >>> device_removal("without support devices; stable mild right basilar atelectasis")
        DeviceRemoval(scope='all', rest='stable mild right basilar atelectasis')
        >>> device_removal("Endotracheal tube removed; otherwise unchanged.").scope
        'named'
        >>> device_removal("new large left pleural effusion").scope
        'none'
    """
    clauses = [c.strip() for c in _CLAUSES.split(instruction or "") if c.strip()]
    scope = "none"
    rest = []
    for clause in clauses:
        named, general = _NAMED.search(clause), _GENERAL.search(clause)
        if _REMOVAL.search(clause) and (named or general):
            scope = "named" if named or scope == "named" else "all"
            continue
        rest.append(clause)
    if scope == "none":
        return DeviceRemoval("none", instruction)
    return DeviceRemoval(scope, "; ".join(c for c in rest if not _is_filler(c)))


def _is_filler(clause: str) -> bool:
    """A clause that asks nothing ("otherwise unchanged", "no other significant change")."""
    return bool(re.fullmatch(r"(?:otherwise\s+)?(?:unchanged|stable|no\s+(?:other\s+)?(?:significant\s+|interval\s+)?change)"
                             r"(?:\s+otherwise)?", clause.strip().lower()))


def load_device_detector(spec: str | Path = "auto", device: Any = "cpu") -> Any:
    """The device detector: a one-channel (``devices``) small segmenter folder.

    Args:
        spec: ``auto`` (the bundled ``cxr-devices-mini``) or a folder.
        device: where to run.

    Raises:
        InputError: no detector there, or a segmenter without a ``devices`` channel.
    """
    from engine.analysis import smallnet
    from engine.analysis.segmentation import SmallSegmenter

    folder = BUNDLED_DETECTOR if str(spec) == "auto" else Path(spec)
    if not (folder / smallnet.CONFIG_NAME).is_file():
        raise InputError(f"No device detector in {folder}: place a cxr-devices-mini folder there "
                         "(`python -m train analysis --kind segmenter --targets devices`, see docs/TRAINING.md)")
    detector = SmallSegmenter.load(folder, device)
    if "devices" not in detector.structures:
        raise InputError(f"{folder} is a segmenter of {', '.join(detector.structures)}, not a device detector")
    return detector


def device_mask(detector: Any, canvas: np.ndarray, content: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of the devices on ``canvas`` (``(S, S)`` float32 in [0, 1]), grown by
    :data:`DEVICE_MARGIN`; only inside ``content`` (the letterbox's film area) when given."""
    from scipy import ndimage

    probs = detector.probabilities(canvas[None]).numpy()[0, detector.structures.index("devices")]
    mask = probs >= DETECTION_THRESHOLD
    if DEVICE_MARGIN and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=DEVICE_MARGIN)
    if content is not None:
        mask &= content
    return mask


def inpaint(canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``canvas`` with ``mask`` filled from its surroundings (biharmonic); exact elsewhere."""
    from skimage.restoration import inpaint_biharmonic

    if canvas.shape != mask.shape:
        raise InputError(f"the device mask {mask.shape} does not match the image {canvas.shape}")
    if not mask.any():
        return canvas.astype(np.float32, copy=True)
    filled = inpaint_biharmonic(canvas.astype(np.float64), mask)
    out = canvas.astype(np.float32, copy=True)
    out[mask] = np.clip(filled[mask], 0.0, 1.0)
    return out
