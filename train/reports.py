"""Radiology reports: sections, findings, and progression descriptions between two studies.

Three pieces, used by the sources and by :mod:`train.journeys`:

* :func:`extract_sections` splits a free-text report (MIMIC-CXR layout: ``FINDINGS:``,
  ``IMPRESSION:`` headers at line starts) into named sections; :func:`report_text` gives the
  Findings + Impression text a model is trained on (BiomedJourney stage 1).
* :func:`findings_from_text` is a small rule-based labeller (keyword + negation/uncertainty
  cues, CheXpert's eight labels used here) that also reads laterality and size words.
* :func:`describe_change` turns two studies' labels/findings into a progression description
  ("new moderate right pleural effusion, heart size unchanged"), always available;
  :class:`LLMDescriber` asks any OpenAI-compatible endpoint instead (BiomedJourney used GPT-4),
  with a JSONL cache and retries, and is never required.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from train.manifest import CHEXPERT_LABELS

log = logging.getLogger(__name__)

# -- sections ------------------------------------------------------------------------------

_SECTION_ALIASES = {
    "findings": "findings", "finding": "findings", "findings and impression": "findings",
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "summary": "impression",
    "indication": "indication", "indications": "indication", "history": "indication",
    "clinical history": "indication", "clinical information": "indication", "reason for exam": "indication",
    "comparison": "comparison", "comparisons": "comparison",
    "technique": "technique", "examination": "examination", "exam": "examination",
    "notification": "notification", "recommendation": "recommendation",
    "recommendations": "recommendation", "wet read": "wet_read",
}
# An upper-case header at the start of a line, ended by a colon: "FINDINGS:", "CLINICAL HISTORY:".
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{1,40}?)[ \t]*:", re.MULTILINE)


def extract_sections(text: str) -> dict[str, str]:
    """Splits a report into sections keyed by normalised header name.

    Headers are upper-case words at the start of a line followed by a colon (the MIMIC-CXR
    and Indiana layouts). Known synonyms are merged (``IMPRESSIONS``/``CONCLUSION`` ->
    ``impression``); other headers keep their lower-cased name; text before the first header
    is ``preamble``. Whitespace inside a section is collapsed to single spaces.

    Args:
        text: the full report.

    Returns:
        Section name -> text; repeated sections are joined with a space.
    """
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    starts = [(m.start(), m.end(), m.group(1).strip().lower()) for m in matches]
    pieces = [("preamble", 0, starts[0][0] if starts else len(text))]
    for i, (_, end, name) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        pieces.append((_SECTION_ALIASES.get(name, name.replace(" ", "_")), end, stop))
    for name, start, stop in pieces:
        body = " ".join(text[start:stop].split())
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def report_text(text: str, *, max_chars: int = 1000) -> str:
    """The training text of a report: Findings then Impression (BiomedJourney stage 1).

    Falls back to the whole report (minus its preamble) when neither section exists.
    """
    sections = extract_sections(text)
    parts = [sections[k] for k in ("findings", "impression") if sections.get(k)]
    if not parts:
        parts = [v for k, v in sections.items() if k not in ("preamble", "indication", "comparison", "technique", "examination")]
    return " ".join(parts)[:max_chars].strip()


def indiana_reports(tgz: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Reads the Indiana University reports (``NLMCXR_reports.tgz``, e.g. the copy in torchxrayvision).

    Yields:
        ``(report_id, sections)`` with lower-case section names (comparison, indication,
        findings, impression) and whitespace collapsed; empty sections are left out.
    """
    with tarfile.open(tgz) as archive:
        for member in archive:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(archive.extractfile(member).read())
            sections = {}
            for node in root.iter("AbstractText"):
                body = " ".join((node.text or "").split())
                if body:
                    sections[node.get("Label", "").lower()] = body
            yield Path(member.name).stem, sections


# -- findings --------------------------------------------------------------------------------

_TERMS: dict[str, str] = {
    "Atelectasis": r"atelecta\w*",
    "Cardiomegaly": r"cardiomegaly|(?:heart|cardiac silhouette|cardiac size|heart size)\s+(?:is\s+|are\s+)?(?:\w+\s+)?enlarged|enlarge\w* (?:heart|cardiac silhouette)",
    "Consolidation": r"consolidat\w*",
    "Edema": r"edema|oedema",
    "Pleural Effusion": r"effusion\w*",
    "Pneumothorax": r"pneumothora\w*",
    "Support Devices": r"\b(?:tube|line|catheter|pacemaker|pacer|icd|wires?|stent|drain|port|picc|sternotomy|clips?|device)s?\b",
}
_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|resolved|resolution of|removed|"
    r"rule out|no evidence of|no new|interval removal of)\b"
)
_UNCERTAIN = re.compile(
    r"\b(?:may|might|possible|possibly|probable|probably|cannot be excluded|can not be excluded|could|"
    r"likely|suggest\w*|question\w*|versus|vs|concern for|suspicious for|equivocal)\b"
)
_POST_NEGATION = re.compile(r"\b(?:removed|resolved|withdrawn|no longer)\b")
_LATERALITY = re.compile(r"\b(bilateral|both|right|left)\b")
_SIZE_WORDS = ("trace", "minimal", "small", "mild", "moderate", "large", "severe", "massive")
_SIZE = re.compile(r"\b(" + "|".join(_SIZE_WORDS) + r")\b")
_CLAUSE = re.compile(r"[.;]\s+|\n+|\bbut\b|\bhowever\b|\bwhich\b")


@dataclass(frozen=True)
class Finding:
    """One label as read from a report.

    Attributes:
        state: 1 present, 0 absent (negated), -1 uncertain.
        laterality: ``right``, ``left``, ``bilateral`` or None.
        size: one of ``trace .. massive`` or None.
    """

    state: float
    laterality: str | None = None
    size: str | None = None


def findings_from_text(text: str) -> dict[str, Finding]:
    """Rule-based labels for CheXpert's eight labels from one report's text.

    A label mentioned in a clause with a negation cue before it is 0; with an uncertainty cue,
    -1; otherwise 1. A positive mention wins over uncertain, which wins over negative.
    ``No Finding`` is 1 when no other label is positive or uncertain. This is a deliberately
    small labeller (cf. CheXpert's NegBio rules); use the dataset's own labels when there are some.

    Returns:
        Label -> :class:`Finding` for every label mentioned (plus ``No Finding``).
    """
    out: dict[str, Finding] = {}
    for clause in _CLAUSE.split(text.lower()):
        for label, pattern in _TERMS.items():
            for match in re.finditer(pattern, clause):
                before = clause[: match.start()]
                if label == "Support Devices" and re.search(r"\b(?:septal|kerley|pleural|midline|costophrenic)\s*$", before):
                    continue  # "septal lines", "pleural line": anatomy, not devices
                if _NEGATION.search(before) or _POST_NEGATION.search(clause[match.end():match.end() + 40]):
                    state = 0.0
                elif _UNCERTAIN.search(clause):
                    state = -1.0
                else:
                    state = 1.0
                lat = _LATERALITY.search(clause)
                size = _SIZE.search(before[-40:])
                laterality = None if lat is None else ("bilateral" if lat.group(1) in ("bilateral", "both") else lat.group(1))
                found = Finding(state, laterality, size.group(1) if size else None)
                old = out.get(label)
                if old is None or _rank(found.state) > _rank(old.state):
                    out[label] = found
    positive = any(f.state != 0 for k, f in out.items() if k != "Support Devices")
    out["No Finding"] = Finding(0.0 if positive else 1.0)
    return out


def _rank(state: float) -> int:
    return {0.0: 0, -1.0: 1, 1.0: 2}[state]


def labels_from_findings(findings: Mapping[str, Finding]) -> dict[str, float | None]:
    """CheXpert-style label dict (1, 0, -1, None for unmentioned) from :func:`findings_from_text`."""
    return {k: (findings[k].state if k in findings else None) for k in CHEXPERT_LABELS}


# -- descriptions ---------------------------------------------------------------------------

_NAMES = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Pleural Effusion": "pleural effusion",
    "Pneumothorax": "pneumothorax",
    "Support Devices": "support devices",
}


def _as_finding(value: Finding | float | None) -> Finding | None:
    if value is None or isinstance(value, Finding):
        return value
    return Finding(float(value))


def _phrase(label: str, f: Finding, *, with_size: bool = True) -> str:
    words = []
    if with_size and f.size:
        words.append(f.size)
    if f.laterality and label in ("Pleural Effusion", "Pneumothorax", "Atelectasis", "Consolidation"):
        words.append(f.laterality)
    words.append(_NAMES[label])
    return " ".join(words)


def describe_change(
    prior: Mapping[str, Finding | float | None],
    followup: Mapping[str, Finding | float | None],
    *,
    uncertain_as: float = 1.0,
) -> str:
    """A progression description from two studies' findings (rule-based, always available).

    Args:
        prior: label -> :class:`Finding` or CheXpert value (1, 0, -1, None) of the earlier study.
        followup: the same for the later study.
        uncertain_as: how an uncertain (-1) label counts (1: present, 0: absent).

    Returns:
        e.g. ``"new moderate right pleural effusion, heart size unchanged"``; ``"no significant
        interval change"`` when nothing differs.
    """
    parts: list[str] = []
    unchanged: list[str] = []
    for label in _NAMES:
        a, b = _as_finding(prior.get(label)), _as_finding(followup.get(label))
        present_a = a is not None and (a.state == 1 or (a.state == -1 and uncertain_as == 1))
        present_b = b is not None and (b.state == 1 or (b.state == -1 and uncertain_as == 1))
        if present_b and not present_a:
            parts.append("new " + (_phrase(label, b) if label != "Support Devices" else "support device"))
        elif present_a and not present_b and b is not None:  # absent only when said so
            parts.append(("removed " if label == "Support Devices" else "resolved ") + _phrase(label, a, with_size=False))
        elif present_a and present_b:
            order_a = _SIZE_WORDS.index(a.size) if a.size else None
            order_b = _SIZE_WORDS.index(b.size) if b.size else None
            if order_a is not None and order_b is not None and order_a != order_b:
                trend = "increasing" if order_b > order_a else "decreasing"
                parts.append(f"{trend} {_phrase(label, b, with_size=False)}, now {b.size}")
            else:
                unchanged.append("heart size" if label == "Cardiomegaly" else _phrase(label, b, with_size=False))
    if not parts:
        return "no significant interval change"
    if unchanged:
        parts.append(" and ".join(unchanged) + " unchanged")
    return ", ".join(parts)


def swap_laterality(text: str) -> str:
    """Swaps ``right`` and ``left`` (keeping case), for horizontally flipped images.

    A flipped "right pleural effusion" is a left one.
    """
    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        new = {"right": "left", "left": "right"}[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    return re.sub(r"\b(?:right|left)\b", repl, text, flags=re.IGNORECASE)


# -- optional LLM descriptions ------------------------------------------------------------

LLM_PROMPT = (
    "You are given two chest X-ray reports of the same patient, an earlier (prior) one and a "
    "later (follow-up) one. Write a concise description of how the patient's chest X-ray "
    "changed from the prior to the follow-up study, as a short instruction such as "
    "\"new moderate right pleural effusion, heart size unchanged\". Mention only findings that "
    "appear, resolve, worsen or improve, with their location and size when the reports give "
    "them; say \"no significant interval change\" if nothing changed. Do not mention the "
    "reports, dates, comparisons or recommendations. Answer with the description only.\n\n"
    "PRIOR REPORT:\n{prior}\n\nFOLLOW-UP REPORT:\n{followup}"
)


class LLMError(RuntimeError):
    """The endpoint failed after all retries (the caller falls back to rule-based text)."""


class LLMDescriber:
    """Progression descriptions from any OpenAI-compatible chat endpoint, cached to JSONL.

    BiomedJourney summarised the two reports of a pair with GPT-4; this sends the same kind of
    request (:data:`LLM_PROMPT`, a paraphrase of the paper's instruction) to
    ``{base_url}/chat/completions``. Answers are appended to ``cache_path`` (one JSON object per
    line, keyed by model + prompt hash), so a rerun costs nothing.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``; default ``$CXR_LLM_URL``.
        model: model name; default ``$CXR_LLM_MODEL``.
        api_key: bearer token; default ``$CXR_LLM_API_KEY`` (optional for local servers).
        cache_path: JSONL cache file.
        retries: attempts after the first on timeouts, 429 and 5xx.
        timeout: seconds per request.
        backoff: first wait between attempts in seconds (doubles each time).

    Raises:
        ValueError: no URL or model given and none in the environment.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        cache_path: str | os.PathLike[str] | None = None,
        retries: int = 3,
        timeout: float = 60.0,
        backoff: float = 1.0,
    ) -> None:
        self.base_url = (base_url or os.environ.get("CXR_LLM_URL", "")).rstrip("/")
        self.model = model or os.environ.get("CXR_LLM_MODEL", "")
        if not self.base_url or not self.model:
            raise ValueError(
                "LLM descriptions need an endpoint and a model: pass --llm-url/--llm-model or set "
                "CXR_LLM_URL and CXR_LLM_MODEL (any OpenAI-compatible server), or use rule-based ones"
            )
        self.api_key = api_key if api_key is not None else os.environ.get("CXR_LLM_API_KEY")
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, str] = {}
        if self.cache_path and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._cache[row["key"]] = row["description"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a crash
        self.requests = 0

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.model}\0{prompt}".encode()).hexdigest()

    def describe(self, prior_report: str, followup_report: str) -> str:
        """The progression description for one pair (cached).

        Raises:
            LLMError: every attempt failed, or the answer was empty.
        """
        prompt = LLM_PROMPT.format(prior=prior_report.strip(), followup=followup_report.strip())
        key = self._key(prompt)
        if key in self._cache:
            return self._cache[key]
        text = self._ask(prompt)
        self._cache[key] = text
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "model": self.model, "description": text}) + "\n")
        return text

    def _ask(self, prompt: str) -> str:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        wait = self.backoff
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            self.requests += 1
            request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read().decode("utf-8"))
                text = " ".join(str(data["choices"][0]["message"]["content"]).split()).strip().strip('"')
                if not text:
                    raise LLMError("the endpoint returned an empty description")
                return text
            except urllib.error.HTTPError as exc:
                last = exc
                if exc.code != 429 and exc.code < 500:
                    break  # 4xx other than rate limits will not get better
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                last = exc
            log.info("LLM request %d failed: %s", attempt + 1, last)
        raise LLMError(f"LLM endpoint {self.base_url} failed after {self.requests} request(s): {last}")
