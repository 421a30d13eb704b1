"""What an instruction model was trained to read, and a warning for instructions outside it.

A model card may carry ``vocabulary`` (``card.json["vocabulary"]``): the words of the instructions
the model was trained on, as lists of phrases under :data:`VOCABULARY_KEYS`:

``findings``
    the findings it was taught, without their side ("pleural effusion", "pulmonary edema").
``devices``
    the support devices ("endotracheal tube", "support devices").
``changes``
    every other word its instructions used: change words ("new", "resolved", "worsening",
    "unchanged"), connecting words ("interval", "of", "the").
``severities``
    severity words ("small", "moderate", "large", "mild", "severe", ...).
``sides``
    the patient's sides ("right", "left", "bilateral", "right-sided", ...).

``python -m train export`` writes it for models trained on the simulator's instructions
(:func:`train.simulator.vocabulary.instruction_vocabulary`, derived from the simulator's own text
functions), so the warning follows the model. A card without one gives no warning.

A model ran "asdfgh qwerty" and changed the image (mean |change| 0.018): a text encoder embeds
anything, and nothing said that the model could only guess. :func:`instruction_warning` says so,
naming what the model knows, and the edit still runs.

No torch here: the UI imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

VOCABULARY_KEYS = ("findings", "devices", "changes", "severities", "sides")
"""The lists of ``card.json["vocabulary"]``, in the order a warning names them."""

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """The lower-case words of ``text``; a hyphenated word is one word ("right-sided")."""
    return _WORD.findall(str(text).lower())


def check_vocabulary(vocabulary: object, *, where: str = "card.json") -> dict[str, list[str]]:
    """A card's ``vocabulary`` as ``{key: [phrase, ...]}`` (keys among :data:`VOCABULARY_KEYS`).

    Raises:
        ValueError: not a mapping of those keys to lists of strings.
    """
    if not isinstance(vocabulary, Mapping):
        raise ValueError(f"{where}: vocabulary must be an object with lists {', '.join(VOCABULARY_KEYS)}")
    unknown = sorted(set(vocabulary) - set(VOCABULARY_KEYS))
    if unknown:
        raise ValueError(f"{where}: vocabulary has unknown list(s) {', '.join(unknown)}; "
                         f"known: {', '.join(VOCABULARY_KEYS)}")
    out: dict[str, list[str]] = {}
    for key, phrases in vocabulary.items():
        if isinstance(phrases, (str, bytes)) or not isinstance(phrases, Sequence) or \
                not all(isinstance(p, str) for p in phrases):
            raise ValueError(f"{where}: vocabulary.{key} must be a list of strings")
        out[str(key)] = list(phrases)
    return out


def instruction_warning(instruction: str, vocabulary: Mapping[str, Sequence[str]] | None) -> str | None:
    """A plain warning when an instruction is outside what the model was trained to read, else None.

    Warns when the instruction has words none of the model's instructions had, or names none of
    its findings or devices (an instruction of change words alone, "no change" or "unchanged", is
    fine). The warning lists what the model knows. An empty vocabulary (a card without one) gives
    None: nothing is known, so nothing is claimed.

    Args:
        instruction: the description as it will be applied.
        vocabulary: ``card.json["vocabulary"]`` (see the module docstring), or None.

    Example:
        >>> v = {"findings": ["pleural effusion"], "devices": ["support devices"], "changes": ["new", "without"],
        ...      "severities": ["large"], "sides": ["left", "right"]}
        >>> instruction_warning("new large left pleural effusion", v) is None
        True
        >>> instruction_warning("asdfgh qwerty", v).split(", so")[0]
        "The model was never trained on the words 'asdfgh', 'qwerty', and the instruction names none of its findings or devices"
    """
    if not vocabulary:
        return None
    tokens = words(instruction)
    if not tokens:
        return None
    lists = {key: [str(p) for p in vocabulary.get(key, ())] for key in VOCABULARY_KEYS}
    known = {w for phrases in lists.values() for p in phrases for w in words(p)}
    heads = {words(p)[-1] for key in ("findings", "devices") for p in lists[key] if words(p)}
    change_words = {w for p in lists["changes"] for w in words(p)}
    unknown = list(dict.fromkeys(t for t in tokens if t not in known))
    names_something = any(t in heads for t in tokens)
    changes_only = all(t in change_words for t in tokens)
    if not unknown and (names_something or changes_only):
        return None
    problems = []
    if unknown:
        shown = ", ".join(f"'{w}'" for w in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        problems.append(f"The model was never trained on the word{'s' if len(unknown) > 1 else ''} {shown}")
    if not names_something and not changes_only:
        problems.append("the instruction names none of its findings or devices" if problems else
                        "The instruction names none of the findings or devices the model was trained on")
    names = {"findings": "findings", "devices": "devices", "changes": "change words"}
    knows = "; ".join(f"{names[key]}: {', '.join(lists[key])}" for key in names if lists[key])
    return f"{', and '.join(problems)}, so it can only guess what this asks. The model knows {knows}."
