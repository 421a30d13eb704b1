"""``python -m train evaluate`` end to end on simulated pairs with the tiny model, plus its parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.analysis import metrics, smallnet
from engine.analysis.classifier import SmallClassifier
from engine.analysis.segmentation import SmallSegmenter
from engine.errors import InputError
from train import evaluate as ev


@pytest.fixture(scope="module")
def sim_pairs(tmp_path_factory) -> Path:
    """Four simulated patients with two visits each: four pairs with exact counterfactuals."""
    from train.simulator.writer import SimulationConfig, write_dataset

    out = tmp_path_factory.mktemp("sim")
    write_dataset(SimulationConfig(out=str(out), patients=4, visits=2, size=128, seed=5))
    return out / "pairs.jsonl"


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random classifier (the five findings + two more) and segmenter, as folders."""
    root = tmp_path_factory.mktemp("nets")
    g = torch.Generator().manual_seed(0)
    targets = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumothorax", "Support Devices")
    c = smallnet.SmallNetConfig(kind="classifier", targets=targets, input_resolution=32, widths=(8, 16), groups=4)
    s = smallnet.SmallNetConfig(kind="segmenter", targets=("right_lung", "left_lung", "heart"), input_resolution=32, widths=(8, 16), groups=4)
    SmallClassifier(smallnet.build(c, g), smallnet.SmallNetCard(name="tiny-clf")).save(root / "clf")
    SmallSegmenter(smallnet.build(s, g), smallnet.SmallNetCard(name="tiny-seg")).save(root / "seg")
    return root / "clf", root / "seg"


def test_evaluate_end_to_end_through_the_cli(tiny_model, sim_pairs, nets, tmp_path, capsys):
    from train.__main__ import main

    out = tmp_path / "report" / "REPORT.json"
    code = main(["evaluate", "--model", str(tiny_model), "--pairs", str(sim_pairs), "--out", str(out),
                 "--limit", "2", "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--classifier", str(nets[0]),
                 "--segmenter", str(nets[1]), "--race-age", "none", "--examples", "2", "--quiet", "--batch-size", "2"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"] == str(out) and set(printed["cmig"]) == {"model", "identity", "text-only"}

    report = json.loads(out.read_text())
    assert report["pairs"] == 2 and report["systems"] == ["model", "identity", "text-only"]
    assert report["networks"]["classifier"] == "tiny-clf" and report["networks"]["segmenter"] == "tiny-seg"
    rows = report["rows"]
    assert [r["index"] for r in rows] == [0, 1]
    for row in rows:
        ident, model, text = row["systems"]["identity"], row["systems"]["model"], row["systems"]["text-only"]
        assert ident["l1_prior"] == 0.0 and ident["anatomy_dice"] == 1.0  # the identity baseline changes nothing
        assert model["l1_prior"] > 0 and math.isfinite(model["psnr_out"]) and -1 <= model["ssim_out"] <= 1
        assert (model["ssim_in"] is None) == (row["changes"] == {} and model.get("change_in_region") is None)
        assert set(model["probabilities"]) == set(report["networks"]["classifier_targets"])
        assert model["l1_prior"] != text["l1_prior"]  # withholding the prior changes the output
        assert row["seed"] == ev.pair_seed(0, row["pair_id"])
        for finding, gain in model["cpg"].items():
            assert finding in row["changes"] and -1 <= gain <= 1
    # the aggregate is the CMIG of its own components
    for system, agg in report["aggregate"].items():
        if agg["cmig"] is not None:
            comp = agg["cmig_components"]
            acc = {k: v for k, v in comp.items() if k == "pathology_auroc"}
            ret = {k: v for k, v in comp.items() if k != "pathology_auroc"}
            assert agg["cmig"] == pytest.approx(metrics.cmig(list(acc.values()), list(ret.values())), abs=1e-4)
    assert report["aggregate"]["identity"]["l1_prior"] == 0.0
    assert "substitute" in report["aggregate"]["model"]["retention_definition"]

    table = out.with_suffix(".md").read_text()
    assert "| System | Pathology AUROC ↑ | Race AUROC ↑ | Age Pearson ↑ | Accuracy | Retention | CMIG ↑ |" in table
    for system in ("model", "identity", "text-only"):
        assert f"\n| {system} |" in table
    png = out.with_suffix(".png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 200


def test_exact_baseline_is_the_simulators_counterfactual(tiny_model, sim_pairs, nets, tmp_path):
    config = ev.EvaluateConfig(model=str(tiny_model), pairs=str(sim_pairs), out=str(tmp_path / "R.json"), limit=2,
                               baselines=("identity", "exact", "latent-ceiling"), steps=1, device="cpu",
                               dtype="fp32", classifier=str(nets[0]), segmenter=str(nets[1]), race_age="none",
                               examples=0, progress=False)
    report = ev.evaluate(config)
    assert report["systems"] == ["model", "identity", "exact", "latent-ceiling"]
    assert "confine: none; devices: model" in ev.markdown_report(report)  # the model's whole edit unless asked
    for row in report["rows"]:
        exact = row["systems"]["exact"]
        assert exact["l1_exact"] == 0.0 and exact["ssim_out"] == pytest.approx(1.0)
        assert exact["anatomy_dice_exact"] == 1.0 and 0 <= row["systems"]["model"]["anatomy_dice_exact"] <= 1
    assert report["aggregate"]["exact"]["psnr_out"] == ev.PSNR_CAP_DB  # identical: infinite, capped
    assert "\n| exact |" in ev.markdown_report(report) and "\n| latent-ceiling |" in ev.markdown_report(report)
    # the exact counterfactual through the model's VAE: not the exact image, but no UNet sampling either
    ceiling = [row["systems"]["latent-ceiling"] for row in report["rows"]]
    assert all(c["l1_exact"] > 0.0 for c in ceiling)


def test_pair_seed_is_stable_and_order_free():
    assert ev.pair_seed(0, "a") == ev.pair_seed(0, "a")
    assert ev.pair_seed(0, "a") != ev.pair_seed(0, "b") and ev.pair_seed(1, "a") != ev.pair_seed(0, "a")
    assert 0 <= ev.pair_seed(3, "x") < 2**31


def test_finding_changes_reads_simulator_changes(sim_pairs):
    from train.manifest import read_pairs

    rec = read_pairs(sim_pairs)[0]
    rec.extra = {"changes": [
        {"kind": "finding", "name": "effusion", "before": None, "after": 0.4},
        {"kind": "finding", "name": "cardiomegaly", "before": 0.5, "after": 0.2},
        {"kind": "device", "name": "ett", "before": None, "after": 1.0},
    ]}
    assert ev.finding_changes(rec) == {"Pleural Effusion": 1, "Cardiomegaly": -1}


def test_config_validation_and_outputs():
    with pytest.raises(InputError, match="unknown baseline"):
        ev.EvaluateConfig(model="m", pairs="p", out="o", baselines=("nope",))
    with pytest.raises(InputError, match="--limit"):
        ev.EvaluateConfig(model="m", pairs="p", out="o", limit=0)
    with pytest.raises(InputError, match="--confine"):
        ev.EvaluateConfig(model="m", pairs="p", out="o", confine="lungs")
    with pytest.raises(InputError, match="--devices"):
        ev.EvaluateConfig(model="m", pairs="p", out="o", devices="erase")
    cfg = ev.EvaluateConfig(model="m", pairs="p", out="dir/REPORT.json", baselines=("text-only",))
    assert cfg.systems == ("model", "text-only")
    assert [p.name for p in cfg.outputs()] == ["REPORT.json", "REPORT.md", "REPORT.png"]
    # a dot in the name is part of the name, not a suffix to replace (t7.5_i1.5.json once became t7.5_i1.json)
    cfg = ev.EvaluateConfig(model="m", pairs="p", out="dir/t7.5_i1.5.json")
    assert [str(p) for p in cfg.outputs()] == ["dir/t7.5_i1.5.json", "dir/t7.5_i1.5.md", "dir/t7.5_i1.5.png"]
    assert [p.name for p in ev.EvaluateConfig(model="m", pairs="p", out="dir/REPORT").outputs()] == \
        ["REPORT.json", "REPORT.md", "REPORT.png"]


def test_missing_manifest_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ev.load_pairs(ev.EvaluateConfig(model="m", pairs=str(tmp_path / "pairs.jsonl"), out="o"))


def test_auto_networks_fall_back_with_notes(tmp_path, monkeypatch):
    from engine.analysis import classifier, segmentation

    monkeypatch.setattr(classifier, "BUNDLED_CLASSIFIER", tmp_path / "none")
    monkeypatch.setattr(segmentation, "BUNDLED_SEGMENTER", tmp_path / "none")
    monkeypatch.setenv("HOME", str(tmp_path))
    nets = ev.load_networks(ev.EvaluateConfig(model="m", pairs="p", out="o", xrv_cache=str(tmp_path)), "cpu")
    assert nets.classifier is None and nets.segmenter is None and nets.race is None and nets.age is None
    assert any("No pathology classifier" in n for n in nets.notes)
    assert any("resnet_race_detection" in n for n in nets.notes)
    with pytest.raises(InputError):
        ev.load_networks(ev.EvaluateConfig(model="m", pairs="p", out="o", classifier="xrv", xrv_cache=str(tmp_path)), "cpu")


def test_markdown_shows_missing_values_as_dashes():
    agg = {"pairs": 1, "pathology_auroc": None, "cmig": None, "l1_prior": 0.01, "retention_definition": "x"}
    report = {"model": {"model_id": "m", "resolution": 64}, "pairs": 1, "config": {"pairs": "p"},
              "networks": {"classifier": None, "segmenter": None}, "aggregate": {"model": agg}, "notes": ["n"]}
    md = ev.markdown_report(report)
    assert "| model | – | – | – | – | – | – |" in md and "0.0100" in md and "- n" in md


def test_aggregate_pathology_auroc_uses_reference_labels():
    class Clf:
        targets = ("Pleural Effusion",)

        def supports(self, f):
            return f == "Pleural Effusion"

        def index(self, f):
            return 0

    rows = [{"truth": {"Pleural Effusion": t}, "systems": {"model": {"probabilities": {"Pleural Effusion": p}}}}
            for t, p in ((1, 0.9), (0, 0.2), (1, 0.4), (0, 0.6))]
    agg = ev.aggregate(rows, "model", ev.Networks(classifier=Clf()))
    assert agg["pathology_auroc"] == pytest.approx(75.0)  # 3 of 4 positive-negative pairs ordered
    assert math.isnan(agg["cmig"])  # no retention measure available in this toy
    assert np.isnan(agg["pathology_auroc_per_finding"]["Edema"])
