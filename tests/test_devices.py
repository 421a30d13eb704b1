"""Support-device removal by detection and inpainting (engine.devices)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import engine
from engine.devices import NO_CHANGE, device_removal, inpaint, load_device_detector
from engine.errors import InputError


@pytest.mark.parametrize("text, scope, rest", [
    ("without support devices", "all", ""),
    ("lines and tubes removed", "all", ""),
    ("Interval removal of all lines and tubes; no other significant change.", "all", ""),
    ("no support devices", "all", ""),
    ("remove the support devices, new large left pleural effusion", "all", "new large left pleural effusion"),
    ("without support devices; stable mild right basilar atelectasis", "all", "stable mild right basilar atelectasis"),
    ("Endotracheal tube removed; otherwise unchanged.", "named", ""),
    ("The left chest tube has been removed; stable moderate cardiomegaly.", "named", "stable moderate cardiomegaly"),
    ("new large left pleural effusion; heart size unchanged", "none", None),
    ("lines and tubes unchanged", "none", None),
    ("new endotracheal tube", "none", None),
    ("no interval change", "none", None),
])
def test_device_removal_reads_what_the_instruction_asks(text, scope, rest):
    found = device_removal(text)
    assert found.scope == scope
    assert found.rest == (text if rest is None else rest)


def test_inpaint_fills_a_line_from_the_film_around_it():
    rows, cols = np.mgrid[0:64, 0:64]
    film = (0.3 + 0.4 * rows / 63 + 0.1 * np.sin(cols / 9.0)).astype(np.float32)
    with_line = film.copy()
    line = np.zeros(film.shape, bool)
    line[8:56, 30:32] = True
    with_line[line] = 0.98
    out = inpaint(with_line, line)
    assert np.abs(out - film)[line].max() < 0.02  # the smooth film continues under the line
    np.testing.assert_array_equal(out[~line], with_line[~line])  # nothing else moves
    np.testing.assert_array_equal(inpaint(with_line, np.zeros_like(line)), with_line)
    with pytest.raises(InputError, match="does not match"):
        inpaint(with_line, line[:32])


class _BrightLines:
    """A stand-in detector: every pixel brighter than 0.95 is a device."""

    name = "bright-lines"
    structures = ("devices",)

    def probabilities(self, images, batch_size: int = 8, *, mirror: bool = True) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, np.float32))
        return (x > 0.95).float()[:, None]


def _film_with_line(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from train.simulator import Findings, render, sample_patient

    film = render(sample_patient(np.random.default_rng(3)), Findings(), size=2 * size, noise_seed=1).image
    film = film.reshape(size, 2, size, 2).mean(axis=(1, 3)).astype(np.float32)
    line = np.zeros(film.shape, bool)
    line[10:50, 20] = True
    with_line = film.copy()
    with_line[line] = 1.0
    return with_line, line


def test_without_support_devices_runs_the_model_on_the_inpainted_prior(tiny_engine, monkeypatch):
    """The detected devices are inpainted, the model makes the rest of the instruction on that
    prior, the result keeps the film as given as its prior, and provenance says how."""
    tiny_engine.clear_prior_cache()
    monkeypatch.setattr(tiny_engine, "_device_detector", _BrightLines())
    film, line = _film_with_line()
    request = engine.EditRequest("without support devices", seed=4, steps=3, sampler="full")
    out = tiny_engine.counterfactual(film, request)
    filled, area = tiny_engine.devices_inpainted(*tiny_engine.prepare(film))
    assert filled[line].max() < 0.9 and area > 0  # the line is gone from what the model saw
    np.testing.assert_array_equal(out.prior, film)  # the result's prior is the film as given
    # what was asked stays the result's instruction; the model made the rest (here: no change)
    assert out.instruction_applied == "without support devices"
    assert out.devices_removed["model_instruction"] == NO_CHANGE
    same = tiny_engine.counterfactual(filled, replace(request, instruction=NO_CHANGE))
    np.testing.assert_array_equal(out.image, same.image)  # the model ran on the inpainted prior
    record = out.provenance()["devices_removed"]
    assert record["method"] == "detect+inpaint" and record["detector"] == "bright-lines"
    assert record["model_instruction"] == NO_CHANGE and record["area"] == pytest.approx(area, abs=1e-5)
    # the rest of the instruction is the model's
    both = tiny_engine.counterfactual(film, replace(request, instruction="without support devices; new large left pleural effusion"))
    assert both.devices_removed["model_instruction"] == "new large left pleural effusion"
    # devices="model" and a named device: the model's own edit of the film as given
    own = tiny_engine.counterfactual(film, replace(request, devices="model"))
    assert own.devices_removed["method"] == "model" and own.instruction_applied == "without support devices"
    assert not np.array_equal(own.image, out.image)
    named = tiny_engine.counterfactual(film, replace(request, instruction="ETT removed"))
    assert named.devices_removed["method"] == "model" and "named device" in named.devices_removed["note"]
    assert tiny_engine.counterfactual(film, replace(request, instruction="no interval change")).devices_removed is None
    with pytest.raises(InputError, match="devices"):
        engine.EditRequest("without support devices", devices="erase").validated()


def test_the_bundled_detector_finds_rendered_devices_and_little_else():
    """cxr-devices-mini on simulated films with rendered lines, tubes and leads (held out: other
    seeds than its training data): most device pixels found, few others marked."""
    from train.simulator import Findings, Nuisance, render, sample_patient
    from train.simulator.params import Device

    from engine.devices import device_mask

    detector = load_device_detector("auto")
    found, false = [], []
    for i in range(3):
        rng = np.random.default_rng(9000 + i)
        patient = sample_patient(rng)
        devices = (Device("ett", seed=i), Device("cvc", side="right", seed=i), Device("pacemaker", side="left", seed=i))
        shown = render(patient, Findings(), Nuisance(), devices=devices, size=256, noise_seed=9000 + i)
        mask = device_mask(detector, shown.image.astype(np.float32))
        truth = shown.device_mask
        found.append((mask & truth).sum() / truth.sum())
        false.append((mask & ~truth).sum() / (~truth).sum())
    assert np.mean(found) > 0.6 and np.mean(false) < 0.02
    with pytest.raises(InputError, match="No device detector"):
        load_device_detector("/nonexistent/detector")
