"""Pathology classifiers: one interface, two backends, probabilities before and after an edit.

A :class:`Classifier` takes images in the engine's contract (float32 [0, 1], ``(B, 1, H, W)``,
square) and does its own edge conversion (resize to :attr:`~Classifier.input_resolution`, map
to :attr:`~Classifier.input_range`). It exposes the two halves of the network separately,
:meth:`~Classifier.features` (the last convolutional feature map) and
:meth:`~Classifier.head` (feature map to logits), which is all Grad-CAM needs
(:mod:`engine.analysis.attention`) without hooks.

Backends:

* :class:`XRVClassifier`: torchxrayvision's DenseNet-121 (``densenet121-res224-all`` and the
  other ``densenet121-res224-*`` weights) or ResNet-50 (``resnet50-res512-all``); input
  [-1024, 1024] at 224 (512) px; probabilities are the package's calibrated outputs (sigmoid,
  then ``op_norm`` with its operating-point thresholds so 0.5 is the operating point) unless
  ``calibrated=False``.
* :class:`SmallClassifier`: this project's bundled small CNN (:mod:`engine.analysis.smallnet`),
  loaded from a folder.

Finding names are matched loosely: case, underscores and the aliases in :data:`ALIASES`
("Effusion" is torchxrayvision's "Pleural Effusion").
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from engine.analysis import smallnet, xrv
from engine.analysis._images import as_unit_batch
from engine.errors import InputError

ALIASES = {
    "effusion": "pleural effusion",
    "pleural effusions": "pleural effusion",
    "enlarged cardiac silhouette": "cardiomegaly",
    "support device": "support devices",
    "devices": "support devices",
}
"""Alternative spellings of findings, after lower-casing and ``_`` -> space."""

BUNDLED_CLASSIFIER = Path(__file__).resolve().parents[2] / "assets" / "models" / "cxr-classifier-mini"
"""Where the demo-model issue puts the bundled small classifier folder."""


def canonical_finding(name: str) -> str:
    """Lower-case, ``_`` -> space, aliases resolved: ``"Effusion"`` -> ``"pleural effusion"``."""
    key = " ".join(name.replace("_", " ").lower().split())
    return ALIASES.get(key, key)


def resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(B, 1, S, S)`` to ``(B, 1, R, R)`` (bilinear, antialiased when shrinking), differentiable.

    Raises:
        InputError: the images are not square (letterbox them with ``engine.io.to_square``).
    """
    h, w = images.shape[-2:]
    if h != w:
        raise InputError(
            f"classifiers take square images, got {h}x{w}; letterbox with engine.io.to_square "
            "(the engine's Counterfactual.prior/.image already are)"
        )
    if h == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=h > resolution)


class Classifier(abc.ABC):
    """A multi-label pathology classifier on [0, 1] images.

    Attributes:
        name: what to call it in reports.
        targets: finding names in output order.
        input_resolution: square side the network runs at.
        input_range: the network's input value range.
        device: where its weights are.
    """

    name: str
    targets: tuple[str, ...]
    input_resolution: int
    input_range: tuple[float, float]
    device: torch.device

    # -- what a backend implements ------------------------------------------------------------
    @abc.abstractmethod
    def convert_range(self, images01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (already resized) to the network's input range."""

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Network input ``(B, 1, R, R)`` to the last feature map ``(B, C, h, w)``."""

    @abc.abstractmethod
    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map to logits ``(B, T)``."""

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits to probabilities (sigmoid; backends may calibrate further)."""
        return torch.sigmoid(logits)

    # -- shared ---------------------------------------------------------------------------------
    def to_input(self, images: Any) -> torch.Tensor:
        """Contract images to network input: check, move to the device, resize, convert range."""
        x = as_unit_batch(images).to(self.device)
        return self.convert_range(resize_square(x, self.input_resolution))

    def logits(self, images: Any) -> torch.Tensor:
        """``(B, T)`` logits (differentiable with respect to tensor inputs)."""
        return self.head(self.features(self.to_input(images)))

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 16) -> np.ndarray:
        """``(B, T)`` probabilities as float32 numpy, in batches."""
        x = as_unit_batch(images)
        out = [self.calibrate(self.logits(x[i : i + batch_size])).float().cpu() for i in range(0, x.shape[0], batch_size)]
        return torch.cat(out).numpy()

    def index(self, finding: str | int) -> int:
        """Output column of a finding (by loose name, or an index).

        Raises:
            InputError: the classifier does not predict it (the message lists its targets).
        """
        if isinstance(finding, int):
            if not 0 <= finding < len(self.targets):
                raise InputError(f"target index {finding} is out of range for {len(self.targets)} targets")
            return finding
        want = canonical_finding(finding)
        for i, t in enumerate(self.targets):
            if canonical_finding(t) == want:
                return i
        raise InputError(f"{self.name} does not predict {finding!r}; it predicts {', '.join(self.targets)}")

    def supports(self, finding: str) -> bool:
        """True if :meth:`index` would find it."""
        try:
            self.index(finding)
        except InputError:
            return False
        return True


class XRVClassifier(Classifier):
    """torchxrayvision DenseNet-121 / ResNet-50 pathology classifier.

    Build with :func:`load_xrv_classifier` (checks the weight file offline first).
    """

    def __init__(self, module: Any, weights: str, device: torch.device | str = "cpu", calibrated: bool = True) -> None:
        self.module = module.to(device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.weights = weights
        self.name = f"torchxrayvision {weights}"
        self.targets = tuple(module.targets)
        self.input_resolution = int(getattr(module, "input_resolution", 224))
        self.input_range = xrv.XRV_RANGE
        self.device = torch.device(device)
        self.calibrated = calibrated
        self.is_resnet = weights.startswith("resnet")

    def convert_range(self, images01: torch.Tensor) -> torch.Tensor:
        return xrv.to_xrv_range(images01)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_resnet:
            m = self.module.model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return F.relu(self.module.features(x))  # (B, 1024, 7, 7) at 224 px

    def head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.module.model.fc(pooled) if self.is_resnet else self.module.classifier(pooled)

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        thresholds = getattr(self.module, "op_threshs", None)
        if self.calibrated and thresholds is not None:
            # targets without a threshold (NaN in the package's table, e.g. the ResNet's "Lung
            # Lesion") get 0.5, where op_norm is the identity: their plain sigmoid
            thresholds = torch.nan_to_num(thresholds.to(p.device).float(), nan=0.5)
            p = xrv.import_xrv().models.op_norm(p, thresholds)
        return p


def load_xrv_classifier(weights: str = "densenet121-res224-all", cache_dir: str | os.PathLike[str] | None = None,
                        device: torch.device | str = "cpu", calibrated: bool = True) -> XRVClassifier:
    """torchxrayvision's classifier, loaded offline.

    Args:
        weights: a torchxrayvision weight name (``densenet121-res224-all``, ``-chex``, ...).
        cache_dir: folder holding the weight file (default: ``$CXR_JOURNEY_XRV_CACHE`` or
            ``~/.torchxrayvision/models_data``).
        device: where to run.
        calibrated: report the package's operating-point-normalised probabilities.

    Raises:
        InputError: unknown weights or missing file (saying which file to place where).
    """
    return XRVClassifier(xrv.load_classifier_module(weights, cache_dir), weights, device, calibrated)


class SmallClassifier(smallnet.SmallNetBackend, Classifier):
    """The bundled small CNN (``cxr-small-cnn``), from a folder (:mod:`engine.analysis.smallnet`)."""

    kind = "classifier"

    def __init__(self, net: smallnet.SmallClassifierNet, card: smallnet.SmallNetCard | None = None,
                 device: torch.device | str = "cpu") -> None:
        self._hold(net, card, device)
        self.targets = tuple(net.config.targets)

    def convert_range(self, images01: torch.Tensor) -> torch.Tensor:
        return smallnet.to_net_range(images01, self.input_range)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.classify(features)


def load_classifier(spec: str | os.PathLike[str] = "auto", *, cache_dir: str | os.PathLike[str] | None = None,
                    device: torch.device | str = "cpu") -> Classifier:
    """A classifier by name.

    Args:
        spec: ``xrv`` (``densenet121-res224-all``), ``xrv:WEIGHTS``, a small-classifier folder,
            or ``auto``: torchxrayvision's ``densenet121-res224-all`` when its weights are
            present, else the bundled small classifier.
        cache_dir: torchxrayvision weight folder.
        device: where to run.

    Raises:
        InputError: nothing usable is installed (the message says what to place where).
    """
    spec = str(spec)
    if spec == "auto":
        if xrv.available("densenet121-res224-all", cache_dir):
            return load_xrv_classifier("densenet121-res224-all", cache_dir, device)
        if (BUNDLED_CLASSIFIER / smallnet.CONFIG_NAME).is_file():
            return SmallClassifier.load(BUNDLED_CLASSIFIER, device)
        wf = xrv.classifier_weight_file("densenet121-res224-all", cache_dir)
        raise InputError(
            f"No pathology classifier is installed: place {wf.filename} in {wf.folder} (from {wf.url}) "
            f"for torchxrayvision's DenseNet, or a small-classifier folder at {BUNDLED_CLASSIFIER}, "
            "or pass a classifier folder"
        )
    if spec == "xrv" or spec.startswith("xrv:"):
        weights = spec.partition(":")[2] or "densenet121-res224-all"
        return load_xrv_classifier(weights, cache_dir, device)
    if Path(spec).is_dir():
        return SmallClassifier.load(spec, device)
    raise InputError(f"Unknown classifier {spec!r}: use auto, xrv, xrv:WEIGHTS or a small-classifier folder")


@dataclass(frozen=True)
class BeforeAfter:
    """A classifier's probability for one finding on the prior and on the counterfactual."""

    finding: str
    before: float
    after: float

    @property
    def change(self) -> float:
        """``after - before``."""
        return self.after - self.before


def before_after(classifier: Classifier, prior: Any, counterfactual: Any, findings: Sequence[str] | None = None) -> dict[str, BeforeAfter]:
    """Probabilities before and after the edit, for the findings the classifier predicts.

    Args:
        classifier: any backend.
        prior: ``(H, W)`` [0, 1] prior.
        counterfactual: ``(H, W)`` [0, 1] counterfactual (same size).
        findings: which findings (default: all of the classifier's targets); ones it does not
            predict are left out.

    Returns:
        finding (as the classifier names it) -> :class:`BeforeAfter`.
    """
    probs = classifier.predict(torch.cat([as_unit_batch(prior), as_unit_batch(counterfactual)]))
    names = list(classifier.targets) if findings is None else [f for f in findings if classifier.supports(f)]
    out = {}
    for f in names:
        i = classifier.index(f)
        out[classifier.targets[i]] = BeforeAfter(classifier.targets[i], float(probs[0, i]), float(probs[1, i]))
    return out


# ---------------------------------------------------------------------------------------------
# torchxrayvision's race and age models (BiomedJourney's retention measures)


class XRVRaceModel:
    """Emory HITI race classifier (Asian, Black, White) through torchxrayvision, on [0, 1] images."""

    targets = ("Asian", "Black", "White")

    def __init__(self, module: Any, device: torch.device | str = "cpu") -> None:
        self.module = module.to(device).eval()
        self.device = torch.device(device)
        self.targets = tuple(getattr(module, "targets", self.targets))

    def predict(self, images: Any, batch_size: int = 16) -> np.ndarray:
        """``(B, 3)`` class probabilities (the model returns log-softmax)."""
        return _run_race_age(self.module, images, batch_size, self.device).exp().numpy()


@torch.no_grad()
def _run_race_age(module: Any, images: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """Runs a torchxrayvision race/age network on [0, 1] images in batches; float32 on the CPU."""
    x = as_unit_batch(images)
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = resize_square(x[i : i + batch_size].to(device), xrv.RACE_AGE_RESOLUTION)
        out.append(module(xrv.to_xrv_range(xb)).float().cpu())
    return torch.cat(out)


class XRVAgeModel:
    """RIKEN age regressor through torchxrayvision, on [0, 1] images."""

    def __init__(self, module: Any, device: torch.device | str = "cpu") -> None:
        self.module = module.to(device).eval()
        self.device = torch.device(device)

    def predict(self, images: Any, batch_size: int = 16) -> np.ndarray:
        """``(B,)`` predicted age in years."""
        return _run_race_age(self.module, images, batch_size, self.device).reshape(-1).numpy()


def load_race_model(device: torch.device | str = "cpu", cache_dir: str | os.PathLike[str] | None = None) -> XRVRaceModel:
    """torchxrayvision's race model, loaded offline.

    Raises:
        InputError: the weight file is missing (saying which file to place where).
    """
    return XRVRaceModel(xrv.load_race_module(cache_dir), device)


def load_age_model(device: torch.device | str = "cpu", cache_dir: str | os.PathLike[str] | None = None) -> XRVAgeModel:
    """torchxrayvision's age model, loaded offline.

    Raises:
        InputError: the weight file is missing (saying which file to place where).
    """
    return XRVAgeModel(xrv.load_age_module(cache_dir), device)
