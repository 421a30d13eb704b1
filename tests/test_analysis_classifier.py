"""Classifier interface, the small-classifier folder, torchxrayvision range converters and the
offline weight plumbing (same-architecture random weights saved where the package looks)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.analysis import classifier as clf
from engine.analysis import smallnet, xrv
from engine.errors import InputError, ModelFolderError

FIVE = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax")


def tiny_classifier(seed: int = 0, resolution: int = 32) -> clf.SmallClassifier:
    config = smallnet.SmallNetConfig(kind="classifier", targets=FIVE, input_resolution=resolution, widths=(8, 16), groups=4)
    return clf.SmallClassifier(smallnet.build(config, torch.Generator().manual_seed(seed)), smallnet.SmallNetCard(name="tiny"))


# -- converters and names ------------------------------------------------------------------------


def test_xrv_range_converters_match_the_package():
    xrv_pkg = xrv.import_xrv()
    img = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(xrv.to_xrv_range(img), xrv_pkg.utils.normalize(img, maxval=1), atol=1e-4)
    assert xrv.to_xrv_range(0.0) == -1024.0 and xrv.to_xrv_range(1.0) == 1024.0
    np.testing.assert_allclose(xrv.from_xrv_range(xrv.to_xrv_range(img)), img, atol=1e-6)
    t = torch.rand(2, 1, 4, 4, requires_grad=True)
    xrv.to_xrv_range(t).sum().backward()
    assert torch.allclose(t.grad, torch.full_like(t, 2048.0))


def test_smallnet_range_converter():
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(smallnet.to_net_range(x, (-1.0, 1.0)), torch.tensor([-1.0, 0.0, 1.0]))


def test_finding_names_match_loosely():
    assert clf.canonical_finding("Effusion") == "pleural effusion"
    assert clf.canonical_finding("Pleural_Effusion") == "pleural effusion"
    c = tiny_classifier()
    assert c.index("effusion") == 3 and c.index("CARDIOMEGALY") == 1 and c.index(4) == 4
    with pytest.raises(InputError, match="does not predict 'Support Devices'; it predicts Atelectasis"):
        c.index("Support Devices")


# -- the small classifier ------------------------------------------------------------------------


def test_small_classifier_folder_round_trip(tmp_path):
    c = tiny_classifier(seed=1)
    folder = c.save(tmp_path / "clf")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "card.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "classifier" and config["targets"] == list(FIVE) and config["input_range"] == [-1.0, 1.0]
    loaded = clf.SmallClassifier.load(folder)
    x = torch.rand(3, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(loaded.predict(x), c.predict(x), atol=2e-3)  # weights stored in fp16
    p = loaded.predict(x)
    assert p.shape == (3, 5) and p.dtype == np.float32 and (p >= 0).all() and (p <= 1).all()
    assert loaded.targets == FIVE and loaded.name == "tiny"
    with pytest.raises(ModelFolderError, match="holds a classifier"):
        smallnet.load(folder, kind="segmenter")


def test_small_classifier_is_deterministic_and_small():
    a, b = tiny_classifier(seed=3), tiny_classifier(seed=3)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    default = smallnet.build(smallnet.SmallNetConfig(kind="classifier", targets=FIVE))
    assert smallnet.parameter_count(default) < 2_000_000


def test_avgmax_pool_round_trips_and_old_folders_default_to_avg(tmp_path):
    config = smallnet.SmallNetConfig(kind="classifier", targets=FIVE, input_resolution=32, widths=(8, 16), groups=4,
                                     pool="avgmax")
    c = clf.SmallClassifier(smallnet.build(config, torch.Generator().manual_seed(2)), smallnet.SmallNetCard(name="mx"))
    assert c.net.head.in_features == 32
    folder = c.save(tmp_path / "mx")
    assert json.loads((folder / "config.json").read_text())["pool"] == "avgmax"
    loaded = clf.SmallClassifier.load(folder)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(loaded.predict(x), c.predict(x), atol=2e-3)  # weights stored in fp16
    # a folder written before the option (no "pool" key) still loads, with average pooling
    old = tiny_classifier(seed=1).save(tmp_path / "old")
    cfg = json.loads((old / "config.json").read_text())
    del cfg["pool"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert smallnet.load(old)[0].config.pool == "avg"
    with pytest.raises(ModelFolderError, match="pool must be one of"):
        smallnet.SmallNetConfig(kind="classifier", targets=FIVE, input_resolution=32, widths=(8, 16), groups=4, pool="sum")


def test_small_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        smallnet.load(tmp_path)
    c = tiny_classifier()
    folder = c.save(tmp_path / "clf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["widths"] = [8, 32]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="do not match config.json"):
        smallnet.load(folder)
    with pytest.raises(ModelFolderError, match="multiple of 2"):
        smallnet.SmallNetConfig(kind="classifier", targets=FIVE, input_resolution=30, widths=(8, 16), groups=4)


def test_classifier_checks_input_contract():
    c = tiny_classifier()
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        c.predict(np.full((32, 32), 300.0, np.float32))
    with pytest.raises(InputError, match="square"):
        c.predict(np.zeros((32, 40), np.float32))


def test_before_after_reports_both_probabilities():
    c = tiny_classifier()
    prior = np.zeros((32, 32), np.float32)
    cf = np.ones((32, 32), np.float32)
    ba = clf.before_after(c, prior, cf, ["Pleural Effusion", "Support Devices"])
    assert list(ba) == ["Pleural Effusion"]  # findings it does not predict are left out
    p = c.predict(np.stack([prior, cf])[:, None])
    assert ba["Pleural Effusion"].before == pytest.approx(float(p[0, 3]))
    assert ba["Pleural Effusion"].after == pytest.approx(float(p[1, 3]))
    assert ba["Pleural Effusion"].change == pytest.approx(float(p[1, 3] - p[0, 3]))


# -- torchxrayvision: offline messages and loading plumbing ---------------------------------------


def test_missing_weights_say_which_file_to_place_where(tmp_path, monkeypatch):
    monkeypatch.delenv(xrv.CACHE_ENV, raising=False)
    with pytest.raises(InputError) as exc:
        clf.load_xrv_classifier("densenet121-res224-all", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt" in msg
    assert str(tmp_path) in msg
    assert "https://github.com/mlmed/torchxrayvision/releases/download/v1/" in msg
    with pytest.raises(InputError, match="choose one of"):
        clf.load_xrv_classifier("densenet121-res224-nope", cache_dir=tmp_path)
    monkeypatch.setenv(xrv.CACHE_ENV, str(tmp_path / "env"))
    assert xrv.classifier_weight_file("densenet121-res224-chex").folder == tmp_path / "env"
    assert not xrv.available("pspnet") and not xrv.available("not-a-model")


def test_hardcoded_urls_still_match_the_installed_package():
    pkg = xrv.import_xrv()
    from torchxrayvision.baseline_models import chestx_det, emory_hiti, riken

    assert xrv.PSPNET_URL in inspect.getsource(chestx_det.PSPNet.__init__)
    assert xrv.RACE_URL in inspect.getsource(emory_hiti.RaceModel.__init__)
    assert xrv.AGE_URL in inspect.getsource(riken.AgeModel.__init__)
    assert Path(pkg.utils.get_cache_dir()) == xrv.package_cache_dir()


def test_xrv_densenet_loads_through_the_package_constructor(tmp_path):
    pkg = xrv.import_xrv()
    torch.manual_seed(0)
    reference = pkg.models.DenseNet()  # same architecture, random weights, 18 outputs
    wf = xrv.classifier_weight_file("densenet121-res224-all", tmp_path)
    torch.save(reference, wf.path)  # the package's layout: a whole pickled module
    c = clf.load_classifier("xrv", cache_dir=tmp_path)
    assert isinstance(c, clf.XRVClassifier) and c.input_resolution == 224 and c.input_range == (-1024.0, 1024.0)
    assert c.targets[7] == "Effusion" and c.index("Pleural Effusion") == 7
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = c.features(c.to_input(x))  # what Classifier.logits does, in two halves
        logits = c.head(feats)
        xin = xrv.to_xrv_range(torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
        expected = reference.eval().classifier(reference.features2(xin))
    assert feats.shape == (1, 1024, 7, 7)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    p = c.calibrate(logits)  # the package's own output: sigmoid, then op_norm at its thresholds
    torch.testing.assert_close(p, pkg.models.op_norm(torch.sigmoid(expected), c.module.op_threshs), atol=1e-5, rtol=1e-4)


def test_xrv_resnet_loads_and_splits_into_features_and_head(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=18, weights=None)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # the package's patch
    torch.save({k: v.half() for k, v in net.state_dict().items()}, xrv.classifier_weight_file("resnet50-res512-all", tmp_path).path)
    c = clf.load_xrv_classifier("resnet50-res512-all", cache_dir=tmp_path)
    assert c.input_resolution == 512 and c.index("Effusion") == 7
    xin = xrv.to_xrv_range(torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)))  # small: cheap
    with torch.no_grad():
        logits = c.head(c.features(xin))
        torch.testing.assert_close(logits, c.module.model(xin), atol=1e-4, rtol=1e-4)
    p = c.calibrate(logits)
    assert torch.isfinite(p).all()  # the package has no threshold (NaN) for two of its targets


def test_xrv_race_and_age_models_load_from_the_package_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("HOME", str(tmp_path))  # torchxrayvision reads ~/.torchxrayvision/models_data
    with pytest.raises(InputError, match="resnet_race_detection"):
        clf.load_race_model()
    cache = xrv.package_cache_dir()
    assert cache == tmp_path / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Sequential(torch.nn.Linear(512, 3), torch.nn.LogSoftmax(dim=1))
    torch.save(torch.nn.DataParallel(net).state_dict(), xrv.race_weight_file().path)
    race = clf.load_race_model()
    probs = race.predict(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    class Age(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3)).unsqueeze(1) * 10.0 + 50.0

    torch.jit.script(Age()).save(str(xrv.age_weight_file().path))
    age = clf.load_age_model()
    ages = age.predict(np.zeros((1, 1, 32, 32), np.float32))
    # input 0 -> [-1024] -> the package maps to [0, 1] and ImageNet-normalises; mean of 3 channels
    expected = 50.0 + 10.0 * float(np.mean([(0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    assert ages.shape == (1,) and ages[0] == pytest.approx(expected, rel=1e-4)


def test_race_file_in_a_configured_folder_gets_a_precise_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    other = tmp_path / "weights"
    other.mkdir()
    (other / xrv.race_weight_file().filename).write_bytes(b"x")
    with pytest.raises(InputError, match="reads it only from"):
        xrv.load_race_module(other)


def test_load_classifier_auto_without_anything_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(clf, "BUNDLED_CLASSIFIER", tmp_path / "none")
    with pytest.raises(InputError, match="No pathology classifier is installed"):
        clf.load_classifier("auto", cache_dir=tmp_path)
    folder = tiny_classifier().save(tmp_path / "bundled")
    monkeypatch.setattr(clf, "BUNDLED_CLASSIFIER", folder)
    assert isinstance(clf.load_classifier("auto", cache_dir=tmp_path), clf.SmallClassifier)
    with pytest.raises(InputError, match="Unknown classifier"):
        clf.load_classifier("nonsense")
