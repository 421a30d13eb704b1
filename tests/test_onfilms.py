"""Real-anatomy pairs: findings and devices rendered on a film's own anatomy, in its log-odds.

The tests need no real film: a simulated radiograph and its lung masks stand in for one (the
renderer only sees pixels and a mask), which also gives the truth to check against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError
from train.simulator import Findings, Severity, render, sample_patient
from train.simulator.anatomy import MASK_BITS
from train.simulator.onfilms import (FilmAnatomy, fit_anatomy, from_logit, render_on_film, split_lungs, to_logit)
from train.simulator.params import Device

SIZE = 256


@pytest.fixture(scope="module")
def film() -> tuple[np.ndarray, np.ndarray, float]:
    """A simulated PA film (no findings), both lungs' mask, and its true cardiothoracic ratio."""
    patient = sample_patient(np.random.default_rng(4))
    result = render(patient, Findings(), size=SIZE, noise_seed=3)
    lungs = result.masks["left_lung"] | result.masks["right_lung"]
    return result.image, lungs, result.cardiothoracic_ratio


@pytest.fixture(scope="module")
def anatomy(film) -> FilmAnatomy:
    return fit_anatomy(film[0], film[1], seed=0)


def _halves(delta: np.ndarray) -> tuple[float, float]:
    """|change| on the patient's right (image left) and left (image right) halves."""
    a = np.abs(delta)
    return float(a[:, : SIZE // 2].sum()), float(a[:, SIZE // 2:].sum())


def test_logit_round_trip_and_lung_split(film):
    image, lungs, _ = film
    assert np.allclose(from_logit(to_logit(image)), np.clip(image, 2e-3, 1 - 2e-3), atol=1e-6)
    right, left = split_lungs(lungs)  # image-left lung is the patient's right
    assert right.any() and left.any() and not (right & left).any()
    assert np.flatnonzero(right.any(axis=0)).mean() < np.flatnonzero(left.any(axis=0)).mean()


def test_anatomy_fits_the_film(anatomy, film):
    _, _, true_ctr = film
    right, left = anatomy.lungs["right"], anatomy.lungs["left"]
    assert right.sign == -1 and left.sign == 1
    assert right.cp[0] < right.hilum[0] < left.hilum[0] < left.cp[0]  # angles lateral, hila medial
    assert anatomy.heart.any() and anatomy.tissue > anatomy.lung_level
    assert abs(anatomy.cardiothoracic_ratio() - true_ctr) < 0.12


@pytest.mark.parametrize("name, side", [("effusion", "left"), ("effusion", "right"), ("consolidation", "left"),
                                        ("atelectasis", "right"), ("pneumothorax", "left"),
                                        ("pneumothorax", "right")])
def test_one_sided_findings_change_the_asked_side_and_nothing_outside_their_support(anatomy, name, side):
    film = anatomy.image
    out = render_on_film(anatomy, Findings(**{name: Severity(0.7, side=side, seed=2, zone="lower")}))
    delta = out.image - film
    assert np.array_equal(out.image[~out.support], film[~out.support])  # exact outside
    assert out.support.any()
    right, left = _halves(delta)
    assert (left > 2 * right) if side == "left" else (right > 2 * left)
    assert not out.support[~anatomy.content].any()


@pytest.mark.parametrize("name", ["effusion", "consolidation", "atelectasis", "edema", "cardiomegaly"])
def test_severity_grows_the_change(anatomy, name):
    side = None if name in ("edema", "cardiomegaly") else "right"
    sizes = [np.abs(render_on_film(anatomy, Findings(**{name: Severity(v, side=side, seed=1, zone="lower")})).image
                    - anatomy.image).sum() for v in (0.2, 0.5, 0.85)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_effusion_brightens_the_base_and_pneumothorax_darkens_the_periphery(anatomy):
    film = anatomy.image
    lung = anatomy.lungs["left"].mask
    eff = render_on_film(anatomy, Findings(effusion=Severity(0.8, side="left"))).image - film
    ptx = render_on_film(anatomy, Findings(pneumothorax=Severity(0.8, side="left"))).image - film
    rows = np.flatnonzero(lung.any(axis=1))
    base = lung.copy()
    base[: rows[0] + int(0.7 * (rows[-1] - rows[0]))] = False
    assert eff[base].mean() > 0.02
    assert (ptx[lung] < 0).sum() > (ptx[lung] > 0).sum()


def test_cardiomegaly_widens_the_heart_and_moves_only_its_surroundings(anatomy):
    out = render_on_film(anatomy, Findings(cardiomegaly=Severity(0.8)))
    assert out.cardiothoracic_ratio > anatomy.cardiothoracic_ratio() + 0.03
    cols = np.flatnonzero(out.support.any(axis=0))
    lung_cols = np.flatnonzero(anatomy.lung_mask.any(axis=0))
    assert cols[0] > lung_cols[0] and cols[-1] < lung_cols[-1]  # the chest wall never moves
    assert not out.support[: int(np.flatnonzero(anatomy.heart_rows)[0]) - 10].any()


def test_devices_follow_the_film_and_brighten_it(anatomy):
    patient = sample_patient(np.random.default_rng(0))
    devices = (Device("ett", seed=1), Device("pacemaker", side="left", seed=2))
    out = render_on_film(anatomy, Findings(), devices, patient)
    delta = out.image - anatomy.image
    assert delta.max() > 0.15 and delta.min() >= -1e-6
    ys, xs = np.nonzero(delta > 0.05)
    lung_rows = np.flatnonzero(anatomy.lung_mask.any(axis=1))
    assert ys.min() < lung_rows[0] + 0.5 * (lung_rows[-1] - lung_rows[0])
    with pytest.raises(ValueError, match="patient"):
        render_on_film(anatomy, Findings(), devices)
    # the devices' mask: where they visibly brighten the film; fainter with a lower gain
    assert out.devices.any() and not out.devices[delta < 0.02].any() and (delta[out.devices] >= 0.02).all()
    faint = render_on_film(anatomy, Findings(), devices, patient, device_gain=0.3)
    assert (faint.image - anatomy.image).sum() < 0.8 * delta.sum()  # (a steel wire saturates either way)
    assert faint.devices.sum() < out.devices.sum() and not render_on_film(anatomy).devices.any()
    # each shown device pixel names its kind: the ETT's along the midline, the pacemaker's on the left
    from train.simulator.anatomy import DEVICE_KIND_LABELS

    kinds = out.device_kinds
    assert ((kinds > 0) == out.devices).all()
    assert set(np.unique(kinds[out.devices])) == {DEVICE_KIND_LABELS["ett"], DEVICE_KIND_LABELS["pacemaker"]}
    ett_cols = np.nonzero(kinds == DEVICE_KIND_LABELS["ett"])[1]
    pm_cols = np.nonzero(kinds == DEVICE_KIND_LABELS["pacemaker"])[1]
    lung_cols = np.nonzero(anatomy.lung_mask.any(axis=0))[0]
    midline = 0.5 * (lung_cols[0] + lung_cols[-1])
    assert abs(np.median(ett_cols) - midline) < 0.08 * anatomy.size  # down the trachea
    assert np.median(pm_cols) > midline  # the patient's left pocket: the image's right
    alone = render_on_film(anatomy, Findings(), devices[:1], patient)
    assert set(np.unique(alone.device_kinds[alone.devices])) == {DEVICE_KIND_LABELS["ett"]}


def test_bad_masks_are_refused(film):
    image, lungs, _ = film
    with pytest.raises(InputError, match="empty"):
        fit_anatomy(image, np.zeros_like(lungs))
    one = lungs.copy()
    one[:, SIZE // 2:] = False
    with pytest.raises(InputError):
        fit_anatomy(image, one)
    content = np.zeros_like(lungs)
    content[:, : SIZE // 2 + 10] = True  # the film ends in the middle of the left lung
    with pytest.raises(InputError, match="outside the film"):
        fit_anatomy(image, lungs, content=content)


def _film_folder(tmp_path: Path, n: int = 3) -> tuple[Path, Path]:
    """n simulated films as 8-bit PNGs and their lung masks in a second folder (one film without)."""
    films, masks = tmp_path / "films", tmp_path / "masks"
    films.mkdir()
    masks.mkdir()
    for k in range(n):
        r = render(sample_patient(np.random.default_rng(10 + k)), Findings(), size=300, noise_seed=k)
        Image.fromarray(np.rint(r.image * 255).astype(np.uint8)).save(films / f"film{k}.png")
        if k < n - 1:
            lungs = r.masks["left_lung"] | r.masks["right_lung"]
            Image.fromarray(lungs.astype(np.uint8) * 255).save(masks / f"film{k}.png")
    return films, masks


def test_on_films_command_writes_the_simulators_manifests(tmp_path, capsys):
    from train.__main__ import main as train_main
    from train.manifest import read_images, read_pairs
    from train.train_analysis import _is_real_folder, _samples

    films, masks = _film_folder(tmp_path)
    device_free = tmp_path / "free.txt"
    device_free.write_text("# ids\nfilm0\nfilm1\n")
    out = tmp_path / "out"
    args = ["simulate", "--on-films", str(films), "--masks", str(masks), "--out", str(out), "--size", "128",
            "--edits-per-film", "6", "--seed", "3", "--device-free", str(device_free), "--quiet"]
    assert train_main(args) == 0
    assert "skipped" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "films.jsonl").read_text().splitlines()]
    assert {r["film_id"]: r.get("skipped") for r in rows}["film2"] == "no lung mask for this film"
    images = {r.image_id: r for r in read_images(out / "images.jsonl")}
    pairs = read_pairs(out / "pairs.jsonl")
    assert pairs and all(p.prior_id in images and p.followup_id in images for p in pairs)
    for p in pairs:
        prior = np.asarray(Image.open(out / p.prior_path), dtype=np.float64)
        follow = np.asarray(Image.open(out / p.followup_path), dtype=np.float64)
        changed = np.asarray(Image.open(out / p.extra["change_mask_path"])) > 0
        assert np.array_equal(prior != follow, changed)  # the change mask is exactly where they differ
        assert p.counterfactual_path == p.followup_path and p.extra["real_anatomy"]
        if p.extra["edit"] == "none":
            assert not changed.any()
        else:
            assert changed.any()
        if p.extra["edit"] == "devices":
            assert "Support Devices" in images[p.prior_id].extra["labels_known"]
    # the film as acquired is one image, shared by every edit that starts from it or returns to it
    plain = [i for i in images if i.endswith("-film")]
    assert sorted(plain) == ["film0-film", "film1-film"]
    # a rendered image knows what its plain film knows (the film's premises stay true under a drawing),
    # so a classifier sees negatives on real anatomy, not only the rendered positives
    inherited = 0
    for r in images.values():
        film = images[f"{r.extra['film_id']}-film"]
        assert set(film.extra["labels_known"]) <= set(r.extra["labels_known"])
        for label in film.extra["labels_known"]:
            assert r.labels[label] == r.extra["labels_truth"][label]
            if r.extra["labels_truth"][label] != 1.0:  # not drawn on this image: the film's own value
                assert r.extra["labels_truth"][label] == film.extra["labels_truth"][label]
        if r is not film:
            inherited += sum(v == 0.0 for v in r.extra["labels_truth"].values())
    assert inherited > 0  # negatives on the rendered images, not only on the plain films
    assert sum(p.prior_id == "film0-film" or p.followup_id == "film0-film" for p in pairs) > 1
    record = next(iter(images.values()))
    bits = np.asarray(Image.open(out / record.extra["mask_path"])).astype(np.int64)
    assert ((bits >> MASK_BITS["left_lung"]) & 1).any() and not ((bits >> MASK_BITS["spine"]) & 1).any()
    assert set(record.extra["mask_known"]) >= {"left_lung", "right_lung"}
    assert _is_real_folder(out) and _samples(out)[0]["real"]
    settings = json.loads((out / "simulation.json").read_text())["settings"]
    assert settings["films"] == "films"  # no local path of this machine
    # the same settings give the same bytes; an existing folder needs --overwrite
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    assert exit_info.value.code == 2
    again = tmp_path / "again"
    assert train_main([*args[:6], str(again), *args[7:]]) == 0
    assert (again / "pairs.jsonl").read_bytes() == (out / "pairs.jsonl").read_bytes()


def test_removal_pairs_only_on_device_free_films(tmp_path):
    from train.simulator.filmpairs import FilmPairsConfig, write_film_pairs
    from train.manifest import read_pairs

    films, masks = _film_folder(tmp_path)
    out = tmp_path / "out"
    write_film_pairs(FilmPairsConfig(films=str(films), out=str(out), size=128, masks=str(masks), edits_per_film=5,
                                     edit_kinds=("devices", "none"), device_free=("film1",)))
    kinds = {(p.extra["film_id"], p.extra["edit"]) for p in read_pairs(out / "pairs.jsonl")}
    assert ("film1", "devices") in kinds
    assert ("film0", "devices") not in kinds and ("film0", "none") in kinds
    # on the device-free film every device is a rendered one: its mask bit is written and known
    from PIL import Image

    from train.manifest import read_images
    from train.simulator.anatomy import DEVICE_KIND_TARGETS, MASK_BITS, structure_mask

    images = {r.image_id: r for r in read_images(out / "images.jsonl")}
    priors = [p for p in read_pairs(out / "pairs.jsonl") if p.extra["edit"] == "devices"]
    for p in priors:
        record = images[p.prior_id]
        assert "devices" in record.extra["mask_known"]
        bits = np.asarray(Image.open(out / record.extra["mask_path"])).astype(np.int64)
        assert ((bits >> MASK_BITS["devices"]) & 1).any()
        # the kind bits: every shown device pixel has the kind of one of the prior's devices
        assert set(DEVICE_KIND_TARGETS) <= set(record.extra["mask_known"])
        shown = structure_mask(bits, "devices")
        kinds = {t for t in DEVICE_KIND_TARGETS if structure_mask(bits, t).any()}
        assert (np.logical_or.reduce([structure_mask(bits, t) for t in DEVICE_KIND_TARGETS]) == shown).all()
        assert kinds == {f"device_{'pacemaker' if d['kind'] == 'icd' else d['kind']}" for d in record.extra["devices"]}
    assert all("devices" not in (r.extra.get("mask_known") or []) for r in images.values() if r.extra["film_id"] == "film0")
    # only removals asked: the film with devices of its own gets none; --device-gain varies the contrast
    only = tmp_path / "only"
    write_film_pairs(FilmPairsConfig(films=str(films), out=str(only), size=128, masks=str(masks), edits_per_film=3,
                                     edit_kinds=("devices",), device_free=("film1",), device_gain=(0.2, 0.5)))
    assert {p.extra["film_id"] for p in read_pairs(only / "pairs.jsonl")} == {"film1"}
    with pytest.raises(ValueError, match="device_gain"):
        FilmPairsConfig(films=str(films), out=str(only), device_gain=(0.5, 0.2))


def test_analysis_nets_learn_only_what_a_real_film_knows(tmp_path):
    """Real-anatomy images train only their known structures and labels (the loss leaves the rest
    out), their test patients are never trained on, and held-out real films score under real/."""
    import torch

    from train.simulator.filmpairs import FilmPairsConfig, write_film_pairs
    from train.train_analysis import SEGMENTER_TARGETS, _known, _loss, _samples, train_analysis

    films, masks = _film_folder(tmp_path, n=4)
    out = tmp_path / "real"
    write_film_pairs(FilmPairsConfig(films=str(films), out=str(out), size=128, masks=str(masks), edits_per_film=2))
    samples = _samples(out)
    known = _known(samples, "segmenter", SEGMENTER_TARGETS)
    assert known[:, SEGMENTER_TARGETS.index("left_lung")].all() and not known[:, SEGMENTER_TARGETS.index("spine")].any()
    # an unknown structure's error costs nothing
    logits = torch.zeros(1, len(SEGMENTER_TARGETS), 8, 8)
    target = torch.zeros(1, len(SEGMENTER_TARGETS), 8, 8, dtype=torch.bool)
    wrong_spine = target.clone()
    wrong_spine[:, SEGMENTER_TARGETS.index("spine")] = True
    k = known[:1]
    assert torch.isclose(_loss("segmenter", logits, target, known=k), _loss("segmenter", logits, wrong_spine, known=k))
    # film0 and film1 are training patients, film2 a test patient (film3 has no mask)
    trained = _samples(out, ("train",))
    assert {Path(s["image"]).name.split("-")[0] for s in trained} == {"film0", "film1"}
    metrics = train_analysis("segmenter", [str(out)], [str(out)], str(tmp_path / "seg"), steps=2, batch_size=2,
                             resolution=64, widths=(8, 16), groups=4, device="cpu", real_share=0.5)
    assert "real/dice/left_lung" in metrics and "real/dice/spine" not in metrics
    assert metrics["real/heldout_images"] == 3  # one plain image per film
    # a device detector: one "devices" channel, named on its card; unknown targets are refused
    from engine.analysis import smallnet

    train_analysis("segmenter", [str(out)], None, str(tmp_path / "dev"), steps=2, batch_size=2, resolution=64,
                   widths=(8, 16), groups=4, device="cpu", targets=("devices",), name="cxr-devices-test")
    net, card = smallnet.load(tmp_path / "dev", kind="segmenter")
    assert tuple(net.config.targets) == ("devices",) and card.name == "cxr-devices-test"
    with pytest.raises(ValueError, match="unknown segmenter targets"):
        train_analysis("segmenter", [str(out)], None, str(tmp_path / "bad"), steps=2, targets=("tubes",))
    # kind channels added to that detector: its own channel keeps its weights, the new ones start
    # fresh; a folder that lists no known masks knows its structure bits, not the device kinds
    from train.train_analysis import _with_targets

    kinds = ("devices", "device_ett", "device_cvc")
    wider = _with_targets(net, kinds, seed=0)
    assert tuple(wider.config.targets) == kinds
    torch.testing.assert_close(wider.out.weight[0], net.out.weight[0])
    torch.testing.assert_close(wider.encoder.state_dict(), net.encoder.state_dict())
    with pytest.raises(ValueError, match="not among"):
        _with_targets(net, ("device_ett",), seed=0)
    assert _known([{"mask_known": None}], "segmenter", kinds).tolist() == [[True, False, False]]
    # the kinds are learned as which kind a device pixel is (cross-entropy among the kind
    # channels there), and not at all from an image that does not know them
    logits = torch.zeros(2, 3, 8, 8, requires_grad=True)
    truth = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    truth[:, 0, 2:4] = True
    truth[:, 1, 2:4] = True  # every device pixel is an ETT
    knows = torch.tensor([[True, True, True], [True, False, False]])
    _loss("segmenter", logits, truth, known=knows, categorical=[1, 2]).backward()
    assert logits.grad[1, 1:].abs().sum() == 0 and logits.grad[0, 1:, 4:].abs().sum() == 0
    assert (logits.grad[0, 1, 2:4] < 0).all() and (logits.grad[0, 2, 2:4] > 0).all()  # the ETT channel up, the other down
    train_analysis("segmenter", [str(out)], None, str(tmp_path / "kinds"), steps=2, batch_size=2, device="cpu",
                   targets=kinds, init_from=str(tmp_path / "dev"), name="cxr-devices-test")
    assert tuple(smallnet.load(tmp_path / "kinds", kind="segmenter")[0].config.targets) == kinds
    card = json.loads((tmp_path / "seg" / "card.json").read_text())
    assert any("Hannover" in d["name"] for d in card["training_data"])


def test_model_cards_attribute_the_films_and_masks_of_real_anatomy_pairs(tmp_path):
    from train.export import training_data
    from train.simulator.filmpairs import FilmPairsConfig, write_film_pairs

    films, masks = _film_folder(tmp_path)
    out = tmp_path / "real"
    write_film_pairs(FilmPairsConfig(films=str(films), out=str(out), size=128, masks=str(masks), edits_per_film=1))
    entries = training_data(out / "pairs.jsonl", "stage2", "CC0 (test films)")
    assert entries[0]["name"].startswith("real films (films)") and entries[0]["license"] == "CC0 (test films)"
    info = json.loads((out / "simulation.json").read_text())
    info.update(film_source="hannover", mask_sources=["v7"])
    (out / "simulation.json").write_text(json.dumps(info))
    names = [e["name"] for e in training_data(out / "pairs.jsonl", "stage2", None)]
    licences = [e["license"] for e in training_data(out / "pairs.jsonl", "stage2", None)]
    assert names[0].startswith("hannover") and licences == ["CC BY 3.0", "CC BY 4.0"]


def test_real_film_report_says_where_the_change_lands(tmp_path, tiny_model):
    from train.__main__ import main as train_main
    from train.evaluate_real import where

    films, masks = _film_folder(tmp_path, n=3)
    out = tmp_path / "report.json"
    assert train_main(["evaluate-real", "--model", str(tiny_model), "--films", str(films), "--masks", str(masks),
                       "--split", "all", "--out", str(out), "--segmenter", "none", "--sheet", "1", "--device", "cpu",
                       "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["films"] == 2 and report["mask_sources"] == {"folder": 2}  # film2 has no mask
    agg = report["aggregate"]
    assert set(agg) == {"left effusion", "right effusion", "cardiomegaly", "no change"}
    assert 0.0 <= agg["left effusion"]["asked_side_rate"] <= 1.0
    assert out.with_suffix(".md").read_text().count("|") > 20 and out.with_suffix(".png").is_file()
    # the app's default confines the edit to the named finding's anatomy; --confine none does not
    loose = tmp_path / "loose.json"
    assert train_main(["evaluate-real", "--model", str(tiny_model), "--films", str(films), "--masks", str(masks),
                       "--split", "all", "--out", str(loose), "--segmenter", "none", "--sheet", "0", "--device", "cpu",
                       "--confine", "none", "--quiet"]) == 0
    loose_agg = json.loads(loose.read_text())["aggregate"]
    assert report["confine"] == "anatomy" and "confine anatomy" in out.with_suffix(".md").read_text()
    for key in ("left effusion", "right effusion"):
        assert agg[key]["outside_lungs_median"] < 0.5 * loose_agg[key]["outside_lungs_median"]
        assert agg[key]["asked_side_rate"] == 1.0
    # the measure itself, by hand: all change in the patient's left lung (the image's right)
    from train.evaluate_real import FilmLungs

    lungs = np.zeros((32, 32), bool)
    right, left = lungs.copy(), lungs.copy()
    right[8:24, 3:12], left[8:24, 20:29] = True, True
    film = FilmLungs("f", "PA", np.zeros((32, 32)), right, left, "test")
    delta = np.zeros((32, 32))
    delta[12:20, 22:27] = 0.1
    row = where(delta, film, "left", grow=1)
    assert row["asked_more"] and row["asked_lung"] == 1.0 and row["other_lung"] == 0.0 and row["outside_lungs"] == 0.0
    delta[0, 0] = 0.4  # outside both lungs
    assert abs(where(delta, film, "right", grow=1)["outside_lungs"] - 0.4 / 4.4) < 1e-9


def _v7_zip(tmp_path: Path, masks: dict[str, np.ndarray]) -> Path:
    """A zip laid out as torchxrayvision's V7 masks (square 0/255 PNGs named by image id)."""
    import zipfile

    path = tmp_path / "v7.zip"
    with zipfile.ZipFile(path, "w") as z:
        for image_id, mask in masks.items():
            square = Image.fromarray(mask.astype(np.uint8) * 255).resize((400, 400), Image.Resampling.NEAREST)
            buffer = __import__("io").BytesIO()
            square.save(buffer, format="PNG")
            z.writestr(f"masks/{image_id}.png", buffer.getvalue())
    return path


def test_a_v7_mask_drawn_on_another_crop_is_not_used(tmp_path, film):
    """A mask lying on the film's blank border was drawn on another crop: MaskSource refuses it
    (v7: no mask; auto: the segmenter's), and one that fits is used as it is."""
    from train.simulator.filmpairs import Film, MaskSource
    from train.sources.v7masks import MAX_ON_BORDER, V7LungMasks, on_blank_border

    image, lungs, _ = film
    pixels = image.copy()
    pixels[:, :24] = 0.0  # a blank strip at the film's edge (collimation / letterbox)
    shifted = np.roll(lungs, -40, axis=1)  # the same lungs, moved onto that strip
    assert on_blank_border(lungs, pixels) == 0.0
    assert on_blank_border(shifted, pixels) > MAX_ON_BORDER
    dark_lungs = pixels.copy()
    dark_lungs[lungs] = 0.0  # dark lungs inside the film are not its border
    assert on_blank_border(lungs, dark_lungs) == 0.0

    source = MaskSource("v7")
    source._v7 = V7LungMasks(_v7_zip(tmp_path, {"fits": lungs, "shifted": shifted}))
    mask, where = source.lungs(Film("fits", "p", "fits.png", "PA"), pixels)
    assert where == "v7" and (mask == lungs).mean() > 0.99
    assert source.lungs(Film("shifted", "p", "shifted.png", "PA"), pixels) == (None, "none")
