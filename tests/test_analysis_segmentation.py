"""Segmentation: the small segmenter folder, masks as dicts, Dice on simulator masks, PSPNet
loading plumbing and the auto fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis import segmentation as seg
from engine.analysis import smallnet, xrv
from engine.errors import InputError, ModelFolderError

STRUCTURES = ("right_lung", "left_lung", "heart")


def tiny_segmenter(seed: int = 0) -> seg.SmallSegmenter:
    config = smallnet.SmallNetConfig(kind="segmenter", targets=STRUCTURES, input_resolution=32, widths=(8, 16), groups=4)
    return seg.SmallSegmenter(smallnet.build(config, torch.Generator().manual_seed(seed)), smallnet.SmallNetCard(name="tiny-seg"))


@pytest.fixture(scope="module")
def cardiomegaly_pair():
    """A simulated prior and its exact counterfactual with a large heart (same acquisition)."""
    from train.simulator.anatomy import sample_patient
    from train.simulator.params import Findings, Severity
    from train.simulator.render import render

    patient = sample_patient(np.random.default_rng(11))
    prior = render(patient, size=128, noise_seed=1)
    cf = render(patient, Findings(cardiomegaly=Severity(0.9)), size=128, noise_seed=1)
    return prior, cf


def test_mirror_averages_each_structure_with_its_mirrored_side():
    """probabilities(mirror=True) averages each sided structure with the mirror's other side."""

    class Halves(seg.Segmenter):
        name, structures, input_resolution, device = "halves", ("left_lung", "right_lung", "heart"), 8, torch.device("cpu")

        def logits(self, x01):  # left_lung: the image's right half; right_lung: its left half
            out = torch.full((x01.shape[0], 3, 8, 8), -20.0)
            out[:, 0, :, 4:] = 20.0 + 10 * x01[:, 0, :, 4:]
            out[:, 1, :, :4] = 20.0
            out[:, 2, :, :3] = 20.0  # a heart on the image's left edge, whatever the film
            return out

    s = Halves()
    assert s.mirror_order() == [1, 0, 2]
    img = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, mirrored = s.probabilities(img, mirror=False), s.probabilities(img)
    torch.testing.assert_close(mirrored, plain)  # a consistent segmenter agrees with its mirror
    assert mirrored[0, 0, :, 4:].min() > 0.99 and mirrored[0, 0, :, :4].max() < 0.01
    # an unpaired structure keeps the film's own prediction (a mirrored heart is not averaged in)
    torch.testing.assert_close(mirrored[:, 2], plain[:, 2])
    assert mirrored[0, 2, :, 5:].max() < 0.01


def test_test_resolutions_average_the_lungs_over_scales_and_leave_the_heart():
    """A folder's ``test_resolutions`` run the network at further sizes and average the sided
    structures' probabilities with the native size's; the heart keeps the native prediction."""
    seen = []

    class ByScale(seg.Segmenter):
        name, structures, input_resolution, device = "by-scale", ("left_lung", "right_lung", "heart"), 8, torch.device("cpu")
        test_resolutions = (16,)

        def logits(self, x01):  # every channel: +2 at the native size, -2 at any other
            seen.append(x01.shape[-1])
            value = 2.0 if x01.shape[-1] == 8 else -2.0
            return torch.full((x01.shape[0], 3, x01.shape[-1], x01.shape[-1]), value)

    s = ByScale()
    p = s.probabilities(torch.rand(1, 1, 8, 8), mirror=False)
    assert seen == [8, 16]
    lo, hi = torch.sigmoid(torch.tensor(-2.0)), torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(p[:, :2], torch.full((1, 2, 8, 8), float((lo + hi) / 2)))
    torch.testing.assert_close(p[:, 2], torch.full((1, 8, 8), float(hi)))
    # a folder asks for them in config.json; sizes the network cannot take are refused
    config = smallnet.SmallNetConfig(kind="segmenter", targets=STRUCTURES, input_resolution=32, widths=(8, 16),
                                     groups=4, test_resolutions=[24, 40])
    assert seg.SmallSegmenter(smallnet.build(config)).test_resolutions == (24, 40)
    assert smallnet.SmallNetConfig.from_json(config.to_json()) == config
    for bad in ([30], [32]):
        with pytest.raises(ModelFolderError, match="test_resolutions"):
            smallnet.SmallNetConfig(kind="segmenter", targets=STRUCTURES, input_resolution=32, widths=(8, 16),
                                    groups=4, test_resolutions=bad)


def test_small_segmenter_round_trip_and_mask_dicts(tmp_path):
    s = tiny_segmenter(seed=2)
    folder = s.save(tmp_path / "seg")
    loaded = seg.SmallSegmenter.load(folder)
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    # weights are stored in fp16 (half the bytes): the outputs move by about 1e-3 at most
    torch.testing.assert_close(loaded.probabilities(x), s.probabilities(x), atol=2e-3, rtol=0)
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(folder / "model.safetensors")).values())
    masks = loaded.segment(x)
    assert len(masks) == 2 and list(masks[0]) == list(STRUCTURES)
    assert all(m.dtype == bool and m.shape == (48, 48) for m in masks[0].values())
    with pytest.raises(InputError, match="threshold"):
        loaded.segment(x, threshold=1.5)
    assert smallnet.parameter_count(smallnet.build(smallnet.SmallNetConfig(kind="segmenter", targets=STRUCTURES))) < 2_000_000


def test_small_unet_output_is_full_resolution():
    s = tiny_segmenter()
    assert s.logits(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_dice_on_simulator_masks_sees_the_enlarged_heart(cardiomegaly_pair):
    prior, cf = cardiomegaly_pair
    scores = seg.mask_dice(prior.masks, cf.masks, ["heart", "spine", "clavicles", "trachea"])
    assert scores["spine"] == 1.0 and scores["clavicles"] == 1.0  # the body frame is untouched
    assert scores["heart"] < 0.95  # the heart grew
    assert cf.masks["heart"].sum() > 1.1 * prior.masks["heart"].sum()
    with pytest.raises(InputError, match="not in both"):
        seg.mask_dice({"heart": prior.masks["heart"]}, {}, ["heart"])


def test_decode_bitmask_matches_the_simulator(cardiomegaly_pair):
    from train.simulator.anatomy import MASK_BITS

    prior, _ = cardiomegaly_pair
    decoded = seg.decode_bitmask(prior.bits, MASK_BITS)
    for name, mask in prior.masks.items():
        np.testing.assert_array_equal(decoded[name], mask)
    with pytest.raises(InputError, match="unsigned"):
        seg.decode_bitmask(prior.bits.astype(np.float32), MASK_BITS)


def test_anatomy_retention_of_identical_images_is_perfect(cardiomegaly_pair):
    prior, _ = cardiomegaly_pair
    s = tiny_segmenter()
    scores = seg.anatomy_retention(s, prior.image, prior.image, exclude=("heart",))
    assert set(scores) == {"right_lung", "left_lung", "mean"} and scores["mean"] == 1.0


def test_pspnet_loads_through_the_package_constructor(tmp_path):
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet

    with pytest.raises(InputError, match="pspnet_chestxray_best_model_4.pth"):
        seg.load_xrv_segmenter(cache_dir=tmp_path)
    torch.manual_seed(0)
    net = pspnet(14)
    # the package's layout: a DataParallel state dict ("module." prefixes); fp16 keeps the file small
    state = {f"module.{k}": v.half() for k, v in net.state_dict().items()}
    torch.save(state, xrv.pspnet_weight_file(tmp_path).path)
    s = seg.load_segmenter("xrv", cache_dir=tmp_path)
    assert isinstance(s, seg.XRVSegmenter) and s.input_resolution == 512
    assert s.structures == ("left_clavicle", "right_clavicle", "left_scapula", "right_scapula", "left_lung", "right_lung",
                            "left_hilum", "right_hilum", "heart", "aorta", "diaphragm", "mediastinum", "trachea", "spine")
    loaded = s.module.model.state_dict()
    key = next(k for k in loaded if k.endswith("weight"))
    torch.testing.assert_close(loaded[key], state[f"module.{key}"].float())


def test_xrv_segmenter_feeds_the_package_its_range():
    seen = {}

    class Fake(torch.nn.Module):
        targets = list(seg.PSPNET_STRUCTURES)

        def forward(self, x):
            seen["range"] = (float(x.min()), float(x.max()), tuple(x.shape))
            return torch.full((x.shape[0], 14, 512, 512), -10.0)

    s = seg.XRVSegmenter(Fake())
    img = np.zeros((64, 64), np.float32)
    img[0, 0] = 1.0
    masks = s.segment(img)
    # the film and its mirror (Segmenter.probabilities' test-time mirror) in one call
    assert seen["range"][:2] == (-1024.0, 1024.0) and seen["range"][2] == (2, 1, 512, 512)
    assert masks[0]["heart"].shape == (64, 64) and not masks[0]["heart"].any()


def test_load_segmenter_auto_falls_back_and_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "BUNDLED_SEGMENTER", tmp_path / "none")
    with pytest.raises(InputError, match="No anatomy segmenter is installed: place pspnet_chestxray_best_model_4.pth"):
        seg.load_segmenter("auto", cache_dir=tmp_path)
    folder = tiny_segmenter().save(tmp_path / "bundled")
    monkeypatch.setattr(seg, "BUNDLED_SEGMENTER", folder)
    assert isinstance(seg.load_segmenter("auto", cache_dir=tmp_path), seg.SmallSegmenter)


def test_cardiothoracic_ratio_of_drawn_masks_and_of_the_simulator(cardiomegaly_pair):
    lungs = np.zeros((64, 100), bool)
    lungs[10:50, 20:45] = True  # right lung, image left: columns 20-44
    left = np.zeros_like(lungs)
    left[10:50, 55:80] = True  # left lung: columns 55-79, so the thorax spans 60 columns
    heart = np.zeros_like(lungs)
    heart[30:50, 40:70] = True  # 30 columns
    assert seg.cardiothoracic_ratio({"right_lung": lungs, "left_lung": left, "heart": heart}) == 0.5
    # A thin strip along the dome (what real-film segmentations add) is not the cardiac border.
    strip = heart.copy()
    strip[48:50, 22:80] = True
    assert seg.cardiothoracic_ratio({"right_lung": lungs, "left_lung": left, "heart": strip}) == 0.5
    assert np.isnan(seg.cardiothoracic_ratio({"right_lung": lungs, "left_lung": left, "heart": np.zeros_like(heart)}))
    with pytest.raises(InputError, match="heart"):
        seg.cardiothoracic_ratio({"right_lung": lungs, "left_lung": left})
    # On the simulator's own masks the ratio is in the normal range and grows with cardiomegaly.
    prior, cf = cardiomegaly_pair
    before, after = seg.cardiothoracic_ratio(prior.masks), seg.cardiothoracic_ratio(cf.masks)
    assert 0.3 < before < 0.55 and after > before + 0.1


def test_one_piece_structures_lose_specks_and_holes_and_two_piece_ones_keep_both():
    from engine.analysis.segmentation import _clean

    lung = np.zeros((40, 40), bool)
    lung[5:30, 5:15] = True
    lung[12:15, 8:11] = False  # a hole where an opacity crossed the lung
    lung[35:37, 30:32] = True  # a speck under the diaphragm
    cleaned = _clean("left_lung", lung)
    assert cleaned[12:15, 8:11].all() and not cleaned[35:37, 30:32].any()
    clavicles = np.zeros((40, 40), bool)
    clavicles[2:4, 2:12], clavicles[2:4, 28:38] = True, True
    assert np.array_equal(_clean("clavicles", clavicles), clavicles)
    assert not _clean("heart", np.zeros((4, 4), bool)).any()
