"""Support-device removal by detection and inpainting.

The diffusion model alone does not take lines and tubes away on real films: it fades a lead here
and there and leaves every line (issue 26: 1 of 24 rendered devices removed, none of six real
films cleared). A device is a thin, bright overlay on anatomy the film also shows beside it, so
it is removed the way a reader imagines the film without it:

1. :func:`device_removal` reads what the instruction asks: every device removed ("without
   support devices", "lines and tubes removed"), named devices ("ETT removed", "the left chest
   tube has been removed": :class:`NamedDevice`, with the kind and side), or nothing.
2. A device detector (the bundled ``cxr-devices-mini``, a small U-Net trained on devices rendered
   on real device-free films and on simulated films; see ``docs/MODEL_CARD.md``) marks the device
   pixels on the model's canvas (:func:`device_mask`). For a named removal a second small network
   (``cxr-device-kinds-mini``, its ``device_<kind>`` channels) says which kind each marked pixel
   is, so only the marked pixels of that kind go, and of a lateral device only the pieces on the
   named side.
3. What the detector marks is followed along the thin bright lines connected to it
   (:func:`grow_along_lines`): real leads are often fainter than the renderings it learned from,
   and where it finds a stretch of one the rest of the lead goes with it.
4. :func:`inpaint` fills them from the film around them (biharmonic inpainting,
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

BUNDLED_KINDS = Path(__file__).resolve().parents[1] / "assets" / "models" / "cxr-device-kinds-mini"
"""The bundled device-kind network's folder: which kind each device pixel is (``device_<kind>``
channels), for named removals. Kept apart from the detector: training the kinds into the
detector's own network cost it recall (0.86 -> 0.76 on the held-out removal pairs)."""

DETECTION_THRESHOLD = 0.5
"""Probability from which a canvas pixel is a device's."""

DEVICE_MARGIN = 1
"""Pixels the detected devices are grown by on the canvas before inpainting (a wire's blurred
edge, and the detector's half-pixel uncertainty at 256 px)."""

GROW_CONTRAST = 0.04
"""A detected device is followed along thin bright ridges connected to it: pixels at least this
much brighter than their surroundings (white top-hat, disk of radius 2 px at 256 px)..."""

GROW_SPARSITY = 0.3
"""...where such ridge pixels are sparse (at most this share of a 15 px window): a line or wire,
not the lung's vessel pattern. Real leads are often fainter than anything the detector learned
from; where it finds part of one, the rest of the lead goes with it."""

BLANK_LEVEL = 0.1
"""Display value below which a pixel is blank film (a border, a collimated edge); lines are not
followed within 3 px of it."""

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
_KIND_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((kind, re.compile(words, re.IGNORECASE)) for kind, words in (
    ("pacemaker", r"\b(?:pacemakers?|pacer|icd|defibrillator|cardiac\s+(?:device|generator)|generator)(?:\s+(?:leads?|wires?|generator))?\b"),
    ("ett", r"\b(?:endotracheal|tracheostomy|ett|et\s+tube|breathing\s+tube)\b"),
    ("ng_tube", r"\b(?:nasogastric|orogastric|ng|og|feeding|gastric|enteric|dobhoff)\b"),
    ("cvc", r"\b(?:central\s+(?:venous|line)|cvc|picc|subclavian|jugular|swan|venous\s+catheter|catheters?|port)\b"),
    ("chest_tube", r"\b(?:chest\s+tubes?|pleural\s+(?:drains?|catheters?)|thoracostomy|drains?)\b"),
    ("ecg", r"\b(?:ecg|ekg|electrodes?|monitoring\s+leads?|cardiac\s+monitor\w*|leads?)\b"),
    ("sternal_wires", r"\b(?:sternal|sternotomy)\b"),
))
"""Words that name each device kind the detector knows, in the order they are tried ("pacemaker
leads" is the pacemaker, not ECG leads; "pleural catheter" a chest tube, not a central line)."""

_SIDE = re.compile(r"\b(left|right)(?:-sided)?\b", re.IGNORECASE)

LATERAL_KINDS = frozenset({"cvc", "pacemaker", "chest_tube"})
"""Kinds placed on one side of the patient (insertion side, generator pocket, drained pleura)."""

_GENERAL = re.compile(r"\b(?:devices?|lines?|tubes?|hardware|support|monitoring)\b", re.IGNORECASE)
_CLAUSES = re.compile(r"[;.\n]+|,\s*(?=[a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class NamedDevice:
    """A device an instruction names for removal.

    Attributes:
        kind: the detector's kind (``ett``, ``ng_tube``, ``cvc``, ``pacemaker``, ``ecg``,
            ``chest_tube``, ``sternal_wires``), or None when the words name a device the detector
            does not know (clips, stents, valves, "wires" alone).
        side: the patient's side named for a lateral device (:data:`LATERAL_KINDS`), else None.
        words: the clause that names it.
    """

    kind: str | None
    side: str | None
    words: str

    @property
    def target(self) -> str | None:
        """The detector channel of this kind (``device_<kind>``), or None."""
        return None if self.kind is None else f"device_{self.kind}"

    def describe(self) -> str:
        """Plain words, e.g. "left chest tube", "ETT", "unrecognised device"."""
        if self.kind is None:
            return f"device in '{self.words}'"
        name = {"ett": "endotracheal tube", "ng_tube": "enteric tube", "cvc": "central venous catheter",
                "ecg": "ECG leads", "chest_tube": "chest tube", "sternal_wires": "sternal wires"}.get(self.kind, self.kind)
        return f"{self.side} {name}" if self.side else name


@dataclass(frozen=True)
class DeviceRemoval:
    """What an instruction asks of the film's devices (:func:`device_removal`).

    Attributes:
        scope: ``all`` (every device removed), ``named`` (the devices in ``named``) or ``none``.
        rest: the instruction without its device-removal clauses ("" when nothing else is asked).
        named: with scope ``named``, the devices named, in the order they were named.
    """

    scope: str
    rest: str
    named: tuple[NamedDevice, ...] = ()


def named_devices(clause: str) -> tuple[NamedDevice, ...]:
    """The devices a removal clause names: every kind its words name (once each), with the side
    for lateral kinds when the clause names exactly one side; one unknown device when the clause
    names a device but no kind the detector knows.

    Example:
        >>> named_devices("The left chest tube has been removed")
        (NamedDevice(kind='chest_tube', side='left', words='The left chest tube has been removed'),)
    """
    spans, rest = [], clause
    for kind, words in _KIND_WORDS:
        if (m := words.search(rest)):
            spans.append((m.start(), m.end(), kind))
            rest = words.sub(lambda w: " " * len(w.group(0)), rest)  # keep positions
    spans.sort()
    sides = [(m.start(), m.group(1).lower()) for m in _SIDE.finditer(clause)]
    found = []
    for i, (start, end, kind) in enumerate(spans):
        side = None
        if kind in LATERAL_KINDS and sides:
            if len({s for _, s in sides}) == 1:  # one side named: it is every lateral device's
                side = sides[0][1]
            else:  # the side word just before the device's name, else just after it
                lo = spans[i - 1][1] if i else 0
                hi = spans[i + 1][0] if i + 1 < len(spans) else len(clause)
                before = [s for pos, s in sides if lo <= pos < start]
                after = [s for pos, s in sides if end <= pos < hi]
                side = before[-1] if before else (after[0] if after else None)
        found.append(NamedDevice(kind, side, clause))
    return tuple(found) or (NamedDevice(None, None, clause),)


def device_removal(instruction: str) -> DeviceRemoval:
    """Whether ``instruction`` removes devices, which, and what else it asks.

    A clause removes devices when it names one (or "lines", "tubes", "devices") with a removal
    word ("without", "removed", "removal", "no longer", "no support devices", "extubated").
    It removes ``all`` when it names no particular device: "without support devices", "lines and
    tubes removed", "interval removal of all lines and tubes".

    Example:
        >>> device_removal("without support devices; stable mild right basilar atelectasis")
        DeviceRemoval(scope='all', rest='stable mild right basilar atelectasis', named=())
        >>> device_removal("Endotracheal tube removed; otherwise unchanged.").named[0].kind
        'ett'
        >>> device_removal("new large left pleural effusion").scope
        'none'
    """
    clauses = [c.strip() for c in _CLAUSES.split(instruction or "") if c.strip()]
    every, named, rest = False, [], []
    for clause in clauses:
        general = _GENERAL.search(clause)
        names = _NAMED.search(clause) or any(words.search(clause) for _, words in _KIND_WORDS)
        if _REMOVAL.search(clause) and (names or general):
            if names:
                named.extend(named_devices(clause))
            else:
                every = True
            continue
        rest.append(clause)
    rest_text = "; ".join(c for c in rest if not _is_filler(c))
    if every:  # every device goes: naming one as well adds nothing
        return DeviceRemoval("all", rest_text)
    if named:
        return DeviceRemoval("named", rest_text, tuple(named))
    return DeviceRemoval("none", instruction)


def _is_filler(clause: str) -> bool:
    """A clause that asks nothing ("otherwise unchanged", "no other significant change")."""
    return bool(re.fullmatch(r"(?:otherwise\s+)?(?:unchanged|stable|no\s+(?:other\s+)?(?:significant\s+|interval\s+)?change)"
                             r"(?:\s+otherwise)?", clause.strip().lower()))


def load_device_detector(spec: str | Path = "auto", device: Any = "cpu", kinds: str | Path | None = "auto") -> Any:
    """The device detector: a small segmenter folder with a ``devices`` channel. Its ``kinds``
    attribute is the network that says which kind each device pixel is (``device_<kind>``
    channels; None when there is none): :func:`device_mask` uses it for named devices.

    Args:
        spec: ``auto`` (the bundled ``cxr-devices-mini``) or a folder.
        device: where to run.
        kinds: ``auto`` (the bundled ``cxr-device-kinds-mini`` when present), a folder, or None.
            A detector folder with kind channels of its own needs none.

    Raises:
        InputError: no detector there, or a segmenter without a ``devices`` channel, or a
            ``kinds`` folder without kind channels.
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
    detector.kinds = None
    if kinds is not None and not any(s.startswith("device_") for s in detector.structures):
        kinds_folder = BUNDLED_KINDS if str(kinds) == "auto" else Path(kinds)
        if (kinds_folder / smallnet.CONFIG_NAME).is_file():
            detector.kinds = SmallSegmenter.load(kinds_folder, device)
            if not any(s.startswith("device_") for s in detector.kinds.structures):
                raise InputError(f"{kinds_folder} has no device-kind channels")
        elif str(kinds) != "auto":
            raise InputError(f"No device-kind network in {kinds_folder}")
    return detector


def _kind_source(detector: Any) -> Any:
    """What tells the device kinds apart: the detector's ``kinds`` network, else the detector."""
    return getattr(detector, "kinds", None) or detector


def detects(detector: Any, named: tuple[NamedDevice, ...]) -> bool:
    """Whether ``detector`` (or its ``kinds`` network) has a channel for every ``named`` device."""
    structures = _kind_source(detector).structures
    return all(d.target is not None and d.target in structures for d in named)


def device_mask(detector: Any, canvas: np.ndarray, content: np.ndarray | None = None,
                named: tuple[NamedDevice, ...] = (), *, grow: bool = True) -> np.ndarray:
    """Bool mask of the devices on ``canvas`` (``(S, S)`` float32 in [0, 1]): the detector's,
    followed along the thin bright lines connected to them (``grow``, :func:`grow_along_lines`),
    grown by :data:`DEVICE_MARGIN`; only inside ``content`` (the letterboxed film area) when given.

    With ``named`` devices, only the marked pixels whose most likely kind (among the
    ``device_<kind>`` channels of the detector's ``kinds`` network, or its own) is a named one, and of a named side's lateral device only the
    connected pieces whose centre lies on that side of the film (the patient's right is the
    image's left, as a frontal film is displayed).

    Raises:
        InputError: a named device the detector has no channel for.
    """
    from scipy import ndimage

    if named and not detects(detector, named):
        missing = [d.describe() for d in named if d.target not in _kind_source(detector).structures]
        raise InputError(f"the device detector cannot find {', '.join(missing)}")
    probs = detector.probabilities(canvas[None]).numpy()[0]
    mask = probs[list(detector.structures).index("devices")] >= DETECTION_THRESHOLD
    if content is not None:
        mask &= content
    detected = mask.copy()
    if named and mask.any():
        source = _kind_source(detector)
        structures = list(source.structures)
        kind_probs = probs if source is detector else source.probabilities(canvas[None]).numpy()[0]
        kinds = [s for s in structures if s.startswith("device_")]
        which = np.argmax(np.stack([kind_probs[structures.index(k)] for k in kinds]), axis=0)
        cols = np.nonzero(content.any(axis=0))[0] if content is not None and content.any() else np.arange(canvas.shape[1])
        midline = 0.5 * (cols[0] + cols[-1])
        keep = np.zeros_like(mask)
        for d in named:
            part = mask & (which == kinds.index(d.target))
            if d.side is not None and part.any():
                labels, n = ndimage.label(part, structure=np.ones((3, 3)))
                centres = ndimage.center_of_mass(part, labels, index=np.arange(1, n + 1))
                on_side = [i + 1 for i, (_, c) in enumerate(centres) if (c < midline) == (d.side == "right")]
                part = np.isin(labels, on_side)
            keep |= part
        mask = keep
    if grow and mask.any():  # (never into another detected device: that one was not named)
        mask = grow_along_lines(canvas, mask, content, blocked=detected & ~mask)
    if DEVICE_MARGIN and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=DEVICE_MARGIN)
        if content is not None:
            mask &= content
    return mask


def grow_along_lines(canvas: np.ndarray, seeds: np.ndarray, content: np.ndarray | None = None,
                     blocked: np.ndarray | None = None) -> np.ndarray:
    """``seeds`` and every thin bright ridge of ``canvas`` connected to them (8-connected): pixels
    :data:`GROW_CONTRAST` brighter than their surroundings where such pixels are sparse
    (:data:`GROW_SPARSITY`), within ``content`` and outside ``blocked``."""
    from scipy import ndimage
    from skimage.morphology import disk, white_tophat

    ridge = white_tophat(canvas.astype(np.float32), disk(2)) >= GROW_CONTRAST
    sparse = ndimage.uniform_filter(ridge.astype(np.float32), 15) <= GROW_SPARSITY
    # not along a film's blank border or collimation edge (inpainting there pulls the blank in)
    blank = ndimage.binary_dilation(canvas < BLANK_LEVEL, iterations=3)
    allowed = (ridge & sparse & ~blank) | seeds
    if content is not None:
        allowed &= content
    if blocked is not None:
        allowed &= ~blocked | seeds
    labels, _ = ndimage.label(allowed, structure=np.ones((3, 3)))
    touched = np.unique(labels[seeds & allowed])
    return seeds | np.isin(labels, touched[touched > 0])


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
