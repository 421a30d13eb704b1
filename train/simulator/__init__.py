"""Chest radiograph simulator: patient journeys with exact ground-truth counterfactuals.

A data source like MIMIC-CXR, but every image comes with its parameters, CheXpert labels,
severities, anatomy masks and a finding-region mask, and every consecutive pair of visits with
the *exact counterfactual*: the follow-up's findings rendered with the prior's positioning,
exposure and noise, so prior and counterfactual differ only where the findings changed.

In-memory use::

    import numpy as np
    from train.simulator import Findings, Severity, Nuisance, sample_patient, render

    rng = np.random.default_rng(0)
    patient = sample_patient(rng)
    result = render(patient, Findings(effusion=Severity(0.6, side="left")), Nuisance(), size=256)
    result.image                 # float32 (256, 256) in [0, 1], PA view
    result.masks["left_lung"]    # the PATIENT's left lung, on the image's right

Laterality is always the patient's: in the PA view the patient's right is on the image's left.
See docs/SIMULATOR.md for the model, the file layout and the mask legend.
"""

from .anatomy import MASK_BITS, Anatomy, build_anatomy, sample_patient
from .journey import Change, compare_visits, sample_findings, sample_journey, sample_nuisance, sample_visit
from .params import (
    DEVICE_KINDS,
    FIELD_OF_VIEW_MM,
    FINDING_NAMES,
    Device,
    Findings,
    Nuisance,
    Patient,
    Severity,
    Visit,
)
from .render import (
    PSF_RADIUS,
    SIMULATOR_VERSION,
    RenderResult,
    change_mask,
    chexpert_labels,
    decode_bits,
    encode_bits,
    render,
    render_counterfactual,
    render_visit,
)
from .text import (
    GRADES,
    WORD_GRADES,
    describe_progression,
    finding_phrase,
    report,
    severity_grade,
    severity_word,
)
from .writer import SimulationConfig, SimulationSummary, read_masks, read_png, write_dataset

Finding = Severity
"""Alias: a finding's severity and laterality."""

__all__ = [
    "DEVICE_KINDS", "FIELD_OF_VIEW_MM", "FINDING_NAMES", "GRADES", "MASK_BITS", "PSF_RADIUS",
    "SIMULATOR_VERSION", "WORD_GRADES", "Anatomy", "Change", "Device", "Finding", "Findings",
    "Nuisance", "Patient", "RenderResult", "Severity", "SimulationConfig", "SimulationSummary",
    "Visit", "build_anatomy", "change_mask", "chexpert_labels", "compare_visits", "decode_bits",
    "describe_progression", "encode_bits", "finding_phrase", "read_masks", "read_png", "render",
    "render_counterfactual", "render_visit", "report", "sample_findings", "sample_journey",
    "sample_nuisance", "sample_patient", "sample_visit", "severity_grade", "severity_word",
    "write_dataset",
]
