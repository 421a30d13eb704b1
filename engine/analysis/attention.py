"""Where a classifier looks: Grad-CAM and gradient saliency for one finding.

Both take images in the [0, 1] contract and return ``(B, H, W)`` maps on the *input's* grid
(Grad-CAM is upsampled from the feature map; saliency is the gradient with respect to the [0, 1]
input, through the classifier's own resize and range conversion), normalised per image to
[0, 1] unless ``normalize=False``.

Grad-CAM (Selvaraju et al., 2017): with feature maps ``A^k`` of the last convolutional stage and
the target's logit ``y``, weights ``alpha_k = mean_ij dy/dA^k_ij`` and the map
``ReLU(sum_k alpha_k A^k)``. The classifier interface hands us ``features`` and ``head``
separately, so no hooks are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from engine.analysis._images import as_unit_batch
from engine.analysis.classifier import Classifier
from engine.errors import InputError


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-image division by the max (all-zero maps stay zero). ``(B, H, W)``."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return maps / peak


def grad_cam(classifier: Classifier, images: Any, finding: str | int, *, normalize: bool = True) -> torch.Tensor:
    """Grad-CAM of one finding.

    Args:
        classifier: any :class:`~engine.analysis.classifier.Classifier`.
        images: ``(H, W)`` or ``(B, 1, H, W)`` in [0, 1] (square).
        finding: finding name (loosely matched) or output index.
        normalize: divide each map by its maximum.

    Returns:
        ``(B, H, W)`` float32 CPU tensor, non-negative, on the input's grid.

    Raises:
        InputError: the classifier does not predict ``finding``; bad images.
    """
    index = classifier.index(finding)
    x01 = as_unit_batch(images)
    size = x01.shape[-2:]
    x = classifier.to_input(x01.detach()).requires_grad_(True)
    with torch.enable_grad():
        feats = classifier.features(x)  # (B, C, h, w)
        logit = classifier.head(feats)[:, index]
        (grads,) = torch.autograd.grad(logit.sum(), feats)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k, (B, C, 1, 1)
    cam = F.relu((weights * feats.detach()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    cam = cam.float().cpu()
    return _normalize(cam) if normalize else cam


def gradient_saliency(classifier: Classifier, images: Any, finding: str | int, *, samples: int = 0,
                      noise_std: float = 0.05, generator: torch.Generator | None = None,
                      normalize: bool = True) -> torch.Tensor:
    """Gradient saliency ``|d logit / d image|`` of one finding, optionally SmoothGrad-averaged.

    Args:
        classifier: any classifier.
        images: ``(H, W)`` or ``(B, 1, H, W)`` in [0, 1].
        finding: finding name or output index.
        samples: 0 for plain saliency; N > 0 averages the gradient over N noisy copies
            (SmoothGrad, Smilkov et al., 2017).
        noise_std: SmoothGrad noise in [0, 1] intensity units.
        generator: the noise's source (CPU generator); required when ``samples > 0``.
        normalize: divide each map by its maximum.

    Returns:
        ``(B, H, W)`` float32 CPU tensor, non-negative, on the input's grid.

    Raises:
        InputError: unknown finding, bad images, or SmoothGrad without a generator.
    """
    index = classifier.index(finding)
    x01 = as_unit_batch(images).detach()
    if samples < 0:
        raise InputError(f"samples must be >= 0, not {samples}")
    if samples and generator is None:
        raise InputError("SmoothGrad draws noise: pass generator=torch.Generator().manual_seed(...)")
    inputs = [x01] if samples == 0 else [
        (x01 + noise_std * torch.randn(x01.shape, generator=generator)).clamp(0, 1) for _ in range(samples)
    ]
    total = torch.zeros_like(x01)
    for xin in inputs:
        xin = xin.clone().to(classifier.device).requires_grad_(True)
        with torch.enable_grad():
            logit = classifier.logits(xin)[:, index]
            (grad,) = torch.autograd.grad(logit.sum(), xin)
        total += grad.detach().float().cpu()
    sal = (total / len(inputs)).abs()[:, 0]
    return _normalize(sal) if normalize else sal


@dataclass(frozen=True)
class AttentionComparison:
    """One finding's attention and probability on the prior and on the counterfactual.

    Attributes:
        finding: as the classifier names it.
        method: ``grad_cam`` or ``saliency``.
        prior_map, counterfactual_map: ``(H, W)`` float32 in [0, 1].
        p_prior, p_counterfactual: the classifier's probabilities.
    """

    finding: str
    method: str
    prior_map: np.ndarray
    counterfactual_map: np.ndarray
    p_prior: float
    p_counterfactual: float


def compare_attention(classifier: Classifier, prior: Any, counterfactual: Any, finding: str | int,
                      method: str = "grad_cam", generator: torch.Generator | None = None,
                      samples: int = 0) -> AttentionComparison:
    """Attention maps and probabilities for one finding on the prior and the counterfactual.

    The two maps are normalised jointly (by the larger peak of the two), so a finding that
    appears in the counterfactual shows as a brighter map there, not just a differently shaped one.

    Raises:
        InputError: unknown finding or method, bad images.
    """
    x = torch.cat([as_unit_batch(prior), as_unit_batch(counterfactual)])
    if method == "grad_cam":
        maps = grad_cam(classifier, x, finding, normalize=False)
    elif method == "saliency":
        maps = gradient_saliency(classifier, x, finding, normalize=False, samples=samples, generator=generator)
    else:
        raise InputError(f"attention method must be 'grad_cam' or 'saliency', not {method!r}")
    maps = maps / maps.max().clamp_min(1e-12)
    probs = classifier.predict(x)
    i = classifier.index(finding)
    return AttentionComparison(classifier.targets[i], method, maps[0].numpy(), maps[1].numpy(),
                               float(probs[0, i]), float(probs[1, i]))
