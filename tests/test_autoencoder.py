"""The TAEF2-style tiny autoencoder: architecture, conversion from the published state dicts,
model folders that carry it, the engine and the trainer on its latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from engine.autoencoder import (DETERMINISTIC_LOGVAR, TinyAutoencoder, autoencoder_class, convert_taesd_state_dict,
                                is_tiny_autoencoder, value_range_of)
from engine.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SHARED_TAEF2 = ROOT.parent / "shared" / "weights" / "taef2"


def _published(model: TinyAutoencoder) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model's weights split back into the published layout (Sequential indices, no prefix)."""
    state = model.state_dict()
    enc = {k.removeprefix("encoder."): v.half() for k, v in state.items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder."): v.half() for k, v in state.items() if k.startswith("decoder.")}
    return enc, dec


def test_taef2_layout_matches_the_published_keys_and_shapes():
    """The published TAEF2 files: encoder keys 0..14 with the pooled branch in 11-13, decoder 1..19
    with it in 3-5; 1,338,528 and 1,338,499 parameters (../shared/weights/taef2/README.md)."""
    model = TinyAutoencoder()
    enc, dec = _published(model)
    assert sum(v.numel() for v in enc.values()) == 1_338_528
    assert sum(v.numel() for v in dec.values()) == 1_338_499
    assert len(enc) == 79 and len(dec) == 79
    assert enc["0.weight"].shape == (64, 3, 3, 3) and enc["14.weight"].shape == (32, 64, 3, 3)
    assert {k.split(".")[0] for k in enc if ".pool." in k} == {"11", "12", "13"}
    assert {k.split(".")[0] for k in dec if ".pool." in k} == {"3", "4", "5"}
    assert dec["1.weight"].shape == (64, 32, 3, 3) and dec["19.weight"].shape == (3, 64, 3, 3)
    assert "0.weight" not in dec  # index 0 is the clamp


def test_published_state_dicts_load_strictly_and_round_trip_the_same_outputs():
    torch.manual_seed(0)
    model = TinyAutoencoder(latent_channels=8, width=16, downsampling_stages=2).eval()
    enc, dec = _published(model)
    again = TinyAutoencoder(latent_channels=8, width=16, downsampling_stages=2).eval()
    again.load_state_dict(convert_taesd_state_dict(enc, dec), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model.half().float()(x).sample, again(x).sample
    assert torch.equal(a, b)


def test_encoder_is_deterministic_and_shaped_like_a_vae_posterior():
    torch.manual_seed(1)
    model = TinyAutoencoder(latent_channels=8, width=16, downsampling_stages=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        post = model.encode(x).latent_dist
        z = post.mode()
        assert z.shape == (2, 8, 8, 8)  # 8x downscaling with three stages
        assert torch.equal(post.mean, z) and torch.equal(post.sample(), z)
        assert torch.all(post.logvar == DETERMINISTIC_LOGVAR) and torch.all(post.std == 0)
        assert torch.equal(model.encode(x).latent_dist.mode(), z)
        out = model.decode(z).sample
    assert out.shape == (2, 3, 64, 64)
    # the decoder's first layer keeps latents within +-latent_magnitude
    assert torch.allclose(model.decoder[0](torch.tensor([1e6, -1e6])), torch.tensor([3.0, -3.0]))
    assert model.config.block_out_channels == [16, 16, 16, 16] and model.config.scaling_factor == 1.0


def test_config_dispatch_and_value_range():
    assert is_tiny_autoencoder({"_class_name": "TinyAutoencoder"})
    assert not is_tiny_autoencoder({"_class_name": "AutoencoderKL"})
    assert autoencoder_class({"_class_name": "TinyAutoencoder"}) is TinyAutoencoder
    assert autoencoder_class({"_class_name": "AutoencoderKL"}).__name__ == "AutoencoderKL"
    assert value_range_of(TinyAutoencoder(width=16)) == (0.0, 1.0)
    with pytest.raises(ValueError, match="block_out_channels"):
        TinyAutoencoder(width=16, block_out_channels=(16, 16))


def _fake_published(folder: Path, seed: int = 0, *, licence: bool = True) -> Path:
    torch.manual_seed(seed)
    enc, dec = _published(TinyAutoencoder())
    folder.mkdir(parents=True)
    torch.save(enc, folder / "taef2_encoder.pth")
    torch.save(dec, folder / "taef2_decoder.pth")
    if licence:
        (folder / "LICENSE").write_text("MIT License\n\nCopyright (c) 2023 Ollin Boer Bohan\n")
    return folder


def test_convert_autoencoder_writes_a_loadable_component_with_licence_and_provenance(tmp_path, capsys):
    from train.__main__ import main as train_main

    src = _fake_published(tmp_path / "src")
    out = tmp_path / "taef2"
    assert train_main(["convert-autoencoder", "--source", str(src), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["LICENSE", "PROVENANCE.json", "config.json", "diffusion_pytorch_model.safetensors"]
    assert "Ollin Boer Bohan" in (out / "LICENSE").read_text()
    prov = json.loads((out / "PROVENANCE.json").read_text())
    assert prov["license"] == "MIT" and set(prov["files"]) == {"taef2_encoder.pth", "taef2_decoder.pth"}
    assert json.loads((out / "config.json").read_text())["_class_name"] == "TinyAutoencoder"
    loaded = TinyAutoencoder.from_pretrained(out, use_safetensors=True, torch_dtype=torch.float32)
    enc = torch.load(src / "taef2_encoder.pth", weights_only=True)
    assert torch.equal(loaded.state_dict()["encoder.0.weight"], enc["0.weight"].float())
    # a second conversion into the same folder, a missing licence and foreign weights are refused
    assert train_main(["convert-autoencoder", "--source", str(src), "--out", str(out)]) == 2
    bare = _fake_published(tmp_path / "bare", licence=False)
    assert train_main(["convert-autoencoder", "--source", str(bare), "--out", str(tmp_path / "x")]) == 2
    assert "LICENSE" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({"0.weight": torch.zeros(8, 3, 3, 3)}, wrong / "taef2_encoder.pth")
    torch.save({"1.weight": torch.zeros(8, 8, 3, 3)}, wrong / "taef2_decoder.pth")
    (wrong / "LICENSE").write_text("MIT")
    assert train_main(["convert-autoencoder", "--source", str(wrong), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))


@pytest.mark.skipif(not SHARED_TAEF2.is_dir(), reason="the published TAEF2 weights are in ../shared only")
def test_published_taef2_round_trips_a_radiograph(tmp_path):
    """The real weights load strictly into this implementation and reconstruct a chest film."""
    from train.autoencoder import convert_autoencoder
    from train.simulator import Findings, render, sample_patient

    out = convert_autoencoder(SHARED_TAEF2, tmp_path / "taef2")
    model = TinyAutoencoder.from_pretrained(out, use_safetensors=True, torch_dtype=torch.float32).eval()
    image = render(sample_patient(np.random.default_rng(0)), Findings(), size=256).image
    x = torch.from_numpy(image)[None, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        y = model.decode(model.encode(x).latent_dist.mode()).sample.mean(dim=1)[0].clamp(0, 1).numpy()
    psnr = 10 * np.log10(1.0 / np.mean((y - image) ** 2))
    assert psnr > 30.0


def test_engine_edits_with_a_tiny_autoencoder_model(tmp_path):
    """A model folder whose vae/ is a TinyAutoencoder: grey in, three channels at the VAE, grey out."""
    import engine

    model = build_tiny_model(tmp_path / "m", autoencoder="tiny", instruct_target="change")
    config = json.loads((model / "vae" / "config.json").read_text())
    assert config["_class_name"] == "TinyAutoencoder" and config["in_channels"] == 3
    eng = engine.load(model, device="cpu", dtype="fp32")
    assert isinstance(eng.vae, TinyAutoencoder) and eng.card.value_range == (0.0, 1.0)
    prior = torch.rand(1, 1, 64, 64)
    latent = eng.encode_prior(prior)
    assert latent.shape == (1, 8, 16, 16)
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    cf = eng.counterfactual(image, engine.EditRequest("new right pleural effusion", steps=2, seed=0))
    again = eng.counterfactual(image, engine.EditRequest("new right pleural effusion", steps=2, seed=0))
    assert cf.image.shape == (64, 64) and np.array_equal(cf.image, again.image)


def test_trainer_trains_and_exports_on_tiny_autoencoder_latents(tmp_path):
    """vae_from a converted autoencoder: the UNet is built for its latent channels, the export
    carries the autoencoder with its licence and provenance, and the engine loads it."""
    import engine
    from train.autoencoder import convert_autoencoder
    from train.config import load_config
    from train.export import export_run
    from train.fit import fit
    from train.simulator.writer import SimulationConfig, write_dataset

    sim = tmp_path / "sim"
    write_dataset(SimulationConfig(out=str(sim), patients=3, visits=3, size=128, seed=3))
    vae = convert_autoencoder(_fake_published(tmp_path / "src"), tmp_path / "taef2")
    cfg = load_config(ROOT / "train" / "configs" / "tiny.yaml", {
        "manifest": str(sim / "pairs.jsonl"), "out_dir": str(tmp_path / "run"), "resolution": 32, "batch_size": 2,
        "steps": 2, "ckpt_every": 2, "log_every": 1, "progress": False, "simulate": 0, "warmup_steps": 0,
        "vae_from": str(vae), "instruct_target": "change"})
    fit(cfg)
    model = export_run(cfg.out_dir, tmp_path / "model")
    unet = json.loads((model / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 64 and unet["out_channels"] == 32
    assert (model / "vae" / "LICENSE").is_file() and (model / "vae" / "PROVENANCE.json").is_file()
    card = json.loads((model / "card.json").read_text())
    assert card["value_range"] == [0.0, 1.0] and card["latent_scaling"] == 1.0
    eng = engine.load(model, device="cpu", dtype="fp32")
    cf = eng.counterfactual(np.full((40, 32), 0.5, dtype=np.float32), engine.EditRequest("new effusion", steps=2))
    assert cf.image.shape == (32, 32) and cf.image_input.shape == (40, 32)


def test_region_decode_equals_the_full_decode_inside_the_region():
    torch.manual_seed(2)
    for normed, stages in ((True, 3), (False, 2)):
        model = TinyAutoencoder(latent_channels=8, width=16, downsampling_stages=stages, normed=normed).eval()
        z = torch.randn(1, 8, 24, 24)
        f = 2 ** stages
        with torch.no_grad():
            full = model.decode(z).sample
            part = model.decode_region(z, (5, 11, 14, 24))
        assert part.shape == (1, 3, 6 * f, 10 * f)
        assert torch.allclose(part, full[..., 5 * f:11 * f, 14 * f:24 * f], atol=1e-5)


def test_change_models_decode_only_where_the_change_is(tmp_path):
    """With a region-decoding autoencoder the output is the prior outside the changed latent box and
    the same sum as the full path inside it."""
    import engine
    from engine.engine import CHANGE_FLOOR

    eng = engine.load(build_tiny_model(tmp_path / "m", autoencoder="tiny", instruct_target="change"),
                      device="cpu", dtype="fp32")
    prior = torch.rand(1, 1, 64, 64)
    latent = eng.encode_prior(prior)
    change = torch.zeros_like(latent)
    change[:, :, 4:7, 9:12] = 0.5 * eng.card.change_factor
    change[:, :, 0, 0] = 0.5 * CHANGE_FLOOR * eng.card.change_factor  # below the floor: not decoded
    out = eng.decode_change(prior, latent, change, detail_threshold=None)
    assert torch.equal(out[..., :8, :], prior[..., :8, :]) and torch.equal(out[..., 52:, :], prior[..., 52:, :])
    with torch.no_grad():
        d = lambda z: eng.vae.decode(z).sample.float().mean(dim=1, keepdim=True)  # noqa: E731
        base = latent * eng.card.latent_scaling
        reference = (prior + d(base + change / eng.card.change_factor) - d(base)).clamp(0, 1)
    box = (slice(None), slice(None), slice(12, 32), slice(32, 52))  # the change +- one latent pixel
    assert torch.allclose(out[box], reference[box], atol=1e-4)
    assert not torch.equal(out[box], prior[box])
    untouched = eng.decode_change(prior, latent, torch.zeros_like(latent), detail_threshold=0.04)
    assert torch.equal(untouched, prior)
