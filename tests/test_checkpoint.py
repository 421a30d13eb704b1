"""Model folders: save/load round trip, validation messages, shards, hub ids offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.checkpoint import (
    ModelCard,
    TextEncoderSpec,
    content_hash,
    load_model_parts,
    read_card,
    save_model,
)
from engine.errors import ModelFolderError
from engine.text import load_text_encoder


def _copy(tiny_model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(tiny_model, dst)
    return dst


def test_round_trip_preserves_weights(tiny_model: Path, tmp_path: Path):
    parts = load_model_parts(tiny_model)
    out = save_model(
        tmp_path / "again", card=parts.card, vae=parts.vae, unet=parts.unet,
        scheduler=__import__("diffusers").DDIMScheduler.from_config(parts.scheduler_config),
        text_projection=parts.text_projection, text_encoder_folder=tiny_model / "text_encoder",
    )
    again = load_model_parts(out)
    assert again.card == parts.card
    for a, b in zip(parts.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(parts.vae.state_dict().values(), again.vae.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(parts.text_projection.weight, again.text_projection.weight)
    assert again.content_hash == parts.content_hash
    assert not list(tmp_path.glob(".again*")), "temporary folder left behind"


def test_card_fields_and_research_notice(tiny_model: Path):
    card = read_card(tiny_model)
    assert card.method == "instruct" and card.resolution == 64
    assert card.text_encoder == TextEncoderSpec("bert", "text_encoder", 32)
    assert "not for diagnosis" in card.intended_use
    data = json.loads((tiny_model / "card.json").read_text())
    assert ModelCard.from_dict(data) == card


def test_weights_are_sharded_at_15_mb(tmp_path: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32,), norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    unet = UNet2DConditionModel(  # ~40 MB in fp32
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(128, 256),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, norm_num_groups=32,
    )
    card = ModelCard(name="big", method="instruct", resolution=64,
                     text_encoder=TextEncoderSpec("bert", "text_encoder", 16))
    out = save_model(tmp_path / "big", card=card, vae=vae, unet=unet, scheduler=DDIMScheduler())
    shards = list((out / "unet").glob("*.safetensors"))
    assert len(shards) >= 2
    assert max(p.stat().st_size for p in shards) <= 15_000_000
    assert (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    parts = load_model_parts(out)
    for a, b in zip(unet.state_dict().values(), parts.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_instruct_needs_twice_the_latent_channels(tiny_model: Path, tmp_path: Path):
    model = _copy(tiny_model, tmp_path)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["in_channels"] = 4
    (model / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"unet.in_channels == 2 \* vae.latent_channels"):
        load_model_parts(model)


def test_text2image_card_on_instruct_unet_is_rejected(tiny_model: Path, tmp_path: Path):
    model = _copy(tiny_model, tmp_path)
    card = json.loads((model / "card.json").read_text())
    card["method"] = "text2image"
    (model / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="text2image"):
        load_model_parts(model)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("method"), "lacks required field"),
        (lambda c: c.update(method="magic"), "method must be one of"),
        (lambda c: c.update(resolution=100), "multiple of 8"),
        (lambda c: c.update(colour="blue"), "unknown field"),
        (lambda c: c["text_encoder"].update(backend="gpt"), "backend must be one of"),
    ],
)
def test_bad_cards_say_what_is_wrong(tiny_model: Path, tmp_path: Path, mutate, message):
    model = _copy(tiny_model, tmp_path)
    card = json.loads((model / "card.json").read_text())
    mutate(card)
    (model / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match=message):
        load_model_parts(model)


def test_missing_parts_and_folders(tiny_model: Path, tmp_path: Path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model_parts(tmp_path / "nope")
    model = _copy(tiny_model, tmp_path)
    shutil.rmtree(model / "vae")
    with pytest.raises(ModelFolderError, match="lacks vae/config.json"):
        load_model_parts(model)
    (tmp_path / "m" / "card.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        read_card(tmp_path / "m")


def test_pickle_weights_are_not_loaded(tiny_model: Path, tmp_path: Path):
    model = _copy(tiny_model, tmp_path)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save({}, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="no .safetensors"):
        load_model_parts(model)


def test_uncached_hub_id_offline_says_what_to_download(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFolderError, match="hf download someone/cxr-model"):
        load_model_parts("someone/cxr-model")


def test_hub_id_from_the_standard_cache(tiny_model: Path, tmp_path: Path, monkeypatch):
    """A model placed in the hub cache layout loads by id with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    parts = load_model_parts("someone/tiny")
    assert parts.card.name == "tiny-test"
    assert parts.content_hash == content_hash(tiny_model)


def test_text_encoder_is_frozen_cached_and_padded(tiny_model: Path):
    parts = load_model_parts(tiny_model)
    enc = load_text_encoder(parts.card.text_encoder, parts.root)
    assert enc.width == 24 and enc.max_tokens == 32
    assert all(not p.requires_grad for p in enc.model.parameters())
    states, mask = enc.encode(["new moderate right pleural effusion", ""])
    assert states.shape == (2, 32, 24) and mask.shape == (2, 32)
    assert mask[1].sum() == 2  # [CLS] [SEP]
    alone, _ = enc.encode(["new moderate right pleural effusion"])
    torch.testing.assert_close(alone[0], states[0])  # independent of batch mates
    calls = []
    original = enc._encode
    enc._encode = lambda texts: calls.append(texts) or original(texts)
    enc.encode(["new moderate right pleural effusion"])
    assert calls == []  # served from the cache


def test_minilm_package_source_resolves_offline():
    from engine.text import MINILM_SOURCE, resolve_source

    folder = resolve_source(MINILM_SOURCE)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_missing_package_source_says_pip_install():
    from engine.text import resolve_source

    with pytest.raises(ModelFolderError, match="pip install no-such-encoder"):
        resolve_source("package:no-such-encoder")


def test_saved_folder_has_ordinary_permissions(tiny_model: Path):
    """Not the 0700/0600 of the staging folder: files 0666 and folders 0777, less the umask."""
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for path in [tiny_model, *tiny_model.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_weights_that_are_half_precision_values_are_stored_in_half_and_load_identically(tiny_model: Path,
                                                                                         tmp_path: Path):
    """An autoencoder converted from a float16 release (TAEF2) is stored in float16: half the
    bytes, the same numbers once loaded. A network trained in float32 stays float32."""
    from safetensors import safe_open

    parts = load_model_parts(tiny_model)
    with torch.no_grad():
        for p in parts.vae.parameters():
            p.copy_(p.half().float())  # what a converted half-precision release holds
    out = save_model(
        tmp_path / "half", card=parts.card, vae=parts.vae, unet=parts.unet,
        scheduler=__import__("diffusers").DDIMScheduler.from_config(parts.scheduler_config),
        text_projection=parts.text_projection, text_encoder_folder=tiny_model / "text_encoder",
    )

    def stored(part: str) -> set:
        dtypes = set()
        for f in (out / part).glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                dtypes |= {fh.get_tensor(k).dtype for k in fh.keys()}
        return dtypes

    assert stored("vae") == {torch.float16}
    assert stored("unet") == {torch.float32}
    again = load_model_parts(out)
    for a, b in zip(parts.vae.state_dict().values(), again.vae.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a, b)
