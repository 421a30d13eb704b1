"""Text encoder backends: CLIP in Stable Diffusion's folder layout, BiomedCLIP offline message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import TextEncoderSpec
from engine.errors import ModelFolderError
from engine.text import load_text_encoder, make_projection, project


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-to-unicode table (as in its tokenizer), for a tiny character-level vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_sd_text_folder(root: Path) -> Path:
    """A Stable Diffusion-style folder with a tiny CLIP text model and a character-level BPE."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")).save_pretrained(tok_dir)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).save_pretrained(root / "text_encoder", safe_serialization=True)
    return root


def test_clip_backend_loads_sd_layout(tmp_path: Path):
    folder = _tiny_sd_text_folder(tmp_path / "sd")
    enc = load_text_encoder(TextEncoderSpec("clip", str(folder), 77))
    assert enc.width == 32 and enc.max_tokens == 77
    states, mask = enc.encode(["chest x-ray with support devices", ""])
    assert states.shape == (2, 77, 32)
    assert bool(mask.all())  # Stable Diffusion attends to every position
    assert not torch.allclose(states[0], states[1])
    alone, _ = enc.encode(["chest x-ray with support devices"])
    torch.testing.assert_close(alone[0], states[0])


def test_relative_source_inside_model_folder(tmp_path: Path):
    folder = _tiny_sd_text_folder(tmp_path / "model")
    enc = load_text_encoder(TextEncoderSpec("clip", ".", 77), model_root=folder)
    assert enc.width == 32


def test_biomedclip_offline_says_what_to_download(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = TextEncoderSpec("biomedclip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", 256)
    with pytest.raises(ModelFolderError, match="hf download microsoft/BiomedCLIP"):
        load_text_encoder(spec)


def test_projection_is_near_isometric_and_maps_width():
    proj = make_projection(24, 32, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 24)
    y = project(x, proj)
    assert y.shape == (2, 5, 32)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=1e-4)
    assert project(x, None) is x
