"""Engine: counterfactuals on a tiny random model (CPU, fp32)."""

from __future__ import annotations

import threading
from pathlib import Path
from dataclasses import replace

import numpy as np
import torch
import pytest

import engine
from engine import EditRequest, InputError


def _prior(h: int = 80, w: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 9.0) + 0.05 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1).astype(np.float32)


def test_counterfactual_shapes_and_record(tiny_engine):
    prior = _prior(80, 60)
    cf = tiny_engine.counterfactual(prior, "new right pleural effusion", severity="large", seed=3, steps=4)
    assert cf.image.shape == (64, 64) and cf.image.dtype == np.float32
    assert cf.image_input.shape == prior.shape  # mapped back onto the input geometry
    assert 0.0 <= cf.image.min() and cf.image.max() <= 1.0
    assert cf.instruction_applied == "new large right pleural effusion"
    assert cf.request.seed == 3 and cf.request.steps == 4
    assert cf.model_hash == tiny_engine.model_hash and len(cf.model_hash) == 64
    assert cf.synthetic
    assert set(cf.timings) == {"text", "encode", "denoise", "decode", "total"}
    prov = cf.provenance()
    assert prov["synthetic"] and "not for diagnosis" in prov["notice"]
    assert prov["seed"] == 3 and prov["instruction_applied"] == cf.instruction_applied


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_engine):
    prior = _prior()
    a = tiny_engine.counterfactual(prior, "new left pneumothorax", seed=11, steps=3)
    b = tiny_engine.counterfactual(prior, "new left pneumothorax", seed=11, steps=3)
    c = tiny_engine.counterfactual(prior, "new left pneumothorax", seed=12, steps=3)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_random_seed_is_drawn_and_recorded(tiny_engine):
    cf = tiny_engine.counterfactual(_prior(), "worsening edema", steps=2)
    assert isinstance(cf.request.seed, int)
    again = tiny_engine.counterfactual(_prior(), "worsening edema", steps=2, seed=cf.request.seed)
    assert np.array_equal(cf.image, again.image)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp"])
def test_batch_equals_single_calls(tiny_engine, scheduler):
    prior = _prior()
    requests = [
        EditRequest("new right pleural effusion", seed=1, steps=3, scheduler=scheduler),
        EditRequest("without support devices", seed=2, steps=3, scheduler=scheduler, text_guidance=3.0),
        EditRequest("new right pleural effusion", seed=5, steps=3, scheduler=scheduler, image_guidance=1.0),
    ]
    batch = tiny_engine.counterfactuals(prior, requests)
    for request, result in zip(requests, batch):
        single = tiny_engine.counterfactual(prior, request)
        np.testing.assert_allclose(result.image, single.image, atol=1e-5)
        assert result.request == single.request


def test_instruction_changes_the_output(tiny_engine):
    prior = _prior()
    a = tiny_engine.counterfactual(prior, "new right pleural effusion", seed=0, steps=3)
    b = tiny_engine.counterfactual(prior, "without support devices", seed=0, steps=3)
    assert np.abs(a.image - b.image).max() > 1e-4


def test_mixed_steps_in_one_call_keep_order(tiny_engine):
    prior = _prior()
    requests = [EditRequest("edema", seed=1, steps=2), EditRequest("edema", seed=1, steps=3),
                EditRequest("edema", seed=1, steps=2)]
    out = tiny_engine.counterfactuals(prior, requests)
    assert [r.request.steps for r in out] == [2, 3, 2]
    np.testing.assert_allclose(out[0].image, out[2].image, atol=1e-5)


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"instruction": ""}, "empty"),
        ({"instruction": "   \n\t"}, "empty"),
        ({"instruction": "x" * 10_000}, "10000 characters"),
        ({"instruction": "edema", "severity": "huge"}, "severity must be one of"),
        ({"instruction": "edema", "steps": 0}, "steps must be"),
        ({"instruction": "edema", "text_guidance": float("nan")}, "text_guidance"),
        ({"instruction": "edema", "scheduler": "pndm"}, "scheduler must be one of"),
        ({"instruction": "edema", "seed": -1}, "seed must be"),
    ],
)
def test_bad_requests_are_input_errors(tiny_engine, request_kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny_engine.counterfactual(_prior(), **request_kwargs)


def test_non_ascii_instruction_is_accepted(tiny_engine):
    cf = tiny_engine.counterfactual(_prior(), "Pleuraerguss rechts, größer — 右侧胸腔积液", seed=0, steps=2)
    assert cf.image.shape == (64, 64)


def test_bad_priors_are_input_errors(tiny_engine):
    with pytest.raises(InputError, match="2-D"):
        tiny_engine.counterfactual(np.zeros((4, 64, 64), np.float32), "edema")
    bad = _prior()
    bad[0, 0] = np.nan
    with pytest.raises(InputError):
        tiny_engine.counterfactual(bad, "edema")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        tiny_engine.counterfactual(_prior() * 300, "edema")


def test_threads_share_one_engine(tiny_engine):
    prior = _prior()
    expected = {s: tiny_engine.counterfactual(prior, "edema", seed=s, steps=2).image for s in range(4)}
    got: dict[int, np.ndarray] = {}

    def work(seed: int) -> None:
        got[seed] = tiny_engine.counterfactual(prior, "edema", seed=seed, steps=2).image

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(4):
        assert np.array_equal(got[s], expected[s])


def test_missing_default_model_says_how_to_pass_one(monkeypatch, tmp_path):
    from engine import loading as engine_module

    monkeypatch.setattr(engine_module, "DEFAULT_MODEL", tmp_path / "journey-mini")
    with pytest.raises(engine.ModelFolderError, match="--model"):
        engine.load()


def test_info_has_card_and_hash(tiny_engine):
    info = tiny_engine.info()
    assert info["card"]["name"] == "tiny-test"
    assert info["model_hash"] == tiny_engine.model_hash
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_withheld_prior_ignores_the_prior(tiny_engine):
    a = tiny_engine.counterfactuals(_prior(seed=0), [EditRequest("edema", seed=4, steps=3)], withhold_prior=True)[0]
    b = tiny_engine.counterfactuals(_prior(seed=1) * 0.5, [EditRequest("edema", seed=4, steps=3)], withhold_prior=True)[0]
    c = tiny_engine.counterfactuals(_prior(seed=0), [EditRequest("edema", seed=4, steps=3)])[0]
    assert np.array_equal(a.image, b.image)  # the prior does not reach the model
    assert not np.array_equal(a.image, c.image)
    assert a.prior_withheld and "text only" in a.provenance()["method"]


def test_several_priors_in_one_batch_equal_single_calls(tiny_engine):
    priors = [_prior(80, 60, seed=0), _prior(50, 90, seed=1), _prior(64, 64, seed=2)]
    requests = [EditRequest("new right pleural effusion", seed=s, steps=3) for s in (1, 2, 3)]
    batch = tiny_engine.counterfactuals(priors, requests)
    for prior, request, result in zip(priors, requests, batch):
        single = tiny_engine.counterfactual(prior, request)
        np.testing.assert_allclose(result.image, single.image, atol=1e-5)
        assert result.image_input.shape == prior.shape
    with pytest.raises(InputError, match="2 priors for 3 requests"):
        tiny_engine.counterfactuals(priors[:2], requests)


@pytest.fixture(scope="module")
def change_engine(tmp_path_factory):
    """The tiny model saved as a ``change`` model (it diffuses the change from the prior)."""
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-change", instruct_target="change")
    return engine.load(folder, device="cpu", dtype="fp32")


def test_change_model_keeps_the_prior_where_it_changes_nothing(change_engine, tiny_engine, monkeypatch):
    import engine.instruct_path as engine_module

    monkeypatch.setattr(engine_module, "sample_instruct", lambda unet, scheduler, prior_latents, *a, **k: torch.zeros_like(prior_latents))
    request = EditRequest("no change", seed=1, steps=2)
    kept = change_engine.counterfactual(_prior(64, 64), request)
    np.testing.assert_allclose(kept.image, kept.prior, atol=1e-5)  # exact pixels, not the VAE's reconstruction
    redrawn = tiny_engine.counterfactual(_prior(64, 64), request)  # a latent model decodes the zero latent
    assert np.abs(redrawn.image - redrawn.prior).mean() > 0.05


def test_change_model_adds_the_decoded_change_to_the_prior(change_engine):
    prior = torch.from_numpy(_prior(64, 64))[None, None]
    latents = change_engine.encode_prior(prior)
    change = torch.zeros_like(latents)
    change[..., :4, :4] = 3.0  # a change in one corner of the latent
    out = change_engine.decode_change(prior, latents, change)[0, 0].numpy()
    far = (slice(40, 64), slice(40, 64))
    assert np.abs(out - prior[0, 0].numpy())[far].max() < np.abs(out - prior[0, 0].numpy())[:16, :16].max()
    assert out.min() >= 0.0 and out.max() <= 1.0
    withheld = change_engine.counterfactuals(_prior(64, 64), [EditRequest("edema", seed=4, steps=2)], withhold_prior=True)[0]
    assert np.abs(withheld.image - withheld.prior).mean() < 0.5  # the change still lands on the prior


def test_detail_threshold_lets_a_change_remove_detail_the_vae_cannot_hold(change_engine, monkeypatch):
    """Two thin lines on the prior, as a VAE would blur them away: D(p) is flat. The change
    brightens a square around the first line. Summed onto the prior, the change keeps that
    line; with a detail threshold the square (grown by a few pixels) is the decoded edit, so the
    line goes, while the far line and every pixel away from the change stay exactly the prior's."""
    from engine.engine import DETAIL_GROW_PX

    size = 64
    flat = torch.full((1, 1, size, size), 0.3)
    bump = torch.zeros_like(flat)
    bump[..., 20:30, 20:30] = 0.2
    prior = flat.clone()
    prior[..., 10:40, 25] = 0.9  # crosses the changed square
    prior[..., 10:40, 55] = 0.9  # far from it

    def decode(latents, clip=True):  # D(p + change) is the bump on the flat reconstruction; D(p) is flat
        return torch.cat([flat + bump if float(latents.abs().sum()) > 0 else flat for latents in latents.split(1)])

    monkeypatch.setattr(change_engine, "decode", decode)
    latents = torch.zeros(2, 4, 8, 8)
    change = torch.zeros_like(latents)
    change[:, :, 3, 3] = 1.0
    priors = torch.cat([prior, prior])
    out = change_engine.decode_change(priors, latents, change, torch.cat([flat, flat]),
                                      torch.tensor([0.02, float("nan")]))
    masked, summed = out[0, 0].numpy(), out[1, 0].numpy()
    expected_sum = (prior + bump).clamp(0, 1)[0, 0].numpy()
    np.testing.assert_allclose(summed, expected_sum, atol=1e-6)  # NaN: the prior plus the change everywhere
    np.testing.assert_allclose(masked[20:30, 20:30], 0.5, atol=1e-6)  # the decoded edit: the line is gone
    assert summed[25, 25] == pytest.approx(1.0)  # summed, the line stays (0.9 + 0.2, clipped)
    away = np.ones((size, size), bool)
    away[20 - 2 * DETAIL_GROW_PX:30 + 2 * DETAIL_GROW_PX, 20 - 2 * DETAIL_GROW_PX:30 + 2 * DETAIL_GROW_PX] = False
    np.testing.assert_array_equal(masked[away], prior[0, 0].numpy()[away])  # the far line and the rest: exact
    with pytest.raises(InputError, match="detail_threshold must be"):
        EditRequest("x", detail_threshold=0).validated()
    assert EditRequest("x", detail_threshold=None).validated().detail_threshold is None


def test_latent_ceiling_is_the_target_through_the_models_own_decoding(change_engine, tiny_engine):
    prior = torch.from_numpy(_prior(64, 64))[None, None]
    target = prior.clone()
    target[..., 8:24, 8:24] = (target[..., 8:24, 8:24] + 0.4).clamp(0, 1)  # a bright patch
    # A change model: the prior itself where the exact change is zero, the decoded target where it is not.
    torch.testing.assert_close(change_engine.latent_ceiling(prior, prior), prior, atol=1e-5, rtol=0)
    out = change_engine.latent_ceiling(prior, target)
    latents = change_engine.encode_prior(prior)
    change = (change_engine.encode_prior(target) - latents) * change_engine.card.latent_scaling * change_engine.card.change_factor
    torch.testing.assert_close(out, change_engine.decode_change(prior, latents, change, detail_threshold=0.04))
    assert float((out - prior)[..., 8:24, 8:24].abs().mean()) > float((out - prior)[..., 40:, 40:].abs().mean())
    # A latent model returns the VAE's reconstruction of the target.
    latent_out = tiny_engine.latent_ceiling(prior, target)
    torch.testing.assert_close(latent_out, tiny_engine.decode(tiny_engine.encode_prior(target) * tiny_engine.card.latent_scaling))


def test_change_scaling_divides_the_sampled_change(change_engine, monkeypatch):
    from dataclasses import replace

    from engine.checkpoint import ModelCard
    from engine.errors import ModelFolderError

    prior = torch.from_numpy(_prior(64, 64))[None, None]
    latents = change_engine.encode_prior(prior)
    change = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    plain = change_engine.decode_change(prior, latents, change)
    monkeypatch.setattr(change_engine, "card", replace(change_engine.card, change_scaling=5.0))
    torch.testing.assert_close(change_engine.decode_change(prior, latents, 5.0 * change), plain, atol=1e-5, rtol=0)
    assert change_engine.card.change_factor == 5.0
    assert replace(change_engine.card, instruct_target="latent").change_factor == 1.0  # only a change model scales
    with pytest.raises(ModelFolderError, match="change_scaling must be positive"):
        ModelCard.from_dict({**change_engine.card.to_dict(), "change_scaling": 0})


def test_change_gate_returns_the_prior_where_the_sampled_change_is_only_its_noise_floor(change_engine, monkeypatch):
    """A card's change_gate zeroes a sampled change below its noise floor (the prior's own pixels
    come back there) and keeps a strong change, with its rim; without a gate both are decoded."""
    from dataclasses import replace

    import engine.instruct_path as engine_module
    from engine.checkpoint import ModelCard
    from engine.errors import ModelFolderError
    from engine.instruct import gate_change

    strong = {"on": False}

    def sampled(unet, scheduler, prior_latents, *a, **k):
        change = torch.full_like(prior_latents, 0.3)  # the floor everywhere ...
        if strong["on"]:
            change[..., 2:4, 2:4] = 3.0  # ... and one strong change
        return change

    monkeypatch.setattr(engine_module, "sample_instruct", sampled)
    request = EditRequest("no interval change", seed=1, steps=2)
    ungated = change_engine.counterfactual(_prior(64, 64), request)
    assert np.abs(ungated.image - ungated.prior).mean() > 1e-3
    monkeypatch.setattr(change_engine, "card", replace(change_engine.card, change_gate=(0.6, 1.0)))
    gated = change_engine.counterfactual(_prior(64, 64), request)
    np.testing.assert_allclose(gated.image, gated.prior, atol=1e-6)  # the floor alone: the prior itself
    strong["on"] = True
    edited = change_engine.counterfactual(_prior(64, 64), request)
    assert np.abs(edited.image - edited.prior).mean() > 1e-3  # a strong change is kept
    kept = gate_change(sampled(None, None, torch.zeros(1, 4, 8, 8)), (0.6, 1.0))
    assert kept[..., 1:5, 1:5].abs().min() > 0 and kept[..., 6:, 6:].abs().max() == 0  # its rim too, nothing far
    weight = gate_change(torch.ones(1, 2, 5, 5), (0.5, 2.0)) / torch.ones(1, 2, 5, 5)
    assert 0 < float(weight.max()) < 1  # smooth between low and high
    assert ModelCard.from_dict(change_engine.card.to_dict()).change_gate == (0.6, 1.0)
    with pytest.raises(ModelFolderError, match="change_gate"):
        ModelCard.from_dict({**change_engine.card.to_dict(), "change_gate": [1.0, 0.5]})


def test_change_model_journey_decodes_the_shared_prior_once(change_engine, monkeypatch):
    calls = []
    decode = change_engine.decode
    monkeypatch.setattr(change_engine, "decode", lambda latents, **k: calls.append(len(latents)) or decode(latents, **k))
    requests = [EditRequest("new right pleural effusion", severity=s, seed=2, steps=2) for s in ("slight", "moderate", "large")]
    change_engine.clear_prior_cache()
    rungs = change_engine.counterfactuals(_prior(64, 64), requests)
    assert sorted(calls) == [1, 3]  # one prior reconstruction and the three edits
    for request, rung in zip(requests, rungs):
        np.testing.assert_allclose(rung.image, change_engine.counterfactual(_prior(64, 64), request).image, atol=1e-5)


def test_prior_cache_is_exact_and_skips_the_vae(change_engine, monkeypatch):
    """A re-edit of the same image skips encoding the prior and decoding its reconstruction."""
    prior = _prior(64, 64, seed=9)
    request = EditRequest("new right pleural effusion", seed=5, steps=2)
    change_engine.clear_prior_cache()
    calls = {"encode": [], "decode": []}
    encode, decode = change_engine.encode_prior, change_engine.decode
    monkeypatch.setattr(change_engine, "encode_prior", lambda x: calls["encode"].append(len(x)) or encode(x))
    monkeypatch.setattr(change_engine, "decode", lambda x, **k: calls["decode"].append(len(x)) or decode(x, **k))
    first = change_engine.counterfactual(prior, request)
    assert calls == {"encode": [1], "decode": [1, 1]}  # the prior's reconstruction, then the edit
    again = change_engine.counterfactual(prior, replace(request, instruction="edema"))
    assert calls == {"encode": [1], "decode": [1, 1, 1]}  # only the new edit was decoded
    np.testing.assert_array_equal(change_engine.counterfactual(prior, request).image, first.image)
    change_engine.prior_cache_size = 0  # off: the same pixels, the VAE runs every time
    change_engine.clear_prior_cache()
    try:
        cold = change_engine.counterfactual(prior, request)
    finally:
        change_engine.prior_cache_size = engine.engine.PRIOR_CACHE_SIZE
    assert calls["encode"] == [1, 1] and np.abs(cold.image - first.image).max() < 1e-6
    assert np.abs(again.image - first.image).max() > 0  # another instruction, another image
    other = _prior(64, 64, seed=10)  # another image is another entry
    change_engine.counterfactuals([other, prior], [request, request])  # both new: encoded in one batch
    assert calls["encode"] == [1, 1, 2] and len(change_engine._priors) == 2


def test_channels_last_is_the_default_and_moves_pixels_by_rounding_only(tiny_model):
    fast = engine.load(tiny_model, device="cpu", dtype="fp32")
    plain = engine.load(tiny_model, device="cpu", dtype="fp32", channels_last=False)
    weight = next(p for p in fast.unet.parameters() if p.ndim == 4)
    assert fast.channels_last and weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.channels_last and next(p for p in plain.unet.parameters() if p.ndim == 4).is_contiguous()
    request = EditRequest("new right pleural effusion", seed=3, steps=4)
    a = fast.counterfactual(_prior(), request).image
    b = plain.counterfactual(_prior(), request).image
    assert np.abs(a - b).max() < 1e-4  # other convolution kernels, the same arithmetic
    edit_a = fast.invert_edit(_prior(), "support devices", "no support devices", inversion="negative-prompt", steps=3)
    edit_b = plain.invert_edit(_prior(), "support devices", "no support devices", inversion="negative-prompt", steps=3)
    # inversion then regeneration at guidance 7.5 amplifies the rounding (a random model: up to ~5e-4)
    assert np.abs(edit_a.image - edit_b.image).max() < 2e-3


def test_dropping_shared_padding_changes_nothing_but_rounding(tiny_engine):
    from engine.instruct import drop_shared_padding, make_scheduler, sample_instruct

    states = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    kept, kept_mask = drop_shared_padding(states, mask)
    assert kept.shape == (3, 4, 4) and torch.equal(kept, states[:, :4]) and torch.equal(kept_mask, mask[:, :4])
    full = torch.ones(3, 6, dtype=torch.bool)  # no padding anywhere (CLIP): nothing is dropped
    assert drop_shared_padding(states, full)[0] is states

    eng = tiny_engine
    with eng._lock:
        text, text_mask = eng._embed(["new right pleural effusion", "edema"])
        null, null_mask = eng._embed([""])
    assert not bool(text_mask.all())  # the tiny model's encoder pads and masks
    prior = eng.encode_prior(torch.from_numpy(np.stack([_prior(64, 64)] * 2))[:, None])
    runs = []
    for trim in (True, False):
        runs.append(sample_instruct(
            eng.unet, make_scheduler("ddim", eng.parts.scheduler_config), prior, text, text_mask, null, null_mask,
            text_scale=7.5, image_scale=1.5, steps=4, generators=[torch.Generator().manual_seed(s) for s in (1, 2)],
            trim_padding=trim))
    assert (runs[0] - runs[1]).abs().max() < 1e-4


def test_warm_prior_makes_the_first_edit_a_cache_hit(change_engine, monkeypatch):
    prior = _prior(70, 50, seed=12)
    change_engine.clear_prior_cache()
    change_engine.warm_prior(prior)
    calls = []
    encode = change_engine.encode_prior
    monkeypatch.setattr(change_engine, "encode_prior", lambda x: calls.append(len(x)) or encode(x))
    warm = change_engine.counterfactual(prior, "edema", seed=1, steps=2)
    assert calls == []  # encoded (and its reconstruction decoded) when it was loaded
    change_engine.clear_prior_cache()
    np.testing.assert_allclose(change_engine.counterfactual(prior, "edema", seed=1, steps=2).image, warm.image, atol=1e-6)


def test_provenance_names_the_model_by_id_never_by_its_local_path(tiny_engine, tiny_model):
    """The model's absolute path on the serving machine (which can name a user or a hospital
    share) stays out of provenance: a folder goes by its name, a hub id as given, and the
    content hash pins the weights."""
    import json

    from engine.checkpoint import model_id

    assert tiny_model.is_absolute() and tiny_engine.model_id == tiny_model.name == "tiny"
    record = json.dumps(tiny_engine.counterfactual(_prior(), "edema", steps=2, seed=1).provenance())
    assert str(tiny_model.parent) not in record and tiny_engine.model_hash in record
    assert model_id("owner/some-model", Path("/cache/models--owner--some-model/snapshots/abc")) == "owner/some-model"
    assert model_id(tiny_model, tiny_model) == "tiny"
