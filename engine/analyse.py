"""What the workstation shows beside a counterfactual, computed once and handed over as numpy.

:class:`Analyst` is the engine-side service behind the analysis panels: the signed delta
heatmap, the classifier's attention for one finding, the anatomy overlay, the probabilities
before and after, and the numbers that say whether the edit stayed where it was asked to
(change inside vs outside a target structure, Dice of the anatomy). It also compares a
counterfactual with a real follow-up of the same patient, registered onto the prior.

Results are frozen dataclasses of numpy arrays and plain numbers (:class:`EditAnalysis`,
:class:`FollowupComparison`), so the UI never touches torch. Importing this module is cheap:
torch, the networks and SimpleITK are loaded on first use, and an :class:`Analyst` can be built
without loading anything. Models that cannot be loaded do not stop an analysis: the parts that
need them come back empty, :meth:`Analyst.status` says why, and the result's ``notes`` repeat it.

Images are the engine's model canvases (``Counterfactual.prior`` and ``Counterfactual.image``):
float32 ``(S, S)`` in [0, 1], on one grid.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.analysis._images import as_unit_image
from engine.errors import InputError

if TYPE_CHECKING:  # for annotations only: importing them at run time would import torch
    from engine.analysis.classifier import Classifier
    from engine.analysis.segmentation import Segmenter

log = logging.getLogger(__name__)

DELTA_LIMIT_PERCENTILE = 99.5
"""Percentile of the changed pixels' ``|delta|`` used as the colour limit (a few outliers ignored)."""
DIGITS = 4
"""Decimal places of the numbers in ``metrics()``."""
UNCHANGED = 1e-3
"""A probability change below this counts as none when the attention's finding is picked."""

SEGMENTATION_CACHE = 4
"""How many images' anatomy masks an :class:`Analyst` keeps (by content) for the next analyses."""


# ---------------------------------------------------------------------------------------------
# Results


def _number(value: float | None) -> float | None:
    """A float rounded for JSON; ``None`` for missing or non-finite values (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), DIGITS)


@dataclass(frozen=True, eq=False)
class EditAnalysis:
    """Everything shown beside one counterfactual.

    Arrays are on the model canvas ``(S, S)``; overlays are uint8 RGB ``(S, S, 3)``.

    Attributes:
        delta: float32 signed change, counterfactual minus prior (positive: brighter).
        delta_limit: symmetric colour limit ``v``: the heatmap spans ``[-v, v]``.
        delta_rgb: the delta overlaid on the prior (red brighter, blue darker).
        finding: the finding the attention maps are for (the requested one, else the one whose
            probability changed most), as the classifier names it; None without a classifier.
        attention_rgb: Grad-CAM of ``finding`` on the counterfactual, overlaid on it.
        attention_prior_rgb: the same on the prior (both maps share one scale).
        segmentation_rgb: the counterfactual with its structures as fills and outlines.
        probabilities: finding -> (prior, counterfactual) probability; ``{}`` without a classifier.
        dice: structure -> Dice of the prior's and the counterfactual's masks; ``{}`` without a
            segmenter.
        structure: the target structure of the change metrics (None: none asked for).
        change_inside: mean ``|delta|`` inside the structure (its extent on either image).
        change_outside: mean ``|delta|`` outside it.
        change_fraction_inside: share of the total ``|delta|`` that lies inside (0 when nothing
            changed).
        cardiothoracic_ratio: (prior, counterfactual) heart width over thorax width measured on
            the segmentations (:func:`~engine.analysis.segmentation.cardiothoracic_ratio`); None
            without a segmenter that draws the heart and both lungs.
        notes: plain-language remarks (what was left out and why, how the finding was chosen).
    """

    delta: np.ndarray
    delta_limit: float
    delta_rgb: np.ndarray
    finding: str | None
    attention_rgb: np.ndarray | None
    attention_prior_rgb: np.ndarray | None
    segmentation_rgb: np.ndarray | None
    probabilities: dict[str, tuple[float, float]]
    dice: dict[str, float]
    structure: str | None
    change_inside: float | None
    change_outside: float | None
    change_fraction_inside: float | None
    cardiothoracic_ratio: tuple[float, float] | None = None
    notes: tuple[str, ...] = ()

    def metrics(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays), numbers rounded; undefined values are ``None``."""
        magnitude = np.abs(self.delta)
        return {
            "delta": {
                "limit": _number(self.delta_limit),
                "mean_abs": _number(float(magnitude.mean())),
                "max_increase": _number(max(float(self.delta.max()), 0.0)),
                "max_decrease": _number(min(float(self.delta.min()), 0.0)),
            },
            "finding": self.finding,
            "probabilities": {
                name: {"prior": _number(p), "counterfactual": _number(q), "change": _number(q - p)}
                for name, (p, q) in self.probabilities.items()
            },
            "dice": {name: _number(v) for name, v in self.dice.items()},
            "dice_mean": _number(float(np.mean(list(self.dice.values())))) if self.dice else None,
            "structure": self.structure,
            "change_inside": _number(self.change_inside),
            "change_outside": _number(self.change_outside),
            "change_fraction_inside": _number(self.change_fraction_inside),
            "cardiothoracic_ratio": None if self.cardiothoracic_ratio is None else {
                "prior": _number(self.cardiothoracic_ratio[0]),
                "counterfactual": _number(self.cardiothoracic_ratio[1])},
            "notes": list(self.notes),
        }


@dataclass(frozen=True, eq=False)
class FollowupComparison:
    """A counterfactual next to a real follow-up registered onto the prior.

    Both deltas are taken against the prior and shown on one colour scale, so the predicted and
    the real change can be compared by eye; the numbers are computed where the registered
    follow-up covers the prior's canvas.

    Attributes:
        registered_followup: float32 ``(S, S)``, the follow-up after the affine registration
            (0 where it does not reach).
        delta_real: registered follow-up minus prior (0 outside the coverage).
        delta_counterfactual: counterfactual minus prior.
        delta_limit: one symmetric colour limit for both deltas.
        real_rgb: ``delta_real`` overlaid on the prior, uint8 ``(S, S, 3)``.
        counterfactual_rgb: ``delta_counterfactual`` overlaid on the prior.
        psnr: counterfactual vs registered follow-up, dB, inside the coverage.
        ssim: the same pair's mean SSIM inside the coverage.
        ncc: normalised cross-correlation of the prior and the registered follow-up (how well
            the registration fits; 1 is perfect).
        delta_correlation: Pearson r of the two deltas inside the coverage (``nan`` when either
            is constant).
        dice: structure -> Dice of the counterfactual's and the follow-up's masks inside the
            coverage; ``{}`` without a segmenter.
        coverage: bool ``(S, S)``: where the registered follow-up has pixels.
        ncc_before: the same correlation before registration.
        notes: plain-language remarks.
    """

    registered_followup: np.ndarray
    delta_real: np.ndarray
    delta_counterfactual: np.ndarray
    delta_limit: float
    real_rgb: np.ndarray
    counterfactual_rgb: np.ndarray
    psnr: float
    ssim: float
    ncc: float
    delta_correlation: float
    dice: dict[str, float]
    coverage: np.ndarray | None = None
    ncc_before: float | None = None
    notes: tuple[str, ...] = ()

    def metrics(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays), numbers rounded; undefined values are ``None``."""
        return {
            "psnr_db": _number(self.psnr),
            "ssim": _number(self.ssim),
            "registration_ncc": _number(self.ncc),
            "registration_ncc_before": _number(self.ncc_before),
            "delta_correlation": _number(self.delta_correlation),
            "delta_limit": _number(self.delta_limit),
            "coverage": _number(float(self.coverage.mean())) if self.coverage is not None else None,
            "dice": {name: _number(v) for name, v in self.dice.items()},
            "dice_mean": _number(float(np.mean(list(self.dice.values())))) if self.dice else None,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# The service


def structure_key(name: str) -> str:
    """A structure name as the segmenters spell it: ``"Right lung"`` -> ``"right_lung"``."""
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _describe(spec: Any) -> str:
    return "auto" if spec == "auto" else os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else type(spec).__name__


def _pair(prior: Any, counterfactual: Any) -> tuple[np.ndarray, np.ndarray]:
    """The prior and the counterfactual as float32 ``(S, S)`` on one grid."""
    pr = as_unit_image(prior, "prior")
    cf = as_unit_image(counterfactual, "counterfactual")
    if pr.shape != cf.shape:
        raise InputError(
            f"The prior {pr.shape[1]}x{pr.shape[0]} and the counterfactual {cf.shape[1]}x{cf.shape[0]} are on "
            "different grids; pass Counterfactual.prior and Counterfactual.image (both on the model's canvas)"
        )
    if pr.shape[0] != pr.shape[1]:
        raise InputError(
            f"The analysis works on the model's square canvas, got {pr.shape[1]}x{pr.shape[0]}; pass "
            "Counterfactual.prior and Counterfactual.image, or letterbox with engine.io.to_square"
        )
    return pr, cf


def _limit(*deltas: np.ndarray) -> float:
    """One symmetric colour limit for several deltas: a high percentile of the changed pixels."""
    from engine.analysis.delta import MIN_LIMIT, symmetric_limit

    values = np.concatenate([np.asarray(d, np.float32).ravel() for d in deltas])
    changed = values[values != 0]
    if not changed.size:
        return MIN_LIMIT
    return symmetric_limit(changed, DELTA_LIMIT_PERCENTILE)


class Analyst:
    """Loads the pathology classifier and anatomy segmenter once (lazily, thread-safe with a lock)
    and analyses edits.

    Args:
        classifier: ``"auto"`` (torchxrayvision's DenseNet when its weights are present, else the
            bundled small classifier), ``"xrv"``/``"xrv:WEIGHTS"``, a small-classifier folder, a
            loaded :class:`~engine.analysis.classifier.Classifier`, or None to leave it out.
        segmenter: ``"auto"`` (torchxrayvision's PSPNet when present, else the bundled small
            segmenter), ``"xrv"``, a small-segmenter folder, a loaded
            :class:`~engine.analysis.segmentation.Segmenter`, or None to leave it out.
        device: where the networks run (``cpu``, ``cuda``); ignored for loaded ones.

    Nothing is loaded until a model is first needed (:meth:`analyse`, :meth:`status`,
    :attr:`findings`, ...). A model that fails to load is left out, with the reason in
    :meth:`status` and in every result's ``notes``; it is not retried.
    """

    def __init__(self, classifier: str | os.PathLike[str] | Classifier | None = "auto",
                 segmenter: str | os.PathLike[str] | Segmenter | None = "auto", device: str = "cpu") -> None:
        self._specs = {"classifier": classifier, "segmenter": segmenter}
        self.device = str(device)
        self._lock = threading.RLock()
        self._models: dict[str, Any] = {}
        self._status: dict[str, str] = {}
        self._masks: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()

    # -- loading -------------------------------------------------------------------------------

    def _model(self, kind: str) -> Any:
        """The classifier or segmenter (loaded on first call), or None with the reason in status."""
        with self._lock:
            if kind not in self._status:
                self._models[kind], self._status[kind] = self._load(kind)
            return self._models[kind]

    def _load(self, kind: str) -> tuple[Any, str]:
        spec = self._specs[kind]
        if spec is None:
            return None, f"no {kind}: turned off"
        try:
            if kind == "classifier":
                from engine.analysis.classifier import Classifier, load_classifier

                base, loader = Classifier, load_classifier
            else:
                from engine.analysis.segmentation import Segmenter, load_segmenter

                base, loader = Segmenter, load_segmenter
            if isinstance(spec, base):
                model = spec
            elif isinstance(spec, (str, os.PathLike)):
                model = loader(os.fspath(spec), device=self.device)
            else:
                raise InputError(f"expected 'auto', a model folder or a loaded {kind}, got {type(spec).__name__}")
        except Exception as exc:  # a missing or broken model degrades the analysis, never stops it
            log.warning("analysis %s %s could not be loaded: %s", kind, _describe(spec), exc)
            return None, f"no {kind}: {_describe(spec)} could not be loaded ({exc})"
        return model, f"{model.name} on {model.device}"

    @property
    def classifier(self) -> Classifier | None:
        """The pathology classifier in use (loads it), or None."""
        return self._model("classifier")

    @property
    def segmenter(self) -> Segmenter | None:
        """The anatomy segmenter in use (loads it), or None."""
        return self._model("segmenter")

    @property
    def findings(self) -> tuple[str, ...]:
        """The classifier's findings as it names them (e.g. ``"Pleural Effusion"``); ``()`` if none.

        Any loose spelling of these (``"effusion"``, ``"pleural_effusion"``) is accepted as
        ``analyse(finding=...)``; results use these names.
        """
        model = self.classifier
        return tuple(model.targets) if model is not None else ()

    @property
    def structures(self) -> tuple[str, ...]:
        """The segmenter's structure names (snake_case, the patient's sides); ``()`` if none."""
        model = self.segmenter
        return tuple(model.structures) if model is not None else ()

    def simulated_only(self) -> list[str]:
        """The loaded analysis networks whose cards list simulated training data only (the bundled
        ones): their numbers on a real radiograph are out of distribution."""
        names = []
        for model in (self.classifier, self.segmenter):
            data = getattr(getattr(model, "card", None), "training_data", None)
            if data and all("simulat" in str(d.get("name", "")).lower() for d in data):
                names.append(model.name)
        return names

    def status(self) -> dict[str, str]:
        """Which classifier and segmenter are in use, or why not, in plain words (loads them)."""
        for kind in ("classifier", "segmenter"):
            self._model(kind)
        return {kind: self._status[kind] for kind in ("classifier", "segmenter")}

    def _network_notes(self) -> tuple[str, ...]:
        """What the loaded networks' numbers cannot be trusted for: simulated-only training, else
        each card's own ``limits``."""
        names = self.simulated_only()
        notes = []
        if names:
            notes.append(f"{' and '.join(names)} {'were' if len(names) > 1 else 'was'} trained on simulated "
                         "radiographs only: on a real radiograph the probabilities, attention, anatomy and ratios "
                         "are not reliable.")
        for model in (self.classifier, self.segmenter):
            limits = getattr(getattr(model, "card", None), "limits", "")
            if model is not None and limits and model.name not in names:
                notes.append(f"{model.name}: {limits}")
        return tuple(notes)

    # -- checks --------------------------------------------------------------------------------

    def _finding_name(self, finding: str, classifier: Classifier) -> str:
        """The classifier's name for a loosely spelled finding (InputError listing its findings)."""
        return classifier.targets[classifier.index(finding)]

    def _structure_name(self, structure: str, segmenter: Segmenter) -> str:
        key = structure_key(structure)
        if key not in segmenter.structures:
            raise InputError(
                f"unknown structure {structure!r}; the segmenter knows {', '.join(segmenter.structures)}"
            )
        return key

    # -- analysis ------------------------------------------------------------------------------

    def analyse(self, prior: np.ndarray, counterfactual: np.ndarray, *, finding: str | None = None,
                structure: str | None = None) -> EditAnalysis:
        """Delta, attention, anatomy, probabilities and change metrics of one edit.

        One classifier pass and one Grad-CAM pass over the two images, one segmenter pass.

        Args:
            prior: ``(S, S)`` float32 in [0, 1], the prior as the model saw it.
            counterfactual: ``(S, S)`` on the same grid.
            finding: the finding to show attention for (loosely spelled; see :attr:`findings`);
                None picks the one whose probability changed most.
            structure: target structure of the change metrics (see :attr:`structures`), e.g.
                ``"right_lung"`` for a right-sided effusion; None leaves them out.

        Raises:
            InputError: bad or mismatched images, or a finding/structure the loaded models do
                not know (the message lists the known ones).
        """
        from engine.analysis import render
        from engine.analysis.delta import delta_map, structure_stats

        pr, cf = _pair(prior, counterfactual)
        notes: list[str] = []
        classifier, segmenter = self.classifier, self.segmenter
        finding_name = structure_name = None
        if finding is not None:
            if classifier is None:
                notes.append(f"Attention for {finding!r} is not shown: {self._status['classifier']}.")
            else:
                finding_name = self._finding_name(finding, classifier)
        if structure is not None:
            if segmenter is None:
                notes.append(f"Change inside {structure!r} is not measured: {self._status['segmenter']}.")
            else:
                structure_name = self._structure_name(structure, segmenter)

        dmap = delta_map(cf, pr, limit_percentile=DELTA_LIMIT_PERCENTILE)
        delta = dmap.delta
        delta_rgb = render.to_uint8(render.delta_overlay(pr, delta, dmap.limit))

        probabilities: dict[str, tuple[float, float]] = {}
        attention_rgb = attention_prior_rgb = None
        if classifier is None:
            notes.append(f"No probabilities or attention: {self._status['classifier']}.")
        else:
            probs, cams, finding_name = self._classify(classifier, pr, cf, finding_name)
            probabilities = {t: (float(probs[0, i]), float(probs[1, i])) for i, t in enumerate(classifier.targets)}
            if finding is None:
                before, after = probabilities[finding_name]
                why = ("whose probability changed most" if abs(after - before) >= UNCHANGED
                       else "the most likely finding (no probability changed)")
                notes.append(f"Attention is shown for {finding_name}, {why}: {before:.2f} -> {after:.2f}.")
            attention_prior_rgb = render.to_uint8(render.heatmap_overlay(pr, cams[0]))
            attention_rgb = render.to_uint8(render.heatmap_overlay(cf, cams[1]))

        dice: dict[str, float] = {}
        segmentation_rgb = None
        change_inside = change_outside = change_fraction = None
        ctr = None
        if segmenter is None:
            notes.append(f"No anatomy overlay or Dice: {self._status['segmenter']}.")
        else:
            from engine.analysis.segmentation import cardiothoracic_ratio, mask_dice

            prior_masks, cf_masks = self._segment(segmenter, pr, cf)
            dice = mask_dice(prior_masks, cf_masks)
            if {"heart", "left_lung", "right_lung"} <= set(segmenter.structures):
                ctr = (cardiothoracic_ratio(prior_masks), cardiothoracic_ratio(cf_masks))
            segmentation_rgb = render.to_uint8(render.mask_overlay(cf, cf_masks))
            if structure_name is not None:
                # the structure's extent on either image: a heart that grew counts where it grew to
                region = prior_masks[structure_name] | cf_masks[structure_name]
                if not region.any():
                    notes.append(f"The segmenter found no {structure_name} on these images; change inside it "
                                 "is not measured.")
                else:
                    stats = structure_stats(delta, {"inside": region, "outside": ~region})
                    change_inside = stats["inside"].mean_abs
                    change_outside = stats["outside"].mean_abs if stats["outside"].pixels else 0.0
                    change_fraction = stats["inside"].share_of_change

        return EditAnalysis(
            delta=delta, delta_limit=dmap.limit, delta_rgb=delta_rgb, finding=finding_name,
            attention_rgb=attention_rgb, attention_prior_rgb=attention_prior_rgb,
            segmentation_rgb=segmentation_rgb, probabilities=probabilities, dice=dice,
            structure=structure_name, change_inside=change_inside, change_outside=change_outside,
            change_fraction_inside=change_fraction, cardiothoracic_ratio=ctr,
            notes=tuple(notes) + self._network_notes(),
        )

    def _classify(self, classifier: Classifier, prior: np.ndarray, counterfactual: np.ndarray,
                  finding: str | None) -> tuple[np.ndarray, np.ndarray, str]:
        """Probabilities ``(2, T)``, jointly normalised Grad-CAM ``(2, S, S)`` and the finding shown."""
        import torch

        from engine.analysis.attention import grad_cam

        batch = np.stack([prior, counterfactual])[:, None]  # (2, 1, S, S)
        # Grad-CAM needs gradients: callers (the engine) may sit in no_grad or inference mode
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            probs = classifier.predict(batch)
            if finding is None:
                finding = classifier.targets[_most_changed(probs)]
            cams = grad_cam(classifier, batch, finding, normalize=False).numpy()
        cams = cams / max(float(cams.max()), 1e-12)  # one scale: a finding that appears shows brighter
        return probs, cams, finding

    def _segment(self, segmenter: Segmenter, *images: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Masks of each image (read-only arrays), the ones not segmented lately in one batched pass.

        The last :data:`SEGMENTATION_CACHE` images' masks are kept by content: every edit of a film
        analyses the same prior, so its masks are made once, not once per edit."""
        import hashlib

        import torch

        keys = [(id(segmenter), img.shape, str(img.dtype), hashlib.blake2b(np.ascontiguousarray(img).tobytes(),
                                                                          digest_size=16).digest())
                for img in images]
        with self._lock, torch.inference_mode(False):
            todo = [k for k, key in enumerate(keys) if key not in self._masks]
            if todo:
                for k, masks in zip(todo, segmenter.segment(np.stack([images[k] for k in todo])[:, None])):
                    for mask in masks.values():
                        mask.flags.writeable = False
                    self._masks[keys[k]] = masks
            for key in keys:
                self._masks.move_to_end(key)
            out = [dict(self._masks[key]) for key in keys]
            while len(self._masks) > SEGMENTATION_CACHE:
                self._masks.popitem(last=False)
            return out

    def structure_mask(self, image: np.ndarray, names: str | Sequence[str]) -> np.ndarray:
        """The union of named anatomical structures on ``image``, as a bool ``(H, W)`` mask.

        Args:
            image: ``(H, W)`` float32 in [0, 1].
            names: one structure or several, e.g. ``"right_lung"`` (see :attr:`structures`).

        Raises:
            InputError: no segmenter is available, a bad image, or an unknown structure (the
                message lists the known ones).
        """
        from engine.regions import structure_mask

        img = as_unit_image(image)
        segmenter = self.segmenter
        if segmenter is None:
            raise InputError(f"Structure masks need an anatomy segmenter; {self._status['segmenter']}")
        wanted = [names] if isinstance(names, str) else list(names)
        if not wanted:
            raise InputError(f"Name at least one structure: {', '.join(segmenter.structures)}")
        with self._lock:
            return structure_mask(segmenter, img, wanted)

    # -- follow-up -----------------------------------------------------------------------------

    def compare_followup(self, prior: np.ndarray, counterfactual: np.ndarray, followup: np.ndarray) -> FollowupComparison:
        """The counterfactual against a real follow-up, registered (affine) onto the prior.

        Args:
            prior: ``(S, S)`` float32 in [0, 1], the prior on the model's canvas.
            counterfactual: ``(S, S)`` on the same grid.
            followup: the real follow-up, any size, float in [0, 1] (or uint8/uint16); letterboxed
                onto the prior's canvas first (:func:`engine.io.to_square`) unless already on it.

        Raises:
            InputError: bad or mismatched images, or a canvas too small to register (< 32 px).
        """
        from engine.analysis import render
        from engine.analysis.metrics import pearson, psnr, ssim
        from engine.io import to_square

        # The registration the trainer filters its pairs with (SimpleITK; no torch at import);
        # imported here so that importing this module stays cheap.
        try:
            from engine.registration import RegistrationParams, register, resample
        except ImportError as exc:
            raise InputError(f"Comparing with a follow-up needs SimpleITK: pip install SimpleITK ({exc})") from exc

        pr, cf = _pair(prior, counterfactual)
        size = pr.shape[0]
        if size < 32:
            raise InputError(f"The canvas is {size} px; registration needs at least 32 px")
        fu = as_unit_image(followup, "follow-up")
        notes: list[str] = []
        if fu.shape != pr.shape:
            notes.append(f"The follow-up ({fu.shape[1]}x{fu.shape[0]}) was letterboxed onto the {size} px canvas.")
            fu, _ = to_square(fu, size)

        result = register(pr, fu, RegistrationParams(transform="affine", size=size))
        registered = np.clip(resample(fu, result, pr.shape), 0.0, 1.0).astype(np.float32)
        coverage = resample(np.ones_like(fu), result, pr.shape) > 0.5
        if coverage.mean() < 0.5:
            notes.append(f"The registered follow-up covers only {coverage.mean():.0%} of the prior; "
                         "check that it shows the same patient and view.")
        if result.score < 0.9:
            notes.append(f"The registration fits loosely (NCC {result.score:.2f}); differences may be misalignment.")

        delta_cf = (cf - pr).astype(np.float32)
        delta_real = np.where(coverage, registered - pr, 0.0).astype(np.float32)
        limit = _limit(delta_real[coverage], delta_cf[coverage])
        real_rgb = render.to_uint8(render.delta_overlay(pr, delta_real, limit))
        cf_rgb = render.to_uint8(render.delta_overlay(pr, delta_cf, limit))
        if coverage.any():
            quality = (psnr(cf, registered, coverage), ssim(cf, registered, coverage),
                       pearson(delta_real[coverage], delta_cf[coverage]))
        else:
            quality = (float("nan"),) * 3

        dice: dict[str, float] = {}
        segmenter = self.segmenter
        if segmenter is None:
            notes.append(f"No anatomy Dice: {self._status['segmenter']}.")
        else:
            from engine.analysis.segmentation import mask_dice

            cf_masks, fu_masks = self._segment(segmenter, cf, registered)
            dice = mask_dice(_within(cf_masks, coverage), _within(fu_masks, coverage))

        return FollowupComparison(
            registered_followup=registered, delta_real=delta_real, delta_counterfactual=delta_cf,
            delta_limit=limit, real_rgb=real_rgb, counterfactual_rgb=cf_rgb, psnr=quality[0],
            ssim=quality[1], ncc=result.score, delta_correlation=quality[2], dice=dice,
            coverage=coverage, ncc_before=result.score_before, notes=tuple(notes),
        )


def _most_changed(probs: np.ndarray) -> int:
    """The finding whose probability changed most; the most likely one when none changed."""
    change = np.abs(probs[1] - probs[0])
    return int(np.argmax(change)) if change.max() >= UNCHANGED else int(np.argmax(probs[1]))


def _within(masks: Mapping[str, np.ndarray], region: np.ndarray) -> dict[str, np.ndarray]:
    """Every mask cut to ``region``."""
    return {name: np.asarray(m, bool) & region for name, m in masks.items()}


__all__ = ["Analyst", "EditAnalysis", "FollowupComparison", "structure_key"]
