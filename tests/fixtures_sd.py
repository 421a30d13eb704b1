"""Tiny Stable Diffusion-layout folders and CLIP models, built locally (no downloads).

The CLIP tokenizer is written by hand: byte-level single characters plus whole-word merges
for a small vocabulary, so every listed word is one token, as in the real CLIP vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "chest", "x-ray", "with", "without", "support", "devices", "no", "new", "right", "left",
    "pleural", "effusion", "large", "small", "of", "the", "patient", "lots", "a", "heart",
)


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = WORDS) -> Path:
    """Writes ``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE tokenizer into ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merge = f"{a} {b}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tok.save_pretrained(folder)
    return folder


def build_tiny_sd(out: Path, *, seed: int = 0) -> Path:
    """A tiny seeded Stable Diffusion 1.5-layout pipeline folder (64 px, 16x16 latent, 16 tokens).

    Random weights, shaped to behave like a trained model where the inversion tests need it:
    the VAE's ``scaling_factor`` brings latents to about unit spread (SD's 0.18215 does that for
    its VAE); the UNet's output layer is scaled down (a trained noise predictor is smooth in
    ``x_t``, so DDIM inversion nearly retraces sampling); cross-attention keys and values are
    scaled up and token embeddings down (captions sit close together, yet text steers the
    prediction, so guidance at 7.5 drifts and null-text optimisation can pull it back within its
    learning rate; and word maps have spatial contrast, as a trained model's do).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32, sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    tokenizer_dir = write_clip_tokenizer(out / "tokenizer")
    vocab = len(json.loads((tokenizer_dir / "vocab.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    ))
    vae.register_to_config(scaling_factor=5.0)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_v", "attn2.to_k")):
                module.weight.mul_(10.0)
        text.get_input_embeddings().weight.mul_(0.1)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }))
    return out


def build_tiny_clip(out: Path, *, seed: int = 0) -> Path:
    """A tiny seeded transformers ``CLIPModel`` folder (32 px images) with the hand-made tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    write_clip_tokenizer(out)
    vocab = len(json.loads((out / "vocab.json").read_text()))
    config = CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": vocab - 2,
                     "eos_token_id": vocab - 1, "pad_token_id": vocab - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out, safe_serialization=True)
    return out
