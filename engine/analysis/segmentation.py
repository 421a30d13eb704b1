"""Anatomy segmentation: masks as ``name -> bool (H, W)``, and anatomy retention by Dice.

Backends:

* :class:`XRVSegmenter`: torchxrayvision's ChestX-Det PSPNet (14 structures, 512 px,
  [-1024, 1024] input) when its weights are present.
* :class:`SmallSegmenter`: the bundled small U-Net (:mod:`engine.analysis.smallnet`) otherwise.

Structure names are snake_case; lungs (and clavicles, scapulae, hila) are the PATIENT's sides,
as in the simulator's masks (``left_lung`` appears on the image's right). PSPNet's names map as
in :data:`PSPNET_STRUCTURES` ("Weasand" is the trachea, "Facies Diaphragmatica" the diaphragm).

Dice between the prior's and the counterfactual's masks says whether the anatomy the edit was
not asked to touch stayed where it was (:func:`anatomy_retention`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from engine.analysis import smallnet, xrv
from engine.analysis._images import as_unit_batch
from engine.analysis.classifier import resize_square
from engine.analysis.metrics import dice
from engine.errors import InputError

PSPNET_STRUCTURES = {
    "Left Clavicle": "left_clavicle",
    "Right Clavicle": "right_clavicle",
    "Left Scapula": "left_scapula",
    "Right Scapula": "right_scapula",
    "Left Lung": "left_lung",
    "Right Lung": "right_lung",
    "Left Hilus Pulmonis": "left_hilum",
    "Right Hilus Pulmonis": "right_hilum",
    "Heart": "heart",
    "Aorta": "aorta",
    "Facies Diaphragmatica": "diaphragm",
    "Mediastinum": "mediastinum",
    "Weasand": "trachea",
    "Spine": "spine",
}
"""torchxrayvision PSPNet target -> this project's structure name."""

BUNDLED_SEGMENTER = Path(__file__).resolve().parents[2] / "assets" / "models" / "cxr-segmenter-mini"
"""Where the demo-model issue puts the bundled small segmenter folder."""


class Segmenter(abc.ABC):
    """Anatomy segmentation on [0, 1] images.

    Attributes:
        name: what to call it in reports.
        structures: output structure names, in channel order.
        input_resolution: square side the network runs at.
        device: where its weights are.
        test_resolutions: further input sides whose probabilities are averaged with
            ``input_resolution``'s (none unless the network's folder asks for them).
    """

    name: str
    structures: tuple[str, ...]
    input_resolution: int
    device: torch.device
    test_resolutions: tuple[int, ...] = ()

    @abc.abstractmethod
    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        """``(B, 1, R, R)`` [0, 1] images at :attr:`input_resolution` to logits ``(B, S, r, r)``."""

    @torch.no_grad()
    def probabilities(self, images: Any, batch_size: int = 8, *, mirror: bool = True) -> torch.Tensor:
        """``(B, S, H, W)`` per-structure probabilities on the input's grid.

        ``mirror`` averages each sided structure (``left_*``/``right_*``: the lungs) with the
        mirrored film's other side, flipped back (:meth:`mirror_order`): a test-time mirror that
        lifts lung Dice on held-out real films (``benchmarks/segmenter_real_dice.py``) for one
        more network call. Unpaired structures (the heart, the mediastinum) keep the film's own
        prediction: a mirrored film shows a right-sided heart, which the networks rarely saw, and
        averaging it in widened the heart (more held-out CTRs outside 0.35-0.65).

        The sided structures are also averaged over :attr:`test_resolutions`: the network run at
        those input sizes besides :attr:`input_resolution` (a test-time multi-scale a network's
        folder may ask for; none by default). Not the heart: averaging it over scales moved a
        held-out film's CTR out of 0.35-0.65, as the mirror did.
        """
        x = as_unit_batch(images)
        size = x.shape[-2:]
        order = self.mirror_order()
        sided = [k for k, j in enumerate(order) if j != k]
        resolutions = (self.input_resolution, *(self.test_resolutions if sided else ()))
        out = []
        for i in range(0, x.shape[0], batch_size):
            batch = x[i : i + batch_size].to(self.device)
            p = self._probabilities_at(batch, self.input_resolution, order if mirror and sided else None)
            if len(resolutions) > 1:  # the sided structures averaged over every resolution
                more = [F.interpolate(self._probabilities_at(batch, r, order if mirror else None)[:, sided],
                                      size=p.shape[-2:], mode="bilinear", align_corners=False)
                        for r in resolutions[1:]]
                p[:, sided] = (p[:, sided] + sum(more)) / len(resolutions)
            out.append(F.interpolate(p, size=size, mode="bilinear", align_corners=False).cpu())
        return torch.cat(out)

    def _probabilities_at(self, batch: torch.Tensor, resolution: int, order: list[int] | None) -> torch.Tensor:
        """Probabilities of ``batch`` run at ``resolution`` (on the network's output grid); with
        ``order`` (:meth:`mirror_order`) the sided structures averaged with the mirror's."""
        xb = resize_square(batch, resolution)
        if order is None:
            p = torch.sigmoid(self.logits(xb).float())
        else:  # the film and its mirror in one call
            logits = self.logits(torch.cat([xb, xb.flip(-1)])).float()
            n = xb.shape[0]
            p = torch.sigmoid(logits[:n])
            sided = [k for k, j in enumerate(order) if j != k]
            mirrored = torch.sigmoid(logits[n:]).flip(-1)[:, order]
            p[:, sided] = 0.5 * (p[:, sided] + mirrored[:, sided])
        return p

    def mirror_order(self) -> list[int]:
        """For each channel, the channel of the same structure on a mirrored film (``left_*`` and
        ``right_*`` swap; the patient's left lung is on the image's right either way)."""
        index = {name: k for k, name in enumerate(self.structures)}

        def other(name: str) -> str:
            for a, b in (("left_", "right_"), ("right_", "left_")):
                if name.startswith(a) and b + name[len(a):] in index:
                    return b + name[len(a):]
            return name

        return [index[other(name)] for name in self.structures]

    def segment(self, images: Any, threshold: float = 0.5, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
        """Masks per image: ``[{structure: bool (H, W)}, ...]`` on the input's grid.

        Raises:
            InputError: bad images, or a threshold outside (0, 1).
        """
        if not 0 < threshold < 1:
            raise InputError(f"the mask threshold must be in (0, 1), not {threshold}")
        probs = self.probabilities(images, batch_size).numpy() >= threshold
        return [{name: _clean(name, probs[b, k]) for k, name in enumerate(self.structures)}
                for b in range(probs.shape[0])]


SINGLE_PIECE = frozenset({"left_lung", "right_lung", "heart", "trachea"})
"""Structures that are one connected piece on a frontal film: a segmentation keeps only its
largest component, holes filled (on real films the networks add specks under the diaphragm and
in the neck, and leave holes where an opacity or a device crosses a lung)."""


def _clean(name: str, mask: np.ndarray) -> np.ndarray:
    """``mask`` as one filled piece for :data:`SINGLE_PIECE` structures; unchanged otherwise."""
    if name not in SINGLE_PIECE or not mask.any():
        return mask
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


class XRVSegmenter(Segmenter):
    """torchxrayvision's ChestX-Det PSPNet. Build with :func:`load_xrv_segmenter`."""

    def __init__(self, module: Any, device: torch.device | str = "cpu") -> None:
        self.module = module.to(device).eval()
        self.device = torch.device(device)
        self.name = "torchxrayvision chestx_det PSPNet"
        self.structures = tuple(PSPNET_STRUCTURES.get(t, t.lower().replace(" ", "_")) for t in module.targets)
        self.input_resolution = xrv.PSPNET_RESOLUTION

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        # the package's forward: grey -> 3 channels, [-1024, 1024] -> [0, 1] -> ImageNet norm
        return self.module(xrv.to_xrv_range(x01))


def load_xrv_segmenter(cache_dir: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu") -> XRVSegmenter:
    """torchxrayvision's PSPNet, loaded offline.

    Raises:
        InputError: the weight file is missing (saying which file to place where).
    """
    return XRVSegmenter(xrv.load_pspnet_module(cache_dir), device)


class SmallSegmenter(smallnet.SmallNetBackend, Segmenter):
    """The bundled small U-Net (``cxr-small-unet``), from a folder."""

    kind = "segmenter"

    def __init__(self, net: smallnet.SmallUNet, card: smallnet.SmallNetCard | None = None,
                 device: torch.device | str = "cpu") -> None:
        self._hold(net, card, device)
        self.structures = tuple(net.config.targets)
        self.test_resolutions = net.config.test_resolutions

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(smallnet.to_net_range(x01, self.input_range))


def load_segmenter(spec: str | os.PathLike[str] = "auto", *, cache_dir: str | os.PathLike[str] | None = None,
                   device: torch.device | str = "cpu") -> Segmenter:
    """A segmenter by name.

    Args:
        spec: ``xrv`` (PSPNet), a small-segmenter folder, or ``auto``: PSPNet when its weights
            are present, else the bundled small segmenter.
        cache_dir: torchxrayvision weight folder.
        device: where to run.

    Raises:
        InputError: nothing usable is installed (the message says what to place where).
    """
    spec = str(spec)
    if spec == "auto":
        if xrv.available("pspnet", cache_dir):
            return load_xrv_segmenter(cache_dir, device)
        if (BUNDLED_SEGMENTER / smallnet.CONFIG_NAME).is_file():
            return SmallSegmenter.load(BUNDLED_SEGMENTER, device)
        wf = xrv.pspnet_weight_file(cache_dir)
        raise InputError(
            f"No anatomy segmenter is installed: place {wf.filename} in {wf.folder} (from {wf.url}) for "
            f"torchxrayvision's PSPNet, or a small-segmenter folder at {BUNDLED_SEGMENTER}, or pass a "
            "segmenter folder"
        )
    if spec == "xrv":
        return load_xrv_segmenter(cache_dir, device)
    if Path(spec).is_dir():
        return SmallSegmenter.load(spec, device)
    raise InputError(f"Unknown segmenter {spec!r}: use auto, xrv or a small-segmenter folder")


def mask_dice(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, float]:
    """Dice per structure present in both mask sets (or in ``names``).

    Raises:
        InputError: a named structure is missing from either set, or shapes differ.
    """
    names = [n for n in a if n in b] if names is None else list(names)
    missing = [n for n in names if n not in a or n not in b]
    if missing:
        raise InputError(f"structures {missing} are not in both mask sets")
    return {n: dice(a[n], b[n]) for n in names}


def anatomy_retention(segmenter: Segmenter, prior: Any, counterfactual: Any,
                      exclude: Sequence[str] = ()) -> dict[str, float]:
    """Dice between the segmenter's masks on the prior and on the counterfactual.

    Args:
        segmenter: any backend.
        prior, counterfactual: ``(H, W)`` [0, 1] images of one size.
        exclude: structures the edit was meant to change (e.g. ``heart`` for cardiomegaly).

    Returns:
        structure -> Dice, plus ``"mean"`` over them.
    """
    masks = segmenter.segment(torch.cat([as_unit_batch(prior), as_unit_batch(counterfactual)]))
    names = [n for n in segmenter.structures if n not in set(exclude)]
    scores = mask_dice(masks[0], masks[1], names)
    scores["mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    return scores


def decode_bitmask(packed: np.ndarray, bits: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Unpacks an integer mask image whose bit ``k`` is one structure (the simulator's mask PNGs).

    Args:
        packed: ``(H, W)`` unsigned integer array.
        bits: structure name -> bit index.

    Raises:
        InputError: the array is not of an unsigned integer type.
    """
    packed = np.asarray(packed)
    if packed.dtype.kind != "u":
        raise InputError(f"a packed mask must hold unsigned integers, not {packed.dtype}")
    return {name: ((packed >> bit) & 1).astype(bool) for name, bit in bits.items()}


CTR_OPENING = 0.024
"""Radius of the opening that :func:`cardiac_silhouette` applies, as a share of the image width
(6 pixels at 256): slivers under about 5 % of the width high go, the heart (about 35-50 %) stays."""


def cardiac_silhouette(heart: np.ndarray) -> np.ndarray:
    """The heart mask without thin strips: opened with a disk of radius :data:`CTR_OPENING` of
    the width, largest piece kept (the mask itself when the opening would leave nothing)."""
    from scipy import ndimage

    heart = np.asarray(heart, dtype=bool)
    r = max(1, round(CTR_OPENING * heart.shape[1]))
    yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
    opened = ndimage.binary_opening(heart, structure=xx * xx + yy * yy <= r * r)
    if not opened.any():
        return heart
    labels, n = ndimage.label(opened)
    if n > 1:
        opened = labels == 1 + int(np.argmax(ndimage.sum(opened, labels, index=np.arange(1, n + 1))))
    return opened


def cardiothoracic_ratio(masks: Mapping[str, np.ndarray]) -> float:
    """Cardiothoracic ratio measured on a segmentation, as a radiologist measures it on a PA film.

    The horizontal extent of the heart mask (its transverse diameter) divided by that of the
    thorax, taken as the two lung masks together (outer edge of one lung to the outer edge of
    the other). Normal adult hearts measure below about 0.5.

    The heart is measured after a morphological opening with a disk of radius
    :data:`CTR_OPENING` of the image width (largest piece kept): a segmenter on a real film
    often runs a thin strip of "heart" along a dome or into the cardiophrenic angle, and
    a strip a few pixels high is not the cardiac border, though a bounding box would take it
    for one (on the 9 held-out Hannover PA films it raised the median ratio from 0.52 to 0.65).

    Args:
        masks: structure name -> bool ``(H, W)`` mask, with ``heart``, ``left_lung`` and
            ``right_lung`` (any backend's :meth:`Segmenter.segment` output).

    Returns:
        The ratio, or ``nan`` when the heart or both lungs are empty.

    Raises:
        InputError: a needed structure is missing.
    """
    missing = [n for n in ("heart", "left_lung", "right_lung") if n not in masks]
    if missing:
        raise InputError(f"a cardiothoracic ratio needs the structures {missing}")

    def width(mask: np.ndarray) -> int:
        cols = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=0))
        return int(cols[-1] - cols[0] + 1) if cols.size else 0

    thorax = width(np.asarray(masks["left_lung"], dtype=bool) | np.asarray(masks["right_lung"], dtype=bool))
    heart = width(cardiac_silhouette(masks["heart"]))
    return heart / thorax if heart and thorax else float("nan")
