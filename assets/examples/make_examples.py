"""Rebuilds the workstation's example files from a simulated dataset (seed 7, never trained on).

    python -m train simulate --out data/sim-eval500 --seed 7 ...   # see docs/EVALUATION.md
    python assets/examples/make_examples.py data/sim-eval500

Writes single-image PNG examples and one simulated patient's series as DICOM files with study
dates, so the Journey tab can order them by date. Every file here is simulated (the phantom
simulator in ``train/simulator``); no patient data. The real CR chest example (``RG1_UNCR.dcm``)
comes from the ``pydicom-data`` package at run time and is not copied here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

HERE = Path(__file__).resolve().parent
SINGLE = {  # image id -> example file name (what the image shows)
    "sim7-000008-v00": "sim_normal.png",                       # no findings, no devices
    "sim7-000014-v01": "sim_devices_cardiomegaly.png",         # ETT, NG tube, CVC, ECG leads
    "sim7-000009-v00": "sim_right_effusion.png",               # right effusion, cardiomegaly
}
SERIES = "sim7-000076"  # a small right effusion appears (the series tab's default), lines removed, it grows
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _series_dicom(png: Path, out: Path, record: dict, study_uid_seed: int) -> None:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[SERIES, str(study_uid_seed)])
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "SIMULATED^PATIENT"
    ds.PatientID = SERIES
    ds.StudyDate = record["study_date"].replace("-", "")
    ds.StudyID = record["image_id"][-3:]
    ds.Modality = "CR"
    ds.ViewPosition = record.get("view") or "PA"
    ds.BodyPartExamined = "CHEST"
    ds.ImageComments = "Simulated phantom radiograph (CXR Journey simulator, seed 7); not a patient"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 127.5, 256  # the PNG's own mapping (value / 255)
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)


def main(dataset: str) -> None:
    root = Path(dataset)
    records = {r["image_id"]: r for r in map(json.loads, (root / "images.jsonl").open())}
    for image_id, name in SINGLE.items():
        shutil.copyfile(root / records[image_id]["path"], HERE / name)
    visits = sorted((r for r in records.values() if r["patient_id"] == SERIES), key=lambda r: r["order"])
    folder = HERE / "sim_series"
    folder.mkdir(exist_ok=True)
    for i, record in enumerate(visits):
        _series_dicom(root / record["path"], folder / f"visit{i}.dcm", record, i)
    print(f"wrote {len(SINGLE)} PNGs and {len(visits)} series DICOMs to {HERE}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/sim-eval500")
