"""Dataset writer: journeys -> images, masks, reports, parameters, DICOM and the manifest.

Layout of an output folder (paths in the manifest are relative to it)::

    images.jsonl                one ImageRecord per image (train.manifest)
    pairs.jsonl                 one PairRecord per consecutive pair
    simulation.json             the settings that reproduce the folder
    images/<image_id>.png       8- or 16-bit grey PNG
    masks/<image_id>.png        16-bit PNG of structure bits (MASK_BITS)
    reports/<image_id>.txt      the radiology report
    params/<image_id>.json      everything that reproduces the image
    dicom/<image_id>.dcm        CR DICOM (with --dicom)
    counterfactuals/<pair_id>.png        exact counterfactual of the pair
    counterfactuals/<pair_id>_masks.png  its structure bits
    change_masks/<pair_id>.png  8-bit, 255 where prior and counterfactual may differ

Same settings, same bytes: every random draw comes from ``SeedSequence([seed, patient_index])``,
DICOM UIDs are hashes of the seed and ids, and nothing records wall-clock time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import multiprocessing
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..manifest import ImageRecord, PairRecord, split_for, write_jsonl
from .anatomy import MASK_BITS, sample_patient
from .edits import REMOVAL_DEVICES, check_edit_kinds, check_removal_devices, sample_edits
from .journey import compare_visits, sample_journey
from .params import FIELD_OF_VIEW_MM, Patient, Visit
from .render import SIMULATOR_VERSION, RenderResult, change_mask, check_size, render_counterfactual, render_visit
from .text import describe_progression, report

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
UID_ROOT = "2.25."


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of one simulated dataset.

    Args:
        out: output folder.
        patients: number of patients (>= 1).
        visits: visits per patient (>= 1; pairs need >= 2).
        size: square image size, 128-1024.
        seed: non-negative master seed.
        dicom: also write CR DICOM files.
        bits: 8 or 16 bits per pixel for PNG and DICOM.
        workers: processes (>= 1).
        edits: instead of journeys, one prior per patient with the single edits a user asks
            for and their exact counterfactuals (:mod:`.edits`); ``visits`` is then unused.
        edit_kinds: with ``edits``, draw only these kinds of edit (e.g. ``("devices",)`` for a
            set of device removals); None: every kind at its usual weight.
        removal_devices: with ``edits``, the device kinds a removal edit adds to its prior
            (:data:`.edits.REMOVAL_DEVICES` by default: the acute lines and tubes).
    """

    out: str
    patients: int
    visits: int
    size: int = 256
    seed: int = 0
    dicom: bool = False
    bits: int = 8
    workers: int = 1
    edits: bool = False
    edit_kinds: tuple[str, ...] | None = None
    removal_devices: tuple[str, ...] = REMOVAL_DEVICES

    def __post_init__(self) -> None:
        check_size(self.size)
        if self.edit_kinds is not None:
            if not self.edits:
                raise ValueError("edit_kinds needs edits=True (journeys have no edit kinds)")
            check_edit_kinds(self.edit_kinds)
        if self.removal_devices != REMOVAL_DEVICES:
            if not self.edits:
                raise ValueError("removal_devices needs edits=True (journeys place their own devices)")
            check_removal_devices(self.removal_devices)
        if self.patients < 1:
            raise ValueError(f"patients must be at least 1, got {self.patients}")
        if self.visits < 1:
            raise ValueError(f"visits must be at least 1, got {self.visits}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {self.bits}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class SimulationSummary:
    """What :func:`write_dataset` produced.

    Attributes:
        images: images written (rows of images.jsonl).
        pairs: pairs written (each with an exact counterfactual).
        renders: images rendered (images + counterfactuals).
        seconds: wall-clock time.
    """

    images: int
    pairs: int
    renders: int
    seconds: float

    @property
    def renders_per_second(self) -> float:
        """Rendered images (incl. counterfactuals, masks and files) per second."""
        return self.renders / self.seconds if self.seconds > 0 else float("inf")


def patient_id_for(seed: int, index: int) -> str:
    """Identifier of simulated patient ``index`` of a dataset with master seed ``seed``."""
    return f"sim{seed}-{index:06d}"


def write_dataset(config: SimulationConfig, *, progress: Callable[[int, int], None] | None = None) -> SimulationSummary:
    """Simulates ``config.patients`` journeys and writes the dataset folder.

    Args:
        config: the settings.
        progress: called with (patients done, patients total) after each patient.

    Returns:
        A :class:`SimulationSummary`.
    """
    start = time.perf_counter()
    out = Path(config.out)
    for sub in ("images", "masks", "reports", "params", "counterfactuals", "change_masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if config.dicom:
        (out / "dicom").mkdir(exist_ok=True)
    images: list[ImageRecord] = []
    pairs: list[PairRecord] = []
    jobs = [(config, index) for index in range(config.patients)]
    job = _simulate_edits if config.edits else _simulate_patient
    if config.workers == 1:
        results = map(job, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(config.workers)
        results = pool.imap(job, jobs, chunksize=1)
    try:
        for done, (patient_images, patient_pairs) in enumerate(results, start=1):
            images.extend(patient_images)
            pairs.extend(patient_pairs)
            if progress is not None:
                progress(done, config.patients)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    write_jsonl(out / "images.jsonl", images)
    write_jsonl(out / "pairs.jsonl", pairs)
    settings = dataclasses.asdict(config)
    settings.pop("out")
    settings.pop("workers")  # the output does not depend on it
    if not config.edits:
        settings.pop("edits")  # journeys: the settings of folders written before edits existed
    if config.edit_kinds is None:
        settings.pop("edit_kinds")  # every kind: as folders written before the option existed
    if config.removal_devices == REMOVAL_DEVICES:
        settings.pop("removal_devices")  # likewise
    _write_bytes(out / "simulation.json", (json.dumps(
        {"simulator_version": SIMULATOR_VERSION, "settings": settings, "mask_bits": MASK_BITS,
         "field_of_view_mm": FIELD_OF_VIEW_MM}, indent=2, sort_keys=True) + "\n").encode())
    return SimulationSummary(images=len(images), pairs=len(pairs), renders=len(images) + len(pairs),
                             seconds=time.perf_counter() - start)


def _simulate_patient(job: tuple[SimulationConfig, int]) -> tuple[list[ImageRecord], list[PairRecord]]:
    """Samples, renders and writes one patient's journey (runs in a worker process)."""
    config, index = job
    out = Path(config.out)
    journey_seq, text_seq = np.random.SeedSequence([config.seed, index]).spawn(2)
    rng = np.random.default_rng(journey_seq)
    text_rng = np.random.default_rng(text_seq)
    pid = patient_id_for(config.seed, index)
    patient = sample_patient(rng, patient_id=pid)
    visits = sample_journey(patient, config.visits, rng)
    split = split_for(pid)

    images: list[ImageRecord] = []
    pairs: list[PairRecord] = []
    results: list[RenderResult] = []
    for k, visit in enumerate(visits):
        result = render_visit(patient, visit, config.size)
        results.append(result)
        images.append(_write_image(config, patient, visit, index, k, result, split, text_rng))
        if k > 0:
            # Rendered right after the follow-up so the prior's baseline is still cached.
            pairs.append(_write_pair(config, patient, visits[k - 1], visit, results[k - 1], results[k],
                                     images[k - 1], images[k], split, text_rng))
    return images, pairs


def _simulate_edits(job: tuple[SimulationConfig, int]) -> tuple[list[ImageRecord], list[PairRecord]]:
    """Samples, renders and writes one prior and the single edits asked of it (a worker process).

    Each edit's target is written as an image too (visit 1, 2, ...: the prior's acquisition with
    the edit applied, so it equals the pair's exact counterfactual).
    """
    config, index = job
    edit_seq, text_seq = np.random.SeedSequence([config.seed, index]).spawn(2)
    rng = np.random.default_rng(edit_seq)
    text_rng = np.random.default_rng(text_seq)
    pid = patient_id_for(config.seed, index)
    patient = sample_patient(rng, patient_id=pid)
    prior, edits = sample_edits(patient, rng, text_rng, kinds=config.edit_kinds,
                                removal_devices=config.removal_devices)
    split = split_for(pid)
    prior_result = render_visit(patient, prior, config.size)
    prior_record = _write_image(config, patient, prior, index, 0, prior_result, split, text_rng)
    images, pairs = [prior_record], []
    for k, edit in enumerate(edits, start=1):
        result = render_visit(patient, edit.target, config.size)
        record = _write_image(config, patient, edit.target, index, k, result, split, text_rng)
        images.append(record)
        pairs.append(_write_pair(config, patient, prior, edit.target, prior_result, result, prior_record, record,
                                 split, text_rng, description=edit.description, edit=edit.kind))
    return images, pairs


def _write_image(config: SimulationConfig, patient: Patient, visit: Visit, index: int, k: int,
                 result: RenderResult, split: str, text_rng: np.random.Generator) -> ImageRecord:
    """Writes visit ``k`` of patient ``index`` (image, masks, report, parameters, DICOM); returns its record."""
    out = Path(config.out)
    pid = patient.patient_id
    image_id = f"{pid}-v{k:02d}"
    text, labels = report(visit.findings, visit.devices, text_rng, age=patient.age)
    extra: dict[str, Any] = {
        "severities": result.severities,
        "sides": {n: s.side for n, s in visit.findings.present().items()},
        "devices": [dataclasses.asdict(d) for d in visit.devices],
        "labels_truth": result.labels,
        "nuisance": dataclasses.asdict(visit.nuisance),
        "mask_path": f"masks/{image_id}.png",
        "params_path": f"params/{image_id}.json",
        "report_path": f"reports/{image_id}.txt",
        "cardiothoracic_ratio": round(result.cardiothoracic_ratio, 4),
        "bits": config.bits,
        "split": split,
    }
    pixels = _quantise(result.image, config.bits)
    _write_png(out / "images" / f"{image_id}.png", pixels)
    _write_png(out / "masks" / f"{image_id}.png", result.bits)
    _write_bytes(out / "reports" / f"{image_id}.txt", text.encode("utf-8"))
    _write_json(out / "params" / f"{image_id}.json", result.params)
    if config.dicom:
        extra["dicom_path"] = f"dicom/{image_id}.dcm"
        _write_dicom(out / "dicom" / f"{image_id}.dcm", config, patient, visit, index, k, pixels)
    return ImageRecord(
        image_id=image_id, patient_id=pid, study_id=f"{pid}-s{k:02d}", order=k,
        study_date=visit.study_date, view="PA", path=f"images/{image_id}.png", report=text,
        labels=labels, source="simulator", extra=extra,
    )


def _write_pair(config: SimulationConfig, patient: Patient, prior: Visit, followup: Visit,
                prior_result: RenderResult, followup_result: RenderResult, prior_record: ImageRecord,
                followup_record: ImageRecord, split: str, text_rng: np.random.Generator,
                *, description: str | None = None, edit: str | None = None) -> PairRecord:
    """Renders and writes the exact counterfactual of a pair; returns its record.

    ``description`` replaces the drawn progression sentence; ``edit``, the kind of a
    single-edit pair (:mod:`.edits`), is recorded in ``extra``.
    """
    out = Path(config.out)
    pid = patient.patient_id
    pair_id = f"{prior_record.image_id}-v{followup_record.order:02d}"
    cf = render_counterfactual(patient, prior, followup, config.size)
    changed = change_mask(prior_result, cf)
    _write_png(out / "counterfactuals" / f"{pair_id}.png", _quantise(cf.image, config.bits))
    _write_png(out / "counterfactuals" / f"{pair_id}_masks.png", cf.bits)
    _write_png(out / "change_masks" / f"{pair_id}.png", changed.astype(np.uint8) * 255)
    days = (dt.date.fromisoformat(followup.study_date) - dt.date.fromisoformat(prior.study_date)).days
    return PairRecord(
        pair_id=pair_id, patient_id=pid, prior_id=prior_record.image_id,
        followup_id=followup_record.image_id, prior_path=prior_record.path, followup_path=followup_record.path,
        description=description if description is not None else describe_progression(prior, followup, text_rng),
        registration_score=None,
        split=split, counterfactual_path=f"counterfactuals/{pair_id}.png",
        labels_prior=prior_record.labels, labels_followup=followup_record.labels,
        extra={
            "changes": [c.to_dict() for c in compare_visits(prior, followup)],
            "change_mask_path": f"change_masks/{pair_id}.png",
            "counterfactual_mask_path": f"counterfactuals/{pair_id}_masks.png",
            # The counterfactual's parameters: the prior's acquisition and noise seed with the
            # follow-up's findings and devices (params of the two images).
            "counterfactual_of": {"acquisition": prior_record.image_id, "findings": followup_record.image_id},
            "prior_mask_path": prior_record.extra["mask_path"],
            "followup_mask_path": followup_record.extra["mask_path"],
            "change_fraction": round(float(changed.mean()), 6),
            "days_between": days,
            "severities_prior": prior_result.severities,
            "severities_followup": followup_result.severities,
            **({"edit": edit} if edit is not None else {}),
        },
    )


# --------------------------------------------------------------------------------------------
# Files


def _quantise(image: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return np.rint(image * 255.0).astype(np.uint8)
    return np.rint(image * 65535.0).astype(np.uint16)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """A greyscale PNG of a uint8 or uint16 (H, W) array (deterministic; "Up" row filter).

    Faster than PIL's encoder for noisy images, and the bytes depend only on the pixels.
    """
    h, w = array.shape
    depth = 8 if array.dtype == np.uint8 else 16
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG needs uint8 or uint16 pixels, got {array.dtype}")
    raw = np.ascontiguousarray(array.astype(">u2").view(np.uint8).reshape(h, -1) if depth == 16 else array)
    rows = np.empty((h, raw.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter "Up": difference to the row above
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + chunk(b"IEND", b""))


def _write_png(path: Path, array: np.ndarray) -> None:
    _write_bytes(path, encode_png(array))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_bytes(path, (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8"))


def read_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an image PNG written by the simulator as float32 (H, W) in [0, 1] (8 or 16 bit)."""
    with Image.open(path) as im:
        a = np.asarray(im)
    scale = 255.0 if a.dtype == np.uint8 else 65535.0
    return (a.astype(np.float32) / scale).astype(np.float32)


def read_masks(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a 16-bit structure-bit PNG into name -> bool mask (see ``MASK_BITS``)."""
    with Image.open(path) as im:
        bits = np.asarray(im).astype(np.uint32)
    return {name: ((bits >> bit) & 1).astype(bool) for name, bit in MASK_BITS.items()}


def _uid(*parts: object) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return UID_ROOT + str(int(digest[:30], 16))


def _write_dicom(path: Path, config: SimulationConfig, patient: Patient, visit: Visit, index: int,
                 visit_index: int, pixels: np.ndarray) -> None:
    """A CR image (explicit VR little endian) whose UIDs depend only on seed and ids."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    pid = patient.patient_id
    study_uid = _uid("study", config.seed, pid, visit_index)
    series_uid = _uid("series", config.seed, pid, visit_index)
    sop_uid = _uid("image", config.seed, pid, visit_index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("cxr-journey-simulator", SIMULATOR_VERSION)
    meta.ImplementationVersionName = f"CXRJSIM_{SIMULATOR_VERSION}"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    date = visit.study_date.replace("-", "")
    birth_year = int(visit.study_date[:4]) - patient.age
    spacing = FIELD_OF_VIEW_MM / config.size
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CR"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Manufacturer = "CXR Journey simulator"
    ds.ManufacturerModelName = f"simulator {SIMULATOR_VERSION}"
    ds.PatientID = pid
    ds.PatientName = f"SIM^{index:06d}"
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age:03d}Y"
    ds.PatientBirthDate = f"{birth_year:04d}0101"
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.ContentDate = date
    ds.StudyTime = "120000"
    ds.SeriesTime = "120000"
    ds.ContentTime = "120000"
    ds.AccessionNumber = f"S{config.seed}P{index:06d}V{visit_index:02d}"[:16]
    ds.StudyID = f"{visit_index + 1}"
    ds.StudyDescription = "CHEST PA"
    ds.SeriesDescription = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.KVP = 120
    ds.BurnedInAnnotation = "NO"
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.ImagerPixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=config.bits,
                      generate_instance_uid=False)
    top = (1 << config.bits) - 1
    ds.WindowCenter = f"{top / 2:.1f}"
    ds.WindowWidth = f"{top + 1}"
    ds.PresentationLUTShape = "IDENTITY"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    _write_bytes(path, buf.getvalue())
