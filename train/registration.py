"""Registering the trainer's pairs of image files: a result cache and worker processes.

The registration itself (:class:`RegistrationParams`, :func:`register`, :func:`resample`, the NCC
score) is :mod:`engine.registration`, which the workstation uses too when it compares a
counterfactual with a patient's real follow-up. This module adds what only data preparation
needs: reading files onto the canvas, a cache keyed by both files' contents and the parameters,
and registering many pairs in parallel processes (``python -m train register``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.registration import RegistrationParams, RegistrationResult, register, resample

__all__ = ["cache_key", "load_canvas", "register_files", "register_many"]


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
