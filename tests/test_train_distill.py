"""``stage: distill``: the teacher's results, the student's loss, resume, and the export beside the teacher."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.io import read_xray
from conftest import build_tiny_model
from engine.errors import InputError, ModelFolderError
from train.config import load_config
from train.fit import TrainingInterrupted, fit, latest_checkpoint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny change model with coordinate maps (no student)."""
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "teacher", instruct_target="change",
                            position_channels=2, seed=5)


@pytest.fixture(scope="module")
def taef_teacher(tmp_path_factory) -> Path:
    """The same on a TAEF2-style TinyAutoencoder (v8's autoencoder: [0, 1], region decoding)."""
    return build_tiny_model(tmp_path_factory.mktemp("taef") / "teacher", instruct_target="change",
                            position_channels=2, seed=6, autoencoder="tiny")


@pytest.fixture(scope="module")
def sim_data(tmp_path_factory) -> Path:
    from train.simulator.writer import SimulationConfig, write_dataset

    out = tmp_path_factory.mktemp("sim")
    write_dataset(SimulationConfig(out=str(out), patients=4, visits=3, size=128, seed=3))
    return out


def _cfg(tmp: Path, teacher: Path, sim: Path, name: str, **over):
    base = {"stage": "distill", "init_from": str(teacher), "manifest": str(sim / "pairs.jsonl"),
            "splits": "train,validate,test", "out_dir": str(tmp / name), "cache_dir": str(tmp / "cache"),
            "resolution": 64, "batch_size": 4, "steps": 6, "ckpt_every": 3, "log_every": 1, "progress": False,
            "train_projection": False, "distill_samples": 8, "guidance_dim": 8, "lr": 1e-3, "teacher_batch": 4,
            "warmup_steps": 0}
    return load_config(None, {**base, **over})


def test_config_says_what_a_distill_run_needs(tmp_path, teacher, sim_data):
    with pytest.raises(InputError, match="needs init_from"):
        _cfg(tmp_path, teacher, sim_data, "x", init_from="none")
    with pytest.raises(InputError, match="train_projection: false"):
        _cfg(tmp_path, teacher, sim_data, "x", train_projection=True)
    with pytest.raises(InputError, match="text_guidance_range must contain the engine's default 7.5"):
        _cfg(tmp_path, teacher, sim_data, "x", text_guidance_range="1,5")
    with pytest.raises(InputError, match="resolution must be the teacher's \\(64\\)"):
        fit(_cfg(tmp_path, teacher, sim_data, "x", resolution=32))
    for name in ("distill-journey-mini",):
        cfg = load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / f"{name}.yaml")
        assert cfg.stage == "distill" and cfg.fast_steps == 4 and cfg.teacher_steps == 20


@pytest.mark.parametrize("kind", ["kl", "tiny"])
def test_teacher_results_are_the_engines_full_sampler(tmp_path, teacher, taef_teacher, sim_data, kind):
    """What the student learns from is what the engine's full sampler makes for the same draw
    (on the project's VAE and on a TAEF2-style autoencoder, whose change decodes by region)."""
    teacher = teacher if kind == "kl" else taef_teacher
    from train.data import TensorStore, load_config_items
    from train.distill import draw_key, draws, prior_key
    from train.models import build_models

    cfg = _cfg(tmp_path, teacher, sim_data, "results", steps=1, ckpt_every=1)
    fit(cfg)
    models = build_models(cfg)
    store, priors = TensorStore(cfg.cache_path / "distill"), TensorStore(cfg.cache_path / "priors")
    all_draws = draws(cfg, load_config_items(cfg))
    assert len(all_draws) == 8 and len(store) == 8
    assert {d.text_guidance for d in all_draws} - {7.5}  # drawn in the range, not only the default
    eng = engine.load(teacher, device="cpu", dtype="fp32")
    for d in all_draws[:2]:
        result = store.get(draw_key(models.teacher_digest, cfg, d))["result"][None]
        prior_latent = priors.get(prior_key(models.vae_id, d.prior, cfg.resolution))["latent"][None]
        cf = eng.counterfactual(read_xray(d.prior), d.text, seed=d.seed, text_guidance=d.text_guidance,
                                image_guidance=d.image_guidance, sampler="full")
        canvas = torch.from_numpy(cf.prior)[None, None]
        torch.testing.assert_close(prior_latent, eng.encode_prior(canvas), atol=1e-4, rtol=1e-4)
        image = eng.decode_change(canvas, prior_latent, result, detail_threshold=cf.request.detail_threshold)
        assert np.abs(image[0, 0].numpy() - cf.image).max() < 1e-3


def test_the_student_learns_and_a_killed_run_resumes_identically(tmp_path, teacher, sim_data):
    straight = _cfg(tmp_path, teacher, sim_data, "straight", steps=80, ckpt_every=40, log_every=20, lr=3e-3)
    fit(straight)
    with (Path(straight.out_dir) / "log.csv").open() as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert losses[-1] < 0.7 * losses[0], losses  # 8 draws: the student fits them
    broken = _cfg(tmp_path, teacher, sim_data, "broken", steps=6, ckpt_every=3)
    whole = _cfg(tmp_path, teacher, sim_data, "whole", steps=6, ckpt_every=3)
    fit(whole)
    with pytest.raises(TrainingInterrupted):
        fit(broken, stop_at_step=4)
    fit(broken)
    a, b = latest_checkpoint(whole.out_dir), latest_checkpoint(broken.out_dir)
    for part in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(str(a / part)), load_file(str(b / part))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), part


def test_export_puts_the_student_beside_its_teacher(tmp_path, teacher, sim_data, capsys):
    from train.__main__ import main as train_main

    cfg = _cfg(tmp_path, teacher, sim_data, "export", steps=2, ckpt_every=2)
    fit(cfg)
    copy = tmp_path / "with-student"
    assert train_main(["export", "--run", cfg.out_dir, "--out", str(copy)]) == 0
    card = json.loads((copy / "card.json").read_text())
    fast = card["fast_sampler"]
    assert fast["steps"] == 4 and fast["guidance_dim"] == 8 and len(fast["teacher_timesteps"]) == 20
    assert fast["extra"]["stored_dtype"] == "float16" and "python -m train" in fast["made_by"]
    shard = next((copy / "unet_fast").glob("*.safetensors"))
    assert next(iter(load_file(str(shard)).values())).dtype == torch.float16  # half the bytes on disk
    eng = engine.load(copy, device="cpu", dtype="fp32")
    cf = eng.counterfactual(np.full((64, 64), 0.5, np.float32), "new left pleural effusion", seed=1)
    assert cf.sampler == "fast" and eng.unet_fast.dtype == torch.float32
    assert not (teacher / "unet_fast").exists()  # the teacher's own folder is untouched
    assert train_main(["export", "--run", cfg.out_dir, "--out", str(copy)]) == 2  # has one: --overwrite replaces it
    assert "already has a fast sampler" in capsys.readouterr().err
    assert train_main(["export", "--run", cfg.out_dir, "--out", str(copy), "--overwrite"]) == 0
    other = tmp_path / "other-teacher"
    build_tiny_model(other, instruct_target="change", position_channels=2, seed=9)
    assert train_main(["export", "--run", cfg.out_dir, "--out", str(other)]) == 2
    assert "not the teacher this student was distilled from" in capsys.readouterr().err
    in_place = tmp_path / "in-place"
    shutil.copytree(teacher, in_place)
    cfg_in_place = _cfg(tmp_path, in_place, sim_data, "in-place", steps=1, ckpt_every=1)
    fit(cfg_in_place)
    assert train_main(["export", "--run", cfg_in_place.out_dir, "--out", str(in_place)]) == 0
    assert engine.load(in_place, device="cpu", dtype="fp32").fast is not None
    with pytest.raises(ModelFolderError):  # the folder's teacher is retrained: the student is refused
        shard = next((in_place / "unet").glob("*.safetensors"))
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
        engine.load(in_place, device="cpu", dtype="fp32")


def test_priors_the_teacher_already_encoded_are_reused_not_encoded_again(tmp_path, teacher, sim_data):
    """A distill run that shares its teacher's cache_dir takes the prior latents from the fit
    stage's latent cache (the posterior's mode, its first half) instead of running the VAE again."""
    from train.data import TensorStore, load_canvas, load_config_items
    from train.distill import draws, prior_key
    from train.fit import encode_posterior, latent_key
    from train.models import build_models

    cfg = _cfg(tmp_path, teacher, sim_data, "reuse", steps=1, ckpt_every=1)
    models = build_models(cfg)
    paths = sorted({d.prior for d in draws(cfg, load_config_items(cfg))})
    reused = paths[:-1]  # one prior is left for the VAE
    fit_store = TensorStore(cfg.cache_path / "latents")
    marked = {}
    for p in reused:
        params = encode_posterior(models.vae, load_canvas(p, cfg.resolution)[None], models.value_range)[0]
        mode, rest = params.chunk(2, dim=0)
        marked[p] = mode + 0.25  # not what the VAE gives: only a reuse puts it into the priors
        fit_store.write(iter([(latent_key(models.vae_id, p, cfg.resolution), {"params": torch.cat([marked[p], rest])})]))
    fit(cfg)
    priors = TensorStore(cfg.cache_path / "priors")
    assert len(priors) == len(paths)
    for p in reused:
        torch.testing.assert_close(priors.get(prior_key(models.vae_id, p, cfg.resolution))["latent"], marked[p])
    last = paths[-1]
    fresh = encode_posterior(models.vae, load_canvas(last, cfg.resolution)[None], models.value_range)[0].chunk(2, dim=0)[0]
    torch.testing.assert_close(priors.get(prior_key(models.vae_id, last, cfg.resolution))["latent"], fresh,
                               atol=1e-4, rtol=1e-4)
