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


@pytest.mark.parametrize("text, named", [
    ("Endotracheal tube removed; otherwise unchanged.", [("ett", None)]),
    ("The right-sided pacemaker has been removed; otherwise stable.", [("pacemaker", "right")]),
    ("Left subclavian central venous catheter removed", [("cvc", "left")]),
    ("chest tube on the left removed", [("chest_tube", "left")]),
    ("right internal jugular central venous catheter removed and left chest tube removed",
     [("cvc", "right"), ("chest_tube", "left")]),
    ("ETT and NG tube removed", [("ett", None), ("ng_tube", None)]),
    ("pacemaker leads removed", [("pacemaker", None)]),
    ("ECG leads removed", [("ecg", None)]),
    ("interval removal of the enteric tube", [("ng_tube", None)]),
    ("the left pleural drain has been removed", [("chest_tube", "left")]),
    ("surgical clips removed", [(None, None)]),
])
def test_named_devices_say_which_kind_and_side(text, named):
    found = device_removal(text)
    assert found.scope == "named"
    assert [(d.kind, d.side) for d in found.named] == named
    # naming a device beside "every device" removes every device
    assert device_removal(f"without support devices; {text}").scope == "all"


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


def test_a_detected_stretch_is_followed_along_its_faint_line():
    """The rest of a faint lead connected to a detected stretch is marked; a faint line elsewhere,
    the lung's dense pattern and a blank border are not."""
    from engine.devices import grow_along_lines

    film = np.full((96, 96), 0.5, np.float32)
    lead = np.zeros(film.shape, bool)
    lead[20, 10:80] = True
    film[lead] += 0.08  # a faint wire, brighter than its surroundings by 0.08
    other = np.zeros(film.shape, bool)
    other[60, 10:50] = True
    film[other] += 0.08  # another faint line, nowhere near a detection
    rows, cols = np.mgrid[0:96, 0:96]
    texture = (rows > 70) & (cols > 55) & ((rows + cols) % 3 == 0)
    film[texture] += 0.08  # a dense pattern (vessels), touching...
    film[62:96, 50:54] += 0.08  # ...a faint line that runs into it
    seeds = np.zeros(film.shape, bool)
    seeds[20, 10:20] = True  # the detector found the wire's first stretch
    seeds[62:66, 50:54] = True
    grown = grow_along_lines(film, seeds)
    assert grown[lead].all() and not grown[other].any()
    assert grown[texture].mean() < 0.1
    blank = film.copy()
    blank[:, 85:] = 0.0  # the film ends: a blank border beside the wire's end
    assert not grow_along_lines(blank, seeds)[20, 83:85].any()
    blocked = np.zeros(film.shape, bool)
    blocked[20, 40:45] = True  # another detected device on the way: not crossed
    assert not grow_along_lines(film, seeds, blocked=blocked)[20, 50:80].any()


class _BrightLines:
    """A stand-in detector: every pixel brighter than 0.95 is a device."""

    name = "bright-lines"
    structures = ("devices",)

    def probabilities(self, images, batch_size: int = 8, *, mirror: bool = True) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, np.float32))
        return (x > 0.95).float()[:, None]


class _KindLines:
    """A stand-in detector with kind channels: bright pixels are devices; the middle column's
    are an ETT, every other one a chest tube."""

    name = "kind-lines"
    structures = ("devices", "device_ett", "device_chest_tube")

    def probabilities(self, images, batch_size: int = 8, *, mirror: bool = True) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, np.float32))
        bright = (x > 0.95).float()
        middle = torch.zeros_like(bright)
        middle[..., x.shape[-1] // 2 - 1: x.shape[-1] // 2 + 2] = 1.0
        return torch.stack([bright, bright * (0.4 + 0.5 * middle), bright * (0.6 - 0.5 * middle)], dim=1)


def _film_with_lines(size: int = 64) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A film with an "ETT" down the middle and a "chest tube" on each side."""
    clean = _plain_film(size)
    lines = {name: np.zeros(clean.shape, bool) for name in ("ett", "right_tube", "left_tube")}
    lines["ett"][4:30, size // 2] = True
    lines["right_tube"][30:50, 10] = True  # the patient's right: the image's left
    lines["left_tube"][30:50, size - 10] = True
    for line in lines.values():
        clean[line] = 1.0
    return clean, lines


def test_a_named_device_is_removed_by_its_kind_and_side():
    """With kind channels, "ETT removed" takes only the ETT, "left chest tube removed" only the
    chest tube on the patient's left (the image's right); the rest of the devices stay."""
    from engine.devices import device_mask

    film, lines = _film_with_lines()
    content = np.ones(film.shape, bool)
    detector = _KindLines()
    every = device_mask(detector, film, content)
    assert all(every[line].all() for line in lines.values())
    ett = device_mask(detector, film, content, device_removal("ETT removed").named)
    assert ett[lines["ett"]].all() and not ett[lines["left_tube"] | lines["right_tube"]].any()
    left = device_mask(detector, film, content, device_removal("the left chest tube has been removed").named)
    assert left[lines["left_tube"]].all() and not left[lines["ett"] | lines["right_tube"]].any()
    both = device_mask(detector, film, content, device_removal("chest tubes removed").named)
    assert both[lines["left_tube"] | lines["right_tube"]].all() and not both[lines["ett"]].any()
    with pytest.raises(InputError, match="cannot find"):
        device_mask(detector, film, content, device_removal("NG tube removed").named)
    # the kinds from a second network beside a one-channel detector: the same pixels
    plain = _BrightLines()
    plain.kinds = detector
    for words in ("ETT removed", "the left chest tube has been removed"):
        named = device_removal(words).named
        np.testing.assert_array_equal(device_mask(plain, film, content, named), device_mask(detector, film, content, named))


def test_the_bundled_detector_comes_with_a_kind_network():
    from engine.devices import BUNDLED_KINDS, detects

    detector = load_device_detector("auto")
    assert detector.structures == ("devices",) and detector.kinds is not None
    assert detects(detector, device_removal("ETT removed").named)
    assert not detects(detector, device_removal("surgical clips removed").named)
    assert load_device_detector("auto", kinds=None).kinds is None
    with pytest.raises(InputError, match="No device-kind network"):
        load_device_detector("auto", kinds="/nonexistent/kinds")
    assert BUNDLED_KINDS.is_dir()


def test_the_engine_removes_a_named_device_and_says_so(tiny_engine, monkeypatch):
    tiny_engine.clear_prior_cache()
    monkeypatch.setattr(tiny_engine, "_device_detector", _KindLines())
    film, lines = _film_with_lines()
    request = engine.EditRequest("Endotracheal tube removed; otherwise unchanged.", seed=4, steps=3, sampler="full")
    out = tiny_engine.counterfactual(film, request)
    record = out.devices_removed
    assert record["method"] == "detect+inpaint" and record["named"] == ["endotracheal tube"]
    assert record["model_instruction"] == NO_CHANGE and "note" not in record
    canvas, transform = tiny_engine.prepare(film)
    filled, area = tiny_engine.devices_inpainted(canvas, transform, device_removal(request.instruction).named)
    every, every_area = tiny_engine.devices_inpainted(canvas, transform)
    assert 0 < area < every_area and record["area"] == pytest.approx(area, abs=1e-5)
    same = tiny_engine.counterfactual(filled, replace(request, instruction=NO_CHANGE))
    np.testing.assert_array_equal(out.image, same.image)  # the model ran on the ETT-free prior
    # none of the named kind on the film: nothing inpainted, and the note says so
    plain = np.minimum(_plain_film(), 0.9)  # nothing bright: no device of any kind
    nothing = tiny_engine.counterfactual(plain, replace(request, instruction="ETT removed"))
    assert nothing.devices_removed["area"] == 0 and "found no endotracheal tube" in nothing.devices_removed["note"]
    # a kind the detector does not know: the model's, with a note
    clips = tiny_engine.counterfactual(film, replace(request, instruction="surgical clips removed"))
    assert clips.devices_removed["method"] == "model" and "does not know" in clips.devices_removed["note"]


def _plain_film(size: int = 64) -> np.ndarray:
    from train.simulator import Findings, render, sample_patient

    film = render(sample_patient(np.random.default_rng(3)), Findings(), size=2 * size, noise_seed=1).image
    return film.reshape(size, 2, size, 2).mean(axis=(1, 3)).astype(np.float32)


def _film_with_line(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    film = _plain_film(size)
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
    named = tiny_engine.counterfactual(film, replace(request, instruction="ETT removed"))  # no kind channels
    assert named.devices_removed["method"] == "model" and "does not know" in named.devices_removed["note"]
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
