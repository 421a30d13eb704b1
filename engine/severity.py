"""The severity rule: one documented way a severity setting changes an instruction.

Rule: for every finding named in the instruction that is not negated, the severity word
directly before it (after any "new"/"worsening"/laterality words) is replaced by the chosen
one, or the chosen word is inserted before the laterality word (or before the finding when
there is none). Devices and negated findings ("no pneumothorax", "without support devices",
"pneumothorax has resolved") are left alone, as is everything when the severity is ``none``.

The word used depends on the finding, as radiologists write it:

============================================  ==========  ============  ==========
finding                                       slight      moderate      large
============================================  ==========  ============  ==========
pleural effusion, pneumothorax                small       moderate      large
cardiomegaly, edema, atelectasis,             mild        moderate      severe
consolidation
============================================  ==========  ============  ==========

The result is what the model receives and what the user is shown, word for word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEVERITIES = ("none", "slight", "moderate", "large")

_SIZE_WORDS = {"slight": "small", "moderate": "moderate", "large": "large"}
_GRADE_WORDS = {"slight": "mild", "moderate": "moderate", "large": "severe"}

# finding pattern -> (name, word table). Longer phrases first so "pleural effusion" wins over "effusion".
_FINDINGS: tuple[tuple[str, str, dict[str, str]], ...] = (
    (r"pleural effusions?|effusions?", "effusion", _SIZE_WORDS),
    (r"pneumothora(?:x|ces)", "pneumothorax", _SIZE_WORDS),
    (r"cardiomegaly", "cardiomegaly", _GRADE_WORDS),
    (r"(?:pulmonary |interstitial |alveolar )?edema|oedema", "edema", _GRADE_WORDS),
    (r"atelectasis|atelectases", "atelectasis", _GRADE_WORDS),
    (r"consolidations?|airspace (?:disease|opacity|opacities)", "consolidation", _GRADE_WORDS),
)
_EXISTING = (
    r"trace|tiny|minimal|slight|small|mild|moderate|moderately large|large|severe|marked"
    r"|extensive|massive|significant|substantial"
)
# Laterality and location words that sit between the severity word and the finding.
_LATERALITY = (
    r"(?:right|left|bilateral|right-sided|left-sided)"
    r"(?:\s+(?:upper|middle|lower|mid-lung|basilar|basal|apical|perihilar))?"
    r"(?:\s+(?:lobe|lung|zone|base|apex))?"
    r"|bibasilar|bibasal|basilar|basal|perihilar|lingular"
)
_NEGATION = re.compile(
    r"\b(?:no|without|not|resolved|resolution of|free of|absence of)"
    r"(?:\s+(?:new|definite|evidence of|residual|significant|longer))*\s*$",
    re.IGNORECASE,
)
_RESOLVED_AFTER = re.compile(r"^\s+(?:has |have |is |are )?(?:resolved|cleared|gone|removed)\b", re.I)


def _severity_pattern(finding: str) -> re.Pattern[str]:
    return re.compile(
        rf"(?P<sev>\b(?:{_EXISTING})\s+)?(?P<lat>\b(?:{_LATERALITY})\s+)?"
        rf"(?P<finding>\b(?:{finding})\b)",
        re.IGNORECASE,
    )


_PATTERNS = tuple((_severity_pattern(f), name, words) for f, name, words in _FINDINGS)


@dataclass(frozen=True)
class Mention:
    """One finding named in an instruction.

    Attributes:
        finding: ``effusion``, ``pneumothorax``, ``cardiomegaly``, ``edema``, ``atelectasis`` or
            ``consolidation``.
        side: the patient's ``left`` or ``right``, ``bilateral``, or None (not said).
        negated: "no pneumothorax", "without effusion", "effusion has resolved".
        start: where the mention (with its severity and laterality words) starts in the text.
        end: where it ends.
        laterality: the laterality words as written ("right lower lobe ", with the space), or "".
        phrase: the finding's words as written.
    """

    finding: str
    side: str | None
    negated: bool
    start: int
    end: int
    laterality: str
    phrase: str


def mentions(instruction: str) -> list[Mention]:
    """Every finding named in ``instruction``, in order (a longer phrase wins over a shorter one inside it).

    Example:
        >>> [(m.finding, m.side, m.negated) for m in mentions("new right effusion; no pneumothorax")]
        [('effusion', 'right', False), ('pneumothorax', None, True)]
    """
    found: list[Mention] = []
    for pattern, name, _ in _PATTERNS:
        for m in pattern.finditer(instruction):
            if any(f.start < m.end() and m.start() < f.end for f in found):
                continue  # overlaps a longer finding phrase already found
            lat = m.group("lat") or ""
            side = next((w for w in ("right", "left", "bilateral") if lat.lower().startswith(w)), None)
            if side is None and lat.lower().startswith("bi"):  # bibasilar, bibasal
                side = "bilateral"
            negated = bool(_NEGATION.search(instruction[: m.start()]) or _RESOLVED_AFTER.match(instruction[m.end():]))
            found.append(Mention(name, side, negated, m.start(), m.end(), lat, m.group("finding")))
    return sorted(found, key=lambda f: f.start)


def apply_severity(instruction: str, severity: str) -> str:
    """Rewrites ``instruction`` so each finding carries the chosen severity.

    Args:
        instruction: the progression description as typed.
        severity: ``none`` (leave as typed), ``slight``, ``moderate`` or ``large``.

    Returns:
        The instruction exactly as it will be applied.

    Raises:
        ValueError: unknown severity.

    Example:
        >>> apply_severity("new right pleural effusion; heart size unchanged", "moderate")
        'new moderate right pleural effusion; heart size unchanged'
        >>> apply_severity("small left pneumothorax", "large")
        'large left pneumothorax'
        >>> apply_severity("no pneumothorax; worsening edema", "slight")
        'no pneumothorax; worsening mild edema'
        >>> apply_severity("left pneumothorax has resolved", "large")
        'left pneumothorax has resolved'
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    if severity == "none":
        return instruction
    words = {name: table for _, name, table in _PATTERNS}
    taken = [(m.start, m.end, f"{words[m.finding][severity]} {m.laterality}{m.phrase}")
             for m in mentions(instruction) if not m.negated]
    out = instruction
    for start, end, text in sorted(taken, reverse=True):
        out = out[:start] + text + out[end:]
    return out
