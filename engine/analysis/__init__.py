"""What a clinician looks at beside a counterfactual, and what a researcher reports about a model.

Pure tensor/numpy code shared by the UI and the evaluator (``python -m train evaluate``):

* :mod:`engine.analysis.delta`: the signed delta map (counterfactual minus prior), smoothing,
  percentile threshold, symmetric colour limits and per-structure statistics.
* :mod:`engine.analysis.classifier`: the pathology-classifier interface and its backends
  (torchxrayvision's DenseNet/ResNet, the bundled small classifier), probabilities before/after.
* :mod:`engine.analysis.attention`: Grad-CAM and gradient saliency for one finding.
* :mod:`engine.analysis.segmentation`: anatomy masks (torchxrayvision's PSPNet or the bundled
  small segmenter), Dice between prior and counterfactual masks.
* :mod:`engine.analysis.clip_score`: CLIP directional similarity, the edit score PRISM filters by.
* :mod:`engine.analysis.metrics`: CMIG, AUROC, Pearson, KL, Dice, L1, CPG, PSNR/SSIM.
* :mod:`engine.analysis.render`: colour maps, overlays and figures (matplotlib Agg, no GUI).
* :mod:`engine.analysis.xrv`: torchxrayvision weight files, offline checks and range converters.
* :mod:`engine.analysis.smallnet`: the folder format and architecture of the bundled small
  classifier and segmenter.

Images follow the engine's one intensity contract: float32 in [0, 1], shape ``(H, W)`` or
``(B, 1, H, W)``. Every other range (torchxrayvision's [-1024, 1024], a small network's
[-1, 1]) is reached through a named converter. Importing this package is cheap: submodules
(and torch, matplotlib) load on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_SUBMODULES = ("attention", "classifier", "clip_score", "delta", "metrics", "render", "segmentation", "smallnet", "xrv")

__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"engine.analysis.{name}")
    raise AttributeError(f"module 'engine.analysis' has no attribute {name!r}")
