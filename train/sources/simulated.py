"""The phantom simulator's output (``python -m train simulate --out DIR``) as a source.

The simulator writes manifests in this package's schema (``images.jsonl``, and
``pairs.jsonl`` with ground-truth descriptions and counterfactuals); this adaptor reads them
back with absolute image paths, so they can be merged with other sources or re-paired.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from engine.errors import InputError
from train.manifest import ImageRecord, PairRecord, read_images, read_pairs


def _absolute(folder: Path, path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else (folder / p).resolve())


def load_simulated(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Image records of a simulator output folder (its ``images.jsonl``).

    Raises:
        InputError: the folder has no ``images.jsonl`` (run ``python -m train simulate`` first).
    """
    root = Path(root)
    manifest = root / "images.jsonl"
    if not manifest.is_file():
        raise InputError(f"{root} has no images.jsonl; make one with `python -m train simulate --out {root}`")
    return [replace(r, path=_absolute(root, r.path)) for r in read_images(manifest)]


def load_simulated_pairs(root: str | os.PathLike[str]) -> list[PairRecord]:
    """The simulator's own pairs (exact descriptions, known counterfactuals), absolute paths.

    Raises:
        InputError: the folder has no ``pairs.jsonl``.
    """
    root = Path(root)
    manifest = root / "pairs.jsonl"
    if not manifest.is_file():
        raise InputError(f"{root} has no pairs.jsonl; make one with `python -m train simulate --out {root}`")
    return [
        replace(p, prior_path=_absolute(root, p.prior_path), followup_path=_absolute(root, p.followup_path),
                counterfactual_path=_absolute(root, p.counterfactual_path))
        for p in read_pairs(manifest)
    ]
