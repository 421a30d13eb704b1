"""Registering a follow-up radiograph onto its prior with SimpleITK, and scoring the fit.

BiomedJourney registers each follow-up image to its prior and drops pairs that do not align
well. Here both images are first letterboxed onto the same square canvas (the one the model is
trained on, :func:`engine.io.to_square`), then the follow-up (moving) is registered to the
prior (fixed) with a rigid, similarity or affine transform, multi-resolution (shrink 4, 2, 1),
by gradient descent on the correlation metric.

The **score** is the normalised cross-correlation (Pearson's r) between the prior and the
resampled follow-up over the pixels the follow-up still covers after the transform:
1 is a perfect (linear) intensity match, 0 no relation. It is the number pairs are filtered by.

Images are given physical spacing ``1/size``, so the canvas spans the unit square whatever the
working size and the transform parameters (``matrix``, ``translation``, ``center``, in canvas
units) apply at any resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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
    """Normalised cross-correlation (Pearson's r) of two images over ``mask``.

    Returns 0 when either image is constant over the mask.
    """
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


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


# -- pairs of files: cache and workers ----------------------------------------------------------

def load_canvas(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Reads a radiograph (DICOM, PNG, JPEG) and letterboxes it onto a ``size`` square canvas."""
    from engine.io import read_xray, to_square

    canvas, _ = to_square(read_xray(path), size)
    return np.asarray(canvas, dtype=np.float32)


def _file_digest(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(prior: str | os.PathLike[str], followup: str | os.PathLike[str], params: RegistrationParams) -> str:
    """Key of one registration: both files' contents and every parameter."""
    text = json.dumps([_file_digest(prior), _file_digest(followup), asdict(params)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def register_files(
    prior: str | os.PathLike[str],
    followup: str | os.PathLike[str],
    params: RegistrationParams = RegistrationParams(),
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    write_registered: str | os.PathLike[str] | None = None,
) -> RegistrationResult:
    """Registers one pair of image files, using and filling the cache.

    Args:
        prior, followup: image files.
        params: registration parameters.
        cache_dir: folder of ``<key>.json`` results (same files + same parameters = same key).
        write_registered: if given, the registered follow-up is written there as a 16-bit PNG
            (on the ``params.size`` canvas, matching the letterboxed prior).
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(prior, followup, params)}.json"
        if path.is_file() and write_registered is None:
            data = json.loads(path.read_text())
            data["matrix"], data["translation"], data["center"] = (tuple(data[k]) for k in ("matrix", "translation", "center"))
            return RegistrationResult(**data)
    fixed, moving = load_canvas(prior, params.size), load_canvas(followup, params.size)
    result = register(fixed, moving, params)
    if write_registered is not None:
        from engine.io import write_png

        Path(write_registered).parent.mkdir(parents=True, exist_ok=True)
        write_png(write_registered, np.clip(resample(moving, result), 0.0, 1.0), bits=16)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result.to_dict()))
        os.replace(tmp, path)
    return result


def _worker_init() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # parallelism comes from processes


def _register_job(job: tuple[str, str, RegistrationParams, str | None, str | None]) -> RegistrationResult:
    prior, followup, params, cache_dir, out = job
    return register_files(prior, followup, params, cache_dir=cache_dir, write_registered=out)


def register_many(
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    params: RegistrationParams = RegistrationParams(),
    *,
    workers: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    write_registered: Sequence[str | os.PathLike[str] | None] | None = None,
    progress: bool = False,
) -> list[RegistrationResult]:
    """Registers many ``(prior, follow-up)`` file pairs, in parallel processes.

    Args:
        pairs: file pairs.
        params: registration parameters.
        workers: processes (1 runs in this process, with SimpleITK's own threads).
        cache_dir: result cache folder.
        write_registered: per pair, where to write the registered follow-up (or None).
        progress: show a progress bar.

    Returns:
        One result per pair, in order.
    """
    outs = list(write_registered) if write_registered is not None else [None] * len(pairs)
    jobs = [(str(a), str(b), params, None if cache_dir is None else str(cache_dir), None if o is None else str(o))
            for (a, b), o in zip(pairs, outs)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="register", unit="pair", disable=not progress)
    results: list[RegistrationResult] = []
    if workers <= 1:
        for job in jobs:
            results.append(_register_job(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
            for result in pool.map(_register_job, jobs, chunksize=max(1, len(jobs) // (8 * workers))):
                results.append(result)
                bar.update()
    bar.close()
    return results
