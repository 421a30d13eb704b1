"""Data sources: each turns one dataset's files, in its own layout, into image records.

Every source is one small function ``load_<name>(root, **options) -> list[ImageRecord]``
(:mod:`train.manifest`), with image paths absolute (``python -m train prepare`` rewrites them
relative to the manifest folder). :data:`SOURCES` names them for the command line and says
what license and attribution a model trained on each must carry in its card.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from train.sources.chexpert import load_chexpert, prism_caption
from train.sources.dicom_folder import load_dicom_folder
from train.sources.folder_csv import load_folder_csv
from train.sources.hannover import load_hannover
from train.sources.mimic import load_mimic
from train.sources.simulated import load_simulated


@dataclass(frozen=True)
class Source:
    """A data source as the command line knows it.

    Attributes:
        name: the ``prepare`` argument.
        load: ``load(root, **options) -> list[ImageRecord]``.
        license: license of the data (goes into model cards).
        attribution: required attribution text.
        description: one line for ``--help``.
    """

    name: str
    load: Callable[..., list]
    license: str
    attribution: str
    description: str

    def card_entry(self) -> dict[str, str]:
        """The ``training_data`` entry of a model card trained on this source."""
        return {"name": self.name, "license": self.license, "attribution": self.attribution}


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("mimic", load_mimic, "PhysioNet Credentialed Health Data License 1.5.0",
               "Johnson et al., MIMIC-CXR(-JPG), PhysioNet, doi:10.13026/8360-t248",
               "MIMIC-CXR-JPG: metadata/split/chexpert CSVs + files/pXX/.../*.jpg and report .txt files"),
        Source("chexpert", load_chexpert, "Stanford University School of Medicine CheXpert Dataset Research Use Agreement",
               "Irvin et al., CheXpert, AAAI 2019",
               "CheXpert: train.csv / valid.csv with PRISM's label captions"),
        Source("dicom", load_dicom_folder, "as given by the data owner", "as given by the data owner",
               "a folder of DICOM radiographs (patient/study/date tags give journeys); optional <file>.txt reports"),
        Source("csv", load_folder_csv, "as given by the data owner", "as given by the data owner",
               "a folder of images + a CSV (path, patient_id, study_date/order, view, report, label columns)"),
        Source("hannover", load_hannover, "CC BY 3.0",
               "Hannover Medical School COVID-19 chest X-ray repository, doi:10.6084/m9.figshare.12275009",
               "the Hannover COVID-19 layout: data.csv + png/ (real journeys, no reports)"),
        Source("simulated", load_simulated, "MIT (synthetic)", "CXR Journey phantom simulator",
               "output of `python -m train simulate` (phantom journeys with known findings)"),
    )
}

__all__ = ["SOURCES", "Source", "load_chexpert", "load_dicom_folder", "load_folder_csv", "load_hannover",
           "load_mimic", "load_simulated", "prism_caption"]
