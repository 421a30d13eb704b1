"""Registering a follow-up radiograph onto its prior with SimpleITK, and scoring the fit.

Two callers share this one registration: the analyst (:meth:`engine.analyse.Analyst.compare_followup`)
compares a counterfactual with a patient's real follow-up registered onto the prior, and the
trainer (``train/registration.py``: files, cache, worker processes) registers each follow-up of a
training pair to its prior and drops pairs that do not align well, as BiomedJourney does. Both
images are first letterboxed onto the same square canvas (the one the model works on,
:func:`engine.io.to_square`), then the follow-up (moving) is registered to the prior (fixed) with
a rigid, similarity or affine transform, multi-resolution (shrink 4, 2, 1), by gradient descent on
the correlation metric.

The **score** is the normalised cross-correlation (Pearson's r) between the prior and the
resampled follow-up over the pixels the follow-up still covers after the transform:
1 is a perfect (linear) intensity match, 0 no relation. It is the number pairs are filtered by.

Images are given physical spacing ``1/size``, so the canvas spans the unit square whatever the
working size and the transform parameters (``matrix``, ``translation``, ``center``, in canvas
units) apply at any resolution. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from engine.analysis.metrics import pearson

log = logging.getLogger(__name__)

TRANSFORMS = ("rigid", "similarity", "affine")


@dataclass(frozen=True)
class RegistrationParams:
    """How to register.

    Attributes:
        transform: ``rigid`` (rotation + shift), ``similarity`` (+ isotropic scale) or ``affine``.
        size: working canvas side in pixels (both images are letterboxed to it).
        shrink: shrink factor per resolution level, coarsest first.
        smoothing: Gaussian sigma per level, in pixels of that level's input.
        iterations: optimiser iterations per level.
        sampling: fraction of pixels the metric samples (random, seeded).
        seed: seed of the metric's pixel sampling.
    """

    transform: str = "affine"
    size: int = 256
    shrink: tuple[int, ...] = (4, 2, 1)
    smoothing: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 50
    sampling: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, not {self.transform!r}")
        if len(self.shrink) != len(self.smoothing):
            raise ValueError("shrink and smoothing need one entry per resolution level")
        if self.size < 32:
            raise ValueError(f"registration size must be at least 32 px, not {self.size}")


@dataclass(frozen=True)
class RegistrationResult:
    """A fitted transform and its score.

    The transform maps a point ``p`` of the prior canvas (unit square, (x, y)) to the
    follow-up canvas: ``matrix @ (p - center) + center + translation`` (ITK convention).

    Attributes:
        transform: the transform kind.
        matrix: 2x2 row-major.
        translation: (tx, ty).
        center: (cx, cy).
        score: NCC between the prior and the registered follow-up (see module docstring).
        score_before: NCC before registration (identity transform).
        seconds: wall time of the registration alone.
        size: working canvas size.
    """

    transform: str
    matrix: tuple[float, float, float, float]
    translation: tuple[float, float]
    center: tuple[float, float]
    score: float
    score_before: float
    seconds: float
    size: int

    def to_sitk(self) -> sitk.AffineTransform:
        """The transform as a SimpleITK affine transform (canvas units)."""
        t = sitk.AffineTransform(2)
        t.SetMatrix(self.matrix)
        t.SetTranslation(self.translation)
        t.SetCenter(self.center)
        return t

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (stored in the pair manifest and the cache)."""
        return asdict(self)


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((1.0 / array.shape[1], 1.0 / array.shape[0]))
    return image


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation (Pearson's r, :func:`engine.analysis.metrics.pearson`) of two
    images over ``mask``.

    Returns 0 when either image is constant over the mask (or the mask holds under two pixels):
    a registration that leaves nothing to correlate scores as no relation.
    """
    if mask is not None:
        a, b = a[mask], b[mask]
    r = pearson(a, b)
    return 0.0 if math.isnan(r) else r


def resample(moving: np.ndarray, result: RegistrationResult, shape: tuple[int, int] | None = None, fill: float = 0.0) -> np.ndarray:
    """Applies a fitted transform: the follow-up resampled onto the prior's canvas.

    Args:
        moving: the follow-up canvas, ``(S, S)`` float32 (any S: the transform is in canvas units).
        result: the fitted transform.
        shape: output shape (default: ``moving.shape``).
        fill: value outside the follow-up.

    Returns:
        ``(H, W)`` float32.
    """
    shape = shape or moving.shape
    reference = _image(np.zeros(shape, np.float32))
    out = sitk.Resample(_image(moving), reference, result.to_sitk(), sitk.sitkLinear, fill, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _coverage(shape: tuple[int, int], transform: sitk.Transform) -> np.ndarray:
    ones = _image(np.ones(shape, np.float32))
    covered = sitk.Resample(ones, ones, transform, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(covered) > 0.5


def register(fixed: np.ndarray, moving: np.ndarray, params: RegistrationParams = RegistrationParams()) -> RegistrationResult:
    """Registers ``moving`` (the follow-up) onto ``fixed`` (the prior).

    Args:
        fixed: prior canvas ``(S, S)`` float32 in [0, 1].
        moving: follow-up canvas ``(S, S)``, same shape.
        params: see :class:`RegistrationParams`.

    Returns:
        The transform and its NCC score.

    Raises:
        ValueError: shapes differ.
    """
    if fixed.shape != moving.shape or fixed.ndim != 2:
        raise ValueError(f"register needs two 2-D canvases of one shape, got {fixed.shape} and {moving.shape}")
    start = time.perf_counter()
    f_img, m_img = _image(fixed), _image(moving)
    kind = {"rigid": sitk.Euler2DTransform(), "similarity": sitk.Similarity2DTransform(),
            "affine": sitk.AffineTransform(2)}[params.transform]
    initial = sitk.CenteredTransformInitializer(f_img, m_img, kind, sitk.CenteredTransformInitializerFilter.GEOMETRY)

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(params.sampling, params.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=0.05, minStep=1e-5, numberOfIterations=params.iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(params.shrink))
    method.SetSmoothingSigmasPerLevel([s / params.size for s in params.smoothing])  # physical units
    method.SetInitialTransform(initial, inPlace=False)
    try:
        fitted = method.Execute(f_img, m_img)
    except RuntimeError as exc:  # e.g. all samples mapped outside the image
        log.info("registration failed, keeping the identity: %s", exc)
        fitted = sitk.AffineTransform(2)
    seconds = time.perf_counter() - start

    affine = _as_affine(fitted)
    result = RegistrationResult(
        transform=params.transform,
        matrix=tuple(float(v) for v in affine.GetMatrix()),
        translation=tuple(float(v) for v in affine.GetTranslation()),
        center=tuple(float(v) for v in affine.GetCenter()),
        score=0.0, score_before=0.0, seconds=seconds, size=params.size,
    )
    warped = resample(moving, result)
    mask = _coverage(fixed.shape, affine)
    score = ncc(fixed, warped, mask) if mask.sum() > 0.1 * mask.size else 0.0
    return RegistrationResult(**{**asdict(result), "score": score, "score_before": ncc(fixed, moving)})


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Any fitted 2-D transform (possibly a composite) as one affine transform."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        transform = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1)
    kind = transform.GetName()
    typed = {"Euler2DTransform": sitk.Euler2DTransform, "Similarity2DTransform": sitk.Similarity2DTransform,
             "AffineTransform": sitk.AffineTransform}[kind](transform)
    affine = sitk.AffineTransform(2)
    affine.SetMatrix(typed.GetMatrix())
    affine.SetTranslation(typed.GetTranslation())
    affine.SetCenter(typed.GetCenter())
    return affine
