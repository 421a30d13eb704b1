"""``python -m train analysis``: the bundled classifier and segmenter's trainer, end to end on a
tiny simulated folder (a few steps: that it runs, saves a loadable folder and scores held-out data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.analysis import smallnet
from train.train_analysis import CLASSIFIER_TARGETS, SEGMENTER_TARGETS, train_analysis


@pytest.fixture(scope="module")
def sim_folders(tmp_path_factory) -> tuple[Path, Path]:
    from train.simulator.writer import SimulationConfig, write_dataset

    root = tmp_path_factory.mktemp("sim")
    write_dataset(SimulationConfig(out=str(root / "train"), patients=3, visits=2, size=128, seed=11))
    write_dataset(SimulationConfig(out=str(root / "held"), patients=2, visits=2, size=128, seed=12))
    return root / "train", root / "held"


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 20])
def test_any_step_count_trains(sim_folders, tmp_path, steps):
    """Short runs used to fail inside the learning-rate schedule (20 steps: a one-step warm-up
    that OneCycleLR divides by zero with)."""
    train, _ = sim_folders
    train_analysis("classifier", [str(train)], None, str(tmp_path / "c"), steps=steps, batch_size=2, resolution=64,
                   widths=(8, 16), groups=4, device="cpu")
    net, _ = smallnet.load(tmp_path / "c", kind="classifier")
    assert tuple(net.config.targets) == CLASSIFIER_TARGETS


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_trains_saves_and_scores_held_out_images(sim_folders, tmp_path, kind):
    train, held = sim_folders
    out = tmp_path / kind
    metrics = train_analysis(kind, [str(train)], str(held), str(out), steps=6, batch_size=2, resolution=64,
                             widths=(8, 16), groups=4, device="cpu",
                             loss_weights={"diaphragm": 3.0} if kind == "segmenter" else None)
    net, card = smallnet.load(out, kind=kind)
    assert card.metrics == metrics and metrics["heldout_images"] > 0
    names = CLASSIFIER_TARGETS if kind == "classifier" else SEGMENTER_TARGETS
    key = "dice" if kind == "segmenter" else "auroc"
    assert f"{key}/mean" in metrics and all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith(key))
    logits = net(torch.zeros(1, 1, 64, 64))
    assert logits.shape == ((1, len(names)) if kind == "classifier" else (1, len(names), 64, 64))
    assert "not for diagnosis" in json.loads((out / "card.json").read_text())["description"].lower()


def test_fine_tuning_keeps_the_folder_architecture_and_rejects_unknown_structures(sim_folders, tmp_path):
    train, _ = sim_folders
    base = tmp_path / "base"
    train_analysis("segmenter", [str(train)], None, str(base), steps=2, batch_size=2, resolution=64, widths=(8, 16),
                   groups=4, device="cpu")
    train_analysis("segmenter", [str(train)], None, str(tmp_path / "tuned"), steps=2, batch_size=2,
                   resolution=256, widths=(32, 64), init_from=str(base), device="cpu")
    tuned, _ = smallnet.load(tmp_path / "tuned", kind="segmenter")
    assert tuned.config.input_resolution == 64 and tuple(tuned.config.widths) == (8, 16)
    with pytest.raises(ValueError, match="unknown structures"):
        train_analysis("segmenter", [str(train)], None, str(tmp_path / "x"), steps=2, batch_size=2, resolution=64,
                       widths=(8, 16), groups=4, device="cpu", loss_weights={"liver": 2.0})
