"""The instruction vocabulary on a model card, and the warning for instructions outside it
(issue 27: "asdfgh qwerty" ran and changed the image with nothing said)."""

from __future__ import annotations

import json

import pytest

from engine.checkpoint import ModelCard, ModelFolderError, read_card
from engine.engine import DEFAULT_MODEL
from engine.vocabulary import VOCABULARY_KEYS, instruction_warning, words
from journey_ui.workstation import EXAMPLE_INSTRUCTIONS
from train.simulator.vocabulary import instruction_vocabulary


@pytest.fixture(scope="module")
def vocabulary():
    return instruction_vocabulary()


def test_the_vocabulary_is_the_simulators_own(vocabulary):
    """Derived from the simulator's text functions: every word of the instructions it writes is in
    it, and the findings, devices, severities and sides it names are the simulator's."""
    import numpy as np

    from train.simulator.anatomy import sample_patient
    from train.simulator.edits import sample_edits
    from train.simulator.journey import sample_journey
    from train.simulator.text import describe_progression

    assert list(vocabulary) == list(VOCABULARY_KEYS)
    known = {w for phrases in vocabulary.values() for p in phrases for w in words(p)}
    rng = np.random.default_rng(0)  # a sample of what the simulator writes, drawn as data sets draw it
    texts = []
    for k in range(60):
        patient = sample_patient(rng, f"p{k}")
        visits = sample_journey(patient, 4, rng)
        texts += [describe_progression(a, b, rng) for a, b in zip(visits, visits[1:])]
        texts += [e.description for e in sample_edits(patient, rng, np.random.default_rng(k))[1]]
    assert len(texts) > 200
    missing = {w for t in texts for w in words(t)} - known
    assert not missing, missing
    assert {"pleural effusion", "pneumothorax", "cardiomegaly", "pulmonary edema"} <= set(vocabulary["findings"])
    assert {"support devices", "endotracheal tube", "pacemaker"} <= set(vocabulary["devices"])
    assert {"new", "resolved", "worsening", "unchanged"} <= set(vocabulary["changes"])
    assert {"small", "moderate", "large", "mild", "severe"} <= set(vocabulary["severities"])
    assert {"right", "left", "bilateral"} <= set(vocabulary["sides"])
    assert not set(vocabulary["changes"]) & {"effusion", "left", "large", "tube"}


def test_the_bundled_model_card_carries_it(vocabulary):
    """What ``python -m train export`` writes for a simulator-trained model (a re-export keeps it)."""
    card = read_card(DEFAULT_MODEL)
    assert card.vocabulary == vocabulary
    assert json.loads((DEFAULT_MODEL / "card.json").read_text())["vocabulary"] == vocabulary


def test_the_warning_names_what_the_model_knows(vocabulary):
    for example in (e[0] for e in EXAMPLE_INSTRUCTIONS):
        assert instruction_warning(example, vocabulary) is None, example
    for fine in ("no change", "new small left pneumothorax; otherwise unchanged", "ECG leads removed",
                 "interval decrease in right pleural effusion, now small", "New Large Left Pleural Effusion."):
        assert instruction_warning(fine, vocabulary) is None, fine
    warning = instruction_warning("asdfgh qwerty", vocabulary)
    assert warning.startswith("The model was never trained on the words 'asdfgh', 'qwerty', and the instruction "
                              "names none of its findings or devices, so it can only guess what this asks.")
    for known in ("findings: basilar atelectasis", "pleural effusion", "devices:", "support devices",
                  "change words:", "worsening"):
        assert known in warning, known
    assert instruction_warning("new large pneumonia", vocabulary).startswith(
        "The model was never trained on the word 'pneumonia', and the instruction names none")
    assert instruction_warning("new large left", vocabulary).startswith(
        "The instruction names none of the findings or devices the model was trained on")
    assert instruction_warning("new large left pleural effusion please", vocabulary).startswith(
        "The model was never trained on the word 'please', so")
    assert instruction_warning("asdfgh qwerty", {}) is None and instruction_warning("asdfgh", None) is None


def test_a_card_vocabulary_is_checked_and_round_trips(vocabulary):
    base = {"name": "m", "method": "instruct", "resolution": 64,
            "text_encoder": {"backend": "bert", "source": "text_encoder", "max_tokens": 8}}
    card = ModelCard.from_dict({**base, "vocabulary": vocabulary})
    assert ModelCard.from_dict(card.to_dict()).vocabulary == vocabulary
    assert "vocabulary" not in ModelCard.from_dict(base).to_dict()  # older cards keep their bytes
    for bad in ({"words": ["a"]}, {"findings": "pleural effusion"}, {"findings": [1]}, ["findings"]):
        with pytest.raises(ModelFolderError, match="vocabulary"):
            ModelCard.from_dict({**base, "vocabulary": bad})


def test_the_exporter_writes_it_when_the_simulator_wrote_every_instruction(monkeypatch, vocabulary):
    """Simulated pairs and real-anatomy pairs (the simulator's findings rendered on real films)
    are described by the simulator's text functions; any other source leaves the card without one."""
    import train.export as export

    for names, expected in (({"simulator"}, vocabulary), ({"simulated", "real-anatomy"}, vocabulary),
                            ({"simulator", "mimic"}, {}), ({"unknown"}, {})):
        monkeypatch.setattr(export, "source_names", lambda manifest, stage, n=names: n)
        assert export.card_vocabulary(("pairs.jsonl",), "stage2") == expected, names
    assert export.card_vocabulary((), "stage2") == {}
