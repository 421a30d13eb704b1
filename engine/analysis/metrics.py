"""The metrics both papers report, as small pure functions of numpy arrays.

BiomedJourney (Gu et al., 2023, section 4.3) scores counterfactual generation with CMIG, the
geometric mean of two geometric means: of the *accuracy* measures (pathology AUROC of a
classifier on the generated image against the reference labels) and of the *retention*
measures (race AUROC, age Pearson correlation: what must not change). PRISM (Kumar et al.,
2025) reports L1 identity preservation and the counterfactual prediction gain (CPG). With the
simulator's exact counterfactuals we also report PSNR/SSIM to the exact image inside and
outside the finding region.

Conventions: images are float arrays in [0, 1]; probabilities in [0, 1]; "undefined" (an AUROC
over one class, a correlation of a constant) is ``nan``, never an exception, so one degenerate
finding does not stop an evaluation; aggregation helpers say which values they skipped.

The statistics themselves come from libraries: AUROC from scikit-learn (``roc_auc_score``),
Pearson's r from SciPy (``pearsonr``), PSNR and SSIM from scikit-image
(``peak_signal_noise_ratio``, ``structural_similarity``). The functions here add what the project
needs around them: input checks with messages, ``nan`` for the degenerate cases above (where the
libraries would warn or raise), and regions (a mask selects the pixels a PSNR or a mean SSIM is
taken over).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from engine.errors import InputError

PATHOLOGY_FINDINGS = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax")
"""The five findings of BiomedJourney's pathology AUROC (CheXpert names)."""


# ---------------------------------------------------------------------------------------------
# CMIG


def geometric_mean(values: Iterable[float]) -> float:
    """Geometric mean of non-negative numbers (0 if any is 0; ``nan`` if any is ``nan``).

    Raises:
        InputError: no values, or a negative value (clip it first if that is what you mean).
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise InputError("geometric_mean needs at least one value")
    if np.isnan(arr).any():
        return float("nan")
    if (arr < 0).any():
        raise InputError(f"geometric_mean is defined for non-negative values, got {arr.tolist()}")
    if (arr == 0).any():
        return 0.0
    return float(np.exp(np.mean(np.log(arr))))


@dataclass(frozen=True)
class CMIGScore:
    """A CMIG score and its parts (all on the scale of the inputs, e.g. percent).

    Attributes:
        accuracy: geometric mean of the accuracy measures.
        retention: geometric mean of the retention measures.
        cmig: geometric mean of ``accuracy`` and ``retention``.
        components: every measure used, by name; ``clipped`` names any that were negative and
            counted as 0 (a negative correlation retains nothing).
    """

    accuracy: float
    retention: float
    cmig: float
    components: dict[str, float]
    clipped: tuple[str, ...] = ()


def cmig(accuracy: Sequence[float], retention: Sequence[float]) -> float:
    """BiomedJourney's Counterfactual Medical Image Generation score, exactly as section 4.3 states it.

    ``CMIG = sqrt(G(accuracy) * G(retention))`` where ``G`` is the geometric mean. For the
    paper's Table 1 BiomedJourney row (pathology AUROC 80.54; race AUROC 97.22, age Pearson
    79.38) this gives ``sqrt(80.54 * sqrt(97.22 * 79.38)) = 84.11``, while the table prints
    83.23: the printed scores do not follow from the stated formula (docs/EVALUATION.md).
    Negative measures (a negative age correlation) count as 0.

    Args:
        accuracy: accuracy measures (e.g. ``[pathology_auroc]``), all on one scale.
        retention: retention measures (e.g. ``[race_auroc, age_pearson]``), same scale.

    Returns:
        The score on the inputs' scale; ``nan`` if any input is ``nan``.

    Raises:
        InputError: either group is empty.
    """
    if not len(accuracy) or not len(retention):
        raise InputError("CMIG needs at least one accuracy measure and one retention measure")
    acc = geometric_mean(max(0.0, float(v)) if not math.isnan(v) else v for v in accuracy)
    ret = geometric_mean(max(0.0, float(v)) if not math.isnan(v) else v for v in retention)
    return geometric_mean([acc, ret])


def cmig_score(accuracy: Mapping[str, float], retention: Mapping[str, float]) -> CMIGScore:
    """:func:`cmig` with named measures, returning the parts as well (for reports).

    Raises:
        InputError: either mapping is empty.
    """
    if not accuracy or not retention:
        raise InputError("CMIG needs at least one accuracy measure and one retention measure")
    clipped = tuple(k for k, v in {**accuracy, **retention}.items() if not math.isnan(v) and v < 0)
    acc = geometric_mean(max(0.0, v) if not math.isnan(v) else v for v in accuracy.values())
    ret = geometric_mean(max(0.0, v) if not math.isnan(v) else v for v in retention.values())
    return CMIGScore(
        accuracy=acc,
        retention=ret,
        cmig=geometric_mean([acc, ret]),
        components={**{k: float(v) for k, v in accuracy.items()}, **{k: float(v) for k, v in retention.items()}},
        clipped=clipped,
    )


# ---------------------------------------------------------------------------------------------
# Classification: AUROC, correlation, divergence, prediction gain


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``; tied scores count one half).

    Args:
        labels: 0/1 (or bool) ground truth, shape ``(N,)``.
        scores: higher means more likely positive, shape ``(N,)``.

    Returns:
        AUROC in [0, 1]; ``nan`` when only one class is present.

    Raises:
        InputError: shapes differ, labels are not binary, or scores are not finite.
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise InputError(f"auroc: {y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise InputError("auroc: labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise InputError("auroc: scores must be finite")
    y = y.astype(bool)
    if y.all() or not y.any():  # one class (scikit-learn would warn and return nan)
        return float("nan")
    from sklearn.metrics import roc_auc_score  # imported here: scikit-learn takes ~0.3 s to import

    return float(roc_auc_score(y, s))


@dataclass(frozen=True)
class AurocSummary:
    """Per-target AUROCs and their mean over the targets where AUROC is defined.

    Attributes:
        per_target: AUROC per target name (``nan`` where only one class is present).
        mean: mean over the defined ones (``nan`` if none is).
        undefined: names whose AUROC is undefined and left out of the mean.
    """

    per_target: dict[str, float]
    mean: float
    undefined: tuple[str, ...]


def multilabel_auroc(labels: np.ndarray, scores: np.ndarray, names: Sequence[str] = PATHOLOGY_FINDINGS) -> AurocSummary:
    """AUROC of each column (BiomedJourney's pathology AUROC over five findings), and their mean.

    Args:
        labels: ``(N, K)`` 0/1 reference labels.
        scores: ``(N, K)`` classifier probabilities on the generated images.
        names: the K column names.

    Raises:
        InputError: shapes do not match ``(N, len(names))``.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape or y.shape[1] != len(names):
        raise InputError(f"multilabel_auroc: labels {y.shape} and scores {s.shape} must both be (N, {len(names)})")
    per = {name: auroc(y[:, k], s[:, k]) for k, name in enumerate(names)}
    defined = [v for v in per.values() if not math.isnan(v)]
    return AurocSummary(
        per_target=per,
        mean=float(np.mean(defined)) if defined else float("nan"),
        undefined=tuple(k for k, v in per.items() if math.isnan(v)),
    )


def multiclass_auroc(labels: Sequence[int] | np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest AUROC (BiomedJourney's race AUROC over the race model's classes).

    Args:
        labels: ``(N,)`` class indices in ``[0, K)``.
        probabilities: ``(N, K)`` predicted class probabilities.

    Returns:
        The mean over classes present with both outcomes; ``nan`` if there is none.

    Raises:
        InputError: shapes disagree or a label is out of range.
    """
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise InputError(f"multiclass_auroc: {y.size} labels but probabilities of shape {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise InputError(f"multiclass_auroc: labels must lie in [0, {p.shape[1]})")
    values = [auroc((y == k).astype(int), p[:, k]) for k in range(p.shape[1])]
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation coefficient (BiomedJourney's age retention measure; ``scipy.stats.pearsonr``).

    Returns:
        r in [-1, 1]; ``nan`` for fewer than two points or a constant input (where SciPy raises
        or warns).

    Raises:
        InputError: lengths differ or values are not finite.
    """
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise InputError(f"pearson: {a.size} vs {b.size} values")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("pearson: values must be finite")
    if a.size < 2 or (a == a[0]).all() or (b == b[0]).all():
        return float("nan")
    return float(pearsonr(a, b).statistic)


def bernoulli_kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """KL(p || q) between independent Bernoulli outputs, summed over the last axis.

    The divergence of a multi-label (sigmoid) classifier's outputs on the reference image ``p``
    from its outputs on the counterfactual ``q``: ``sum_k p_k log(p_k/q_k) + (1-p_k) log((1-p_k)/(1-q_k))``.
    Probabilities are clipped to ``[eps, 1-eps]``.

    Args:
        p: reference probabilities ``(..., K)``.
        q: counterfactual probabilities, same shape.

    Returns:
        ``(...)`` divergences in nats (non-negative).

    Raises:
        InputError: shapes differ or values are outside [0, 1].
    """
    p, q = _probabilities(p, q)
    p = np.clip(p, eps, 1 - eps)
    q = np.clip(q, eps, 1 - eps)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return np.maximum(kl.sum(axis=-1), 0.0)


def categorical_kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """KL(p || q) between categorical distributions over the last axis (e.g. race softmax).

    Raises:
        InputError: shapes differ or values are outside [0, 1].
    """
    p, q = _probabilities(p, q)
    p = np.clip(p, eps, 1.0)
    q = np.clip(q, eps, 1.0)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    return np.maximum((p * np.log(p / q)).sum(axis=-1), 0.0)


def _probabilities(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise InputError(f"KL divergence: shapes {p.shape} and {q.shape} differ")
    for arr in (p, q):
        if not np.isfinite(arr).all() or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
            raise InputError("KL divergence: probabilities must be finite and in [0, 1]")
    return p, q


def counterfactual_prediction_gain(p_original: np.ndarray | float, p_counterfactual: np.ndarray | float, direction: np.ndarray | float | None = None) -> np.ndarray:
    """PRISM's counterfactual prediction gain (CPG), after CounteRGAN (Nemirovsky et al., 2022).

    ``CPG = |P(y | x_cf) - P(y | x)|``: how far the classifier's probability for the edited
    finding moved. With ``direction`` (+1: the edit adds the finding, -1: removes it) the gain
    is signed, ``direction * (P(y | x_cf) - P(y | x))``, so moving the wrong way is negative.

    Args:
        p_original: classifier probability on the original image (any shape).
        p_counterfactual: on the counterfactual, same shape.
        direction: optional +1/-1 per element.

    Returns:
        The gain per element (float64 array; a 0-d array for scalars).

    Raises:
        InputError: shapes differ or ``direction`` is not +1/-1.
    """
    a = np.asarray(p_original, dtype=np.float64)
    b = np.asarray(p_counterfactual, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"CPG: shapes {a.shape} and {b.shape} differ")
    if direction is None:
        return np.abs(b - a)
    d = np.asarray(direction, dtype=np.float64)
    if not np.isin(d, (-1.0, 1.0)).all():
        raise InputError("CPG: direction must be +1 (finding added) or -1 (finding removed)")
    return d * (b - a)


# ---------------------------------------------------------------------------------------------
# Images: Dice, L1, PSNR, SSIM (optionally inside a region)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|A∩B| / (|A| + |B|)`` of two masks; 1.0 when both are empty.

    Raises:
        InputError: shapes differ.
    """
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise InputError(f"dice: mask shapes {a.shape} and {b.shape} differ")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / total)


def _pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"images of shapes {a.shape} and {b.shape} cannot be compared; resample them first")
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != a.shape:
            raise InputError(f"region mask {mask.shape} does not match the images {a.shape}")
    return a, b, mask


def l1_distance(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference (PRISM's identity preservation, on [0, 1] images; lower is closer).

    Returns:
        The mean over the image, or over ``mask`` (``nan`` for an empty mask).

    Raises:
        InputError: shapes differ.
    """
    a, b, mask = _pair(a, b, mask)
    diff = np.abs(a - b)
    if mask is None:
        return float(diff.mean())
    return float(diff[mask].mean()) if mask.any() else float("nan")


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``, optionally inside ``mask``.

    ``skimage.metrics.peak_signal_noise_ratio`` of the whole images, or of the pixels inside
    ``mask``.

    Returns:
        dB; ``inf`` for identical images (pixels); ``nan`` for an empty mask.

    Raises:
        InputError: shapes differ.
    """
    a, b, mask = _pair(a, b, mask)
    if mask is not None:
        if not mask.any():
            return float("nan")
        a, b = a[mask], b[mask]
    with np.errstate(divide="ignore"):  # identical: MSE 0, PSNR inf
        return float(peak_signal_noise_ratio(a, b, data_range=data_range))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM (Wang et al., 2004) with a Gaussian window (sigma 1.5: 11x11).

    scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    full=True)``: population statistics, reflected borders, as Wang et al.

    Raises:
        InputError: shapes differ, or an image is smaller than the window.
    """
    a, b, _ = _pair(a, b, None)
    window = 2 * int(3.5 * sigma + 0.5) + 1  # scikit-image's window for a Gaussian of truncate 3.5
    if a.ndim != 2 or min(a.shape) < window:
        raise InputError(f"SSIM needs 2-D images of at least {window}x{window} px (its window), got {a.shape}")
    _, smap = structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=sigma,
                                    use_sample_covariance=False, full=True)
    return smap


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """Mean SSIM over the image or over ``mask`` (windows may straddle the mask's edge).

    The mean of :func:`ssim_map` over every pixel (or every pixel of ``mask``); scikit-image's own
    mean leaves out a border of half a window, which a region touching the edge cannot afford.

    Returns:
        SSIM in [-1, 1]; ``nan`` for an empty mask.

    Raises:
        InputError: shapes differ, or an image is smaller than the SSIM window (11x11).
    """
    a, b, mask = _pair(a, b, mask)
    smap = ssim_map(a, b, data_range)
    if mask is None:
        return float(smap.mean())
    return float(smap[mask].mean()) if mask.any() else float("nan")


def region_fidelity(generated: np.ndarray, exact: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of a generated image to the exact counterfactual, inside and outside a region.

    Inside the finding region says whether the edit looks like the true change; outside it says
    whether everything else was left alone.

    Returns:
        ``{"psnr_in", "psnr_out", "ssim_in", "ssim_out"}`` (``nan`` where a side is empty).

    Raises:
        InputError: shapes differ.
    """
    _, _, region = _pair(generated, exact, region)
    outside = ~region
    return {
        "psnr_in": psnr(generated, exact, region),
        "psnr_out": psnr(generated, exact, outside),
        "ssim_in": ssim(generated, exact, region),
        "ssim_out": ssim(generated, exact, outside),
    }


def finite_mean(values: Iterable[float]) -> float:
    """Mean of the finite values (``nan`` if none): for aggregating per-pair metrics."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")
