"""``python -m train prepare`` (sources to manifests) and ``python -m train register``.

::

    python -m train prepare mimic --root /data/mimic-cxr-jpg --reports /data/mimic-cxr --out data/mimic
    python -m train register --pairs data/mimic/pairs.jsonl --min-score 0.6 --workers 16

``prepare`` writes ``OUT/images.jsonl``, ``OUT/pairs.jsonl`` (consecutive studies, filtered and
described; paths relative to OUT) and ``OUT/source.json``. ``register`` registers every pair's
follow-up to its prior, stores the score and transform, drops pairs under ``--min-score`` and
writes ``pairs.registered.jsonl`` next to the input (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from engine.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_VIEWS = {"mimic": "PA"}
DEFAULT_REQUIRE = {"hannover": "none", "simulated": "none"}


def _relative(path: str | None, base: Path) -> str | None:
    return None if path is None else os.path.relpath(Path(path).resolve(), base.resolve())


def prepare(source: str, root: str, out: str, *, views: tuple[str, ...] | None = None,
            require_finding: str | None = None, max_days: int | None = None, llm=None,
            options: dict | None = None, pairs: bool = True) -> dict[str, int]:
    """Reads a source, pairs its journeys and writes the manifests.

    Args:
        source: a name in :data:`train.sources.SOURCES`.
        root: the source's folder (or CSV for ``csv``).
        out: output folder.
        views: view preference for pairing (default: PA for MIMIC, else PA then AP).
        require_finding: pairing filter (default: ``none`` for sources without labels, else ``any``).
        max_days: maximum interval between paired studies.
        llm: an optional :class:`train.reports.LLMDescriber`.
        options: extra keyword arguments for the source's loader.
        pairs: also write ``pairs.jsonl``.

    Returns:
        Counts: ``{"images", "pairs"}``.
    """
    from train.journeys import make_pairs
    from train.manifest import write_jsonl
    from train.sources import SOURCES

    if source not in SOURCES:
        raise InputError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    spec = SOURCES[source]
    images = spec.load(root, **(options or {}))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    views = views or tuple(DEFAULT_VIEWS.get(source, "PA,AP").split(","))
    require = require_finding or DEFAULT_REQUIRE.get(source, "any")
    pair_records = make_pairs(images, views=views, require_finding=require, max_days=max_days, describer=llm) if pairs else []
    write_jsonl(out_dir / "images.jsonl", [replace(r, path=_relative(r.path, out_dir)) for r in images])
    if pairs:
        write_jsonl(out_dir / "pairs.jsonl", [
            replace(p, prior_path=_relative(p.prior_path, out_dir), followup_path=_relative(p.followup_path, out_dir))
            for p in pair_records])
    info = {"source": source, "root": str(root), "license": spec.license, "attribution": spec.attribution,
            "images": len(images), "pairs": len(pair_records), "views": list(views), "require_finding": require}
    (out_dir / "source.json").write_text(json.dumps(info, indent=2))
    return {"images": len(images), "pairs": len(pair_records)}


def register_manifest(pairs_path: str, out: str | None = None, *, params=None, min_score: float | None = None,
                      workers: int = 1, cache_dir: str | None = None, write_images: bool = False,
                      progress: bool = False) -> dict[str, float]:
    """Registers every pair of a manifest and writes the kept pairs.

    Returns:
        ``{"pairs", "kept", "mean_score", "seconds_per_pair"}``.
    """
    from train.journeys import apply_registration
    from train.manifest import read_pairs, write_jsonl
    from engine.registration import RegistrationParams
    from train.registration import register_many

    params = params or RegistrationParams()
    path = Path(pairs_path)
    base = path.parent
    pairs = read_pairs(path)
    if not pairs:
        raise InputError(f"{path} has no pairs to register")
    files = [(base / p.prior_path, base / p.followup_path) for p in pairs]
    targets = [base / "registered" / f"{p.pair_id.replace(':', '_')}.png" for p in pairs] if write_images else None
    results = register_many(files, params, workers=workers, cache_dir=cache_dir or base / ".registration-cache",
                            write_registered=targets, progress=progress)
    kept = apply_registration(pairs, results, min_score=min_score)
    if write_images:
        where = {p.pair_id: t for p, t in zip(pairs, targets)}
        kept = [replace(p, extra={**p.extra, "followup_registered_path": _relative(str(where[p.pair_id]), base)}) for p in kept]
    destination = Path(out) if out else base / "pairs.registered.jsonl"
    write_jsonl(destination, kept)
    scores = [r.score for r in results]
    return {"pairs": len(pairs), "kept": len(kept), "mean_score": sum(scores) / len(scores),
            "seconds_per_pair": sum(r.seconds for r in results) / len(results)}


# -- command line ------------------------------------------------------------------------------

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``prepare``."""
    from train.sources import SOURCES

    p = subparsers.add_parser("prepare", help="turn a data set into images.jsonl + pairs.jsonl",
                              description="Reads one data source in its own layout and writes manifests: "
                                          + "; ".join(f"{s.name}: {s.description}" for s in SOURCES.values()))
    p.add_argument("source", choices=sorted(SOURCES), help="data source layout")
    p.add_argument("--root", required=True, help="the data set's folder (csv: the CSV file)")
    p.add_argument("--out", required=True, help="output folder for the manifests")
    p.add_argument("--reports", default=None, help="mimic: folder holding files/pXX/pSUBJECT/sSTUDY.txt")
    p.add_argument("--views", default=None, help="view preference for pairing, e.g. PA or PA,AP")
    p.add_argument("--require-finding", choices=("any", "followup", "none"), default=None,
                   help="keep pairs with a finding in either study (any, paper), the follow-up, or all")
    p.add_argument("--max-days", type=int, default=None, help="drop pairs further apart than this")
    p.add_argument("--uncertain", choices=("negative", "positive", "ignore"), default="negative",
                   help="chexpert: how uncertain labels enter PRISM captions")
    p.add_argument("--all-views", action="store_true", help="chexpert: keep lateral images too")
    p.add_argument("--llm-url", default=None, help="OpenAI-compatible endpoint for descriptions (or $CXR_LLM_URL)")
    p.add_argument("--llm-model", default=None, help="model name at that endpoint (or $CXR_LLM_MODEL)")
    p.add_argument("--no-pairs", action="store_true", help="write images.jsonl only")


def run(args: argparse.Namespace) -> int:
    """Runs ``prepare``."""
    from train.reports import LLMDescriber

    options: dict = {}
    if args.source == "mimic":
        options = {"reports_root": args.reports, "views": tuple(args.views.split(",")) if args.views else ("PA",)}
    elif args.source == "chexpert":
        options = {"uncertain": args.uncertain, "frontal_only": not args.all_views}
    llm = None
    if args.llm_url or args.llm_model or os.environ.get("CXR_LLM_URL"):
        llm = LLMDescriber(args.llm_url, args.llm_model, cache_path=Path(args.out) / "llm-cache.jsonl")
    counts = prepare(args.source, args.root, args.out, views=tuple(args.views.split(",")) if args.views else None,
                     require_finding=args.require_finding, max_days=args.max_days, llm=llm, options=options,
                     pairs=not args.no_pairs)
    print(json.dumps({"out": args.out, **counts}))
    return 0


def add_register_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``register``."""
    p = subparsers.add_parser("register", help="register follow-ups to priors, score and filter pairs",
                              description="SimpleITK registration of every pair (follow-up onto prior), "
                                          "NCC score, cached; drops pairs under --min-score.")
    p.add_argument("--pairs", required=True, help="pairs.jsonl")
    p.add_argument("--out", default=None, help="output manifest (default: pairs.registered.jsonl next to --pairs)")
    p.add_argument("--transform", choices=("rigid", "similarity", "affine"), default="affine")
    p.add_argument("--size", type=int, default=256, help="working canvas in px (default 256)")
    p.add_argument("--iterations", type=int, default=50, help="optimiser iterations per level")
    p.add_argument("--min-score", type=float, default=None, help="drop pairs whose NCC after registration is lower")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--cache", default=None, help="result cache folder (default: .registration-cache next to --pairs)")
    p.add_argument("--write-images", action="store_true",
                   help="write registered follow-ups to registered/ and train on them")


def run_register(args: argparse.Namespace) -> int:
    """Runs ``register``."""
    from engine.registration import RegistrationParams

    try:
        params = RegistrationParams(transform=args.transform, size=args.size, iterations=args.iterations)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    summary = register_manifest(args.pairs, args.out, params=params, min_score=args.min_score, workers=args.workers,
                                cache_dir=args.cache, write_images=args.write_images, progress=True)
    print(json.dumps(summary))
    return 0
