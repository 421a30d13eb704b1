"""The vocabulary of the simulator's instructions, for a model card (``card.json["vocabulary"]``).

Derived from the simulator's own text functions, never typed by hand: every progression
description :func:`.text.describe_progression` can write is enumerated by running it on one
pair of visits per finding, side, zone, grade and change (and per device placed or removed)
with :class:`_EveryChoice`, a stand-in random generator that records every option it is offered;
the single-edit phrasings of :mod:`.edits` are added as they are. The words are then sorted into
the lists :mod:`engine.vocabulary` reads: findings and devices (their nouns without a side),
severity words, sides, and every other word as a change word.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from engine.vocabulary import words

from .edits import _DEVICE_REMOVAL, _NO_CHANGE, _TAILS
from .params import DEVICE_KINDS, FINDING_NAMES, LATERAL_DEVICES, LATERAL_FINDINGS, SIDES, ZONES, Device, Findings, \
    Severity, Visit
from .text import WORD_GRADES, describe_progression, device_noun, finding_noun

_VALUES = (0.05, 0.12, 0.25, 0.5, 0.8)
"""Severity values reaching every grade and the tiny words (below 0.15)."""
_COLLECTIVE = ("support devices", "lines and tubes")
"""Collective device names, kept when the simulator's removal phrases use them."""


class _EveryChoice:
    """Stands in for ``numpy.random.Generator`` in the text functions: records every option of
    every ``choice`` (returning the first), and answers ``random()`` with a fixed draw so both
    sides of a branch can be visited."""

    def __init__(self, draw: float) -> None:
        self.draw = draw
        self.offered: list[str] = []

    def choice(self, options: Iterable[object]) -> object:
        options = list(options)
        self.offered.extend(str(o) for o in options)
        return options[0]

    def random(self) -> float:
        return self.draw


def _severities(name: str) -> list[Severity]:
    if name == "cardiomegaly":
        sides: tuple[str | None, ...] = (None,)
    elif name == "edema":
        sides = ("bilateral",)
    else:
        sides = SIDES
    zones: tuple[str | None, ...] = ZONES if name == "consolidation" else (None,)
    return [Severity(v, side=s, zone=z) for v, s, z in itertools.product(_VALUES, sides, zones)]


def _devices() -> list[Device]:
    return [Device(kind, side=side) for kind in DEVICE_KINDS
            for side in (("right", "left") if kind in LATERAL_DEVICES else (None,))]


def _pairs() -> Iterable[tuple[Visit, Visit]]:
    """Visit pairs covering every change the descriptions name."""
    for name in FINDING_NAMES:
        for sev in _severities(name):
            with_it = Visit(findings=Findings(**{name: sev}))
            yield Visit(), with_it  # new
            yield with_it, Visit()  # resolved
            yield with_it, with_it  # unchanged (no change, or "stable ...")
            for other in _VALUES:
                if abs(other - sev.value) >= 0.1:  # increased or decreased
                    yield with_it, Visit(findings=Findings(**{name: Severity(other, side=sev.side, zone=sev.zone)}))
    devices = _devices()
    for d in devices:
        yield Visit(devices=(d,)), Visit()  # removed
        yield Visit(), Visit(devices=(d,))  # placed
    acute = tuple(d for d in devices if d.side in (None, "right") and d.kind != "sternal_wires")
    yield Visit(devices=acute), Visit()  # every device removed


def _strip_side(phrase: str, sides: set[str]) -> str:
    head, _, rest = phrase.partition(" ")
    return rest if head.lower() in sides and rest else phrase


def instruction_vocabulary() -> dict[str, list[str]]:
    """``card.json["vocabulary"]`` of a model trained on the simulator's instructions.

    Returns:
        ``{"findings", "devices", "changes", "severities", "sides"}``, each a sorted list.
    """
    texts: list[str] = [*_DEVICE_REMOVAL, *_NO_CHANGE, *_TAILS]
    for prior, followup in _pairs():
        for draw in (0.0, 0.99):  # both sides of every `rng.random() < p`
            rng = _EveryChoice(draw)
            texts.append(describe_progression(prior, followup, rng))  # type: ignore[arg-type]
            texts.extend(rng.offered)
    all_words = {w for t in texts for w in words(t)}
    sides = set(SIDES) | {w for w in all_words if w.split("-")[0] in SIDES and "-" in w}

    findings = {_strip_side(finding_noun(name, sev), sides) for name in FINDING_NAMES
                for sev in _severities(name) if name in LATERAL_FINDINGS or sev.side in (None, "bilateral")}
    devices: set[str] = set()
    for d in _devices():
        rng = _EveryChoice(0.0)
        device_noun(d, rng)  # type: ignore[arg-type]
        devices |= {_strip_side(n, sides) for n in rng.offered or [device_noun(d)]}
    joined = " ".join(" ".join(words(t)) for t in texts)
    devices |= {c for c in _COLLECTIVE if f" {c} " in f" {joined} "}

    severities = set(WORD_GRADES)
    named = {w for p in findings | devices for w in words(p)} | severities | sides
    return {
        "findings": sorted(findings),
        "devices": sorted(devices, key=str.lower),
        "changes": sorted(all_words - named),
        "severities": sorted(severities),
        "sides": sorted(sides),
    }
