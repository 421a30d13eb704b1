"""Rendering: attenuation -> Beer-Lambert -> scatter, blur, quantum noise -> log -> tone curve.

Pipeline of :func:`render` (one image):

1. Patient-level canonical fields (:func:`.anatomy.build_anatomy`), finding and device fields.
2. Resample the body frame and the thorax frame into the image (visit rotation, translation,
   magnification; the thorax frame also stretches with inspiration).
3. Line integral ``A`` (cm water-equivalent) -> primary fluence ``exp(-mu * A)``.
4. Scatter: a wide low-pass of the primary fluence of the *finding- and device-free* anatomy
   (a deliberate approximation: keeping scatter independent of findings is what lets a
   counterfactual differ from its prior only where the finding changed).
5. Detector blur: a separable Gaussian with a finite kernel of radius :data:`PSF_RADIUS` pixels.
6. Quantum noise: ``I + sqrt(I / N) * z``, ``z`` from ``noise_seed`` only.
7. Log transform, exposure-partially-compensated window, gamma tone curve, clip to [0, 1].

Every step after 3 is either pointwise or reaches at most :data:`PSF_RADIUS` pixels, so two
renders with the same patient, nuisance and noise seed differ only within ``PSF_RADIUS`` of
where their line integrals differ: :func:`change_mask` returns exactly that region.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..manifest import CHEXPERT_LABELS
from .anatomy import MASK_BITS, build_anatomy
from .devices import devices_field
from .findings import render_findings
from .geometry import F32, Warp, dilate, gaussian_kernel, make_warps, separable_blur
from .params import FIELD_OF_VIEW_MM, Device, Findings, Nuisance, Patient, Visit

SIMULATOR_VERSION = "1.0"
MU_WATER = 0.2  # 1/cm, effective linear attenuation of water at a ~120 kVp chest spectrum
SCATTER_FRACTION = 0.3
PHOTONS_PER_PIXEL = 40000.0  # at 256 x 256, exposure 1.0, unattenuated; scales with pixel area
PSF_RADIUS = 2
"""Half-width, in pixels, of the detector blur kernel: the dilation allowance of every mask."""
PSF_SIGMA = 0.6
DRC_STRENGTH = 0.5
WINDOW = (0.1, 3.9)  # processed density mapped to [0, 1]
TONE_GAMMA = 1.6
MIN_SIZE, MAX_SIZE = 128, 1024

FINDING_LABELS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
                  "consolidation": "Consolidation", "edema": "Edema",
                  "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax"}


@dataclass(frozen=True)
class RenderResult:
    """One rendered radiograph and its ground truth.

    Attributes:
        image: (S, S) float32 in [0, 1], PA view, bright = attenuating (MONOCHROME2).
        masks: structure name -> (S, S) bool, names of :data:`.anatomy.MASK_BITS`
            ("left_lung" is the patient's left lung, on the image's right), unpacked from
            ``bits`` on first access. "finding" and "devices" include the blur allowance.
        finding_mask: same array as ``masks["finding"]``: where any finding changes the image.
        device_mask: same array as ``masks["devices"]``.
        bits: (S, S) uint16, all masks packed (``(bits >> MASK_BITS[name]) & 1``).
        labels: CheXpert label -> 1.0 / 0.0 (complete ground truth, no uncertainty).
        severities: finding name -> severity (0.0 when absent).
        params: JSON-friendly parameters that reproduce the image.
        attenuation: (S, S) float32 line integral before the detector (cm water-equivalent),
            for :func:`change_mask`.
        cardiothoracic_ratio: heart width over thoracic width in the canonical frame.
    """

    image: np.ndarray
    masks: Mapping[str, np.ndarray]
    finding_mask: np.ndarray
    device_mask: np.ndarray
    bits: np.ndarray
    labels: dict[str, float]
    severities: dict[str, float]
    params: dict[str, Any]
    attenuation: np.ndarray
    cardiothoracic_ratio: float


def check_size(size: int) -> int:
    """Validates an output size (square, 128-1024 pixels)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    return int(size)


def chexpert_labels(findings: Findings, devices: tuple[Device, ...]) -> dict[str, float]:
    """Complete CheXpert-style labels of a simulated image (1.0 present, 0.0 absent).

    "No Finding" is 1.0 when none of the six pathologies is present (support devices do not
    count, as in CheXpert).
    """
    present = findings.present()
    labels = {FINDING_LABELS[name]: float(name in present) for name in FINDING_LABELS}
    labels["Support Devices"] = float(bool(devices))
    labels["No Finding"] = float(not present)
    return {name: labels[name] for name in CHEXPERT_LABELS}


def render(
    patient: Patient,
    findings: Findings | None = None,
    nuisance: Nuisance | None = None,
    *,
    devices: tuple[Device, ...] | list[Device] = (),
    size: int = 256,
    noise_seed: int = 0,
) -> RenderResult:
    """Renders one PA chest radiograph with its masks, labels and parameters.

    Args:
        patient: identity (:func:`.anatomy.sample_patient`).
        findings: pathology; default none.
        nuisance: positioning and exposure; default nominal.
        devices: support devices in place.
        size: square output size, 128-1024.
        noise_seed: seed of the quantum noise; same seed + same inputs = same pixels.

    Returns:
        The :class:`RenderResult`.
    """
    size = check_size(size)
    findings = findings or Findings()
    nuisance = nuisance or Nuisance()
    devices = tuple(devices)
    base = _baseline(patient, size, nuisance)
    fr = render_findings(patient, size, findings)
    dev = devices_field(patient, size, devices)

    # Line integral: the cached finding-free baseline plus the warped finding/device change.
    delta = fr.delta + dev
    if delta.any():
        attenuation = base.attenuation + base.warp_thorax.apply(delta)
    else:
        attenuation = base.attenuation.copy()
    image = detector(attenuation, base, nuisance, noise_seed)

    # Structure bits: one nearest-neighbour warp of everything in the thorax frame. Nearest
    # sampling can miss a pixel that bilinear sampling touches, hence the extra pixel of dilation.
    canonical = fr.thorax_bits | (fr.support.astype(np.uint16) << MASK_BITS["finding"])
    canonical |= (dev != 0.0).astype(np.uint16) << MASK_BITS["devices"]
    bits = base.warp_thorax.nearest(canonical) | base.body_bits
    finding = (bits >> MASK_BITS["finding"]) & 1
    finding = dilate(finding, PSF_RADIUS + 1) if fr.support.any() else finding.astype(bool)
    device = (bits >> MASK_BITS["devices"]) & 1
    device = dilate(device, PSF_RADIUS + 1) if devices else device.astype(bool)
    keep = ~np.uint16((1 << MASK_BITS["finding"]) | (1 << MASK_BITS["devices"]))
    bits = (bits & keep) | (finding.astype(np.uint16) << MASK_BITS["finding"])
    bits |= device.astype(np.uint16) << MASK_BITS["devices"]
    masks = StructureMasks(bits)
    present = findings.present()
    params = {
        "simulator_version": SIMULATOR_VERSION,
        "size": size,
        "field_of_view_mm": FIELD_OF_VIEW_MM,
        "pixel_spacing_mm": FIELD_OF_VIEW_MM / size,
        "noise_seed": int(noise_seed),
        "patient": _patient_dict(patient),
        "findings": findings.to_dict(),
        "devices": [dataclasses.asdict(d) for d in devices],
        "nuisance": dataclasses.asdict(nuisance),
        "cardiothoracic_ratio": round(fr.cardiothoracic_ratio, 4),
    }
    return RenderResult(
        image=image, masks=masks, finding_mask=finding, device_mask=device, bits=bits,
        labels=chexpert_labels(findings, devices),
        severities={name: (present[name].value if name in present else 0.0) for name in FINDING_LABELS},
        params=params, attenuation=attenuation, cardiothoracic_ratio=fr.cardiothoracic_ratio,
    )


@functools.lru_cache(maxsize=8)
def _patient_dict(patient: Patient) -> dict[str, Any]:
    return patient.to_dict()


def render_visit(patient: Patient, visit: Visit, size: int = 256) -> RenderResult:
    """Renders a :class:`Visit` (its findings, devices, nuisance and noise seed)."""
    return render(patient, visit.findings, visit.nuisance, devices=visit.devices, size=size,
                  noise_seed=visit.noise_seed)


def render_counterfactual(patient: Patient, prior: Visit, followup: Visit, size: int = 256) -> RenderResult:
    """The exact counterfactual of a pair: the follow-up's findings and devices, rendered with
    the prior's positioning, exposure and noise seed.

    Compared with ``render_visit(patient, prior)``, it differs only inside
    ``change_mask(prior_result, counterfactual_result)``.
    """
    return render(patient, followup.findings, prior.nuisance, devices=followup.devices, size=size,
                  noise_seed=prior.noise_seed)


def change_mask(a: RenderResult, b: RenderResult) -> np.ndarray:
    """Where two renders of the same patient, nuisance and noise seed can differ.

    The pixels whose line integrals differ, dilated by the detector blur radius. Outside this
    mask the two images are bit-identical.

    Raises:
        ValueError: if the renders do not share patient, size, nuisance and noise seed.
    """
    for key in ("patient", "size", "nuisance", "noise_seed"):
        if a.params[key] != b.params[key]:
            raise ValueError(
                f"change_mask compares renders that share {key}; use render_counterfactual "
                "to render the follow-up's findings with the prior's acquisition"
            )
    return dilate(a.attenuation != b.attenuation, PSF_RADIUS)


class StructureMasks(Mapping[str, np.ndarray]):
    """Read-only name -> bool mask view of a structure-bit image, unpacked on first access."""

    def __init__(self, bits: np.ndarray) -> None:
        self._bits = bits
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in MASK_BITS:
                raise KeyError(f"{name!r}; structures are {sorted(MASK_BITS)}")
            self._cache[name] = ((self._bits >> MASK_BITS[name]) & 1).astype(bool)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(MASK_BITS)

    def __len__(self) -> int:
        return len(MASK_BITS)


def decode_bits(bits: np.ndarray) -> dict[str, np.ndarray]:
    """Unpacks a uint16 structure-bit image into name -> bool mask (see ``MASK_BITS``)."""
    bits = np.asarray(bits)
    return {name: ((bits >> bit) & 1).astype(bool) for name, bit in MASK_BITS.items()}


def encode_bits(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Packs name -> bool masks into a uint16 image (inverse of :func:`decode_bits`)."""
    first = next(iter(masks.values()))
    bits = np.zeros(first.shape, dtype=np.uint16)
    for name, mask in masks.items():
        if name not in MASK_BITS:
            raise ValueError(f"unknown structure {name!r}; known: {sorted(MASK_BITS)}")
        bits |= np.asarray(mask, dtype=bool).astype(np.uint16) << MASK_BITS[name]
    return bits


# --------------------------------------------------------------------------------------------
# Detector


@dataclass(frozen=True)
class Baseline:
    """Everything of one (patient, size, nuisance) that findings and devices do not change.

    Attributes:
        warp_body, warp_thorax: resampling of the two canonical frames into the image.
        attenuation: (S, S) line integral of the finding- and device-free anatomy.
        body_bits: (S, S) uint16 body-frame structure bits in the image.
        scatter: (S, S) scatter fluence (from the baseline anatomy only).
        density_offset: (S, S) processing offset subtracted from the log image: dynamic-range
            compression (from the baseline anatomy only) and partial exposure compensation.
    """

    warp_body: Warp
    warp_thorax: Warp
    attenuation: np.ndarray
    body_bits: np.ndarray
    scatter: np.ndarray
    density_offset: np.ndarray


def _baseline(patient: Patient, size: int, nuisance: Nuisance) -> Baseline:
    return _baseline_cached(patient, size, nuisance)


@functools.lru_cache(maxsize=3)
def _baseline_cached(patient: Patient, size: int, nuisance: Nuisance) -> Baseline:
    anat = build_anatomy(patient, size)
    warp_body, warp_thorax = make_warps(
        size, rotation_deg=nuisance.rotation_deg, shift=(nuisance.shift_x, nuisance.shift_y),
        scale=nuisance.scale, stretches=(1.0, nuisance.stretch), pivot_y=anat.apex_y)
    attenuation = warp_body.apply(anat.body_att)
    attenuation += warp_thorax.apply(anat.thorax_att)
    primary = np.exp(attenuation * F32(-MU_WATER))
    # Large-scale fields on a 32 x 32 grid: scatter (a wide blur of the primary fluence) and
    # dynamic-range compression as in CR/DR processing (subtract part of the large-scale
    # density above 2: mediastinum, abdomen).
    small = _downsample(primary)
    scatter = SCATTER_FRACTION * ndimage.gaussian_filter(small, 0.09 * LOWPASS_GRID, mode="nearest")
    density = -np.log(ndimage.gaussian_filter(small, 0.05 * LOWPASS_GRID, mode="nearest") + scatter)
    drc = DRC_STRENGTH * np.maximum(density - 2.0, 0.0)
    scatter, offset = _upsample(np.stack([scatter, drc]), size)
    offset += F32(0.2 * np.log(nuisance.exposure))  # the detector compensates 80% of the exposure
    for a in (attenuation, scatter, offset):
        a.flags.writeable = False
    return Baseline(warp_body=warp_body, warp_thorax=warp_thorax, attenuation=attenuation,
                    body_bits=warp_body.nearest(anat.body_bits), scatter=scatter, density_offset=offset)


LOWPASS_GRID = 32


def _downsample(field: np.ndarray) -> np.ndarray:
    """Area mean onto the LOWPASS_GRID x LOWPASS_GRID grid (float64)."""
    size, n = field.shape[0], LOWPASS_GRID
    if size % n == 0:
        k = size // n
        out = np.zeros((n, n))
        for di in range(k):
            out += field[di::k].reshape(n, n, k).sum(axis=2)
        return out / (k * k)
    return ndimage.zoom(field.astype(np.float64), n / size, order=1, grid_mode=True, mode="nearest")


def _upsample(small: np.ndarray, size: int) -> np.ndarray:
    """Separable linear interpolation of (..., n, n) cell values to (..., size, size) float32."""
    i0, i1, w = _upsample_weights(size, small.shape[-1])
    rows = small[..., i0, :] * (1.0 - w)[:, None] + small[..., i1, :] * w[:, None]
    return (rows[..., i0] * (1.0 - w) + rows[..., i1] * w).astype(F32)


@functools.lru_cache(maxsize=8)
def _upsample_weights(size: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from n cell centres to ``size`` pixel centres (clamped at the ends)."""
    pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    return i0, i0 + 1, pos - i0


_KERNEL = gaussian_kernel(PSF_SIGMA, PSF_RADIUS)


def detector(attenuation: np.ndarray, base: Baseline, nuisance: Nuisance, noise_seed: int) -> np.ndarray:
    """Turns a line-integral image into a displayed radiograph in [0, 1].

    Args:
        attenuation: (S, S) cm water-equivalent along each ray.
        base: the finding-free baseline of the same patient and nuisance (scatter, processing).
        nuisance: exposure and gamma.
        noise_seed: seed of the quantum noise.

    Returns:
        (S, S) float32 image in [0, 1].
    """
    size = attenuation.shape[0]
    primary = attenuation * F32(-MU_WATER)
    np.exp(primary, out=primary)
    signal = separable_blur(primary, _KERNEL)
    signal += base.scatter
    photons = PHOTONS_PER_PIXEL * (256.0 / size) ** 2 * nuisance.exposure
    z = np.random.default_rng(noise_seed).standard_normal((size, size), dtype=F32)
    sigma = np.maximum(signal, F32(1e-6))
    sigma *= F32(1.0 / photons)
    np.sqrt(sigma, out=sigma)
    z *= sigma
    signal += z
    # v = (-log(signal) - offset - w0) / (w1 - w0), clipped to [0, 1], then the gamma curve.
    np.maximum(signal, F32(1e-4), out=signal)
    v = np.log(signal, out=signal)
    v += base.density_offset
    v *= F32(-1.0 / (WINDOW[1] - WINDOW[0]))
    v -= F32(WINDOW[0] / (WINDOW[1] - WINDOW[0]))
    np.clip(v, 0.0, 1.0, out=v)
    return np.power(v, F32(TONE_GAMMA * nuisance.gamma), out=v)
