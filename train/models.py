"""Building the networks a training stage needs, fresh or from a model folder.

Architectures of fresh networks (``arch``):

======  =====================================  ==================================
arch    UNet (block_out_channels, layers)      VAE (block_out_channels), latent
======  =====================================  ==================================
tiny    (32, 64), 1, cross-attention 32        (32, 64): /2, 4 channels (tests)
small   (32, 64, 128), 1, cross 256            (32, 64, 128, 128): /8, 4 channels (journey-mini)
mini    (64, 128, 256, 256), 2, cross 256      (32, 64, 128, 128): /8, 4 channels
sd15    (320, 640, 1280, 1280), 2, cross 768   Stable Diffusion's VAE: /8, 4 channels
======  =====================================  ==================================

The noise schedule is Stable Diffusion's (scaled-linear betas 0.00085-0.012, 1000 steps,
epsilon prediction) unless a loaded model brings its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.autoencoder import value_range_of
from engine.checkpoint import CARD_FILE, TextEncoderSpec, load_model_parts
from engine.errors import InputError
from engine.text import TextEncoder, load_text_encoder, make_projection
from train.config import TrainConfig

log = logging.getLogger(__name__)

UNET_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32),
    # journey-mini, the bundled CPU model: 4.4 M parameters, 20 steps at 256 px in a few seconds on 2 cores
    "small": dict(block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=256, attention_head_dim=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32),
    "mini": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256,
                 attention_head_dim=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=32),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 norm_num_groups=32),
}
VAE_ARCHS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1),
    "small": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1),
    "mini": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1),
    "sd15": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
}
LATENT_CHANNELS = 4
SD_SCALING = 0.18215


def noise_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """Stable Diffusion's training schedule, as a DDIM scheduler config the engine samples with."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def fresh_unet(arch: str, *, in_channels: int, resolution: int, latent_factor: int,
               out_channels: int = LATENT_CHANNELS):
    """A randomly initialised UNet of ``arch`` (seed the global RNG first) predicting ``out_channels``
    latent channels (the VAE's: 4 for the project's VAEs, 32 for TAEF2)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=resolution // latent_factor, in_channels=in_channels,
                                out_channels=out_channels, **UNET_ARCHS[arch])


def fresh_vae(arch: str, *, resolution: int, channels: int = 1):
    """A randomly initialised grey (1-channel) VAE of ``arch``."""
    from diffusers import AutoencoderKL

    spec = VAE_ARCHS[arch]
    n = len(spec["block_out_channels"])
    return AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=32, sample_size=resolution, scaling_factor=SD_SCALING, **spec,
    )


def for_new_latents(unet, in_channels: int, out_channels: int):
    """A UNet for another autoencoder's latents that keeps every weight that still fits.

    ``conv_in`` and ``conv_out`` depend on the number of latent channels, so they start fresh
    (seed the global RNG first; ``conv_out`` at zero, so the run starts predicting nothing);
    everything between them (resnets, attention, the time embedding: what the model learned
    about the text and where things are) is copied.
    """
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config.update(in_channels=in_channels, out_channels=out_channels)
    new_unet = UNet2DConditionModel.from_config(config)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith(("conv_in.", "conv_out."))}
    missing, unexpected = new_unet.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"}
    torch.nn.init.zeros_(new_unet.conv_out.weight)
    torch.nn.init.zeros_(new_unet.conv_out.bias)
    return new_unet


def expand_conv_in(unet, in_channels: int):
    """InstructPix2Pix's trick: widen ``conv_in`` to ``in_channels``, new input channels zero.

    A text-to-image UNet (e.g. Stable Diffusion 1.5) then starts as if the prior latent were
    absent, and learns to use it.
    """
    from diffusers import UNet2DConditionModel

    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    config = dict(unet.config)
    config["in_channels"] = in_channels
    new_unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    weight = torch.zeros(old.out_channels, in_channels, *old.kernel_size)
    weight[:, : old.in_channels] = state["conv_in.weight"]
    state["conv_in.weight"] = weight
    new_unet.load_state_dict(state)
    return new_unet


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters: identifies the VAE a latent cache was made with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass
class Models:
    """The networks of one run.

    Attributes:
        stage: the config's stage.
        method: ``instruct`` or ``text2image`` (what an export's card says); ``vae`` for stage 0.
        vae: ``AutoencoderKL`` (trained in stage 0, frozen otherwise).
        unet: ``UNet2DConditionModel`` or None (stage 0).
        projection: the learnable text projection, or None (identity, e.g. SD's CLIP).
        text_encoder: the frozen text encoder, or None (stage 0).
        text_spec: how the card names the encoder.
        scheduler_config: the noise schedule.
        latent_scaling: factor on VAE latents.
        value_range: pixel range of the VAE.
        vae_id: digest of the VAE (cache keys).
        text_encoder_folder: folder to copy into exports when the encoder lives in the init model.
        vae_notices: licence and provenance files that came with the VAE (a converted TAEF2's
            ``LICENSE`` and ``PROVENANCE.json``), copied into every export's ``vae/``.
        teacher: stage distill: the frozen teacher UNet (``unet`` is then the student).
        teacher_digest: stage distill: :func:`engine.checkpoint.teacher_digest` of ``init_from``.
        teacher_timesteps: stage distill: the teacher's DDIM timesteps.
        schedule: stage distill: ``(alphas_cumprod, final_alpha)`` of the teacher's schedule.
        position_channels: coordinate maps the UNet reads (distill: the teacher card's).
    """

    stage: str
    method: str
    vae: Any
    unet: Any
    projection: torch.nn.Linear | None
    text_encoder: TextEncoder | None
    text_spec: TextEncoderSpec | None
    scheduler_config: dict[str, Any]
    latent_scaling: float
    value_range: tuple[float, float]
    vae_id: str
    text_encoder_folder: Path | None = None
    vae_notices: tuple[Path, ...] = ()
    teacher: Any = None
    teacher_digest: str | None = None
    teacher_timesteps: tuple[int, ...] = ()
    schedule: Any = None
    position_channels: int = 0


NOTICE_FILES = ("LICENSE", "PROVENANCE.json")
"""Files a ``vae/`` part may carry besides its config and weights (a third party's licence terms)."""


def vae_notices(folder: str | Path | None) -> tuple[Path, ...]:
    """The :data:`NOTICE_FILES` in a VAE's folder (``folder/vae`` or ``folder``), in that order."""
    if not folder:
        return ()
    path = Path(folder)
    for candidate in (path / "vae", path):
        if (candidate / "config.json").is_file():
            return tuple(candidate / n for n in NOTICE_FILES if (candidate / n).is_file())
    return ()


def _load_vae(folder: str):
    """A VAE from a model folder (``vae/``), an SD folder, a stage-0 ``vae`` export, or a converted
    tiny autoencoder (``python -m train convert-autoencoder``)."""
    from engine.autoencoder import autoencoder_class

    path = Path(folder)
    for candidate in (path / "vae", path):
        if (candidate / "config.json").is_file():
            config = json.loads((candidate / "config.json").read_text())
            return autoencoder_class(config).from_pretrained(candidate, use_safetensors=True, torch_dtype=torch.float32)
    raise InputError(f"vae_from {folder} holds no VAE (looked for vae/config.json and config.json)")


def _load_init(cfg: TrainConfig) -> dict[str, Any]:
    """Parts of ``init_from``: an engine model folder (with card.json) or a diffusers SD folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = Path(cfg.init_from)
    if (root / CARD_FILE).is_file():
        parts = load_model_parts(root)
        enc_folder = root / parts.card.text_encoder.source if (root / parts.card.text_encoder.source).is_dir() else None
        return dict(vae=parts.vae, unet=parts.unet, projection=parts.text_projection, spec=parts.card.text_encoder,
                    scheduler=parts.scheduler_config, scaling=parts.card.latent_scaling,
                    value_range=parts.card.value_range, root=root, encoder_folder=enc_folder)
    if not (root / "unet" / "config.json").is_file():
        raise InputError(f"init_from {root} is neither a model folder (card.json) nor a diffusers folder (unet/, vae/)")
    vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else noise_scheduler_config()
    spec = TextEncoderSpec("clip", str(root), 77) if (root / "text_encoder").is_dir() else None
    return dict(vae=vae, unet=unet, projection=None, spec=spec, scheduler=scheduler,
                scaling=float(vae.config.get("scaling_factor", SD_SCALING)), value_range=(-1.0, 1.0), root=root,
                encoder_folder=None)


def build_models(cfg: TrainConfig) -> Models:
    """The networks for ``cfg.stage``, fresh ones seeded from ``cfg.seed``.

    Raises:
        InputError: an init/VAE folder that does not fit the stage.
    """
    from train.data import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init") % (2**31))
        if cfg.stage == "vae":
            vae = _load_vae(cfg.init_from) if cfg.init_from else fresh_vae(cfg.arch, resolution=cfg.resolution)
            return Models("vae", "vae", vae, None, None, None, None, noise_scheduler_config(),
                          float(vae.config.scaling_factor), (-1.0, 1.0), "trainable")

        if cfg.stage == "distill":
            return _distill_models(cfg)
        method = "text2image" if cfg.stage == "prism" else "instruct"

        def unet_inputs(vae) -> int:
            latent = int(vae.config.latent_channels)
            return latent * 2 + cfg.position_channels if method == "instruct" else latent

        if cfg.init_from:
            init = _load_init(cfg)
            vae, unet, projection = init["vae"], init["unet"], init["projection"]
            spec, scheduler, scaling, value_range = init["spec"], init["scheduler"], init["scaling"], init["value_range"]
            encoder_folder = init["encoder_folder"]
            if cfg.vae_from:  # the init model's UNet moved onto another autoencoder's latents
                vae = _load_vae(cfg.vae_from)
                scaling, value_range = float(vae.config.scaling_factor), value_range_of(vae)
                if int(vae.config.latent_channels) != int(unet.config.out_channels):
                    log.info("init_from %s with vae_from %s: conv_in/conv_out rebuilt for %d latent channels, "
                             "every other UNet weight kept", cfg.init_from, cfg.vae_from, vae.config.latent_channels)
                    unet = for_new_latents(unet, unet_inputs(vae), int(vae.config.latent_channels))
            in_channels = unet_inputs(vae)
            if method == "instruct":
                if unet.config.in_channels > in_channels:
                    raise InputError(f"{cfg.init_from}'s UNet takes {unet.config.in_channels} input channels, more "
                                     f"than this config's {in_channels} (check position_channels)")
                unet = expand_conv_in(unet, in_channels)
            elif unet.config.in_channels != in_channels:
                raise InputError(f"stage prism needs a text-to-image UNet ({in_channels} input channels); "
                                 f"{cfg.init_from} has {unet.config.in_channels}")
            if spec is None:
                spec = TextEncoderSpec(cfg.text_backend, cfg.text_source, cfg.max_tokens)
        else:
            vae = _load_vae(cfg.vae_from) if cfg.vae_from else fresh_vae(cfg.arch, resolution=cfg.resolution)
            if not cfg.vae_from:
                log.warning("no vae_from and no init_from: training on a random frozen VAE (smoke tests only)")
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            unet = fresh_unet(cfg.arch, in_channels=unet_inputs(vae), resolution=cfg.resolution, latent_factor=factor,
                              out_channels=int(vae.config.latent_channels))
            spec = TextEncoderSpec(cfg.text_backend, cfg.text_source, cfg.max_tokens)
            projection, scheduler = None, noise_scheduler_config(cfg.prediction_type or "epsilon")
            scaling, value_range, encoder_folder = float(vae.config.scaling_factor), value_range_of(vae), None
        if cfg.prediction_type is not None:  # an init model fine-tuned to another parametrisation
            scheduler = {**scheduler, "prediction_type": cfg.prediction_type}
        encoder = load_text_encoder(spec, Path(cfg.init_from) if cfg.init_from else None)
        cross = int(unet.config.cross_attention_dim)
        if projection is None and encoder.width != cross:
            projection = make_projection(encoder.width, cross, generator=torch.Generator().manual_seed(cfg.seed))
    vae.requires_grad_(False).eval()
    return Models(cfg.stage, method, vae, unet, projection, encoder, spec, scheduler, scaling, value_range,
                  module_digest(vae), encoder_folder, vae_notices(cfg.vae_from or cfg.init_from),
                  position_channels=cfg.position_channels if method == "instruct" else 0)


def _distill_models(cfg: TrainConfig) -> Models:
    """Stage distill: the teacher (``init_from``, frozen) and its student (:func:`train.distill.student_from_teacher`)."""
    from engine.checkpoint import read_card, teacher_digest
    from train.distill import schedule, student_from_teacher, teacher_timesteps

    root = Path(cfg.init_from)
    if not (root / CARD_FILE).is_file():
        raise InputError(f"init_from {root} is not a model folder (no card.json); stage distill needs an instruct model")
    card = read_card(root)
    if card.method != "instruct":
        raise InputError(f"init_from {root} is a {card.method} model; stage distill needs an instruct model")
    if cfg.vae_from:
        raise InputError("stage distill keeps the teacher's autoencoder; remove vae_from")
    if cfg.resolution != card.resolution:
        raise InputError(f"resolution must be the teacher's ({card.resolution}), not {cfg.resolution}")
    if cfg.prediction_type not in (None, "v_prediction"):
        raise InputError("stage distill's student always predicts v; remove prediction_type")
    parts = load_model_parts(root)
    teacher = parts.unet.requires_grad_(False).eval()
    student = student_from_teacher(teacher, cfg.guidance_dim)
    encoder = load_text_encoder(card.text_encoder, root)
    encoder_folder = root / card.text_encoder.source if (root / card.text_encoder.source).is_dir() else None
    parts.vae.requires_grad_(False).eval()
    return Models("distill", "instruct", parts.vae, student, parts.text_projection, encoder, card.text_encoder,
                  parts.scheduler_config, card.latent_scaling, card.value_range, module_digest(parts.vae),
                  encoder_folder, (), teacher=teacher, teacher_digest=teacher_digest(root, card),
                  teacher_timesteps=tuple(teacher_timesteps(parts.scheduler_config, cfg.teacher_steps)),
                  schedule=schedule(parts.scheduler_config), position_channels=card.position_channels)
