"""The invert method (PRISM): loading SD-layout folders, inversions, prompt-to-prompt, regions, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from fixtures_sd import build_tiny_clip, build_tiny_sd

import engine
from engine import InputError, InvertRequest, ModelFolderError, Regions
from engine.__main__ import main

SOURCE = "chest x-ray with support devices"
TARGET = "chest x-ray without support devices"
STEPS = 8


def _image(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 0.5 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 9.0) + 0.02 * rng.standard_normal((size, size))
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def sd_engine(sd_folder):
    return engine.load(sd_folder, device="cpu", dtype="fp32")


def _vae_round_trip(eng, img: np.ndarray) -> np.ndarray:
    latents = eng.encode_prior(torch.from_numpy(img)[None, None]) * eng.card.latent_scaling
    return eng.decode(latents)[0, 0].numpy()


# -- loading ---------------------------------------------------------------------------------

def test_pipeline_folder_loads_as_text2image_with_prisms_scheduler(sd_engine):
    from engine.invert import make_ddim

    card = sd_engine.card
    assert card.method == "text2image" and card.text_encoder.backend == "clip"
    assert card.resolution == 64 and card.latent_scaling == 5.0
    sched = make_ddim(sd_engine.parts.scheduler_config)
    cfg = sched.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)
    with pytest.raises(InputError, match="invert"):
        sd_engine.counterfactual(_image(), "new right pleural effusion")


def test_unet_override_from_safetensors_and_errors(sd_folder, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    other = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    with torch.no_grad():
        other.conv_out.bias.add_(0.5)
    path = tmp_path / "prism-unet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    base = engine.load(sd_folder, device="cpu", dtype="fp32")
    tuned = engine.load(sd_folder, device="cpu", dtype="fp32", unet=path)
    assert tuned.model_hash != base.model_hash and "unet" in tuned.model_id
    assert torch.equal(tuned.unet.conv_out.bias, other.conv_out.bias)
    save_file({"nope": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFolderError, match="does not fit"):
        engine.load(sd_folder, device="cpu", dtype="fp32", unet=tmp_path / "bad.safetensors")
    with pytest.raises(ModelFolderError, match="hf download"):
        engine.load("runwayml/stable-diffusion-v1-5-not-cached", device="cpu", dtype="fp32")


# -- inversion quality ------------------------------------------------------------------------------

def test_null_text_reconstructs_closely_and_ddim_at_guidance_7_5_does_not(sd_engine):
    img = _image()
    target = _vae_round_trip(sd_engine, img)  # the best any latent method can do
    errors = {}
    for inversion in ("ddim", "null-text"):
        out = sd_engine.invert_edit(img, SOURCE, SOURCE, inversion=inversion, steps=STEPS, guidance=7.5)
        errors[inversion] = float(np.abs(out.reconstruction - target).mean())
    assert errors["null-text"] < 0.03
    assert errors["ddim"] > 2 * errors["null-text"]


@pytest.mark.parametrize("inversion", ["null-text", "negative-prompt", "ddim"])
def test_identical_captions_return_the_reconstruction(sd_engine, inversion):
    out = sd_engine.invert_edit(_image(), SOURCE, SOURCE, inversion=inversion, steps=STEPS, residual=False)
    assert out.edit_mode == "none"
    np.testing.assert_allclose(out.image, out.reconstruction, atol=1e-5)
    assert np.abs(out.image - out.prior).max() > 1e-2  # the decoded image is the VAE's copy, not the input


def test_residual_output_is_the_input_where_the_edit_did_nothing(sd_engine):
    img = _image()
    same = sd_engine.invert_edit(img, SOURCE, SOURCE, inversion="negative-prompt", steps=STEPS, residual=True)
    np.testing.assert_allclose(same.image, same.prior, atol=1e-5)  # the input's own pixels, not the VAE's
    plain = sd_engine.invert_edit(img, SOURCE, TARGET, inversion="negative-prompt", steps=STEPS)
    residual = sd_engine.invert_edit(img, SOURCE, TARGET, inversion="negative-prompt", steps=STEPS, residual=True)
    # the same edit, carried onto the input: input + (edit - reconstruction)
    expected = np.clip(residual.prior + plain.image - plain.reconstruction, 0, 1)
    np.testing.assert_allclose(residual.image, expected, atol=1e-5)
    assert np.abs(residual.image - residual.prior).max() > 1e-3


def test_direct_inversion_source_branch_is_exact(sd_engine):
    img = _image()
    out = sd_engine.invert_edit(img, SOURCE, TARGET, inversion="direct", steps=STEPS)
    np.testing.assert_allclose(out.reconstruction, _vae_round_trip(sd_engine, img), atol=1e-5)
    assert np.abs(out.image - out.prior).max() > 1e-3  # and the target did move


def test_inversion_cache_is_hit_on_the_second_edit(sd_folder):
    eng = engine.load(sd_folder, device="cpu", dtype="fp32")
    img = _image(seed=3)
    first = eng.invert_edit(img, SOURCE, TARGET, inversion="null-text", steps=4)
    second = eng.invert_edit(img, SOURCE, "chest x-ray with no support devices", inversion="null-text", steps=4)
    assert not first.cache_hit and second.cache_hit
    assert second.timings["invert"] < 0.2 * first.timings["invert"]
    again = eng.invert_edit(img, SOURCE, TARGET, inversion="null-text", steps=4)
    np.testing.assert_allclose(again.image, first.image, atol=1e-6)  # the cached inversion is the same one
    assert not eng.invert_edit(img, "chest x-ray", TARGET, inversion="null-text", steps=4).cache_hit
    assert not eng.invert_edit(_image(seed=4), SOURCE, TARGET, inversion="null-text", steps=4).cache_hit
    # negative-prompt and direct share the plain DDIM inversion
    assert not eng.invert_edit(img, SOURCE, TARGET, inversion="negative-prompt", steps=4).cache_hit
    assert eng.invert_edit(img, SOURCE, TARGET, inversion="direct", steps=4).cache_hit
    assert second.provenance()["inversion_cache_hit"] is True


# -- prompt-to-prompt ----------------------------------------------------------------------------------

def test_plan_replace_and_refine(sd_engine):
    from engine.p2p import plan_edit, word_tokens

    tok = sd_engine.text_encoder.tokenizer
    kw = dict(max_tokens=16, steps=10, cross_replace=0.8, self_replace=0.4, self_max_tokens=256)
    replace = plan_edit(tok, SOURCE, TARGET, **kw)
    assert replace.mode == "replace" and replace.edited_words == ("without",)
    assert torch.equal(replace.mapper, torch.eye(16)) and replace.alphas.min() == 1
    assert (replace.cross_steps, replace.self_steps) == (8, 4)
    # "pacer" and "ecg" split into different numbers of tokens: each "ecg" token averages
    # "pacer"'s, and the words after them still find their source tokens
    shifted = plan_edit(tok, "with pacer devices", "without ecg devices", **kw)
    _, src_pos, _ = word_tokens(tok, "with pacer devices")
    _, tgt_pos, _ = word_tokens(tok, "without ecg devices")
    n = len(src_pos[1])
    assert shifted.mode == "replace" and n != len(tgt_pos[1])
    assert shifted.mapper[src_pos[2][0], tgt_pos[2][0]] == 1
    for j in tgt_pos[1]:
        assert torch.allclose(shifted.mapper[src_pos[1], j], torch.full((n,), 1.0 / n))
    assert torch.allclose(shifted.mapper.sum(0), torch.ones(16))  # every target token takes one map
    refined = "chest x-ray with new support devices"
    refine = plan_edit(tok, SOURCE, refined, **kw)
    assert refine.mode == "refine" and refine.edited_words == ("new",)
    _, src_pos, _ = word_tokens(tok, SOURCE)
    words, tgt_pos, _ = word_tokens(tok, refined)
    (new,) = tgt_pos[words.index("new")]
    (support_src,), (support_tgt,) = src_pos[3], tgt_pos[words.index("support")]
    # "new" keeps its own map; "support" takes the source's "support"
    assert refine.alphas[new] == 0 and refine.alphas[support_tgt] == 1 and refine.mapper[support_src, support_tgt] == 1
    weighted = plan_edit(tok, SOURCE, TARGET, word_weight=2.0, **kw)
    words, tgt_pos, _ = word_tokens(tok, TARGET)
    changed = tgt_pos[words.index("without")]
    assert weighted.weights[changed].eq(2).all() and weighted.weights.eq(2).sum() == len(changed)
    with pytest.raises(InputError, match="not in the prompt"):
        plan_edit(tok, SOURCE, TARGET, word_weight=2.0, weighted_words=("lungs",), **kw)


def test_control_reaches_every_attention_layer_and_is_removed_after(sd_engine):
    from engine.p2p import AttentionController, ControlProcessor, controlled

    unet = sd_engine.unet
    before = dict(unet.attn_processors)
    controller = AttentionController(2, None, None)
    with controlled(unet, controller):
        assert all(isinstance(p, ControlProcessor) for p in unet.attn_processors.values())
        x = torch.zeros(4, 4, 16, 16)
        unet(x, 10, encoder_hidden_states=torch.zeros(4, 16, 32))
    assert controller.layer_calls == len(before) > 0  # every self- and cross-attention layer, once
    assert dict(unet.attn_processors) == before


def test_reweighting_scales_the_words_cross_attention(sd_engine):
    request = InvertRequest(SOURCE, SOURCE, inversion="negative-prompt", steps=STEPS, word_weight=2.0,
                            weighted_words=("devices",), cross_replace=0.5)
    out = sd_engine.invert_edit(_image(), request)
    maps = out.attention
    k = maps.target_words.index("devices")
    replaced = int(0.5 * STEPS)
    # while cross-attention is replaced, the target's map is exactly the source's times the weight
    np.testing.assert_allclose(maps.target[:replaced, k], 2.0 * maps.source[:replaced, k], rtol=1e-4, atol=1e-7)
    others = [i for i in range(len(maps.target_words)) if i != k]
    np.testing.assert_allclose(maps.target[:replaced, others], maps.source[:replaced, others], rtol=1e-4, atol=1e-7)
    assert np.abs(out.image - out.prior).max() > 1e-4  # and the re-weighting changed the image
    word = maps.word_map("devices", steps=(0, replaced))
    assert word.shape == (64, 64) and word.max() == pytest.approx(1.0)
    with pytest.raises(InputError, match="not a word"):
        maps.word_map("lungs")


def test_local_blend_leaves_pixels_outside_the_mask_unchanged(sd_engine, monkeypatch):
    import engine.invert as invert_module

    seen = {}
    sample_edit = invert_module.sample_edit

    def spy(*args, **kwargs):
        seen["latents"] = out = sample_edit(*args, **kwargs)
        if kwargs["blend"] is not None:
            seen["mask"] = kwargs["blend"].mask(kwargs["controller"].record)
        return out

    request = InvertRequest(SOURCE, TARGET, inversion="negative-prompt", steps=STEPS, local_blend=("without",),
                            blend_threshold=0.9, word_weight=4.0)
    monkeypatch.setattr(invert_module, "sample_edit", spy)
    out = sd_engine.invert_edit(_image(), request)
    mask = out.blend_mask
    assert mask is not None and 0.02 < mask.mean() < 0.9
    # in latent space, outside the mask the edit is the reconstruction exactly ...
    latents, latent_mask = seen["latents"], seen["mask"][0]
    assert ((latents[1] - latents[0]).abs() * (1 - latent_mask)).max() == 0
    assert ((latents[1] - latents[0]).abs() * latent_mask).max() > 0.1
    # ... and so are the output pixels (the decoded reconstruction there) ...
    diff = np.abs(out.image - out.reconstruction)
    assert diff[~mask].max() < 1e-6 and diff[mask].max() > 1e-2
    unblended = sd_engine.invert_edit(_image(), replace(request, local_blend=()))
    assert np.abs(unblended.image - unblended.reconstruction)[~mask].max() > 1e-2
    # ... or, with residual output, the input's own pixels
    residual = sd_engine.invert_edit(_image(), replace(request, residual=True))
    diff = np.abs(residual.image - residual.prior)
    assert diff[~mask].max() < 1e-6 and diff[mask].max() > 1e-2


# -- regions -------------------------------------------------------------------------------------------

def test_keep_mask_pixels_match_the_input_for_invert(sd_engine):
    img = _image(64, seed=1)[:, :48]  # not square: the mask follows the image onto the canvas
    keep = np.zeros(img.shape, bool)
    keep[:, :24] = True
    out = sd_engine.invert_edit(img, SOURCE, TARGET, inversion="direct", steps=STEPS, word_weight=4.0,
                                regions=Regions(keep=keep))
    np.testing.assert_allclose(out.image_input[:, :22], img[:, :22], atol=2e-3)
    assert np.abs(out.image_input[:, 28:] - img[:, 28:]).max() > 1e-3
    assert out.provenance()["regions"]["keep_fraction"] == 0.5


def test_keep_and_edit_masks_for_instruct(tiny_engine):
    img = _image(64, seed=2)
    keep = np.zeros(img.shape, bool)
    keep[:32] = True
    request = engine.EditRequest("new right pleural effusion", seed=1, steps=3)
    out = tiny_engine.counterfactuals(img, [request], regions=Regions(keep=keep))[0]
    np.testing.assert_array_equal(out.image[:32], img[:32])
    assert out.provenance()["regions"] == {"edit_fraction": None, "keep_fraction": 0.5}
    assert np.abs(out.image[32:] - img[32:]).mean() > 1e-3
    edit = np.zeros(img.shape, bool)
    edit[40:, 40:] = True
    boxed = tiny_engine.counterfactuals(img, [request], regions=Regions(edit=edit))[0]
    np.testing.assert_array_equal(boxed.image[~edit], img[~edit])
    plain = tiny_engine.counterfactual(img, request)  # no regions: the usual sampler, untouched
    batch = tiny_engine.counterfactuals([img, img], [request, request], regions=[None, Regions(keep=keep)])
    np.testing.assert_array_equal(batch[0].image, plain.image)
    np.testing.assert_array_equal(batch[1].image, out.image)
    for scheduler in ("euler_a", "dpmpp"):  # every scheduler noises the reference its own way
        other = tiny_engine.counterfactuals(img, [replace(request, scheduler=scheduler)], regions=Regions(keep=keep))[0]
        assert np.isfinite(other.image).all() and np.array_equal(other.image[:32], img[:32])
    with pytest.raises(InputError, match="paint it on the same image"):
        tiny_engine.counterfactuals(img, [request], regions=Regions(keep=keep[:10]))


def test_region_masks_from_structures_and_attention():
    from engine.regions import attention_mask, structure_mask

    class Fake:
        def segment(self, images):
            m = np.zeros((64, 64), bool)
            m[10:20, 30:40] = True
            return [{"right_lung": m, "heart": np.zeros((64, 64), bool)}]

    mask = structure_mask(Fake(), _image(), "right lung")
    assert mask.sum() == 100 and mask[15, 35]
    assert structure_mask(Fake(), _image(), ["right lung"], dilate=1).sum() == 144
    with pytest.raises(InputError, match="heart, right_lung"):
        structure_mask(Fake(), _image(), "left kidney")
    maps = np.zeros((8, 8))
    maps[2, 3] = 1.0
    maps[5, 5] = 0.2
    assert attention_mask(maps, 0.3).sum() == 1
    painted = np.zeros((64, 64, 3), np.uint8)
    painted[:5, :5, 0] = 255
    assert Regions(edit=painted).edit.sum() == 25
    assert Regions(keep=np.where(painted[..., 0] > 0, 1.0, 0.0)).keep.dtype == bool
    with pytest.raises(InputError, match="2-D"):
        Regions(edit=np.zeros((2, 3, 4, 5)))


# -- instruct models as text-to-image models -------------------------------------------------------------

@pytest.mark.parametrize("target", ["latent", "change"])
def test_instruct_models_run_the_invert_path(tmp_path, target):
    from conftest import build_tiny_model

    eng = engine.load(build_tiny_model(tmp_path / "m", instruct_target=target), device="cpu", dtype="fp32")
    img = _image(80, seed=5)[:, :60]
    out = eng.invert_edit(img, "support devices", "no support devices", inversion="null-text", steps=4, inner_steps=3)
    assert out.image.shape == (64, 64) and out.image_input.shape == img.shape
    assert out.edit_mode == "refine" and np.isfinite(out.image).all()
    same = eng.invert_edit(img, "support devices", "support devices", inversion="negative-prompt", steps=4)
    np.testing.assert_allclose(same.image, same.reconstruction, atol=1e-5)


def test_latent_instruct_model_inverts_with_the_prior_withheld(tiny_engine, monkeypatch):
    seen = _record_condition(tiny_engine, monkeypatch)
    tiny_engine.invert_edit(_image(64, seed=7), "support devices", "no support devices", inversion="direct", steps=3)
    assert seen and all(float(c.abs().max()) == 0.0 for c in seen)  # the "no image" condition


def test_change_model_inverts_no_change_with_the_input_as_its_prior(tmp_path, monkeypatch):
    """A change model runs on the variable it was trained on: the input is its prior, the inverted
    latent is the zero change, and the images are the input plus the decoded change, so the
    reconstruction is the input's own pixels (not the VAE's round trip), whatever change_scaling."""
    from conftest import build_tiny_model

    eng = engine.load(build_tiny_model(tmp_path / "m", instruct_target="change"), device="cpu", dtype="fp32")
    monkeypatch.setattr(eng, "card", replace(eng.card, change_scaling=3.0))
    img = _image(64, seed=6)
    seen = _record_condition(eng, monkeypatch)
    out = eng.invert_edit(img, "support devices", "no support devices", inversion="direct", steps=4)
    np.testing.assert_allclose(out.reconstruction, img, atol=1e-5)
    prior_latent = eng.encode_prior(torch.from_numpy(img)[None, None])
    assert seen and all(torch.allclose(c, prior_latent.expand_as(c), atol=1e-5) for c in seen)
    round_trip = eng.decode(prior_latent * eng.card.latent_scaling)[0, 0].numpy()
    assert np.abs(round_trip - img).max() > 1e-3  # the VAE alone would not have given the input back


def test_change_model_inversion_decodes_with_the_requests_detail_threshold(tmp_path, monkeypatch):
    from conftest import build_tiny_model

    from engine.engine import DETAIL_THRESHOLD

    eng = engine.load(build_tiny_model(tmp_path / "m", instruct_target="change"), device="cpu", dtype="fp32")
    seen = []
    decode_change = eng.decode_change
    monkeypatch.setattr(eng, "decode_change", lambda *a: seen.append(a[4]) or decode_change(*a))
    img = _image(64, seed=6)
    plain = eng.invert_edit(img, "support devices", "no support devices", inversion="direct", steps=3,
                            detail_threshold=None)
    default = eng.invert_edit(img, "support devices", "no support devices", inversion="direct", steps=3)
    assert seen == [None, DETAIL_THRESHOLD]
    assert plain.provenance()["request"]["detail_threshold"] is None
    np.testing.assert_allclose(default.reconstruction, img, atol=1e-5)  # no change: the input's own pixels
    with pytest.raises(engine.InputError, match="detail_threshold must be"):
        eng.invert_edit(img, "a", "b", inversion="direct", steps=2, detail_threshold=2.0)


def _record_condition(eng, monkeypatch) -> list[torch.Tensor]:
    """Records the image-condition channels of every UNet call the engine makes."""
    seen: list[torch.Tensor] = []
    forward = eng.unet.forward
    latent_channels = int(eng.unet.config.out_channels)

    def recording(sample, *args, **kwargs):
        seen.append(sample[:, latent_channels:].detach().clone())
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(eng.unet, "forward", recording)
    return seen


# -- requests, edit score, CLI -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source_prompt": " "}, "source_prompt is empty"),
        ({"inversion": "edict"}, "inversion must be one of"),
        ({"cross_replace": 1.5}, "cross_replace"),
        ({"steps": 0}, "steps must be"),
        ({"local_blend": ("two words",)}, "single words"),
    ],
)
def test_bad_invert_requests(kwargs, message):
    fields = {"source_prompt": SOURCE, "target_prompt": TARGET, **kwargs}
    with pytest.raises(InputError, match=message):
        InvertRequest(**fields).validated()


def test_local_blend_word_must_be_in_a_prompt(sd_engine):
    with pytest.raises(InputError, match="neither prompt"):
        sd_engine.invert_edit(_image(), SOURCE, TARGET, steps=2, inversion="direct", local_blend=("lungs",))


def test_clip_directional_similarity(tmp_path, sd_engine):
    from engine.analysis.clip_score import load_clip_scorer

    scorer, note = load_clip_scorer(build_tiny_clip(tmp_path / "clip"))
    assert scorer is not None and "directional" in note
    a, b = _image(seed=0), _image(seed=0)[::-1].copy()
    s = scorer.directional_similarity(a, b, SOURCE, TARGET)
    assert -1.0 <= s <= 1.0 and s != 0.0
    assert scorer.directional_similarity(a, b, TARGET, SOURCE) == pytest.approx(-s, abs=1e-5)
    assert scorer.directional_similarity(b, a, SOURCE, TARGET) == pytest.approx(-s, abs=1e-5)
    assert scorer.directional_similarity(a, a, SOURCE, TARGET) == 0.0
    assert load_clip_scorer("none") == (None, "edit score off (no CLIP model asked for)")
    out = sd_engine.invert_edit(a, SOURCE, TARGET, steps=2, inversion="direct", scorer=scorer)
    assert out.edit_score == pytest.approx(scorer.directional_similarity(out.prior, out.image, SOURCE, TARGET))


def test_cli_edit_method_invert(sd_folder, tmp_path, capsys):
    from PIL import Image

    from engine.io import read_xray, write_png

    src = tmp_path / "in.png"
    write_png(src, _image(64, seed=6)[:, :50])
    keep = np.zeros((64, 50), np.uint8)
    keep[:, :20] = 255
    Image.fromarray(keep).save(tmp_path / "keep.png")
    out = tmp_path / "out.png"
    code = main(["edit", str(src), "--method", "invert", "--source-prompt", SOURCE, "--target-prompt", TARGET,
                 "--inversion", "negative-prompt", "--steps", "3", "--word-weight", "2", "--local-blend", "without",
                 "--keep-mask", str(tmp_path / "keep.png"), "--residual", "--model", str(sd_folder),
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "invert (negative-prompt)" and record["edit_mode"] == "replace"
    assert record["request"]["residual"] is True
    assert record["request"]["word_weight"] == 2.0 and record["request"]["local_blend"] == ["without"]
    assert record["regions"]["keep_fraction"] == 0.4 and "edit score off" in record["edit_score_note"]
    assert read_xray(out).pixels.shape == (64, 50)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "invert", "--target-prompt", TARGET], "--source-prompt"),
        (["--method", "instruct"], "--instruction"),
        (["--instruction", "edema", "--word-weight", "2"], "--word-weight do(es) not apply to --method instruct"),
        (["--instruction", "edema", "--residual"], "--residual do(es) not apply to --method instruct"),
        (["--method", "invert", "--source-prompt", SOURCE, "--target-prompt", TARGET, "--seed", "1"], "--seed"),
        (["--method", "invert", "--source-prompt", SOURCE, "--target-prompt", TARGET, "--cross-replace", "3"],
         "cross_replace"),
    ],
)
def test_cli_invert_bad_input_exits_2(sd_folder, tmp_path, capsys, extra, message):
    from engine.io import write_png

    src = tmp_path / "in.png"
    write_png(src, _image())
    code = main(["edit", str(src), *extra, "--model", str(sd_folder), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "o.png").exists()


def test_confine_anatomy_keeps_the_edit_in_the_named_findings_anatomy(tiny_engine):
    """confine="anatomy": a left effusion changes only the left lung (grown and feathered) that the
    bundled segmenter finds on the prior; devices and "no change" are not confined."""
    from engine.analysis.segmentation import load_segmenter
    from engine.regions import ANATOMY_GROW, finding_structures, structure_mask
    from train.simulator import Findings, render, sample_patient

    film = render(sample_patient(np.random.default_rng(3)), Findings(), size=128, noise_seed=1).image
    film = film.reshape(64, 2, 64, 2).mean(axis=(1, 3)).astype(np.float32)  # the tiny model's canvas
    request = engine.EditRequest("new large left pleural effusion", seed=1, steps=3, confine="anatomy")
    out = tiny_engine.counterfactual(film, request)
    lung = structure_mask(load_segmenter("auto"), film, "left_lung")
    assert lung.any()
    far = ~ndimage.binary_dilation(lung, iterations=int(ANATOMY_GROW["lung"] * 64) + 8)
    plain = tiny_engine.counterfactual(film, replace(request, confine="none"))
    assert np.abs(plain.image - film)[far].max() > 1e-3  # the tiny model's edit reaches everywhere ...
    np.testing.assert_array_equal(out.image[far], film[far])  # ... confined, only near the left lung
    assert np.abs(out.image - film).max() > 1e-3
    regions = out.provenance()["regions"]
    assert regions["source"] == "anatomy: left_lung" and regions["feather"] > 0
    assert out.provenance()["request"]["confine"] == "anatomy"
    devices = tiny_engine.counterfactual(film, replace(request, instruction="without support devices"))
    assert devices.regions is None and finding_structures("no interval change") is None
    assert finding_structures("new cardiomegaly; right lower lobe consolidation") == {
        "heart": ("heart",), "lung": ("right_lung",)}
    with pytest.raises(InputError, match="confine"):
        engine.EditRequest("new effusion", confine="lungs").validated()
    # one film's anatomy is segmented once: a re-edit (another severity) reuses its region
    again = tiny_engine.anatomy_region(film, "new small left pleural effusion")
    assert again is tiny_engine.anatomy_region(film, "new large left pleural effusion")
    assert again is not tiny_engine.anatomy_region(film, "new large right pleural effusion")
