"""``benchmarks/bench_engine.py`` end to end, our instruct sampler against diffusers' pipeline, and the
engine's text-embedding cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from benchmarks import bench_engine as bench
from benchmarks.bench_engine import main
from engine.engine import EditRequest

# Our sampler and diffusers' StableDiffusionInstructPix2PixPipeline run the same float32 operations
# except for the order of the dual-guidance sum (ours: e0 + s_img (eI - e0) + s_txt (eT - eI);
# diffusers: e0 + s_txt (eT - eI) + s_img (eI - e0)), which rounds differently in the last bits
# and is carried through the steps and the decoder: measured max |difference| 1.1e-6 (5 steps)
# and 1.2e-6 (20 steps) on the [0, 1] pixel scale. 1e-5 leaves room for other CPUs' kernels and
# is 400 times below one 8-bit grey level (1/255); an algorithmic difference (noise, scaling,
# branch order, schedule) moves pixels by orders of magnitude more (test_instruct_difference_is_detected).
PIPELINE_TOLERANCE = 1e-5


def build_clip_instruct_model(out: Path, *, seed: int = 0) -> Path:
    """A tiny seeded instruct model (64 px, ``latent`` target) whose text encoder is a tiny CLIP.

    CLIP attends to every token (no padding mask), as diffusers' pipeline does, so the two
    samplers see the same cross-attention: the one condition for identical images.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from fixtures_sd import write_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.checkpoint import ModelCard, TextEncoderSpec, save_model

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64), layers_per_block=1,
        norm_num_groups=32, sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    encoder_dir = write_clip_tokenizer(out.parent / f".{out.name}-text")
    vocab = len(json.loads((encoder_dir / "vocab.json").read_text()))
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )).save_pretrained(encoder_dir, safe_serialization=True)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    card = ModelCard(name="tiny-clip-instruct", method="instruct", resolution=64, instruct_target="latent",
                     latent_scaling=float(vae.config.scaling_factor),
                     text_encoder=TextEncoderSpec(backend="clip", source="text_encoder", max_tokens=16),
                     training_data=({"name": "none (random weights)", "license": "n/a"},), license="MIT")
    save_model(out, card=card, vae=vae, unet=unet, scheduler=scheduler, text_encoder_folder=encoder_dir)
    return out


@pytest.fixture(scope="module")
def clip_engine(tmp_path_factory: pytest.TempPathFactory):
    return engine.load(build_clip_instruct_model(tmp_path_factory.mktemp("bench") / "clip-instruct"),
                       device="cpu", dtype="fp32")


def _requests(steps: int = 5) -> list[EditRequest]:
    return [EditRequest("new large left pleural effusion", steps=steps, seed=3).validated(),
            EditRequest("no pleural effusion", steps=steps, seed=4).validated()]


def test_bench_runs_end_to_end_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = main(["--arch", "tiny", "--res", "64", "--steps", "2", "--repeats", "1", "--compare",
                 "diffusers", "--method", "instruct", "invert", "--batch", "1", "2", "--threads", "1",
                 "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(bench.RESULT_KEYS) <= set(data)
    env = data["environment"]
    for key in ("device", "device_name", "threads", "torch", "diffusers", "git_commit", "command"):
        assert key in env
    assert env["command"].startswith("python benchmarks/bench_engine.py --arch tiny")
    rows = data["rows"]
    assert [(r["method"], r["batch"]) for r in rows] == [("instruct", 1), ("instruct", 2), ("invert", 1)]
    for row in rows:
        assert set(bench.ROW_KEYS) <= set(row)
        assert row["res"] == 64 and row["steps"] == 2 and row["device"] == "cpu"
        for side in ("ours", "diffusers"):
            assert row[side]["median_s"] > 0 and row[side]["p95_s"] >= row[side]["median_s"]
            assert row[side]["images_per_s"] > 0 and row[side]["peak_mem_mb"] is not None
            assert len(row[side]["times_s"]) == 1
        assert row["ratio"] == pytest.approx(row["ours"]["median_s"] / row["diffusers"]["median_s"], rel=1e-2)
    assert set(rows[1]["relative_to_batch1"]) == {"ours", "diffusers"}
    assert "text_median_s" in rows[0]["ours"]  # the engine's own stage timings ride along
    table = capsys.readouterr().out
    assert "| instruct | 64 | 2 | 2 |" in table and "| invert | 64 | 1 | 2 |" in table
    assert main(["--table", str(out)]) == 0


def test_bench_runs_as_a_script_from_any_folder(tmp_path: Path) -> None:
    """``python benchmarks/bench_engine.py`` finds the engine wherever it is started (it left the engine)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_engine.py"), "--table",
                           str(root / "docs" / "eval" / "bench_cpu_bundled.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| model | method | res | batch |")


def test_bench_rejects_a_resolution_the_model_does_not_have(tiny_model: Path, capsys) -> None:
    assert main(["--model", str(tiny_model), "--res", "128", "--repeats", "1"]) == 2
    assert "use --arch" in capsys.readouterr().err


def test_instruct_matches_diffusers_pipeline(clip_engine) -> None:
    """Our sampler is InstructPix2Pix's algorithm: diffusers' pipeline gives the same images.

    Same weights (the same module objects), the same DDIM config, steps, guidance 7.5 / 1.5,
    seeds (one CPU generator per item: the same starting noise), a ``latent``-target model and
    an unmasked text encoder; a batch of two different instructions on one prior.
    """
    assert bench._comparable(clip_engine) is None
    canvas = bench.sample_radiograph(64)
    requests = _requests()
    ours = np.stack([c.image for c in clip_engine.counterfactuals(canvas, requests)])
    theirs = bench.diffusers_instruct(bench.instruct_pipeline(clip_engine), clip_engine, canvas, requests)
    assert ours.shape == theirs.shape == (2, 64, 64)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # not trivially equal: the two items differ
    assert 0.0 < ours.mean() < 1.0 and ours.std() > 1e-3
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=PIPELINE_TOLERANCE)


def test_diffusers_pipeline_runs_a_model_with_coordinate_maps(tmp_path) -> None:
    """The pipeline sees 2C input channels and the UNet gets its maps appended, as ours does:
    with the same weights, seeds and a latent target the images agree up to the pipeline's
    unmasked text attention (so only shapes and finiteness are compared here)."""
    from conftest import build_tiny_model

    eng = engine.load(build_tiny_model(tmp_path / "pos", position_channels=2), device="cpu", dtype="fp32")
    canvas = bench.sample_radiograph(64)
    theirs = bench.diffusers_instruct(bench.instruct_pipeline(eng), eng, canvas, _requests(steps=2))
    assert theirs.shape == (2, 64, 64) and np.isfinite(theirs).all()


def test_diffusers_pipeline_runs_a_model_on_a_zero_to_one_autoencoder(tmp_path) -> None:
    """v8's TAEF2 works on [0, 1]; the pipeline normalises to [-1, 1]: the view converts at both
    edges, so the pipeline's encode/decode round trip is the autoencoder's own, in its range."""
    import torch
    from conftest import build_tiny_model

    eng = engine.load(build_tiny_model(tmp_path / "taef", autoencoder="tiny", position_channels=2),
                      device="cpu", dtype="fp32")
    assert tuple(eng.card.value_range) == (0.0, 1.0)
    pipe = bench.instruct_pipeline(eng)
    x01 = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    own = eng.vae.decode(eng.vae.encode(x01).latent_dist.mode()).sample
    theirs = pipe.vae.decode(pipe.vae.encode(x01 * 2 - 1).latent_dist.mode(), return_dict=False)[0]
    torch.testing.assert_close((theirs + 1) / 2, own)
    images = bench.diffusers_instruct(pipe, eng, bench.sample_radiograph(64), _requests(steps=2))
    assert images.shape == (2, 64, 64) and np.isfinite(images).all()


def test_instruct_difference_is_detected(clip_engine) -> None:
    """The tolerance is tight enough to see a one-step change of the schedule."""
    canvas = bench.sample_radiograph(64)
    ours = clip_engine.counterfactuals(canvas, _requests(steps=5))[0].image
    theirs = bench.diffusers_instruct(bench.instruct_pipeline(clip_engine), clip_engine, canvas, _requests(steps=6))
    assert np.abs(ours - theirs[0]).max() > 100 * PIPELINE_TOLERANCE


def test_text_cache_is_exact_and_skips_the_encoder(tiny_model: Path) -> None:
    eng = engine.load(tiny_model, device="cpu", dtype="fp32")
    calls: list[list[str]] = []
    encode = eng.text_encoder.encode

    def counting(texts: list[str]):
        calls.append(list(texts))
        return encode(texts)

    eng.text_encoder.encode = counting
    prior = bench.sample_radiograph(64)
    request = EditRequest("new left pleural effusion", steps=2, seed=1)
    first = eng.counterfactual(prior, request).image
    assert calls == [["new left pleural effusion"], [""]]
    second = eng.counterfactual(prior, request).image
    assert len(calls) == 2  # the instruction and the empty text came from the cache
    assert np.array_equal(first, second)

    eng.text_cache_size = 0  # off: every call goes through the encoder, with the same bits out
    eng.clear_text_cache()
    uncached = eng.counterfactual(prior, request).image
    assert len(calls) == 4
    assert np.array_equal(first, uncached)
    with eng._lock:
        cached_states, cached_mask = eng._embed(["a", "b"])
    eng.text_cache_size = 2
    with eng._lock:
        states, mask = eng._embed(["a", "b"])
        again, _ = eng._embed(["a", "b"])
        assert again is states  # the cached tensor itself
        assert torch.equal(states, cached_states) and torch.equal(mask, cached_mask)
        eng._embed(["b", "a"])  # a different list is a different entry
        eng._embed(["c"])
    assert len(eng._texts) == 2 and (("a", "b"), "cpu", "torch.float32") not in eng._texts


def test_performance_script_rewrites_only_its_table(tmp_path: Path) -> None:
    """benchmarks/performance.py: each JSON kind becomes a table between its own markers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("performance", Path(__file__).parents[1] / "benchmarks/performance.py")
    performance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(performance)
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("intro\n<!-- table:cpu_train -->\nold\n<!-- /table:cpu_train -->\n"
                   "<!-- table:cpu_inversions -->\nkeep me\n<!-- /table:cpu_inversions -->\n")
    train = [{"stage": "instruct", "arch": "small", "params_m": 4.4, "resolution": 256, "batch": 8,
              "ms_per_step": 900.0, "images_per_s": 8.9, "peak_memory_mb": 1500, "device": "Xeon", "threads": 2,
              "dtype": "float32"}]
    assert performance.rewrite(doc, "cpu_train", performance.table("train", train))
    assert not performance.rewrite(doc, "cpu_missing", "x")
    text = doc.read_text()
    assert "| instruct | small | 4.4 | 256 | 8 | 900.0 | 8.9 | 1500 |" in text and "old" not in text
    assert "keep me" in text and text.startswith("intro\n")
    inversions = {"rows": [{"inversion": "null-text", "cached": False, "seconds_per_edit": 9.5, "invert_s": 8.0,
                            "edit_s": 1.2}], "gpu": None, "cpu": "Xeon", "threads": 2, "dtype": "torch.float32",
                  "resolution": 256, "steps": 50, "repeats": 1}
    assert "| null-text | 9.50 | 8.00 | 1.20 | no |" in performance.table("inversions", inversions)
    assert performance.out_flag(performance.SUITES["cpu"]["train"]) == "--json"
    assert performance.out_flag(performance.SUITES["cpu"]["bundled"]) == "--out"
