"""``python -m train evaluate``: score a model (and baselines) on a test set of pairs.

For every pair of ``pairs.jsonl`` (prior, progression description, follow-up; from the
simulator also the exact counterfactual, the finding region and anatomy masks) each *system*
makes an image on the model's square canvas:

* ``model``: the instruct model, prior + description (:meth:`engine.Engine.counterfactuals`);
* ``identity``: the prior returned unchanged (perfect retention, no edit);
* ``text-only``: the model with the prior withheld (``withhold_prior=True``), RoentGen-style
  generation from the description alone;
* ``exact``: the simulator's exact counterfactual (simulated pairs only): what a perfect model
  would make, so its scores are the ceiling the analysis networks allow;
* ``latent-ceiling``: the exact counterfactual through the model's own autoencoder and decoding
  (:meth:`engine.Engine.latent_ceiling`, simulated pairs only): what a perfect UNet on this
  VAE would make, so the distance from ``exact`` is the autoencoder's share of a shortfall and
  the distance from ``model`` the UNet's.

Per pair and system it records (:mod:`engine.analysis.metrics`): L1 to the prior (PRISM's
identity preservation) and to the follow-up; PSNR/SSIM to the exact counterfactual inside and
outside the finding region and the share of the change that fell inside it (simulator pairs);
the classifier's probabilities, KL divergence from its outputs on the follow-up, and the signed
counterfactual prediction gain for every finding the description changes; anatomy Dice between
the segmenter's masks on the prior and on the generated image; race and age predictions.

The aggregate follows BiomedJourney's Table 1: accuracy = pathology AUROC over five findings
against the follow-up's reference labels; retention = race AUROC and age Pearson correlation
(when torchxrayvision's race and age weights are present; otherwise anatomy Dice and SSIM
outside the finding region stand in, and the report says so); CMIG = the geometric mean of the
two geometric means. Outputs: ``REPORT.json`` (per-pair rows and the aggregate), ``REPORT.md``
(the tables) and ``REPORT.png`` (a grid of examples).

Multi-GPU: ``accelerate launch -m train evaluate ...`` shards the pairs over processes and the
main process gathers and writes the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.analysis import metrics
from engine.analysis.delta import delta_map
from engine.errors import InputError

log = logging.getLogger(__name__)

SYSTEMS = ("model", "identity", "text-only", "exact", "latent-ceiling")
BASELINES = ("identity", "text-only", "exact", "latent-ceiling")
FINDINGS = metrics.PATHOLOGY_FINDINGS
SEVERITY_NAMES = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
                  "edema": "Edema", "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax"}
"""Simulator finding keys (``extra.changes[].name``) -> CheXpert names."""
ANATOMY = ("right_lung", "left_lung", "heart", "mediastinum", "diaphragm", "spine", "trachea")
"""Simulator structures used for per-structure delta statistics."""
PSNR_CAP_DB = 100.0
"""Identical regions have infinite PSNR; aggregates count them as this."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation (every ``python -m train evaluate`` option).

    Attributes:
        model: instruct model folder or hub id.
        pairs: the ``pairs.jsonl`` manifest (paths inside are relative to its folder).
        out: the report's JSON path; ``.md`` and ``.png`` are written next to it.
        limit: evaluate the first N pairs (after ``split`` filtering); None for all.
        baselines: any of ``identity``, ``text-only``, ``exact`` and ``latent-ceiling`` (the last
            two: simulated pairs only).
        batch_size: pairs per generation batch, and images per classifier/segmenter batch.
        split: only pairs of this split (``test``, ``validate``, ``train``) or ``all``.
        classifier: ``auto``, ``xrv``, ``xrv:WEIGHTS``, a small-classifier folder, or ``none``.
        segmenter: ``auto``, ``xrv``, a small-segmenter folder, or ``none``.
        race_age: ``auto`` (torchxrayvision's race and age models when their weights are
            present) or ``none``.
        xrv_cache: folder of torchxrayvision weight files.
        steps, text_guidance, image_guidance, scheduler: sampling settings (steps None: the
            sampler's own).
        sampler: ``auto`` (what the app does: the model's fast sampler when it has one),
            ``fast`` or ``full`` (:attr:`engine.EditRequest.sampler`); the report records the
            sampler that ran. The text-only baseline always runs on the full sampler.
        confine: ``none`` (default: the model's whole edit, what the model itself does) or
            ``anatomy`` (what the app shows: the edit kept to the anatomy of the findings named,
            :attr:`engine.EditRequest.confine`); the baselines are never confined.
        devices: how a removal of every device is made: ``model`` (default: the model's own
            edit) or ``detect`` (what the app runs: detected devices inpainted, then the model;
            :attr:`engine.EditRequest.devices`).
        seed: master seed; each pair's seed is derived from it and the pair id.
        device, dtype: as for ``engine.load``.
        examples: rows in the figure grid (0: no figure).
        progress: show a progress bar on stderr.
    """

    model: str
    pairs: str
    out: str
    limit: int | None = None
    baselines: tuple[str, ...] = ("identity", "text-only")
    batch_size: int = 8
    split: str = "all"
    classifier: str = "auto"
    segmenter: str = "auto"
    race_age: str = "auto"
    xrv_cache: str | None = None
    steps: int | None = None
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    scheduler: str = "ddim"
    sampler: str = "auto"
    confine: str = "none"
    devices: str = "model"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    examples: int = 6
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise InputError(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be at least 1, not {self.limit}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.split not in ("all", "train", "validate", "test"):
            raise InputError(f"--split must be all, train, validate or test, not {self.split!r}")
        if self.race_age not in ("auto", "none"):
            raise InputError(f"--race-age must be auto or none, not {self.race_age!r}")
        if self.examples < 0:
            raise InputError(f"--examples must be >= 0, not {self.examples}")
        if self.sampler not in ("auto", "fast", "full"):
            raise InputError(f"--sampler must be auto, fast or full, not {self.sampler!r}")
        if self.confine not in ("none", "anatomy"):
            raise InputError(f"--confine must be none or anatomy, not {self.confine!r}")
        if self.devices not in ("model", "detect"):
            raise InputError(f"--devices must be model or detect, not {self.devices!r}")

    @property
    def systems(self) -> tuple[str, ...]:
        """``model`` then the baselines, in a fixed order."""
        return ("model", *[s for s in BASELINES if s in self.baselines])

    def outputs(self) -> tuple[Path, Path, Path]:
        """``(json, markdown, figure)`` paths: ``out`` itself when it ends in ``.json`` (dots in
        the name kept: ``t7.5.json`` -> ``t7.5.md``), else ``out`` with the three suffixes added."""
        out = Path(self.out)
        stem = out.name[: -len(".json")] if out.suffix.lower() == ".json" else out.name
        return out.with_name(stem + ".json"), out.with_name(stem + ".md"), out.with_name(stem + ".png")


# ---------------------------------------------------------------------------------------------
# Reading pairs


@dataclass
class PairData:
    """One pair on the model's canvas (all arrays ``(S, S)``).

    Attributes:
        index: position in the evaluated list.
        record: the manifest row.
        prior_xray: the prior as read (what the engine is given).
        followup: the reference follow-up, letterboxed.
        exact: the exact counterfactual (simulator), or None.
        region: where prior and exact counterfactual may differ (simulator), or None.
        anatomy: prior structure masks (simulator), or None.
        truth: reference label per finding of :data:`FINDINGS` (1/0) or None when unknown.
        age: the patient's age (simulator ground truth), or None.
        seed: the sampling seed of this pair.
    """

    index: int
    record: Any
    prior_xray: Any
    followup: np.ndarray
    exact: np.ndarray | None
    region: np.ndarray | None
    anatomy: dict[str, np.ndarray] | None
    truth: dict[str, int | None]
    age: float | None
    seed: int
    sampler: str = ""


def pair_seed(master: int, pair_id: str) -> int:
    """A pair's seed: independent of order and of how pairs are sharded over processes."""
    return int.from_bytes(hashlib.sha256(f"{master}:{pair_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def _square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    from engine.io import to_square

    return to_square(np.asarray(mask, dtype=np.float32), size)[0] > 0.5


def _reference_labels(record: Any, image_extra: dict[str, Any] | None) -> dict[str, int | None]:
    """Follow-up labels: the simulator's complete truth, else the manifest's certain labels."""
    source = (image_extra or {}).get("labels_truth") or record.labels_followup
    out: dict[str, int | None] = {}
    for f in FINDINGS:
        v = source.get(f)
        out[f] = int(v) if v in (0.0, 1.0) else None
    return out


def load_pairs(config: EvaluateConfig) -> list[Any]:
    """The manifest rows to evaluate (split filter, then limit).

    Raises:
        InputError: the manifest is missing or malformed, or nothing is left to evaluate.
    """
    from train.manifest import read_pairs

    try:
        records = read_pairs(config.pairs)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if config.split != "all":
        records = [r for r in records if r.split == config.split]
    if config.limit is not None:
        records = records[: config.limit]
    if not records:
        raise InputError(f"{config.pairs} has no pairs to evaluate (split {config.split!r}); try --split all")
    return records


def read_pair(index: int, record: Any, root: Path, size: int, images_by_id: dict[str, Any], master_seed: int) -> PairData:
    """Reads one pair's files and puts the references on the model's canvas.

    Raises:
        InputError: an image file is missing or unreadable.
    """
    from engine.io import read_xray, to_square

    def path(rel: str) -> Path:
        p = root / rel
        if not p.is_file():
            raise InputError(f"pair {record.pair_id}: {p} does not exist (paths are relative to the manifest's folder)")
        return p

    prior = read_xray(path(record.prior_path))
    followup = to_square(read_xray(path(record.followup_path)), size)[0]
    exact = to_square(read_xray(path(record.counterfactual_path)), size)[0] if record.counterfactual_path else None
    extra = record.extra or {}
    region = anatomy = None
    if extra.get("change_mask_path"):
        region = _square_mask(_read_gray(path(extra["change_mask_path"])) > 0, size)
    if extra.get("prior_mask_path"):
        from train.simulator.writer import read_masks

        masks = read_masks(path(extra["prior_mask_path"]))
        anatomy = {k: _square_mask(masks[k], size) for k in ANATOMY if k in masks}
    followup_image = images_by_id.get(record.followup_id)
    age = None
    prior_image = images_by_id.get(record.prior_id)
    params_path = (prior_image.extra or {}).get("params_path") if prior_image is not None else None
    if params_path and (root / params_path).is_file():
        age = json.loads((root / params_path).read_text()).get("patient", {}).get("age")
    return PairData(
        index=index, record=record, prior_xray=prior, followup=followup, exact=exact, region=region,
        anatomy=anatomy, truth=_reference_labels(record, followup_image.extra if followup_image else None),
        age=float(age) if age is not None else None, seed=pair_seed(master_seed, record.pair_id),
    )


def _read_gray(p: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(p) as im:
        return np.asarray(im.convert("L"))


def _images_index(pairs_path: str) -> dict[str, Any]:
    """``images.jsonl`` next to the pairs (for simulator truth labels and parameters), if present."""
    from train.manifest import read_images

    p = Path(pairs_path).parent / "images.jsonl"
    if not p.is_file():
        return {}
    try:
        return {r.image_id: r for r in read_images(p)}
    except ValueError:
        log.warning("ignoring %s: it is not a valid images manifest", p)
        return {}


# ---------------------------------------------------------------------------------------------
# Generation


def generate(engine: Any, pairs: Sequence[PairData], config: EvaluateConfig) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The priors on the canvas and every system's images, the pairs batched together.

    One :meth:`engine.Engine.counterfactuals` call per system makes every pair's image in
    batched UNet calls (each pair keeps its own prior, description and seed).

    Returns:
        ``(priors [(S, S)], {system: [image (S, S)]})`` in the order of ``pairs``.
    """
    from engine import EditRequest

    requests = [
        EditRequest(
            pair.record.description, steps=config.steps, text_guidance=config.text_guidance,
            image_guidance=config.image_guidance, seed=pair.seed, scheduler=config.scheduler, sampler=config.sampler,
            confine=config.confine, devices=config.devices,
        )
        for pair in pairs
    ]
    xrays = [pair.prior_xray for pair in pairs]
    results = engine.counterfactuals(xrays, requests)
    priors = [cf.prior for cf in results]
    images = {"model": [cf.image for cf in results]}
    for pair, cf in zip(pairs, results):
        pair.sampler = f"{cf.request.sampler} {cf.request.steps}"
    if "identity" in config.systems:
        images["identity"] = [prior.copy() for prior in priors]
    if "text-only" in config.systems:  # the student never learned the prior withheld: the full sampler
        text_only = [replace(r, sampler="full", steps=None if config.sampler == "fast" else r.steps, confine="none",
                             devices="model") for r in requests]
        images["text-only"] = [cf.image for cf in engine.counterfactuals(xrays, text_only, withhold_prior=True)]
    if "exact" in config.systems:
        missing = [pair.record.pair_id for pair in pairs if pair.exact is None]
        if missing:
            raise InputError(f"the exact baseline needs simulated pairs with counterfactual_path; {missing[0]} has none")
        images["exact"] = [pair.exact.copy() for pair in pairs]
    if "latent-ceiling" in config.systems:
        missing = [pair.record.pair_id for pair in pairs if pair.exact is None]
        if missing:
            raise InputError(f"the latent-ceiling baseline needs simulated pairs with counterfactual_path; "
                             f"{missing[0]} has none")
        import torch

        ceiling = []
        for start in range(0, len(pairs), config.batch_size):
            chunk = slice(start, start + config.batch_size)
            batch_priors = torch.from_numpy(np.stack(priors[chunk]))[:, None]
            batch_exact = torch.from_numpy(np.stack([pair.exact for pair in pairs[chunk]]).astype(np.float32))[:, None]
            ceiling.extend(engine.latent_ceiling(batch_priors, batch_exact).cpu().numpy()[:, 0])
        images["latent-ceiling"] = ceiling
    return priors, images


# ---------------------------------------------------------------------------------------------
# Per-pair metrics


def image_metrics(pair: PairData, prior: np.ndarray, image: np.ndarray) -> dict[str, Any]:
    """Image-level metrics of one generated image (no networks involved)."""
    row: dict[str, Any] = {
        "l1_prior": metrics.l1_distance(image, prior),
        "l1_followup": metrics.l1_distance(image, pair.followup),
    }
    if pair.exact is not None:
        row["l1_exact"] = metrics.l1_distance(image, pair.exact)
        if pair.region is not None:
            row.update(metrics.region_fidelity(image, pair.exact, pair.region))
    if pair.region is not None:
        change = np.abs(image.astype(np.float64) - prior)
        total = float(change.sum())
        row["change_in_region"] = float(change[pair.region].sum() / total) if total > 0 and pair.region.any() else float("nan")
    if pair.anatomy:
        dm = delta_map(image, prior, masks=pair.anatomy)
        row["delta_by_structure"] = {k: round(v.mean, 6) for k, v in dm.stats.items()}
    return row


def finding_changes(record: Any) -> dict[str, int]:
    """Findings the pair changes and the direction (+1 new/worse, -1 resolved/better).

    From the simulator's ``extra.changes``; an empty dict for other sources.
    """
    out: dict[str, int] = {}
    for change in (record.extra or {}).get("changes", []):
        if change.get("kind") != "finding" or change.get("name") not in SEVERITY_NAMES:
            continue
        before, after = change.get("before") or 0.0, change.get("after") or 0.0
        if after != before:
            out[SEVERITY_NAMES[change["name"]]] = 1 if after > before else -1
    return out


@dataclass
class Networks:
    """The analysis networks the evaluation uses (any may be None) and notes on what is missing."""

    classifier: Any = None
    segmenter: Any = None
    race: Any = None
    age: Any = None
    notes: list[str] = field(default_factory=list)


def load_networks(config: EvaluateConfig, device: str) -> Networks:
    """Classifier, segmenter, race and age models as configured, on ``device`` (``cpu``, ``cuda:0``).

    ``auto`` falls back silently (with a note in the report) when nothing is installed; an
    explicit choice that cannot be loaded is an error.

    Raises:
        InputError: an explicitly requested network cannot be loaded.
    """
    from engine.analysis import classifier as cls_mod
    from engine.analysis import segmentation, xrv

    nets = Networks()
    dev = device
    if config.classifier != "none":
        try:
            nets.classifier = cls_mod.load_classifier(config.classifier, cache_dir=config.xrv_cache, device=dev)
        except InputError as exc:
            if config.classifier != "auto":
                raise
            nets.notes.append(f"no classifier: {exc}")
    if config.segmenter != "none":
        try:
            nets.segmenter = segmentation.load_segmenter(config.segmenter, cache_dir=config.xrv_cache, device=dev)
        except InputError as exc:
            if config.segmenter != "auto":
                raise
            nets.notes.append(f"no segmenter: {exc}")
    if config.race_age == "auto":
        for kind, loader in (("race", cls_mod.load_race_model), ("age", cls_mod.load_age_model)):
            if xrv.available(kind):
                setattr(nets, kind, loader(dev))
            else:
                wf = xrv.race_weight_file() if kind == "race" else xrv.age_weight_file()
                nets.notes.append(f"no {kind} model: place {wf.filename} in {wf.folder} (from {wf.url})")
    return nets


def network_metrics(nets: Networks, pairs: Sequence[PairData], priors: Sequence[np.ndarray],
                    images: dict[str, list[np.ndarray]], batch_size: int) -> dict[str, list[dict[str, Any]]]:
    """Classifier, segmenter, race and age outputs for every system's images, in batches.

    Returns:
        system -> one dict per pair (probabilities, KL, CPG, anatomy Dice, race, age).
    """
    from engine.analysis.segmentation import mask_dice

    n = len(pairs)
    out: dict[str, list[dict[str, Any]]] = {s: [{} for _ in range(n)] for s in images}
    clf = nets.classifier
    if clf is not None:
        p_prior = clf.predict(np.stack(priors)[:, None], batch_size)
        p_follow = clf.predict(np.stack([p.followup for p in pairs])[:, None], batch_size)
    if nets.segmenter is not None:
        seg_prior = nets.segmenter.segment(np.stack(priors)[:, None], batch_size=batch_size)
        have_exact = all(p.exact is not None for p in pairs)
        seg_exact = nets.segmenter.segment(np.stack([p.exact for p in pairs])[:, None], batch_size=batch_size) if have_exact else None
    for system, imgs in images.items():
        batch = np.stack(imgs)[:, None]
        if clf is not None:
            p_gen = clf.predict(batch, batch_size)
            kl = metrics.bernoulli_kl(p_follow, p_gen)
            for i, pair in enumerate(pairs):
                row = out[system][i]
                row["probabilities"] = {t: float(p_gen[i, k]) for k, t in enumerate(clf.targets)}
                row["kl_followup"] = float(kl[i])
                gains = {}
                for finding, direction in finding_changes(pair.record).items():
                    if clf.supports(finding):
                        k = clf.index(finding)
                        gains[finding] = float(metrics.counterfactual_prediction_gain(p_prior[i, k], p_gen[i, k], direction))
                row["cpg"] = gains
        if nets.segmenter is not None:
            seg_gen = nets.segmenter.segment(batch, batch_size=batch_size)
            for i in range(n):
                d = mask_dice(seg_prior[i], seg_gen[i])
                out[system][i]["anatomy_dice"] = float(np.mean(list(d.values()))) if d else float("nan")
                if seg_exact is not None:  # the anatomy the edit should have: the exact counterfactual's
                    d = mask_dice(seg_exact[i], seg_gen[i])
                    out[system][i]["anatomy_dice_exact"] = float(np.mean(list(d.values()))) if d else float("nan")
        if nets.race is not None:
            pr = nets.race.predict(batch, batch_size)
            for i in range(n):
                out[system][i]["race_probabilities"] = [float(v) for v in pr[i]]
        if nets.age is not None:
            ages = nets.age.predict(batch, batch_size)
            for i in range(n):
                out[system][i]["age_predicted"] = float(ages[i])
    if nets.race is not None:  # reference race: the race model on the prior (the simulator has none)
        ref = nets.race.predict(np.stack(priors)[:, None], batch_size).argmax(axis=1)
        for system in images:
            for i in range(n):
                out[system][i]["race_reference"] = int(ref[i])
    if nets.age is not None:
        ref_age = nets.age.predict(np.stack(priors)[:, None], batch_size)
        for system in images:
            for i, pair in enumerate(pairs):
                out[system][i]["age_reference"] = pair.age if pair.age is not None else float(ref_age[i])
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation


def _pct(v: float) -> float:
    return 100.0 * v if v is not None and not math.isnan(v) else float("nan")


def aggregate(rows: Sequence[dict[str, Any]], system: str, nets: Networks) -> dict[str, Any]:
    """Table 1 numbers for one system from the per-pair rows (percent for AUROC/Pearson/Dice/SSIM).

    Accuracy: pathology AUROC over :data:`FINDINGS` against the reference labels. Retention:
    race AUROC and age Pearson (BiomedJourney) when both models are loaded; otherwise the
    available substitutes among anatomy Dice and SSIM outside the finding region.
    """
    sys_rows = [r["systems"][system] for r in rows]
    agg: dict[str, Any] = {"pairs": len(sys_rows)}
    for key in ("l1_prior", "l1_followup", "l1_exact", "ssim_in", "ssim_out", "change_in_region", "kl_followup", "anatomy_dice",
                "anatomy_dice_exact"):
        agg[key] = metrics.finite_mean(r.get(key, float("nan")) for r in sys_rows)
    for key in ("psnr_in", "psnr_out"):
        agg[key] = metrics.finite_mean(min(r.get(key, float("nan")), PSNR_CAP_DB) for r in sys_rows)
    gains = [g for r in sys_rows for g in r.get("cpg", {}).values()]
    agg["cpg"] = metrics.finite_mean(gains)
    agg["cpg_edits"] = len(gains)

    accuracy: dict[str, float] = {}
    if nets.classifier is not None:
        labels, scores = [], []
        for r in rows:
            probs = r["systems"][system].get("probabilities", {})
            for f in FINDINGS:
                t = r["truth"].get(f)
                if t is None or not nets.classifier.supports(f):
                    continue
                labels.append((f, t, probs[nets.classifier.targets[nets.classifier.index(f)]]))
        per = {}
        for f in FINDINGS:
            ys = [t for g, t, _ in labels if g == f]
            ss = [s for g, _, s in labels if g == f]
            per[f] = metrics.auroc(ys, ss) if ys else float("nan")
        defined = [v for v in per.values() if not math.isnan(v)]
        agg["pathology_auroc_per_finding"] = {k: _pct(v) for k, v in per.items()}
        agg["pathology_auroc"] = _pct(float(np.mean(defined))) if defined else float("nan")
        if not math.isnan(agg["pathology_auroc"]):
            accuracy["pathology_auroc"] = agg["pathology_auroc"]

    retention: dict[str, float] = {}
    if nets.race is not None:
        agg["race_auroc"] = _pct(metrics.multiclass_auroc([r.get("race_reference", 0) for r in sys_rows],
                                                          np.asarray([r["race_probabilities"] for r in sys_rows])))
    if nets.age is not None:
        agg["age_pearson"] = _pct(metrics.pearson([r["age_reference"] for r in sys_rows], [r["age_predicted"] for r in sys_rows]))
    if nets.race is not None and nets.age is not None:
        retention = {k: agg[k] for k in ("race_auroc", "age_pearson") if not math.isnan(agg[k])}
        agg["retention_definition"] = "BiomedJourney: race AUROC, age Pearson"
    else:
        for key, label in (("anatomy_dice", "anatomy Dice"), ("ssim_out", "SSIM outside the finding region")):
            if not math.isnan(agg[key]):
                retention[key] = _pct(agg[key])
        agg["retention_definition"] = "substitute (no race/age models): " + (
            ", ".join(k.replace("_", " ") for k in retention) or "none available")
    if accuracy and retention:
        score = metrics.cmig_score(accuracy, retention)
        agg.update(accuracy=score.accuracy, retention=score.retention, cmig=score.cmig,
                   cmig_components=score.components, cmig_clipped=list(score.clipped))
    else:
        agg.update(accuracy=float("nan"), retention=float("nan"), cmig=float("nan"), cmig_components={})
    return agg


# ---------------------------------------------------------------------------------------------
# Report: JSON, Markdown, figure


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return round(v, 6) if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The tables, laid out like BiomedJourney's Table 1, plus PRISM's and the simulator's metrics."""
    agg = report["aggregate"]
    systems = list(agg)
    lines = [
        f"# Evaluation of {report['model']['model_id']}",
        "",
        f"{report['pairs']} pairs from `{report['config']['pairs']}`; model resolution {report['model']['resolution']} px; "
        f"sampler (steps): {', '.join(report['model'].get('sampler') or ['?'])}; "
        f"confine: {report['config'].get('confine', 'none')}; devices: {report['config'].get('devices', 'model')}; "
        f"classifier: {report['networks']['classifier'] or 'none'}; segmenter: {report['networks']['segmenter'] or 'none'}.",
        "",
        "## Counterfactual generation (BiomedJourney, Table 1 layout)",
        "",
        "| System | Pathology AUROC ↑ | Race AUROC ↑ | Age Pearson ↑ | Accuracy | Retention | CMIG ↑ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in systems:
        a = agg[s]
        lines.append(f"| {s} | {_num(a.get('pathology_auroc'))} | {_num(a.get('race_auroc'))} | {_num(a.get('age_pearson'))} | "
                     f"{_num(a.get('accuracy'))} | {_num(a.get('retention'))} | {_num(a.get('cmig'))} |")
    definition = agg[systems[0]].get("retention_definition", "")
    lines += [
        "",
        f"Accuracy = geometric mean of the accuracy measures (pathology AUROC over {', '.join(FINDINGS)} against the "
        "follow-up's reference labels); retention = geometric mean of the retention measures "
        f"({definition}); CMIG = geometric mean of accuracy and retention, exactly as BiomedJourney section 4.3 "
        "states it (the paper's printed Table 1 scores do not follow from that formula; see docs/EVALUATION.md). "
        "Values in percent; – = not available.",
        "",
        "## Edit fidelity and identity preservation",
        "",
        "| System | L1 to prior ↓ | L1 to follow-up ↓ | PSNR in / out (dB) ↑ | SSIM in / out ↑ | Change in region ↑ | KL ↓ | CPG ↑ | Anatomy Dice prior / exact ↑ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in systems:
        a = agg[s]
        lines.append(
            f"| {s} | {_num(a.get('l1_prior'), 4)} | {_num(a.get('l1_followup'), 4)} | "
            f"{_num(a.get('psnr_in'), 1)} / {_num(a.get('psnr_out'), 1)} | {_num(a.get('ssim_in'), 3)} / {_num(a.get('ssim_out'), 3)} | "
            f"{_num(a.get('change_in_region'), 3)} | {_num(a.get('kl_followup'), 3)} | {_num(a.get('cpg'), 3)} | "
            f"{_num(a.get('anatomy_dice'), 3)} / {_num(a.get('anatomy_dice_exact'), 3)} |")
    lines += [
        "",
        "L1: mean |difference| on [0, 1] images (PRISM's identity preservation). PSNR/SSIM: to the simulator's exact "
        f"counterfactual inside / outside the finding region (identical regions count as {PSNR_CAP_DB:g} dB). Change in "
        "region: share of the total |image − prior| that falls inside the finding region. KL: Bernoulli KL of the "
        "classifier's outputs on the follow-up from those on the generated image. CPG: signed counterfactual prediction "
        "gain for each finding the description changes (+: moved the requested way). Anatomy Dice: mean over "
        "structures of the segmenter's masks on the generated image against its masks on the prior / on the exact "
        "counterfactual (simulated pairs; the anatomy a perfect edit has).",
    ]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "_Generated images are synthetic; research use only, not for diagnosis._", ""]
    return "\n".join(lines)


def _column(system: str) -> str:
    return system[0].upper() + system[1:]


def example_figure(examples: Sequence[dict[str, Any]], systems: Sequence[str]) -> Any:
    """The grid of example pairs: references, each system's image, and signed deltas."""
    from engine.analysis.delta import symmetric_limit
    from engine.analysis.render import ExampleRow, example_grid

    has_exact = any(e["exact"] is not None for e in examples)
    shown = [s for s in systems if s not in ("identity", "exact")]  # the exact CF has its own column
    columns = ["Prior", "Follow-up"] + (["Exact CF"] if has_exact else []) + [_column(s) for s in shown]
    delta_cols = (["Δ exact"] if has_exact else []) + ["Δ model"]
    rows = []
    for e in examples:
        row = ExampleRow(label=e["description"], base=e["prior"])
        row.images = {"Prior": e["prior"], "Follow-up": e["followup"]}
        if e["exact"] is not None:
            row.images["Exact CF"] = e["exact"]
            d = e["exact"] - e["prior"]
            row.deltas["Δ exact"] = (d, symmetric_limit(d, 99.5, floor=0.02))
        for s in shown:
            row.images[_column(s)] = e["images"][s]
        d = e["images"]["model"] - e["prior"]
        row.deltas["Δ model"] = (d, symmetric_limit(d, 99.5, floor=0.02))
        rows.append(row)
    return example_grid(rows, columns + delta_cols, title="Examples (all generated images are synthetic)")


# ---------------------------------------------------------------------------------------------
# Orchestration


def _distributed() -> tuple[int, int, Any]:
    """``(rank, world size, accelerate state)``; a single process without accelerate's launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes, state


CHUNK_PAIRS = 32
"""Pairs generated before their analysis networks run (bounds memory on large test sets)."""


def evaluate_chunk(eng: Any, nets: Networks, config: EvaluateConfig, pairs: Sequence[PairData],
                   chosen: set[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generates, then scores, a chunk of pairs.

    Returns:
        ``(rows, examples)``: one report row per pair, and the images of the pairs in ``chosen``.
    """
    priors: list[np.ndarray] = []
    generated: dict[str, list[np.ndarray]] = {s: [] for s in config.systems}
    for start in range(0, len(pairs), config.batch_size):
        batch_priors, batch_images = generate(eng, pairs[start : start + config.batch_size], config)
        priors += batch_priors
        for s in config.systems:
            generated[s] += batch_images[s]
    net_rows = network_metrics(nets, pairs, priors, generated, config.batch_size)
    rows, examples = [], []
    for j, pair in enumerate(pairs):
        row = {"index": pair.index, "pair_id": pair.record.pair_id, "description": pair.record.description,
               "seed": pair.seed, "sampler": pair.sampler, "truth": pair.truth, "changes": finding_changes(pair.record),
               "systems": {}}
        for s in config.systems:
            row["systems"][s] = {**image_metrics(pair, priors[j], generated[s][j]), **net_rows[s][j]}
        rows.append(row)
        if pair.index in chosen:
            examples.append({"index": pair.index, "description": pair.record.description, "prior": priors[j],
                             "followup": pair.followup, "exact": pair.exact,
                             "images": {s: generated[s][j] for s in config.systems}})
    return rows, examples


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Runs the evaluation and writes the JSON, Markdown and PNG outputs (main process).

    Pairs are read and generated in chunks of :data:`CHUNK_PAIRS`; each chunk's images go
    through the analysis networks in batches of ``config.batch_size``. Under ``accelerate
    launch`` every process takes every ``world``-th pair and the main process gathers the rows.

    Returns:
        The report (as written to JSON); an empty dict on processes other than the main one.

    Raises:
        InputError: bad manifest, model or analysis-network choice.
    """
    import engine

    t0 = time.perf_counter()
    rank, world, state = _distributed()
    eng = engine.load(config.model, device=str(state.device) if state is not None else config.device, dtype=config.dtype)
    records = load_pairs(config)
    root = Path(config.pairs).parent
    images_by_id = _images_index(config.pairs)
    nets = load_networks(config, str(eng.device))
    chosen = _pick_examples_global(records, config.examples)
    mine = list(range(rank, len(records), world))

    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    bar = _progress(len(mine), config.progress and rank == 0)
    for start in range(0, len(mine), CHUNK_PAIRS):
        chunk = [read_pair(i, records[i], root, eng.resolution, images_by_id, config.seed) for i in mine[start : start + CHUNK_PAIRS]]
        chunk_rows, chunk_examples = evaluate_chunk(eng, nets, config, chunk, chosen)
        rows += chunk_rows
        examples += chunk_examples
        bar.update(len(chunk))
    bar.close()
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
        examples = gather_object(examples)
        if rank != 0:
            return {}
    rows.sort(key=lambda r: r["index"])
    examples.sort(key=lambda e: e["index"])

    report = _clean({
        "notice": "Generated images are synthetic; research use only, not for diagnosis.",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "model": {"model_id": eng.model_id, "model_hash": eng.model_hash, "resolution": eng.resolution,
                  "sampler": sorted({r["sampler"] for r in rows if r.get("sampler")})},
        "networks": {
            "classifier": getattr(nets.classifier, "name", None),
            "classifier_targets": list(getattr(nets.classifier, "targets", ())),
            "segmenter": getattr(nets.segmenter, "name", None),
            "race_model": nets.race is not None,
            "age_model": nets.age is not None,
        },
        "pairs": len(rows),
        "systems": list(config.systems),
        "aggregate": {s: aggregate(rows, s, nets) for s in config.systems},
        "notes": nets.notes,
        "seconds": round(time.perf_counter() - t0, 2),
        "rows": rows,
    })
    write_report(report, examples, config)
    return report


def write_report(report: dict[str, Any], examples: Sequence[dict[str, Any]], config: EvaluateConfig) -> None:
    """Writes ``REPORT.json``, ``REPORT.md`` and (with examples) ``REPORT.png``."""
    json_path, md_path, png_path = config.outputs()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    md_path.write_text(markdown_report(report))
    if examples and config.examples > 0:
        from engine.analysis.render import save_figure

        save_figure(example_figure(examples, config.systems), png_path, dpi=160)


def _pick_examples_global(records: Sequence[Any], k: int) -> set[int]:
    """Indices (into ``records``) of the k pairs with the largest simulated change, else the first k.

    Chosen from the whole list so every process agrees on the same rows.
    """
    order = sorted(range(len(records)), key=lambda i: (-(records[i].extra or {}).get("change_fraction", 0.0), i))
    return set(order[:k])


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluating pairs", unit="pair", leave=False)


# ---------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``evaluate`` to ``python -m train``."""
    p = subparsers.add_parser(
        "evaluate", help="score a model and baselines on a pairs manifest (JSON + Markdown + figure)",
        description="Generates a counterfactual for every pair, scores it against the follow-up (and the exact "
                    "counterfactual for simulated pairs) and writes REPORT.json, REPORT.md and REPORT.png. "
                    "Multi-GPU: accelerate launch -m train evaluate ...",
    )
    p.add_argument("--model", required=True, help="instruct model folder or hub id")
    p.add_argument("--pairs", required=True, help="pairs.jsonl (paths relative to its folder)")
    p.add_argument("--out", required=True, help="report path (REPORT.json; .md and .png are written next to it)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N pairs")
    p.add_argument("--baselines", default="identity,text-only",
                   help="comma-separated baselines: identity, text-only, exact, latent-ceiling (the last two: simulated pairs), or 'none' (default: identity,text-only)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per generation batch and images per analysis-network batch (default 8)")
    p.add_argument("--split", default="all", choices=("all", "train", "validate", "test"), help="only pairs of this split")
    p.add_argument("--classifier", default="auto", help="auto | xrv | xrv:WEIGHTS | FOLDER | none (default auto)")
    p.add_argument("--segmenter", default="auto", help="auto | xrv | FOLDER | none (default auto)")
    p.add_argument("--race-age", default="auto", choices=("auto", "none"),
                   help="torchxrayvision's race/age models when their weights are present (default auto)")
    p.add_argument("--xrv-cache", default=None, help="folder of torchxrayvision weight files")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the sampler's own, 4 fast or 20 full)")
    p.add_argument("--sampler", default="auto", choices=("auto", "fast", "full"),
                   help="auto (the app's: the model's fast sampler when it has one), fast or full (default auto)")
    p.add_argument("--confine", default="none", choices=("none", "anatomy"),
                   help="none (default: the model's whole edit) or anatomy (as the app shows it: the edit kept to "
                        "the anatomy of the findings named; baselines never)")
    p.add_argument("--devices", default="model", choices=("model", "detect"),
                   help="model (default: the model's own device removal) or detect (as the app runs it: the "
                        "device detector's lines inpainted, then the model makes the rest)")
    p.add_argument("--text-guidance", type=float, default=7.5, help="text guidance scale (default 7.5)")
    p.add_argument("--image-guidance", type=float, default=1.5, help="image guidance scale (default 1.5)")
    p.add_argument("--scheduler", default="ddim", help="ddim | euler_a | dpmpp (default ddim)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16")
    p.add_argument("--examples", type=int, default=6, help="rows in the example figure (0: none; default 6)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The :class:`EvaluateConfig` of parsed ``evaluate`` arguments.

    Raises:
        InputError: invalid values.
    """
    baselines = () if args.baselines.strip() in ("", "none") else tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    return EvaluateConfig(
        model=args.model, pairs=args.pairs, out=args.out, limit=args.limit, baselines=baselines,
        batch_size=args.batch_size, split=args.split, classifier=args.classifier, segmenter=args.segmenter,
        race_age=args.race_age, xrv_cache=args.xrv_cache, steps=args.steps, text_guidance=args.text_guidance,
        image_guidance=args.image_guidance, scheduler=args.scheduler, sampler=args.sampler, confine=args.confine,
        devices=args.devices, seed=args.seed,
        device=args.device,
        dtype=args.dtype, examples=args.examples, progress=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``evaluate``; prints one JSON line with the output paths and each system's CMIG."""
    config = config_from_args(args)
    report = evaluate(config)
    if report:
        json_path, md_path, png_path = config.outputs()
        print(json.dumps({
            "report": str(json_path), "table": str(md_path),
            "figure": str(png_path) if png_path.exists() and config.examples else None,
            "cmig": {s: a.get("cmig") for s, a in report["aggregate"].items()},
        }))
    return 0
