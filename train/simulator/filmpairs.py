"""Real-anatomy pairs from any folder of films: ``python -m train simulate --on-films DIR``.

Every readable film (PNG, JPEG or DICOM; or a Hannover-layout folder with ``data.csv``) is
letterboxed onto the canvas as the engine does, its lungs are taken from a real mask (V7 Labs'
masks shipped in torchxrayvision, a folder of masks) or from a segmenter, and the simulator's
single edits are rendered on it (:mod:`.onfilms`): new findings at the three grades, progression
of a rendered finding, removal of rendered devices, no change. The output folder has the
simulator's layout and manifests (``images.jsonl``, ``pairs.jsonl`` with exact
counterfactuals, structure masks, change masks), so the trainer, the evaluator and
``python -m train analysis`` read it like a simulated folder::

    images/<film>-e<k>-v<j>.png   the film with rendered findings (16-bit); v00 is each edit's prior
    masks/<id>.png                structure bits (left_lung, right_lung, heart; ``extra.mask_known``)
    change_masks/<pair>.png       255 where prior and counterfactual differ
    films.jsonl                   one row per film: split, mask source, heart fit, or why it was skipped

Patients are split by a hash of their id (:data:`train.manifest.REAL_FILM_FRACTIONS`), so a
patient's films are all train, all validation or all test; ``--splits`` writes only some.

What is known about a film is only what was rendered on it: ``labels_truth`` holds the rendered
findings (1) and, for the finding an edit adds, 0 on its prior (the premise of "new ..."); the
film's own findings are unknown (``labels_known`` lists the labels that are known). Removal
pairs (a rendered device on the prior, the film itself as the follow-up) are made only from
films listed as free of devices (``--device-free``), since a film's own lines would otherwise
stay in a "without support devices" target.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InputError

from ..manifest import REAL_FILM_FRACTIONS, ImageRecord, PairRecord, split_for, write_jsonl
from .anatomy import DEVICE_KIND_SHIFT, DEVICE_KIND_TARGETS, MASK_BITS, sample_patient
from .edits import (_DEVICE_REMOVAL, _FINDING_WEIGHTS, _NO_CHANGE, EDIT_KINDS, EDIT_WEIGHTS, GRADE_VALUES,
                    REMOVAL_DEVICES, USER_STYLE_SHARE, _side, _user_instruction, _value, check_edit_kinds,
                    check_removal_devices)
from .journey import _device, compare_visits
from .onfilms import FilmAnatomy, fit_anatomy, render_on_film
from .params import DEVICE_KINDS, Findings, Severity, Visit
from .render import chexpert_labels
from .text import describe_progression
from .writer import _quantise, _write_bytes, _write_png

log = logging.getLogger(__name__)

FILM_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
PATHOLOGY_LABELS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
                    "edema": "Edema", "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax"}
HEART_CTR_RANGE = (0.3, 0.75)
"""A fitted heart whose cardiothoracic ratio falls outside this range is not trusted: the film
gets no cardiomegaly edits and its heart is not offered as a training mask."""


@dataclass(frozen=True)
class FilmPairsConfig:
    """Settings of one real-anatomy folder.

    Args:
        films: folder of films (searched recursively) or a Hannover-layout folder (``data.csv``).
        out: output folder.
        size: canvas size, 128-1024.
        seed: master seed (draws per film come from ``SeedSequence([seed, film index])``).
        edits_per_film: edit draws per film (a severity draw gives three pairs).
        masks: ``auto`` (V7 masks where the film has one, else the segmenter), ``v7`` (only
            films with a V7 mask), or a folder of masks named like the films.
        segmenter: the segmenter for ``auto`` (a model folder; ``auto`` = the bundled one).
        splits: the patient splits to write.
        device_free: film ids known to show no devices (removal pairs are made from these only).
        edit_kinds: draw only these kinds (default all of ``EDIT_KINDS``).
        removal_devices: the devices a removal edit renders on its prior.
        device_gain: ``(low, high)``: each rendered device set's contrast is scaled by a factor
            drawn uniformly from this range (default ``(1, 1)``: as the renderer draws them). Real
            leads and tubing are often fainter and thinner than the renderer's steel wires; a
            device detector trained on a range sees them too.
        workers: processes.
    """

    films: str
    out: str
    size: int = 256
    seed: int = 0
    edits_per_film: int = 4
    masks: str = "auto"
    segmenter: str = "auto"
    splits: tuple[str, ...] = ("train", "validate", "test")
    device_free: tuple[str, ...] = ()
    edit_kinds: tuple[str, ...] | None = None
    removal_devices: tuple[str, ...] = ("ett", "ng_tube", "cvc", "ecg", "pacemaker", "icd", "chest_tube")
    device_gain: tuple[float, float] = (1.0, 1.0)
    workers: int = 1

    def __post_init__(self) -> None:
        if not 128 <= self.size <= 1024:
            raise ValueError(f"size must be 128-1024, got {self.size}")
        if self.edits_per_film < 1:
            raise ValueError(f"edits_per_film must be at least 1, got {self.edits_per_film}")
        if self.edit_kinds is not None:
            check_edit_kinds(self.edit_kinds)
        check_removal_devices(self.removal_devices)
        bad = set(self.splits) - {"train", "validate", "test"}
        if bad or not self.splits:
            raise ValueError(f"splits must be among train, validate, test; got {', '.join(self.splits) or 'none'}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        low, high = self.device_gain
        if not 0 < low <= high <= 2:
            raise ValueError(f"device_gain must be LOW,HIGH with 0 < LOW <= HIGH <= 2, got {low},{high}")


@dataclass(frozen=True)
class Film:
    """A film found in the input folder."""

    film_id: str
    patient_id: str
    path: str
    view: str | None


def discover_films(root: str | Path) -> list[Film]:
    """Every film below ``root``: the Hannover layout by its ``data.csv``, else any image or DICOM
    file (each its own patient unless a DICOM names one).

    Raises:
        InputError: no folder, or no film in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--on-films {root} is not a folder")
    if (root / "data.csv").is_file() and (root / "png").is_dir():
        from ..sources.hannover import load_hannover

        films = [Film(r.image_id, r.patient_id, r.path, r.view) for r in load_hannover(root)]
    else:
        films = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FILM_SUFFIXES):
            film_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(path.relative_to(root).with_suffix("")))
            patient, view = film_id, None
            if path.suffix.lower() in (".dcm", ".dicom"):
                try:
                    import pydicom

                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    patient = str(getattr(ds, "PatientID", "") or film_id)
                    view = str(getattr(ds, "ViewPosition", "") or "") or None
                except Exception:  # noqa: BLE001 - an unreadable header is reported when the film is read
                    pass
            films.append(Film(film_id, patient, str(path), view))
    if not films:
        raise InputError(f"no films (PNG, JPEG or DICOM) below {root}")
    return films


# --------------------------------------------------------------------------------------------
# Edits on a film


@dataclass(frozen=True)
class FilmEdit:
    """One requested edit of a film: the prior's and the target's rendered findings and devices."""

    kind: str
    prior: Visit
    target: Visit
    description: str


def sample_film_edits(rng: np.random.Generator, text_rng: np.random.Generator, *, kinds: tuple[str, ...] | None,
                      removal_devices: tuple[str, ...], device_free: bool, heart_ok: bool) -> list[FilmEdit]:
    """The edits asked of one film (the simulator's kinds, weights, grades and words).

    A severity draw gives three edits (slight, moderate, large) of one finding on one side; a
    progression draw renders a finding on the prior and changes its grade or resolves it; a
    device draw renders 1-3 devices on the prior and removes them all (only on a device-free
    film); ``none`` asks for no change. Cardiomegaly needs a trusted heart fit. Empty when only
    device removals are asked of a film that is not device-free.
    """
    allowed = [k for k in (kinds or EDIT_KINDS) if k != "devices" or device_free]
    if not allowed:  # only device removals asked, and this film shows devices of its own
        return []
    weights = np.array([EDIT_WEIGHTS[EDIT_KINDS.index(k)] for k in allowed])
    kind = str(rng.choice(allowed, p=weights / weights.sum()))
    names = [n for n in _FINDING_WEIGHTS if n != "cardiomegaly" or heart_ok]
    p = np.array([_FINDING_WEIGHTS[n] for n in names])
    name = str(rng.choice(names, p=p / p.sum()))
    zone = str(rng.choice(("upper", "middle", "lower"))) if name == "consolidation" else None
    seed = int(rng.integers(0, 2**31 - 1))
    empty = Visit()

    def visit(sev: Severity | None) -> Visit:
        return Visit(findings=Findings(**{name: sev}) if sev is not None else Findings())

    if kind == "severity":
        side = _side(name, rng)
        edits = []
        for grade in GRADE_VALUES:
            sev = Severity(_value(grade, rng), side=side, seed=seed, zone=zone)
            target = visit(sev)
            user = text_rng.random() < USER_STYLE_SHARE
            text = _user_instruction(name, sev, text_rng) if user else describe_progression(empty, target, text_rng)
            edits.append(FilmEdit(kind, empty, target, text))
        return edits
    if kind == "progress":
        grades = list(GRADE_VALUES)
        start = int(rng.integers(0, 3))
        before = Severity(_value(grades[start], rng), side=_side(name, rng), seed=seed, zone=zone)
        moves = [g for g in range(3) if g != start] + [None]
        move = moves[int(rng.integers(0, len(moves)))]
        after = None if move is None else dataclasses.replace(before, value=_value(grades[move], rng))
        prior, target = visit(before), visit(after)
        return [FilmEdit(kind, prior, target, describe_progression(prior, target, text_rng))]
    if kind == "devices":
        count = int(rng.integers(1, min(3, len(removal_devices)) + 1))
        chosen = sorted(rng.choice(removal_devices, size=count, replace=False).tolist())
        devices = {k: _device(k, rng) for k in chosen}
        prior = Visit(devices=tuple(devices[k] for k in DEVICE_KINDS if k in devices))
        user = text_rng.random() < USER_STYLE_SHARE
        text = str(text_rng.choice(_DEVICE_REMOVAL)) if user else describe_progression(prior, empty, text_rng)
        return [FilmEdit(kind, prior, empty, text)]
    return [FilmEdit("none", empty, empty, str(text_rng.choice(_NO_CHANGE)))]


# --------------------------------------------------------------------------------------------
# Masks


class MaskSource:
    """Lung masks for films: V7's, a folder's, or a segmenter's.

    A V7 mask that does not fit its film (:func:`train.sources.v7masks.on_blank_border` above
    :data:`~train.sources.v7masks.MAX_ON_BORDER`) is not used: ``v7`` then has no mask for the
    film, ``auto`` takes the segmenter's."""

    def __init__(self, spec: str, segmenter: str = "auto") -> None:
        self.spec = spec
        self._segmenter_spec = segmenter
        self._segmenter = None
        self._v7 = None
        if spec in ("auto", "v7"):
            from ..sources.v7masks import V7LungMasks

            self._v7 = V7LungMasks()
        elif not Path(spec).is_dir():
            raise InputError(f"--masks must be auto, v7 or a folder of masks; {spec} is none of them")

    def lungs(self, film: Film, pixels: np.ndarray) -> tuple[np.ndarray | None, str]:
        """Both lungs as a bool mask in the film's geometry, and where it came from (None: no mask)."""
        if self._v7 is not None and film.film_id in self._v7:
            from ..sources.v7masks import MAX_ON_BORDER, on_blank_border

            mask = self._v7.mask(film.film_id, pixels.shape)
            share = on_blank_border(mask, pixels)
            if share <= MAX_ON_BORDER:
                return mask, "v7"
            log.info("%s: V7's mask lies %.0f %% on the film's blank border (drawn on another crop); not used",
                     film.film_id, 100 * share)
        if self.spec == "v7":
            return None, "none"
        if self.spec != "auto":
            for suffix in (".png", ".jpg", ".jpeg"):
                path = Path(self.spec) / f"{film.film_id}{suffix}"
                if path.is_file():
                    from PIL import Image

                    with Image.open(path) as im:
                        grey = im.convert("L").resize((pixels.shape[1], pixels.shape[0]), Image.Resampling.BILINEAR)
                    return np.asarray(grey) > 127, "folder"
            return None, "none"
        return self._segment(pixels), "segmenter"

    def _segment(self, pixels: np.ndarray) -> np.ndarray:
        """The segmenter's lungs on the letterboxed film, mapped back onto the film's own grid."""
        from engine.analysis.segmentation import load_segmenter
        from engine.io import to_square

        if self._segmenter is None:
            self._segmenter = load_segmenter(self._segmenter_spec)
        canvas, transform = to_square(pixels, self._segmenter.input_resolution)
        masks = self._segmenter.segment([canvas])[0]
        lungs = np.asarray(masks["left_lung"], dtype=bool) | np.asarray(masks["right_lung"], dtype=bool)
        return transform.invert(lungs.astype(np.float32)) > 0.5


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class FilmPairsSummary:
    films: int
    skipped: int
    images: int
    pairs: int
    seconds: float


def write_film_pairs(config: FilmPairsConfig, *, progress: Callable[[int, int], None] | None = None) -> FilmPairsSummary:
    """Writes the real-anatomy folder of ``config`` (see the module docstring)."""
    start = time.perf_counter()
    out = Path(config.out)
    for sub in ("images", "masks", "change_masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    films = [f for f in discover_films(config.films) if split_for(f.patient_id, REAL_FILM_FRACTIONS) in config.splits]
    jobs = [(config, index, film) for index, film in enumerate(films)]
    images: list[ImageRecord] = []
    pairs: list[PairRecord] = []
    rows: list[dict[str, Any]] = []
    if config.workers == 1:
        results, pool = map(_film_job, jobs), None
    else:
        pool = multiprocessing.get_context("spawn").Pool(config.workers)
        results = pool.imap(_film_job, jobs, chunksize=1)
    try:
        for done, (row, film_images, film_pairs) in enumerate(results, start=1):
            rows.append(row)
            images.extend(film_images)
            pairs.extend(film_pairs)
            if progress is not None:
                progress(done, len(jobs))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    write_jsonl(out / "images.jsonl", images)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "films.jsonl", rows)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "workers")}
    settings["films"] = Path(config.films).name  # no local path of this machine in the folder
    settings["device_free"] = len(config.device_free)
    settings["device_gain"] = list(config.device_gain)
    hannover = (Path(config.films) / "data.csv").is_file() and (Path(config.films) / "png").is_dir()
    mask_sources = sorted({r["mask_source"] for r in rows if not r.get("skipped") and "mask_source" in r})
    _write_bytes(out / "simulation.json", (json.dumps({
        "kind": "real-anatomy pairs", "settings": settings, "mask_bits": MASK_BITS,
        "device_kind_bits": {"shift": DEVICE_KIND_SHIFT, "labels": DEVICE_KIND_TARGETS},
        "film_source": "hannover" if hannover else "folder", "mask_sources": mask_sources,
    }, indent=2, sort_keys=True) + "\n").encode())
    skipped = sum(1 for r in rows if r.get("skipped"))
    return FilmPairsSummary(films=len(rows) - skipped, skipped=skipped, images=len(images), pairs=len(pairs),
                            seconds=time.perf_counter() - start)


_MASKS: dict[tuple[str, str], MaskSource] = {}


def _mask_source(config: FilmPairsConfig) -> MaskSource:
    key = (config.masks, config.segmenter)
    if key not in _MASKS:
        _MASKS[key] = MaskSource(config.masks, config.segmenter)
    return _MASKS[key]


def _film_job(job: tuple[FilmPairsConfig, int, Film]) -> tuple[dict[str, Any], list[ImageRecord], list[PairRecord]]:
    config, index, film = job
    from engine.io import read_xray, to_square

    split = split_for(film.patient_id, REAL_FILM_FRACTIONS)
    row: dict[str, Any] = {"film_id": film.film_id, "patient_id": film.patient_id, "split": split, "view": film.view}
    try:
        xray = read_xray(film.path)
        lungs, source = _mask_source(config).lungs(film, xray.pixels)
        row["mask_source"] = source
        if lungs is None:
            raise InputError("no lung mask for this film")
        canvas, transform = to_square(xray, config.size)
        mask, _ = to_square(lungs.astype(np.float32), config.size)
        content, _ = to_square(np.ones(xray.pixels.shape, dtype=np.float32), config.size)
        anatomy = fit_anatomy(canvas, mask > 0.5, content=content > 0.5, seed=index)
    except InputError as exc:
        return {**row, "skipped": str(exc)}, [], []
    ctr = anatomy.cardiothoracic_ratio()
    heart_ok = bool(HEART_CTR_RANGE[0] <= ctr <= HEART_CTR_RANGE[1])
    row.update(heart_ctr=round(ctr, 4), heart_trusted=heart_ok, tissue=round(anatomy.tissue, 3),
               contrast=round(anatomy.contrast, 3))
    edit_seq, text_seq = np.random.SeedSequence([config.seed, index]).spawn(2)
    rng, text_rng = np.random.default_rng(edit_seq), np.random.default_rng(text_seq)
    patient = sample_patient(rng, patient_id=film.patient_id)
    device_free = film.film_id in set(config.device_free)
    drawn = [edits for _ in range(config.edits_per_film)
             if (edits := sample_film_edits(rng, text_rng, kinds=config.edit_kinds, removal_devices=config.removal_devices,
                                            device_free=device_free, heart_ok=heart_ok))]
    # Each distinct rendering is one image (the film as acquired is every "new ..." prior and every
    # removal or "no change" target): written, and later encoded by the trainer, once.
    renders: dict[tuple, tuple[str, Any]] = {}
    premises: dict[str, set[str]] = {}

    # each device rendering's contrast factor (config.device_gain), drawn apart so the default draws nothing
    gain_rng = np.random.default_rng([config.seed, index, 1])

    def image_for(visit: Visit, name: str) -> tuple[str, Any]:
        key = (visit.findings, visit.devices)
        if key not in renders:
            plain = not visit.findings.present() and not visit.devices
            gain = 1.0
            if visit.devices and config.device_gain != (1.0, 1.0):
                gain = float(gain_rng.uniform(*config.device_gain))
            renders[key] = (f"{film.film_id}-film" if plain else f"{film.film_id}-{name}",
                            render_on_film(anatomy, visit.findings, visit.devices, patient, device_gain=gain))
            premises[renders[key][0]] = set()
        return renders[key]

    pairs: list[PairRecord] = []
    visits: dict[str, Visit] = {}
    for e, edits in enumerate(drawn):
        prior_id, prior_render = image_for(edits[0].prior, f"e{e}-v00")
        visits[prior_id] = edits[0].prior
        for j, edit in enumerate(edits, start=1):
            target_id, target_render = image_for(edit.target, f"e{e}-v{j:02d}")
            visits[target_id] = edit.target
            for change in compare_visits(edit.prior, edit.target):  # the premise of "new ..." and "... resolved"
                if change.kind == "finding" and change.before is None:
                    premises[prior_id].add(PATHOLOGY_LABELS[change.name])
                if change.kind == "finding" and change.after is None:
                    premises[target_id].add(PATHOLOGY_LABELS[change.name])
            changed = _quantise(prior_render.image, 16) != _quantise(target_render.image, 16)  # as stored
            pair_id = f"{film.film_id}-e{e}-v{j:02d}"
            _write_png(Path(config.out) / "change_masks" / f"{pair_id}.png", changed.astype(np.uint8) * 255)
            pairs.append(PairRecord(
                pair_id=pair_id, patient_id=film.patient_id, prior_id=prior_id, followup_id=target_id,
                prior_path=f"images/{prior_id}.png", followup_path=f"images/{target_id}.png",
                description=edit.description, registration_score=None, split=split,
                counterfactual_path=f"images/{target_id}.png", labels_prior={}, labels_followup={},
                extra={"edit": edit.kind, "real_anatomy": True, "film_id": film.film_id,
                       "changes": [c.to_dict() for c in compare_visits(edit.prior, edit.target)],
                       "change_mask_path": f"change_masks/{pair_id}.png",
                       "counterfactual_mask_path": f"masks/{target_id}.png",
                       "prior_mask_path": f"masks/{prior_id}.png", "followup_mask_path": f"masks/{target_id}.png",
                       "change_fraction": round(float(changed.mean()), 6),
                       "severities_prior": {n: v.value for n, v in edit.prior.findings.present().items()},
                       "severities_followup": {n: v.value for n, v in edit.target.findings.present().items()}},
            ))
    images = {}
    for image_id, render in renders.values():
        images[image_id] = _write_film_image(config, film, split, image_id, anatomy, render, visits[image_id],
                                             premises[image_id], heart_ok, order=0 if image_id.endswith("-film") else 1,
                                             mask_source=source)
    inherit_film_labels(images.values())
    for pair in pairs:  # the labels each image knows, as the pair records carry them
        pair.labels_prior.update(images[pair.prior_id].labels)
        pair.labels_followup.update(images[pair.followup_id].labels)
    return row, list(images.values()), pairs


def inherit_film_labels(images: Iterable[ImageRecord]) -> None:
    """Each rendered image of a film also knows what its plain film knows (in place).

    A rendered image is the film plus what was drawn on it, so a label the plain film knows (a
    premise: "new effusion" takes the film as free of effusion) keeps the film's value wherever the
    drawing does not set it: the film with a rendered consolidation is free of effusion too. Without
    this, a rendered image knew only its own positive label, the plain films were nearly the only
    negatives, and a classifier trained on them learned "a real film has every finding" (held-out
    real-anatomy AUROC 0.57, as low on its own training films).
    """
    images = list(images)
    plain = {r.extra["film_id"]: r for r in images if r.image_id.endswith("-film")}
    for r in images:
        film = plain.get(r.extra["film_id"])
        if film is None or film is r:
            continue
        known, truth = set(r.extra["labels_known"]), r.extra["labels_truth"]
        for label in film.extra["labels_known"]:
            if label not in known:
                truth[label] = film.extra["labels_truth"][label]
                r.labels[label] = truth[label]
                known.add(label)
        r.extra["labels_known"] = sorted(known)


def _write_film_image(config: FilmPairsConfig, film: Film, split: str, image_id: str, anatomy: FilmAnatomy,
                      rendered, visit: Visit, premises: set[str], heart_ok: bool, *, order: int,
                      mask_source: str) -> ImageRecord:
    """Writes one rendered image with its structure bits; returns its record.

    What is known about it: the findings rendered on it (present), ``premises`` (findings an edit
    adds to it or resolves to it: taken as absent), devices when it has rendered ones or the film
    is listed as device-free, and its structures unless its lungs came from a segmenter.
    """
    out = Path(config.out)
    truth = chexpert_labels(visit.findings, visit.devices)
    known = {PATHOLOGY_LABELS[n] for n in visit.findings.present()} | set(premises)
    if visit.devices or film.film_id in set(config.device_free):
        known.add("Support Devices")
    labels_truth = {k: float(v) for k, v in truth.items() if k in known}
    masks = {"right_lung": anatomy.lungs["right"].mask, "left_lung": anatomy.lungs["left"].mask}
    mask_known = ["left_lung", "right_lung"]
    if heart_ok:
        masks["heart"] = rendered.heart
        mask_known.append("heart")
    if mask_source == "segmenter":  # a segmenter's own output is no truth to train a segmenter on
        mask_known = []
    bits = np.zeros(anatomy.image.shape, dtype=np.uint16)
    if film.film_id in set(config.device_free):  # every device it shows is a rendered one, of known kind
        masks["devices"] = rendered.devices
        mask_known.append("devices")
        mask_known.extend(DEVICE_KIND_TARGETS)
        bits |= (rendered.device_kinds.astype(np.uint16) & 7) << DEVICE_KIND_SHIFT
    for name, mask in masks.items():
        bits |= (np.asarray(mask, dtype=np.uint16) << MASK_BITS[name]).astype(np.uint16)
    _write_png(out / "images" / f"{image_id}.png", _quantise(rendered.image, 16))
    _write_png(out / "masks" / f"{image_id}.png", bits)
    sev = {n: s.value for n, s in visit.findings.present().items()}
    return ImageRecord(
        image_id=image_id, patient_id=film.patient_id, study_id=f"{film.film_id}", order=order, study_date=None,
        view=film.view, path=f"images/{image_id}.png", report="", labels={k: labels_truth.get(k) for k in truth},
        source="real-anatomy",
        extra={"film_id": film.film_id, "labels_truth": labels_truth, "labels_known": sorted(known),
               "mask_path": f"masks/{image_id}.png", "mask_known": mask_known, "severities": sev,
               "sides": {n: s.side for n, s in visit.findings.present().items()},
               "devices": [dataclasses.asdict(d) for d in visit.devices],
               "cardiothoracic_ratio": round(rendered.cardiothoracic_ratio, 4) if heart_ok else None,
               "bits": 16, "split": split},
    )
