"""Single-edit instruction pairs: one prior, one edit in the words a user types, its exact counterfactual.

Journeys (:mod:`.journey`) teach how findings evolve, described as reports describe them, with
several changes per pair. The workstation is asked for one edit at a time, in the user's words
and with a severity setting ("new large left pleural effusion", "without support devices"), and
a model trained on journeys alone meets such requests rarely: in 3600 simulated journey pairs
there are ten single-change "new large effusion" pairs. This module samples the requests
themselves, and renders the target of each exactly (the prior's acquisition and noise, only
the edit differs):

``severity``
    A finding absent from the prior, added at all three grades on the same side, with the same
    shape seed: three pairs that differ only in the severity word, so the model is shown what
    "small", "moderate" and "large" change (the workstation's severity rule writes these words,
    see ``engine.severity``). Sides are drawn evenly, so "left" and "right" are taught as often.
``progress``
    A finding the prior has, increased to a higher grade, decreased to a lower one, or resolved.
``devices``
    Every support device removed ("without support devices", PRISM's edit).
``none``
    No change asked, none made.

Descriptions are the user's short form (``"new moderate right pleural effusion"``, the
canonical severity words) or, for a share of pairs, the report-style progression sentence of
:func:`.text.describe_progression`, so the two phrasings meet the same edits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .journey import _device, sample_visit
from .params import DEVICE_KINDS, Patient, Severity, Visit
from .text import describe_progression, finding_noun, severity_word

EDIT_KINDS = ("severity", "progress", "devices", "none")
EDIT_WEIGHTS = (0.5, 0.15, 0.25, 0.1)
"""How often each kind of edit is drawn (per prior; a severity edit gives three pairs)."""

GRADE_VALUES = {"slight": (0.12, 0.3), "moderate": (0.42, 0.6), "large": (0.75, 0.95)}
"""Severity values drawn for each grade: inside ``text.severity_grade``'s bands, away from
their edges, so neighbouring grades always look different."""

_FINDING_WEIGHTS = {"effusion": 0.25, "pneumothorax": 0.15, "cardiomegaly": 0.15, "edema": 0.15,
                    "atelectasis": 0.15, "consolidation": 0.15}
_LATERAL = ("atelectasis", "consolidation", "effusion", "pneumothorax")
_TAILS = ("", "", "; otherwise unchanged", "; no other change", "; heart size unchanged")
_DEVICE_REMOVAL = ("without support devices", "remove the support devices", "support devices removed",
                   "no support devices", "without lines and tubes", "lines and tubes removed")
_NO_CHANGE = ("no change", "unchanged", "no interval change", "stable appearance of the chest")
USER_STYLE_SHARE = 0.65
"""Share of severity and device edits described in the user's short form (else report style)."""


@dataclass(frozen=True)
class Edit:
    """One requested edit of a prior.

    Attributes:
        kind: one of ``EDIT_KINDS``.
        target: the visit whose findings and devices the counterfactual shows (the prior's
            acquisition is kept when rendering it).
        description: the instruction.
    """

    kind: str
    target: Visit
    description: str


REMOVAL_DEVICES: tuple[str, ...] = ("ett", "ng_tube", "cvc", "ecg")
"""The devices a ``devices`` edit adds to its prior (1-3 of them) before removing every device:
the acute lines and tubes. Pacemakers, ICDs and chest tubes then appear only where the sampled
prior already had one (3 % and 6 % of the removals of ``data/sim-devices31``);
``removal_devices`` widens the draw."""


def _distinct_names(names: tuple[str, ...], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """``names`` if it is a non-empty tuple of distinct ``allowed`` names; ValueError otherwise."""
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{what} must be distinct names among {', '.join(allowed)}; got {', '.join(names) or 'none'}")
    return names


def check_removal_devices(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """``kinds`` if it is a non-empty tuple of distinct ``DEVICE_KINDS``; ValueError otherwise."""
    return _distinct_names(kinds, DEVICE_KINDS, "removal devices")


def check_edit_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """``kinds`` if it is a non-empty tuple of distinct ``EDIT_KINDS``; ValueError otherwise."""
    return _distinct_names(kinds, EDIT_KINDS, "edit kinds")


def _value(grade: str, rng: np.random.Generator) -> float:
    lo, hi = GRADE_VALUES[grade]
    return float(rng.uniform(lo, hi))


def _side(name: str, rng: np.random.Generator) -> str | None:
    if name not in _LATERAL:
        return None
    if name == "pneumothorax" or rng.random() < 0.9:
        return str(rng.choice(("right", "left")))
    return "bilateral"


def _with(visit: Visit, name: str, sev: Severity | None) -> Visit:
    return dataclasses.replace(visit, findings=dataclasses.replace(visit.findings, **{name: sev}))


def _user_instruction(name: str, sev: Severity, rng: np.random.Generator) -> str:
    """The short form a user types, with the canonical severity word (``engine.severity``'s)."""
    tail = str(rng.choice([t for t in _TAILS if not (name == "cardiomegaly" and "heart" in t)]))
    return f"new {severity_word(name, sev.value)} {finding_noun(name, sev)}{tail}"


def sample_edits(patient: Patient, rng: np.random.Generator, text_rng: np.random.Generator,
                 *, kind: str | None = None, kinds: tuple[str, ...] | None = None,
                 removal_devices: tuple[str, ...] = REMOVAL_DEVICES) -> tuple[Visit, list[Edit]]:
    """A prior visit and the edits asked of it.

    Args:
        patient: the patient.
        rng: draws the prior, the kind, the finding, side and severities.
        text_rng: draws the wording only (so wording changes never change images).
        kind: force one of ``EDIT_KINDS``; default drawn with ``EDIT_WEIGHTS``.
        kinds: draw the kind among these only (``EDIT_WEIGHTS`` renormalised over them); None:
            all of ``EDIT_KINDS`` (the draws of datasets written before this option existed).
        removal_devices: the device kinds a ``devices`` edit draws 1-3 of (fewer if fewer are
            listed) and adds to the prior; the default ``REMOVAL_DEVICES`` keeps the draws of
            datasets written before this option existed.

    Returns:
        ``(prior, edits)``: three edits for ``severity`` (slight, moderate, large), else one.
    """
    prior = sample_visit(patient, rng)
    if kind is None and kinds is None:
        kind = str(rng.choice(EDIT_KINDS, p=EDIT_WEIGHTS))
    elif kind is None:
        weights = np.array([EDIT_WEIGHTS[EDIT_KINDS.index(k)] for k in check_edit_kinds(kinds)])
        kind = str(rng.choice(list(kinds), p=weights / weights.sum()))
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind must be one of {EDIT_KINDS}, got {kind!r}")
    names = list(_FINDING_WEIGHTS)
    name = str(rng.choice(names, p=[_FINDING_WEIGHTS[n] for n in names]))
    zone = str(rng.choice(("upper", "middle", "lower"))) if name == "consolidation" else None
    seed = int(rng.integers(0, 2**31 - 1))

    if kind == "severity":
        prior = _with(prior, name, None)
        side = _side(name, rng)
        edits = []
        for grade in GRADE_VALUES:
            target = _with(prior, name, Severity(_value(grade, rng), side=side, seed=seed, zone=zone))
            user = text_rng.random() < USER_STYLE_SHARE
            text = (_user_instruction(name, target.findings.present()[name], text_rng) if user
                    else describe_progression(prior, target, text_rng))
            edits.append(Edit(kind, target, text))
        return prior, edits

    if kind == "progress":
        grades = list(GRADE_VALUES)
        start = int(rng.integers(0, 3))
        prior = _with(prior, name, Severity(_value(grades[start], rng), side=_side(name, rng), seed=seed, zone=zone))
        before = prior.findings.present()[name]
        moves = [g for g in range(3) if g != start] + [None]
        move = moves[int(rng.integers(0, len(moves)))]
        after = None if move is None else dataclasses.replace(before, value=_value(grades[move], rng))
        target = _with(prior, name, after)
        return prior, [Edit(kind, target, describe_progression(prior, target, text_rng))]

    if kind == "devices":
        count = int(rng.integers(1, min(3, len(removal_devices)) + 1))
        chosen = sorted(rng.choice(removal_devices, size=count, replace=False).tolist())
        devices = {d.kind: d for d in prior.devices}
        for k in chosen:
            devices.setdefault(k, _device(k, rng))
        prior = dataclasses.replace(prior, devices=tuple(devices[k] for k in DEVICE_KINDS if k in devices))
        target = dataclasses.replace(prior, devices=())
        user = text_rng.random() < USER_STYLE_SHARE
        text = str(text_rng.choice(_DEVICE_REMOVAL)) if user else describe_progression(prior, target, text_rng)
        return prior, [Edit(kind, target, text)]

    return prior, [Edit(kind, prior, str(text_rng.choice(_NO_CHANGE)))]

