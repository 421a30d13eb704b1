"""Parameter dataclasses of the chest radiograph simulator.

Everything that decides what an image looks like is one of these frozen, hashable, JSON-friendly
dataclasses: a :class:`Patient` (identity, fixed across visits), :class:`Findings` (pathology
with a continuous :class:`Severity` in [0, 1] and a laterality), :class:`Device` (support
devices), :class:`Nuisance` (positioning and exposure of one acquisition) and :class:`Visit`
(one study: findings + devices + nuisance + date + noise seed).

Laterality always means the PATIENT's side. In the posteroanterior (PA) view the simulator
renders, the patient faces the detector, so the patient's right is on the image's LEFT and the
patient's left (heart apex, aortic knob, gastric bubble) is on the image's RIGHT.

Canonical coordinates (used by every geometry function): ``x`` and ``y`` in [-1, 1] across the
image, ``x`` growing to the image's right (the patient's left), ``y`` growing downwards. One
unit is 20 cm, so the 2 x 2 field of view is 40 cm x 40 cm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FINDING_NAMES: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "effusion",
    "pneumothorax",
)
"""Finding fields of :class:`Findings`, in rendering order."""

LATERAL_FINDINGS = frozenset({"atelectasis", "consolidation", "effusion", "pneumothorax"})
"""Findings that need ``side`` ("right", "left" or "bilateral")."""

SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "middle", "lower")

DEVICE_KINDS: tuple[str, ...] = (
    "ett",
    "ng_tube",
    "cvc",
    "pacemaker",
    "icd",
    "ecg",
    "chest_tube",
    "sternal_wires",
)
"""Support devices the simulator draws (all radio-opaque)."""

LATERAL_DEVICES = frozenset({"cvc", "pacemaker", "icd", "chest_tube"})

FIELD_OF_VIEW_MM = 400.0
"""Physical width (and height) of every simulated image, in millimetres."""


def side_sign(side: str) -> int:
    """Image-x direction of a patient side in the PA view: right -> -1 (image left), left -> +1.

    Args:
        side: "right" or "left" (the patient's side).

    Returns:
        -1 for the patient's right, +1 for the patient's left.
    """
    if side == "right":
        return -1
    if side == "left":
        return 1
    raise ValueError(f"side must be 'right' or 'left' here, got {side!r}")


def expand_sides(side: str) -> tuple[str, ...]:
    """("right",) / ("left",) / ("right", "left") for "right" / "left" / "bilateral"."""
    return ("right", "left") if side == "bilateral" else (side,)


@dataclass(frozen=True)
class Severity:
    """One finding: how much (``value`` in (0, 1]) and where.

    Args:
        value: continuous severity. Grades used in text: slight (<= 0.33), moderate
            (0.33-0.66), large (> 0.66). A value of 0 means absent; use ``None`` in
            :class:`Findings` instead.
        side: the PATIENT's side: "right", "left" or "bilateral". Required for atelectasis,
            consolidation, effusion and pneumothorax; ignored (set to None) for cardiomegaly
            and forced to "bilateral" for edema.
        seed: shape randomness (where a consolidation sits, which bands of atelectasis), kept
            fixed across visits so the same lesion grows or shrinks in place.
        zone: "upper", "middle" or "lower" lung zone for consolidation; None picks one from
            ``seed``.
    """

    value: float
    side: str | None = None
    seed: int = 0
    zone: str | None = None

    def __post_init__(self) -> None:
        value = float(self.value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"severity must be in [0, 1], got {self.value!r}")
        object.__setattr__(self, "value", value)
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES} (the patient's side), got {self.side!r}")
        if self.zone is not None and self.zone not in ZONES:
            raise ValueError(f"zone must be one of {ZONES}, got {self.zone!r}")
        object.__setattr__(self, "seed", int(self.seed))


@dataclass(frozen=True)
class Findings:
    """The pathology of one image. ``None`` means absent.

    Example:
        ``Findings(effusion=Severity(0.6, side="left"), cardiomegaly=Severity(0.3))``
    """

    atelectasis: Severity | None = None
    cardiomegaly: Severity | None = None
    consolidation: Severity | None = None
    edema: Severity | None = None
    effusion: Severity | None = None
    pneumothorax: Severity | None = None

    def __post_init__(self) -> None:
        for name in FINDING_NAMES:
            sev = getattr(self, name)
            if sev is None:
                continue
            if not isinstance(sev, Severity):
                raise TypeError(f"Findings.{name} must be a Severity or None, got {type(sev).__name__}")
            if sev.value == 0.0:
                object.__setattr__(self, name, None)
                continue
            if name in LATERAL_FINDINGS and sev.side is None:
                raise ValueError(
                    f"{name} needs a side: Severity({sev.value}, side='right'|'left'|'bilateral') "
                    "(the patient's side)"
                )
            if name == "cardiomegaly" and sev.side is not None:
                object.__setattr__(self, name, dataclasses.replace(sev, side=None))
            if name == "edema" and sev.side != "bilateral":
                object.__setattr__(self, name, dataclasses.replace(sev, side="bilateral"))

    def present(self) -> dict[str, Severity]:
        """The findings that are present, in rendering order."""
        return {n: s for n in FINDING_NAMES if (s := getattr(self, n)) is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (absent findings as None)."""
        return {n: (None if s is None else dataclasses.asdict(s)) for n, s in
                ((n, getattr(self, n)) for n in FINDING_NAMES)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Findings:
        """Inverse of :meth:`to_dict`."""
        unknown = set(data) - set(FINDING_NAMES)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}; known: {FINDING_NAMES}")
        return cls(**{n: (None if v is None else Severity(**v)) for n, v in data.items()})


@dataclass(frozen=True)
class Device:
    """A support device. Its geometry follows from the patient's anatomy and ``seed``.

    Args:
        kind: one of :data:`DEVICE_KINDS`: "ett" (endotracheal tube), "ng_tube", "cvc"
            (central venous catheter), "pacemaker", "icd" (pacemaker with a shock coil),
            "ecg" (electrodes and wires), "chest_tube", "sternal_wires".
        side: the PATIENT's side for cvc (insertion side), pacemaker/icd (generator pocket)
            and chest_tube; None otherwise.
        seed: geometry randomness; keep it while the device stays in place.
    """

    kind: str
    side: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device kind {self.kind!r}; choose one of {DEVICE_KINDS}")
        if self.kind in LATERAL_DEVICES:
            if self.side not in ("right", "left"):
                raise ValueError(f"device {self.kind!r} needs side='right' or 'left' (the patient's side)")
        elif self.side is not None:
            object.__setattr__(self, "side", None)
        object.__setattr__(self, "seed", int(self.seed))


@dataclass(frozen=True)
class Nuisance:
    """Acquisition of one visit: positioning and exposure (what registration has to undo).

    Args:
        rotation_deg: in-plane rotation, degrees, positive = counter-clockwise as displayed.
        shift_x: horizontal translation in canonical units (1 unit = 20 cm), + = image right.
        shift_y: vertical translation in canonical units, + = down.
        scale: magnification (1.0 = nominal).
        inspiration: depth of inspiration, 0 (poor, ~8 posterior ribs) .. 1 (deep, ~11).
        exposure: relative detector dose (1.0 = nominal); lower is noisier and brighter.
        gamma: display gamma of the detector's tone curve (1.0 = nominal).
    """

    rotation_deg: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    scale: float = 1.0
    inspiration: float = 0.6
    exposure: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "rotation_deg": (-30.0, 30.0), "shift_x": (-0.5, 0.5), "shift_y": (-0.5, 0.5),
            "scale": (0.7, 1.4), "inspiration": (0.0, 1.0), "exposure": (0.05, 20.0),
            "gamma": (0.3, 3.0),
        }
        for name, (lo, hi) in checks.items():
            value = float(getattr(self, name))
            if not lo <= value <= hi:
                raise ValueError(f"Nuisance.{name} must be in [{lo}, {hi}], got {value}")
            object.__setattr__(self, name, value)

    @property
    def stretch(self) -> float:
        """Vertical stretch of the lungs/diaphragm about the lung apices (1.0 at inspiration 0.6)."""
        return 0.9 + 0.17 * self.inspiration


@dataclass(frozen=True)
class Patient:
    """Identity parameters, fixed across visits. Sample with :func:`sample_patient`.

    All lengths are canonical units (1 unit = 20 cm, image spans [-1, 1]).
    """

    patient_id: str
    seed: int  # texture, vessel tree and bone detail randomness
    sex: str  # "F" or "M"
    age: int
    habitus: float  # 0 thin .. 1 obese: soft-tissue thickness and body outline
    body_half_width: float  # torso outline at the chest
    thorax_half_width: float  # inner rib cage (lateral lung border) at its widest
    apex_y: float  # lung apices
    dome_right_y: float  # top of the right hemidiaphragm
    dome_left_drop: float  # the left dome sits this much lower
    cp_drop: float  # costophrenic angle below the dome top
    heart_x: float  # centre of the cardiac silhouette
    heart_y: float
    heart_size: float  # scale (1.0 ~ cardiothoracic ratio 0.45)
    heart_tilt_deg: float  # long axis of the ventricle below horizontal
    aortic_unfolding: float  # 0 young .. 1 unfolded, tortuous aorta (age)
    mediastinum_half_width: float
    trachea_x: float
    rib_spacing: float  # posterior rib pitch at the spine
    bone_density: float  # 0.5 osteopenic .. 1.2 dense
    breast_size: float  # 0 for men
    scoliosis: float  # lateral curve amplitude of the spine
    gastric_bubble: float  # 0 none .. 1 large
    costal_calcification: float  # 0 .. 1 (age)

    def __post_init__(self) -> None:
        if self.sex not in ("F", "M"):
            raise ValueError(f"Patient.sex must be 'F' or 'M', got {self.sex!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Patient:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class Visit:
    """One study of a journey: what the patient has and how the image was taken.

    Args:
        findings: pathology at this visit.
        devices: support devices in place.
        nuisance: positioning and exposure.
        study_date: ISO date (YYYY-MM-DD).
        noise_seed: seed of the quantum noise (a counterfactual reuses the prior's).
    """

    findings: Findings = field(default_factory=Findings)
    devices: tuple[Device, ...] = ()
    nuisance: Nuisance = field(default_factory=Nuisance)
    study_date: str = "2020-01-01"
    noise_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        kinds = [d.kind for d in self.devices]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a visit can hold each device kind once, got {kinds}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "findings": self.findings.to_dict(),
            "devices": [dataclasses.asdict(d) for d in self.devices],
            "nuisance": dataclasses.asdict(self.nuisance),
            "study_date": self.study_date,
            "noise_seed": self.noise_seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Visit:
        """Inverse of :meth:`to_dict`."""
        return cls(
            findings=Findings.from_dict(data["findings"]),
            devices=tuple(Device(**d) for d in data["devices"]),
            nuisance=Nuisance(**data["nuisance"]),
            study_date=data["study_date"],
            noise_seed=int(data["noise_seed"]),
        )
