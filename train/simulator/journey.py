"""Patient journeys: visits whose findings appear, worsen, improve, resolve or stay, and whose
devices are placed or removed; plus the structured change list of a pair of visits.

Every function takes an explicit ``numpy.random.Generator``; nothing touches global state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np

from .params import DEVICE_KINDS, FINDING_NAMES, Device, Findings, Nuisance, Patient, Severity, Visit

UNCHANGED_BELOW = 0.05
"""Severity changes smaller than this are "unchanged" (and described as stable)."""

_ONSET = {  # probability a finding is present at the first visit: (outpatient, inpatient)
    "atelectasis": (0.2, 0.45), "cardiomegaly": (0.2, 0.3), "consolidation": (0.1, 0.3),
    "edema": (0.06, 0.35), "effusion": (0.12, 0.4), "pneumothorax": (0.03, 0.12),
}
_APPEAR = {  # probability an absent finding appears at the next visit
    "atelectasis": 0.1, "cardiomegaly": 0.02, "consolidation": 0.08, "edema": 0.08,
    "effusion": 0.1, "pneumothorax": 0.04,
}
_SIDES = {  # (right, left, bilateral)
    "atelectasis": (0.35, 0.35, 0.3), "consolidation": (0.45, 0.35, 0.2),
    "effusion": (0.4, 0.3, 0.3), "pneumothorax": (0.5, 0.5, 0.0),
}
_ACUTE_DEVICES = ("ett", "ng_tube", "cvc", "ecg", "chest_tube")
_PLACE = {"ett": 0.12, "ng_tube": 0.12, "cvc": 0.15, "ecg": 0.12}
_REMOVE = {"ett": 0.35, "ng_tube": 0.3, "cvc": 0.25, "ecg": 0.3, "chest_tube": 0.3}


@dataclass(frozen=True)
class Change:
    """One difference between two visits.

    Attributes:
        kind: "finding" or "device".
        name: finding name or device kind.
        change: findings: "new", "increased", "decreased", "resolved", "unchanged";
            devices: "placed", "removed".
        before: prior severity (findings), or None.
        after: follow-up severity (findings), or None.
        device: the device placed or removed (devices), or None.
    """

    kind: str
    name: str
    change: str
    before: Severity | None = None
    after: Severity | None = None
    device: Device | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "change": self.change}
        if self.kind == "finding":
            for key, sev in (("before", self.before), ("after", self.after)):
                out[key] = None if sev is None else round(sev.value, 4)
            out["side"] = (self.after or self.before).side
        else:
            out["side"] = self.device.side
        return out


def compare_visits(prior: Visit, followup: Visit) -> list[Change]:
    """Every finding and device difference between two visits (stable findings included).

    Args:
        prior: the earlier visit.
        followup: the later visit.

    Returns:
        Changes in a fixed order: findings (in ``FINDING_NAMES`` order), then removed and
        placed devices.
    """
    changes: list[Change] = []
    for name in FINDING_NAMES:
        before, after = getattr(prior.findings, name), getattr(followup.findings, name)
        if before is None and after is None:
            continue
        if before is None:
            change = "new"
        elif after is None:
            change = "resolved"
        elif before.side != after.side:
            change = "increased" if after.value >= before.value else "decreased"
        elif abs(after.value - before.value) < UNCHANGED_BELOW:
            change = "unchanged"
        else:
            change = "increased" if after.value > before.value else "decreased"
        changes.append(Change("finding", name, change, before, after))
    before_devices = set(prior.devices)
    after_devices = set(followup.devices)
    for d in sorted(before_devices - after_devices, key=lambda d: d.kind):
        changes.append(Change("device", d.kind, "removed", device=d))
    for d in sorted(after_devices - before_devices, key=lambda d: d.kind):
        changes.append(Change("device", d.kind, "placed", device=d))
    return changes


def sample_nuisance(rng: np.random.Generator, *, portable: bool = False) -> Nuisance:
    """Random positioning and exposure of one acquisition (sicker patients breathe in less)."""
    return Nuisance(
        rotation_deg=float(np.clip(rng.normal(0.0, 2.5), -8.0, 8.0)),
        shift_x=float(np.clip(rng.normal(0.0, 0.03), -0.1, 0.1)),
        shift_y=float(np.clip(rng.normal(0.0, 0.03), -0.1, 0.1)),
        scale=float(np.clip(rng.normal(1.0, 0.025), 0.93, 1.07)),
        inspiration=float(rng.uniform(0.0, 0.7) if portable else rng.uniform(0.3, 1.0)),
        exposure=float(np.clip(np.exp(rng.normal(0.0, 0.25)), 0.5, 2.0)),
        gamma=float(np.clip(rng.normal(1.0, 0.05), 0.85, 1.15)),
    )


def _side(name: str, rng: np.random.Generator) -> str | None:
    if name not in _SIDES:
        return "bilateral" if name == "edema" else None
    return str(rng.choice(("right", "left", "bilateral"), p=_SIDES[name]))


def _new_severity(name: str, rng: np.random.Generator) -> Severity:
    value = float(np.clip(rng.beta(1.4, 2.0), 0.05, 1.0))
    zone = str(rng.choice(("upper", "middle", "lower"))) if name == "consolidation" else None
    return Severity(value, side=_side(name, rng), seed=int(rng.integers(0, 2**31 - 1)), zone=zone)


def sample_findings(rng: np.random.Generator, *, inpatient: bool = False, age: int = 60) -> Findings:
    """Random findings for a first visit."""
    values: dict[str, Severity] = {}
    for name in FINDING_NAMES:
        p = _ONSET[name][int(inpatient)]
        if name == "cardiomegaly":
            p *= 0.5 + max(0, age - 40) / 40.0
        if rng.random() < p:
            values[name] = _new_severity(name, rng)
    return Findings(**values)


def _evolve(name: str, sev: Severity | None, rng: np.random.Generator, *, has_chest_tube: bool) -> Severity | None:
    if sev is None:
        return _new_severity(name, rng) if rng.random() < _APPEAR[name] else None
    if name == "cardiomegaly":  # chronic: drifts slowly, rarely resolves
        step = rng.normal(0.0, 0.08)
        return dataclasses.replace(sev, value=float(np.clip(sev.value + step, 0.05, 1.0)))
    p_resolve = 0.45 if (name == "pneumothorax" and has_chest_tube) else 0.15
    u = rng.random()
    if u < p_resolve:
        return None
    step = float(rng.uniform(0.1, 0.35))
    if u < p_resolve + 0.3:
        value = sev.value - step
    elif u < p_resolve + 0.52:
        value = sev.value + step
    else:
        value = sev.value + rng.normal(0.0, 0.015)
    if value < 0.05:
        return None
    return dataclasses.replace(sev, value=float(np.clip(value, 0.05, 1.0)))


def _device(kind: str, rng: np.random.Generator, side: str | None = None) -> Device:
    if side is None and kind in ("cvc", "chest_tube"):
        side = str(rng.choice(("right", "left"), p=(0.7, 0.3) if kind == "cvc" else (0.5, 0.5)))
    elif side is None and kind in ("pacemaker", "icd"):  # the generator pocket, mostly left
        side = "left" if rng.random() < 0.85 else "right"
    return Device(kind, side=side, seed=int(rng.integers(0, 2**31 - 1)))


def _chest_tube_side(findings: Findings) -> str | None:
    for name in ("pneumothorax", "effusion"):
        sev = getattr(findings, name)
        if sev is not None and (name == "pneumothorax" or sev.value > 0.5):
            return "right" if sev.side in ("right", "bilateral") else "left"
    return None


def _update_devices(devices: tuple[Device, ...], findings: Findings, rng: np.random.Generator,
                    *, inpatient: bool, first: bool) -> tuple[Device, ...]:
    current = {d.kind: d for d in devices}
    for kind in _ACUTE_DEVICES:
        if kind in current:
            p_remove = _REMOVE[kind]
            if kind == "chest_tube" and _chest_tube_side(findings) is None:
                p_remove = 0.6
            if rng.random() < p_remove:
                del current[kind]
            continue
        if kind == "chest_tube":
            side = _chest_tube_side(findings)
            if side is not None and rng.random() < (0.5 if inpatient else 0.1):
                current[kind] = _device(kind, rng, side)
            continue
        p = _PLACE[kind] * (3.0 if first else 1.0) * (1.0 if inpatient else 0.1)
        if kind == "ng_tube" and "ett" in current:
            p = max(p, 0.6)
        if rng.random() < p:
            current[kind] = _device(kind, rng)
    return tuple(current[k] for k in DEVICE_KINDS if k in current)


def sample_visit(patient: Patient, rng: np.random.Generator, previous: Visit | None = None,
                 *, inpatient: bool | None = None) -> Visit:
    """One visit: a first visit when ``previous`` is None, else the next step of a journey.

    Args:
        patient: the patient (age drives cardiomegaly and permanent devices).
        rng: the only source of randomness.
        previous: the visit this one follows.
        inpatient: an acutely ill patient (more findings, tubes and lines, short intervals,
            shallower inspiration); default drawn.

    Returns:
        The new :class:`Visit`.
    """
    if inpatient is None:
        inpatient = bool(rng.random() < 0.4)
    if previous is None:
        findings = sample_findings(rng, inpatient=inpatient, age=patient.age)
        permanent: list[Device] = []
        old = max(0.0, (patient.age - 50) / 40.0)
        if rng.random() < 0.1 * old + 0.02:
            permanent.append(Device("sternal_wires", seed=int(rng.integers(0, 2**31 - 1))))
        if rng.random() < 0.12 * old:
            kind = "icd" if rng.random() < 0.35 else "pacemaker"
            permanent.append(_device(kind, rng))
        devices = _update_devices(tuple(permanent), findings, rng, inpatient=inpatient, first=True)
        year = int(rng.integers(2008, 2023))
        date = dt.date(year, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    else:
        has_tube = any(d.kind == "chest_tube" for d in previous.devices)
        findings = Findings(**{name: _evolve(name, getattr(previous.findings, name), rng, has_chest_tube=has_tube)
                               for name in FINDING_NAMES})
        devices = _update_devices(previous.devices, findings, rng, inpatient=inpatient, first=False)
        gap = int(rng.integers(1, 4)) if inpatient else int(rng.integers(14, 366))
        date = dt.date.fromisoformat(previous.study_date) + dt.timedelta(days=gap)
    return Visit(findings=findings, devices=devices, nuisance=sample_nuisance(rng, portable=inpatient),
                 study_date=date.isoformat(), noise_seed=int(rng.integers(0, 2**31 - 1)))


def sample_journey(patient: Patient, n_visits: int, rng: np.random.Generator) -> list[Visit]:
    """``n_visits`` consecutive visits of one patient.

    Args:
        patient: the patient.
        n_visits: number of visits (>= 1).
        rng: the only source of randomness.

    Returns:
        The visits in chronological order.
    """
    if n_visits < 1:
        raise ValueError(f"a journey needs at least one visit, got {n_visits}")
    inpatient = bool(rng.random() < 0.4)
    visits = [sample_visit(patient, rng, inpatient=inpatient)]
    for _ in range(n_visits - 1):
        visits.append(sample_visit(patient, rng, visits[-1], inpatient=inpatient))
    return visits
