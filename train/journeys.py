"""Patient journeys: order each patient's studies in time, pair consecutive ones, filter.

BiomedJourney's recipe (MIMIC-CXR): for every patient, sort the studies by date, take each
two consecutive studies as a (prior, follow-up) pair, keep pairs where at least one finding
is present, describe the progression from the two reports, register the follow-up to the
prior and drop pairs that do not register well. Registration lives in
:mod:`train.registration`; :func:`apply_registration` applies its scores here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import date

from engine.errors import InputError
from train.manifest import CHEXPERT_LABELS, ImageRecord, PairRecord
from train.reports import Finding, LLMDescriber, LLMError, describe_change, findings_from_text

log = logging.getLogger(__name__)

REQUIRE_FINDING = ("any", "followup", "none")
FINDING_LABELS = tuple(k for k in CHEXPERT_LABELS if k != "No Finding")


def order_studies(images: Iterable[ImageRecord]) -> dict[str, list[list[ImageRecord]]]:
    """Groups images by patient and study, studies sorted in time.

    Studies sort by ``(study_date, order, study_id)``; a missing date sorts first, so give
    either dates or orders consistently within one patient.

    Returns:
        patient_id -> list of studies (each a list of its images), earliest first.
    """
    studies: dict[str, dict[str, list[ImageRecord]]] = {}
    for record in images:
        studies.setdefault(record.patient_id, {}).setdefault(record.study_id, []).append(record)

    def when(study: list[ImageRecord]) -> tuple:
        first = study[0]
        return (first.study_date or "", first.order, first.study_id)

    return {patient: sorted(by_study.values(), key=when) for patient, by_study in studies.items()}


def pick_image(study: Sequence[ImageRecord], views: Sequence[str] = ("PA",)) -> ImageRecord | None:
    """The study's image to pair: the first view in ``views`` order (any view when empty).

    Ties go to the smallest ``image_id`` so the choice is deterministic.
    """
    ranked = sorted(study, key=lambda r: r.image_id)
    if not views:
        return ranked[0] if ranked else None
    for view in views:
        for record in ranked:
            if (record.view or "").upper() == view.upper():
                return record
    return None


def has_finding(labels: dict[str, float | None], *, uncertain_as_positive: bool = True) -> bool:
    """True when any label other than ``No Finding`` is positive (or uncertain, if counted)."""
    return any(labels.get(k) == 1 or (uncertain_as_positive and labels.get(k) == -1) for k in FINDING_LABELS)


def study_findings(record: ImageRecord) -> dict[str, Finding]:
    """A study's findings for descriptions: the record's labels, with laterality and size read
    from its report where the report mentions them."""
    from_text = findings_from_text(record.extra.get("report_full") or record.report) if (record.report or record.extra.get("report_full")) else {}
    out: dict[str, Finding] = {}
    for label in CHEXPERT_LABELS:
        value = record.labels.get(label)
        detail = from_text.get(label)
        if value is None and detail is None:
            continue
        state = value if value is not None else detail.state
        out[label] = Finding(state, detail.laterality if detail else None, detail.size if detail else None)
    return out


def patient_split(patient_id: str, *, validate: float = 0.05, test: float = 0.05) -> str:
    """A deterministic split for a patient (hash of the id), so no patient spans two splits."""
    u = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) / 0x100000000
    return "test" if u < test else ("validate" if u < test + validate else "train")


def _days(a: str | None, b: str | None) -> int | None:
    if not a or not b:
        return None
    return (date.fromisoformat(b) - date.fromisoformat(a)).days


def make_pairs(
    images: Iterable[ImageRecord],
    *,
    views: Sequence[str] = ("PA",),
    require_finding: str = "any",
    max_days: int | None = None,
    describer: LLMDescriber | None = None,
    split: Callable[[str], str] | None = None,
) -> list[PairRecord]:
    """Consecutive same-patient study pairs, filtered and described.

    Args:
        images: image records (any sources).
        views: view preference per study (paper: ``("PA",)``); a study without one is skipped,
            so the pair bridges to the next study that has one.
        require_finding: ``any`` keeps pairs where the prior or the follow-up has a finding
            (paper), ``followup`` needs it in the follow-up, ``none`` keeps every pair
            (sources without labels, e.g. Hannover).
        max_days: drop pairs further apart than this (when both dates are known).
        describer: an LLM describer for pairs where both studies have reports; the rule-based
            description is used without one, and when it fails.
        split: patient_id -> split; default: the follow-up image's ``extra["split"]``, else
            :func:`patient_split`.

    Returns:
        Pair records in patient, then time order.

    Raises:
        InputError: unknown ``require_finding``.
    """
    if require_finding not in REQUIRE_FINDING:
        raise InputError(f"require_finding must be one of {', '.join(REQUIRE_FINDING)}, not {require_finding!r}")
    pairs: list[PairRecord] = []
    counts = {"pairs": 0, "no_finding": 0, "too_far": 0, "llm_failed": 0}
    for patient, studies in sorted(order_studies(images).items()):
        chosen = [img for img in (pick_image(s, views) for s in studies) if img is not None]
        for prior, followup in zip(chosen, chosen[1:]):
            counts["pairs"] += 1
            days = _days(prior.study_date, followup.study_date)
            if max_days is not None and days is not None and days > max_days:
                counts["too_far"] += 1
                continue
            if require_finding == "any" and not (has_finding(prior.labels) or has_finding(followup.labels)):
                counts["no_finding"] += 1
                continue
            if require_finding == "followup" and not has_finding(followup.labels):
                counts["no_finding"] += 1
                continue
            description = describe_pair(prior, followup, describer, counts)
            pair_split = split(patient) if split else followup.extra.get("split") or patient_split(patient)
            pairs.append(PairRecord(
                pair_id=f"{patient}:{prior.study_id}:{followup.study_id}".replace("/", "_"),
                patient_id=patient,
                prior_id=prior.image_id,
                followup_id=followup.image_id,
                prior_path=prior.path,
                followup_path=followup.path,
                description=description,
                registration_score=None,
                split=pair_split,
                counterfactual_path=None,
                labels_prior=dict(prior.labels),
                labels_followup=dict(followup.labels),
                extra={"source": followup.source, "interval_days": days,
                       "prior_study": prior.study_id, "followup_study": followup.study_id,
                       "prior_report": prior.report, "followup_report": followup.report},
            ))
    log.info("pairing: %(pairs)d consecutive pairs, %(no_finding)d without findings dropped, "
             "%(too_far)d too far apart dropped, %(llm_failed)d LLM failures (rule-based used)", counts)
    return pairs


def describe_pair(prior: ImageRecord, followup: ImageRecord, describer: LLMDescriber | None = None,
                  counts: dict[str, int] | None = None) -> str:
    """The progression description of one pair: the LLM's when configured and both studies have
    reports, else the rule-based one; empty when neither study has labels or a report."""
    if describer is not None and prior.report and followup.report:
        try:
            return describer.describe(prior.extra.get("report_full") or prior.report,
                                      followup.extra.get("report_full") or followup.report)
        except LLMError as exc:
            log.info("LLM description failed for %s -> %s: %s", prior.image_id, followup.image_id, exc)
            if counts is not None:
                counts["llm_failed"] += 1
    a, b = study_findings(prior), study_findings(followup)
    if not a and not b:
        return ""
    return describe_change(a, b)


def apply_registration(pairs: Sequence[PairRecord], results: Sequence, *, min_score: float | None) -> list[PairRecord]:
    """Stores registration results in the pairs and drops those scoring under ``min_score``.

    Args:
        pairs: the pairs, in the order they were registered.
        results: one :class:`engine.registration.RegistrationResult` per pair.
        min_score: threshold on the NCC score (None keeps all).

    Returns:
        The kept pairs, with ``registration_score`` and ``extra["registration"]`` filled.
    """
    if len(pairs) != len(results):
        raise ValueError(f"{len(pairs)} pairs but {len(results)} registration results")
    kept = []
    for pair, result in zip(pairs, results):
        if min_score is not None and result.score < min_score:
            continue
        kept.append(replace(pair, registration_score=round(float(result.score), 5),
                            extra={**pair.extra, "registration": result.to_dict()}))
    return kept
