"""Radiology-style text: a report per image and a progression description per pair.

Severity words map to grades consistently everywhere (and agree with ``engine.severity``):

=========  ==================  ====================================================
grade      severity value      words
=========  ==================  ====================================================
slight     <= 0.33             small, mild, slight, trace / tiny / minimal (< 0.15)
moderate   0.33 - 0.66         moderate
large      > 0.66              large (effusion, pneumothorax), severe / marked
=========  ==================  ====================================================

Laterality words ("right", "left", "bilateral") always mean the PATIENT's side.

Reports carry the CheXpert-style labels their sentences imply: 1.0 for a stated finding, 0.0 for
a stated negative, -1.0 for a hedged one ("possible trace ..."), None when not mentioned.
"""

from __future__ import annotations

import numpy as np

from .params import Device, Findings, Severity, Visit

GRADES = ("slight", "moderate", "large")
SLIGHT_MAX, MODERATE_MAX = 1.0 / 3.0, 2.0 / 3.0
UNCERTAIN_BELOW = 0.1
"""Findings below this severity are reported with hedging and labelled uncertain (-1.0)."""

WORD_GRADES: dict[str, str] = {
    "trace": "slight", "tiny": "slight", "minimal": "slight", "small": "slight", "mild": "slight",
    "slight": "slight", "moderate": "moderate", "large": "large", "severe": "large",
    "marked": "large",
}
"""Every severity word the simulator writes, with its grade."""

_SIZE_FINDINGS = frozenset({"effusion", "pneumothorax"})
_WORDS = {
    # (finding uses size words?) -> grade -> words (the first is the canonical one)
    True: {"slight": ("small",), "moderate": ("moderate",), "large": ("large",)},
    False: {"slight": ("mild", "mild", "slight"), "moderate": ("moderate",), "large": ("severe", "marked")},
}
_TINY = {True: ("small", "trace", "tiny"), False: ("mild", "minimal")}

LABEL_NAMES = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
               "consolidation": "Consolidation", "edema": "Edema",
               "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax"}


def severity_grade(value: float) -> str:
    """Grade of a severity value: "slight" (<= 1/3), "moderate" (<= 2/3) or "large"."""
    if value <= SLIGHT_MAX:
        return "slight"
    return "moderate" if value <= MODERATE_MAX else "large"


def severity_word(name: str, value: float, rng: np.random.Generator | None = None) -> str:
    """A severity word for finding ``name`` at ``value`` (random synonym when ``rng`` is given).

    Args:
        name: finding name (see ``FINDING_NAMES``).
        value: severity in (0, 1].
        rng: picks among synonyms; None gives the canonical word.

    Returns:
        A word whose grade (``WORD_GRADES``) equals ``severity_grade(value)``.
    """
    size = name in _SIZE_FINDINGS
    grade = severity_grade(value)
    words = _TINY[size] if (grade == "slight" and value < 0.15) else _WORDS[size][grade]
    return words[0] if rng is None else str(rng.choice(words))


def _a(phrase: str) -> str:
    """With an indefinite article, unless the phrase is plural or a mass noun."""
    if phrase.endswith(("s", "ces", "atelectasis", "edema", "cardiomegaly", "leads", "wires")):
        return phrase
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


_LOBES = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
          ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
          ("left", "middle"): "lingular", ("left", "lower"): "left lower lobe",
          ("bilateral", "upper"): "bilateral upper lobe", ("bilateral", "middle"): "bilateral mid-lung",
          ("bilateral", "lower"): "bilateral lower lobe"}


def finding_noun(name: str, sev: Severity) -> str:
    """The finding with its laterality but no severity, e.g. "right pleural effusion"."""
    side = sev.side
    if name == "effusion":
        return "bilateral pleural effusions" if side == "bilateral" else f"{side} pleural effusion"
    if name == "pneumothorax":
        return "bilateral pneumothoraces" if side == "bilateral" else f"{side} pneumothorax"
    if name == "atelectasis":
        return "bibasilar atelectasis" if side == "bilateral" else f"{side} basilar atelectasis"
    if name == "consolidation":
        zone = sev.zone or ("upper", "middle", "lower")[int(np.random.default_rng(sev.seed).integers(0, 3))]
        return f"{_LOBES[(side, zone)]} consolidation"
    if name == "edema":
        return "pulmonary edema"
    return "cardiomegaly"


def finding_phrase(name: str, sev: Severity, rng: np.random.Generator | None = None) -> str:
    """Severity + laterality + finding, e.g. "small right pleural effusion"."""
    return f"{severity_word(name, sev.value, rng)} {finding_noun(name, sev)}"


_DEVICE_NOUNS = {
    "ett": ("endotracheal tube",),
    "ng_tube": ("enteric tube", "nasogastric tube"),
    "ecg": ("ECG leads", "cardiac monitoring leads"),
    "sternal_wires": ("median sternotomy wires",),
}


def device_noun(device: Device, rng: np.random.Generator | None = None) -> str:
    """Plain name of a device with its side, e.g. "right internal jugular central venous catheter"."""
    if device.kind in _DEVICE_NOUNS:
        words = _DEVICE_NOUNS[device.kind]
        return words[0] if rng is None else str(rng.choice(words))
    if device.kind == "cvc":
        route = "internal jugular" if device.side == "right" else "subclavian"
        return f"{device.side} {route} central venous catheter"
    if device.kind == "pacemaker":
        return f"{device.side}-sided pacemaker"
    if device.kind == "icd":
        return f"{device.side}-sided ICD"
    return f"{device.side} chest tube"


_DEVICE_SENTENCES = {
    "ett": "Endotracheal tube terminates approximately 5 cm above the carina.",
    "ng_tube": "Enteric tube courses below the diaphragm with the tip in the stomach.",
    "ecg": "ECG leads overlie the chest.",
    "sternal_wires": "Median sternotomy wires are intact.",
}


def _device_sentence(device: Device) -> str:
    if device.kind in _DEVICE_SENTENCES:
        return _DEVICE_SENTENCES[device.kind]
    if device.kind == "cvc":
        return f"{_cap(device_noun(device))} terminates at the cavoatrial junction."
    if device.kind in ("pacemaker", "icd"):
        return f"{_cap(device_noun(device))} with leads in the right atrium and right ventricle."
    return f"{_cap(device_noun(device))} in place."


def report(findings: Findings, devices: tuple[Device, ...], rng: np.random.Generator,
           *, age: int | None = None) -> tuple[str, dict[str, float | None]]:
    """A radiology report (FINDINGS and IMPRESSION) and the CheXpert labels it states.

    Args:
        findings: the image's pathology.
        devices: devices in place.
        rng: chooses among synonyms, sentence forms and which negatives are stated.
        age: the patient's age (older patients get the odd degenerative remark).

    Returns:
        ``(text, labels)``; labels map the eight CheXpert names to 1.0 / 0.0 / -1.0 / None.
    """
    present = findings.present()
    labels: dict[str, float | None] = {name: None for name in
                                       ("No Finding", *LABEL_NAMES.values(), "Support Devices")}
    body: list[str] = [_device_sentence(d) for d in sorted(devices, key=lambda d: d.kind)]
    if devices:
        labels["Support Devices"] = 1.0
    positives: list[str] = []

    def state(name: str, sentence: str, impression: str | None) -> None:
        body.append(sentence)
        sev = present[name]
        labels[LABEL_NAMES[name]] = -1.0 if sev.value < UNCERTAIN_BELOW else 1.0
        if impression:
            positives.append(impression)

    def phrase(name: str) -> str:
        return finding_phrase(name, present[name], rng)

    # Heart and mediastinum.
    if "cardiomegaly" in present:
        p = phrase("cardiomegaly")
        sentence = str(rng.choice([f"{_cap(p)}.", f"The cardiac silhouette is enlarged ({p})."]))
        state("cardiomegaly", sentence, p)
    elif rng.random() < 0.85:
        body.append(str(rng.choice(["Heart size is normal.", "The cardiac silhouette is normal in size.",
                                    "Normal heart size."])))
        labels["Cardiomegaly"] = 0.0
    body.append(str(rng.choice(["The mediastinal contours are unremarkable.", "Mediastinal contours are normal.",
                                "The hilar and mediastinal contours are within normal limits."])))
    # Lungs.
    for name in ("consolidation", "atelectasis", "edema"):
        if name not in present:
            continue
        sev = present[name]
        p = phrase(name)
        if sev.value < UNCERTAIN_BELOW:
            state(name, f"Possible {p}.", f"possible {p}")
        elif name == "consolidation":
            state(name, str(rng.choice([f"There is {_a(p)}, concerning for pneumonia.",
                                        f"{_cap(p)}, which may represent pneumonia in the appropriate setting."])),
                  p)
        elif name == "edema":
            extra = " with vascular congestion" if sev.value > 0.2 else ""
            state(name, f"{_cap(p)}{extra}.", p)
        else:
            state(name, f"{_cap(p)}.", p)
    if "consolidation" not in present and rng.random() < 0.8:
        body.append(str(rng.choice(["No focal consolidation.", "There is no focal airspace consolidation."])))
        labels["Consolidation"] = 0.0
    if "edema" not in present and rng.random() < 0.6:
        body.append(str(rng.choice(["No pulmonary edema.", "No evidence of pulmonary edema."])))
        labels["Edema"] = 0.0
    # Pleura.
    for name in ("effusion", "pneumothorax"):
        if name in present:
            sev = present[name]
            p = phrase(name)
            if sev.value < UNCERTAIN_BELOW:
                state(name, f"Possible {p}.", f"possible {p}")
            elif name == "pneumothorax":
                state(name, f"{_cap(p)} with a visible pleural line.", p)
            else:
                state(name, f"{_cap(p)}.", p)
    negatives = [n for n in ("effusion", "pneumothorax") if n not in present and rng.random() < 0.9]
    if negatives:
        words = {"effusion": "pleural effusion", "pneumothorax": "pneumothorax"}
        body.append("No " + " or ".join(words[n] for n in negatives) + ".")
        for n in negatives:
            labels[LABEL_NAMES[n]] = 0.0
    if age is not None and age > 65 and rng.random() < 0.4:
        body.append("Degenerative changes of the thoracic spine.")
    else:
        body.append(str(rng.choice(["No acute osseous abnormality.", "Osseous structures are intact."])))

    if positives:
        items = [_cap(p) for p in positives]
        impression = " ".join(f"{k + 1}. {item}." for k, item in enumerate(items)) if len(items) > 1 \
            else f"{items[0]}."
        if devices:
            impression += " Support devices as described."
    else:
        labels["No Finding"] = 1.0
        impression = str(rng.choice(["No acute cardiopulmonary process.",
                                     "No acute cardiopulmonary abnormality."]))
        if devices:
            impression = "Support devices as described. " + impression
    return f"FINDINGS: {' '.join(body)}\n\nIMPRESSION: {impression}\n", labels


# --------------------------------------------------------------------------------------------
# Progression descriptions


def describe_progression(prior: Visit, followup: Visit, rng: np.random.Generator,
                         target_chars: int = 150) -> str:
    """A one- or two-clause description of what changed between two visits (~150 characters).

    Args:
        prior: the earlier visit.
        followup: the later visit.
        rng: chooses templates and synonyms.
        target_chars: stable findings are mentioned only while the text stays near this length.

    Returns:
        e.g. "New small right pleural effusion and interval increase in cardiomegaly, now
        moderate; otherwise unchanged."
    """
    from .journey import compare_visits  # late import: journey imports this module

    changes = compare_visits(prior, followup)
    clauses: list[str] = []
    stable: list[str] = []
    for ch in changes:
        if ch.kind == "finding":
            if ch.change == "unchanged":
                stable.append(finding_phrase(ch.name, ch.after, rng))
            else:
                clauses.append(_finding_clause(ch.name, ch.change, ch.before, ch.after, rng))
    placed = [c.device for c in changes if c.kind == "device" and c.change == "placed"]
    removed = [c.device for c in changes if c.kind == "device" and c.change == "removed"]
    remaining = [d for d in followup.devices if d.kind != "sternal_wires"]
    if removed and not placed and not remaining and (len(removed) >= 2 or rng.random() < 0.5):
        # Every device is gone: also the phrasing users type ("without support devices").
        clauses.append(str(rng.choice(["lines and tubes removed", "interval removal of all lines and tubes",
                                       "support devices have been removed", "without support devices",
                                       "no support devices remain"])))
    else:
        for d in removed:
            n = device_noun(d, rng)
            removed_verb = "have been removed" if n.endswith("s") else "has been removed"
            clauses.append(str(rng.choice([f"{n} removed", f"interval removal of the {n}",
                                           f"the {n} {removed_verb}"])))
    for d in placed:
        n = device_noun(d, rng)
        placed_verb = "have been placed" if n.endswith("s") else "has been placed"
        clauses.append(str(rng.choice([f"interval placement of {_a(n)}", f"new {n}", f"{_a(n)} {placed_verb}"])))

    if not clauses:
        text = str(rng.choice(["No significant interval change", "Stable appearance of the chest",
                               "Unchanged compared with the prior study"]))
        if stable:
            text += f", with stable {stable[0]}"
        return text + "."
    text = _join(clauses, rng)
    tail = str(rng.choice(["otherwise unchanged", "no other significant change", "otherwise stable"]))
    if stable and len(text) + len(stable[0]) + 12 < target_chars:
        text += f"; stable {stable[0]}"
    elif len(text) < target_chars - 20 or rng.random() < 0.5:
        text += f"; {tail}"
    return _cap(text) + "."


def _finding_clause(name: str, change: str, before: Severity | None, after: Severity | None,
                    rng: np.random.Generator) -> str:
    if change == "new":
        p = finding_phrase(name, after, rng)
        verb = "have" if p.endswith(("effusions", "pneumothoraces")) else "has"
        return str(rng.choice([f"new {p}", f"interval development of {_a(p)}", f"{p} {verb} developed"]))
    if change == "resolved":
        noun = finding_noun(name, before)
        verb = "have" if noun.endswith(("effusions", "pneumothoraces")) else "has"
        return str(rng.choice([f"{noun} {verb} resolved", f"resolution of the {noun}",
                               f"interval resolution of {noun}", f"{noun} no longer seen"]))
    noun = finding_noun(name, after)
    now = severity_word(name, after.value, rng)
    if change == "increased":
        return str(rng.choice([f"interval increase in {noun}, now {now}", f"worsening {noun}, now {now}",
                               f"increased {noun}, now {now}"]))
    return str(rng.choice([f"interval decrease in {noun}, now {now}", f"improving {noun}, now {now}",
                           f"decreased {noun}, now {now}"]))


def _join(clauses: list[str], rng: np.random.Generator) -> str:
    if len(clauses) == 1:
        return clauses[0]
    if any("," in c for c in clauses):  # "..., now moderate" clauses: keep them apart
        return "; ".join(clauses)
    head = ", ".join(clauses[:-1])
    return f"{head} and {clauses[-1]}" if rng.random() < 0.7 else f"{head}; {clauses[-1]}"
