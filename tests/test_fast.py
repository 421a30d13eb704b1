"""The fast sampler: its math against hand-computed values and an oracle student, the model
folder's student part, and how the engine picks and records the sampler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine import EditRequest, InputError, ModelFolderError
from engine.fast import ddim_jump, endpoints, fast_timesteps, guidance_embedding, path_point, sample_fast
from engine.instruct import initial_noise

GRID = [951 - 50 * i for i in range(20)]


def _prior(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:72, 0:64]
    return np.clip(0.5 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 9.0) + 0.05 * rng.standard_normal((72, 64)),
                   0, 1).astype(np.float32)


# -- the math ------------------------------------------------------------------------------------


def test_guidance_embedding_is_lcms_per_scale():
    from diffusers import LatentConsistencyModelPipeline

    w_text, w_image = torch.tensor([7.5, 2.0]), torch.tensor([1.5, 1.0])
    emb = guidance_embedding(w_text, w_image, 16)
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    lcm = LatentConsistencyModelPipeline.get_guidance_scale_embedding
    torch.testing.assert_close(emb[:, :16], lcm(None, w_text, 16))
    torch.testing.assert_close(emb[:, 16:], lcm(None, w_image, 16))
    with pytest.raises(ValueError, match="even"):
        guidance_embedding(w_text, w_image, 7)


def test_fast_timesteps_pick_evenly_from_the_teachers():
    assert fast_timesteps(GRID, 4) == [951, 701, 451, 201]
    assert fast_timesteps(GRID, 2) == [951, 451]
    assert fast_timesteps(GRID, 1) == [951]
    assert fast_timesteps(GRID, 8) == [951, 851, 701, 551, 451, 351, 201, 51]
    assert fast_timesteps(GRID, 20) == GRID
    for bad in (0, 21):
        with pytest.raises(ValueError, match="1 to 20"):
            fast_timesteps(GRID, bad)


def test_the_path_runs_through_the_start_noise_and_the_teachers_result():
    g = torch.Generator().manual_seed(0)
    z, x_final = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a0, af = torch.tensor(0.0078), torch.tensor(0.9991)
    clean, noise = endpoints(z, x_final, a0, af)
    start, _ = path_point(clean, noise, a0.expand(2))
    end, _ = path_point(clean, noise, af.expand(2))
    torch.testing.assert_close(start, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(end, x_final, atol=1e-5, rtol=1e-5)


def test_ddim_jump_hand_computed():
    # a = 0.64 (sqrt 0.8, noise 0.6), x = 1, v = 0.5: X = 0.8 - 0.3 = 0.5, e = 0.6 + 0.4 = 1.0;
    # a_next = 0.36 (0.6, 0.8): 0.6 * 0.5 + 0.8 * 1.0 = 1.1
    out = ddim_jump(torch.tensor([1.0]), torch.tensor([0.5]), 0.64, 0.36)
    torch.testing.assert_close(out, torch.tensor([1.1]))


class _Oracle(torch.nn.Module):
    """A perfect student: the ``v`` of the straight path through known endpoints, whatever it is asked."""

    def __init__(self, clean: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.clean, self.noise, self.alphas = clean, noise, alphas
        self.calls = 0

    def forward(self, model_in, t, *, encoder_hidden_states, encoder_attention_mask=None, timestep_cond=None):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        self.calls += 1
        assert timestep_cond is not None and timestep_cond.shape == (len(model_in), 16)
        _, v = path_point(self.clean, self.noise, self.alphas[int(t)].expand(len(model_in)))
        return UNet2DConditionOutput(sample=v)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_a_perfect_student_reproduces_the_teacher_in_any_number_of_steps(steps):
    """What the trainer teaches (v along the path) is what the sampler needs: every step count
    lands on the teacher's result, one UNet call per step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    alphas, final = scheduler.alphas_cumprod, float(scheduler.final_alpha_cumprod)
    seeds = [3, 4]
    prior = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    z = initial_noise(prior.shape, [torch.Generator().manual_seed(s) for s in seeds], dtype=torch.float32,
                      device=torch.device("cpu"))
    teacher_result = 0.7 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    clean, noise = endpoints(z, teacher_result, alphas[GRID[0]], final)
    oracle = _Oracle(clean, noise, alphas)
    out = sample_fast(oracle, alphas, final, prior, torch.zeros(2, 5, 32), torch.ones(2, 5, dtype=torch.bool),
                      text_scale=torch.tensor([7.5, 3.0]), image_scale=torch.tensor([1.5, 1.0]),
                      timesteps=fast_timesteps(GRID, steps), guidance_dim=8,
                      generators=[torch.Generator().manual_seed(s) for s in seeds])
    assert oracle.calls == steps
    torch.testing.assert_close(out, teacher_result, atol=2e-5, rtol=1e-4)


# -- the model folder ----------------------------------------------------------------------------


def test_the_student_part_is_loaded_checked_and_hashed(fast_model, tmp_path):
    from engine.checkpoint import FAST_PART, content_hash, load_model_parts

    parts = load_model_parts(fast_model)
    assert parts.unet_fast is not None and parts.unet_fast.config.time_cond_proj_dim == 16
    card = json.loads((fast_model / "card.json").read_text())
    assert card["fast_sampler"]["steps"] == 4 and card["fast_sampler"]["part"] == FAST_PART
    # the content hash covers the student: another student, another model hash
    copy = tmp_path / "copy"
    shutil.copytree(fast_model, copy)
    shard = next((copy / FAST_PART).glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert content_hash(copy) != content_hash(fast_model)


def test_a_student_of_another_teacher_is_refused(fast_model, tmp_path):
    copy = tmp_path / "retrained"
    shutil.copytree(fast_model, copy)
    shard = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the teacher's UNet changed after the student was distilled
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="distilled from another teacher.*distil it again"):
        engine.load(copy, device="cpu", dtype="fp32")


def test_student_and_card_entry_go_together(fast_model, tiny_model, tmp_path):
    no_entry = tmp_path / "no-entry"
    shutil.copytree(fast_model, no_entry)
    card = json.loads((no_entry / "card.json").read_text())
    entry = card.pop("fast_sampler")
    (no_entry / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="unet_fast/ is present but card.json has no fast_sampler"):
        engine.load(no_entry, device="cpu", dtype="fp32")
    no_folder = tmp_path / "no-folder"
    shutil.copytree(fast_model, no_folder)
    shutil.rmtree(no_folder / "unet_fast")
    with pytest.raises(ModelFolderError, match="lacks unet_fast/config.json"):
        engine.load(no_folder, device="cpu", dtype="fp32")
    bad = tmp_path / "bad-entry"
    shutil.copytree(fast_model, bad)
    (bad / "card.json").write_text(json.dumps({**card, "fast_sampler": {**entry, "guidance_dim": 16}}))
    with pytest.raises(ModelFolderError, match="time_cond_proj_dim must be 2 \\* fast_sampler.guidance_dim"):
        engine.load(bad, device="cpu", dtype="fp32")
    (bad / "card.json").write_text(json.dumps({**card, "fast_sampler": {**entry, "steps": 30}}))
    with pytest.raises(ModelFolderError, match="fast_sampler.steps must be 1 to 20"):
        engine.load(bad, device="cpu", dtype="fp32")


def test_add_fast_sampler_refuses_another_teacher_and_an_existing_student(fast_model, tiny_model, tmp_path):
    from engine.checkpoint import FastSampler, add_fast_sampler, load_model_parts, read_card

    parts = load_model_parts(fast_model)
    spec = read_card(fast_model).fast
    with pytest.raises(ModelFolderError, match="already has a fast sampler"):
        add_fast_sampler(fast_model, parts.unet_fast, spec)
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    with pytest.raises(ModelFolderError, match="not the teacher this student was distilled from"):
        add_fast_sampler(other, parts.unet_fast, FastSampler(**{**spec.__dict__}))
    assert not (other / "unet_fast").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


# -- the engine ----------------------------------------------------------------------------------


def test_default_options_take_the_fast_path_and_record_it(fast_engine):
    cf = fast_engine.counterfactual(_prior(), "new left pleural effusion", seed=3)
    assert cf.sampler == "fast" and cf.request.sampler == "fast" and cf.request.steps == 4
    assert cf.sampler_note is None
    record = cf.provenance()
    assert record["sampler"] == {"path": "fast", "steps": 4, "unet": "unet_fast"}
    assert record["request"]["sampler"] == "fast" and record["model_hash"] == fast_engine.model_hash
    again = fast_engine.counterfactual(_prior(), "new left pleural effusion", seed=3)
    assert np.array_equal(cf.image, again.image)


def test_the_full_path_is_one_option_away_and_says_why_auto_chose_it(fast_engine):
    prior = _prior()
    full = fast_engine.counterfactual(prior, "new left pleural effusion", seed=3, sampler="full")
    assert full.sampler == "full" and full.request.steps == 20 and full.sampler_note is None
    assert full.provenance()["sampler"]["unet"] == "unet"
    fast = fast_engine.counterfactual(prior, "new left pleural effusion", seed=3)
    assert np.abs(full.image - fast.image).max() > 1e-4  # two different networks
    stepped = fast_engine.counterfactual(prior, "new left pleural effusion", seed=3, steps=5)
    assert stepped.sampler == "full" and "steps were given" in stepped.sampler_note
    strong = fast_engine.counterfactual(prior, "new left pleural effusion", seed=3, text_guidance=15.0)
    assert strong.sampler == "full" and "trained ranges (text 1-12, image 1-3)" in strong.sampler_note
    other = fast_engine.counterfactual(prior, "new left pleural effusion", seed=3, scheduler="euler_a")
    assert other.sampler == "full" and "own schedule" in other.sampler_note
    withheld = fast_engine.counterfactuals(prior, [EditRequest("edema", seed=1)], withhold_prior=True)[0]
    assert withheld.sampler == "full" and "text-only" in withheld.sampler_note
    two = fast_engine.counterfactual(prior, "new left pleural effusion", seed=3, sampler="fast", steps=2)
    assert two.sampler == "fast" and two.request.steps == 2
    with pytest.raises(InputError, match="sampler 'fast' cannot run this request: guidance outside"):
        fast_engine.counterfactual(prior, "edema", sampler="fast", image_guidance=4.0)
    with pytest.raises(InputError, match="sampler must be one of auto, fast, full"):
        fast_engine.counterfactual(prior, "edema", sampler="quick")


def test_a_model_without_a_student_runs_the_full_sampler(tiny_engine):
    cf = tiny_engine.counterfactual(_prior(), "edema", seed=0)
    assert cf.sampler == "full" and cf.request.steps == 20 and cf.sampler_note is None
    with pytest.raises(InputError, match="no fast sampler .*python -m train fit"):
        tiny_engine.counterfactual(_prior(), "edema", sampler="fast")


def test_fast_batches_equal_single_calls_and_guidance_is_an_input(fast_engine):
    prior = _prior()
    requests = [EditRequest("new right pleural effusion", seed=1), EditRequest("new left pneumothorax", seed=2,
                                                                                text_guidance=3.0),
                EditRequest("new right pleural effusion", seed=1, image_guidance=2.5)]
    batch = fast_engine.counterfactuals(prior, requests)
    assert [r.sampler for r in batch] == ["fast"] * 3
    for request, result in zip(requests, batch):
        np.testing.assert_allclose(result.image, fast_engine.counterfactual(prior, request).image, atol=1e-5)
    assert np.abs(batch[0].image - batch[2].image).max() > 1e-5  # same seed and text, other image guidance


def test_fast_path_keeps_pixels_outside_a_region(fast_engine):
    prior = _prior()[:64]  # the canvas itself: pixels compare one to one
    edit = np.zeros(prior.shape, bool)
    edit[10:40, 5:30] = True
    cf = fast_engine.counterfactuals(prior, [EditRequest("new left pleural effusion", seed=2)],
                                     regions=engine.Regions(edit=edit))[0]
    assert cf.sampler == "fast"
    np.testing.assert_array_equal(cf.image[~edit], prior[~edit])
    assert np.abs(cf.image[edit] - prior[edit]).mean() > 1e-4


def test_graphed_unet_passes_the_guidance_input_on_the_cpu(fast_engine):
    from engine.graphs import GraphedUNet

    unet = fast_engine.unet_fast
    wrapped = GraphedUNet(unet)
    x = torch.randn(1, unet.config.in_channels, 16, 16)
    states = torch.randn(1, 4, 32)
    cond = guidance_embedding(torch.tensor([7.5]), torch.tensor([1.5]), 8)
    with torch.no_grad():
        expect = unet(x, torch.tensor(951), encoder_hidden_states=states, timestep_cond=cond).sample
    got = wrapped(x, torch.tensor(951), encoder_hidden_states=states, timestep_cond=cond).sample
    torch.testing.assert_close(got, expect)
