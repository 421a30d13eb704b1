"""The training configuration: one dataclass, loaded from YAML/JSON, overridden by ``--key=value``.

Every field is documented on :class:`TrainConfig`; ``train/configs/*.yaml`` hold the paper
recipes. Overrides are checked against the field types (``--lr=3e-5``, ``--ema=false``,
``--init_from=none``, ``--splits=train,validate``), and unknown keys are errors that list
the valid ones. A checkpoint stores the config that made it, so a run can always be rebuilt.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.checkpoint import INSTRUCT_TARGETS, PREDICTION_TYPES
from engine.errors import InputError
from engine.text import MINILM_SOURCE

STAGES = ("vae", "stage1", "stage2", "prism", "distill")
ARCHS = ("tiny", "small", "mini", "sd15")
STAGE2_TARGETS = ("followup", "counterfactual")
PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Attributes:
        stage: ``vae`` (stage 0: a small VAE from scratch), ``stage1`` (image-report pairs with
            a dummy mid-grey prior), ``stage2`` (instruction tuning on prior/follow-up/description
            triples), ``prism`` (text-to-image UNet fine-tuning on label captions) or ``distill``
            (a few-step student of the instruct model ``init_from``, trained on that model's own
            results for the priors and descriptions of the manifests; :mod:`train.distill`).
        name: run name, written into the exported card.
        out_dir: run folder: checkpoints, ``log.csv``, caches.
        manifest: ``images.jsonl`` (vae, stage1, prism) or ``pairs.jsonl`` (stage2).
        extra_manifests: more manifests of the same kind whose items are mixed in (each
            manifest's paths are relative to its own folder), e.g. the simulator's single-edit
            pairs (``simulate --edits``) beside its journeys.
        splits: manifest splits to train on.
        stage2_target: stage 2's target image: ``followup`` (the registered follow-up when
            registration wrote one, else the follow-up) or ``counterfactual`` (the simulator's
            exact counterfactual, ``counterfactual_path``: only the described change differs).
        resolution: square canvas side in px (paper: 256).
        init_from: a model folder to start from (stage2: a stage-1 export; prism or stage1: a
            Stable Diffusion 1.5 folder in diffusers layout); none builds fresh networks.
        vae_from: a VAE to use (frozen): a model folder, a ``vae`` export of stage 0 or a converted
            autoencoder (``python -m train convert-autoencoder``); none means the init model's, or
            a random VAE without one (smoke tests only). With ``init_from``, the init model's UNet
            moves onto this autoencoder's latents (``conv_in``/``conv_out`` rebuilt when the number
            of latent channels differs, every other weight kept: ``train.models.for_new_latents``).
        arch: size of fresh networks: ``tiny`` (tests), ``small`` (the bundled CPU model journey-mini),
            ``mini`` (this project's small models),
            ``sd15`` (Stable Diffusion 1.5's UNet).
        text_backend, text_source, max_tokens: the frozen text encoder of a fresh model.
        train_projection: train BiomedJourney's text projection along with the UNet.
        train_unet: train the UNet (stages 1, 2, prism); false trains only the projection (what
            runs started from a model folder at the same width did before the trainer switched
            the loaded UNet's gradients back on: ``journey-mini-e.yaml`` keeps it to reproduce v3).
        steps: optimizer steps.
        batch_size: images per device per micro-step (paper: 32).
        grad_accum: micro-steps per optimizer step.
        lr: AdamW learning rate (paper: 1e-4), constant after ``warmup_steps``.
        warmup_steps: linear warm-up steps.
        weight_decay, adam_beta1, adam_beta2, adam_eps: AdamW settings.
        max_grad_norm: gradient clipping (0: off).
        ema: keep an exponential moving average of the trained weights (exported by default).
        ema_decay: EMA decay (warmed up as ``min(decay, (1 + n) / (10 + n))``).
        mixed_precision: ``auto`` (bf16 on CUDA, none on CPU), ``no``, ``fp16``, ``bf16``.
        gradient_checkpointing: trade compute for memory in the UNet/VAE.
        drop_text, drop_image, drop_both: conditioning dropout for classifier-free guidance
            (InstructPix2Pix: 5% each); prism uses ``drop_text`` only.
        hflip: probability of a horizontal flip (text gets right/left swapped).
        crop_scale: smallest area fraction of a random crop (1: no cropping); off when caching.
        dummy_prior: stage-1 prior: a constant image of this intensity (BiomedJourney: 128/255).
        cache_latents: encode every image once (VAE frozen) and train from the cache.
        cache_text: encode every text once (encoder frozen) and train from the cache.
        cache_dir: cache folder (default ``<out_dir>/cache``).
        kl_weight: stage 0: weight of the KL term against the L1 reconstruction.
        latent_sample: stages 1/2/prism: diffuse a sample of the VAE posterior (Stable
            Diffusion) or, when false, its mode; use false for small VAEs trained with a weak KL,
            whose posterior spread is a large share of the latent's (the noise is unlearnable).
        instruct_target: stages 1/2 of an instruct model: diffuse the target's latent
            (``latent``, InstructPix2Pix/BiomedJourney) or its difference from the prior's
            latent (``change``; stage 1's prior is the dummy image). The export writes it into
            the card and the engine adds the prior back. ``change`` spends no capacity on
            copying the prior, which a small model trained briefly otherwise fails to do.
        change_scaling: ``change`` target only: extra factor on the change (written into the
            card). A change is zero almost everywhere and small where it is not, so at the
            latents' scale the noise swamps it until the last steps; scale its busy values to
            about unit variance (journey-mini: std 0.18, so 5).
        change_gate: ``change`` target only: ``[low, high]``, the noise floor of the trained
            model's sampled changes, written into the card (:attr:`engine.checkpoint.ModelCard.change_gate`);
            measured after training (journey-mini v8: "no interval change" samples about 0.3
            per latent position, effusions 2-4, so [0.6, 1.0]). None: every change decoded.
        position_channels: stages 1/2: fixed coordinate maps appended after the prior latent
            (0 none, 1 x, 2 x and y; :func:`engine.instruct.append_position`), written into the
            card. Without them the UNet cannot tell left from right on a nearly symmetric
            chest. With ``init_from`` a model without them, the new input channels start at zero.
        prediction_type: what the UNet predicts, ``epsilon`` (the noise, Stable Diffusion 1.5)
            or ``v_prediction`` (``sqrt(a) eps - sqrt(1 - a) x0``, Salimans & Ho): at high noise
            v is the target itself, so the loss keeps teaching *what* to generate where
            epsilon-prediction only learns to echo its input. Written into the exported
            scheduler config, which the engine samples and inverts with. None: the
            ``init_from`` model's (epsilon for fresh networks).
        seed: seeds data order, augmentation, noise and initial weights.
        log_every: steps between log rows.
        ckpt_every: steps between checkpoints (and one at the end).
        keep_checkpoints: checkpoints kept on disk.
        num_workers: data loader worker processes.
        tensorboard: also log to TensorBoard (when installed).
        progress: show a progress bar.
        data_license: license of the training data, for the card (default: from the sources).
        simulate: when the manifest does not exist yet, first simulate this many patients into
            its folder with :mod:`train.simulator` (0: never); used by the ``tiny`` smoke config.
        extra: free-form values for the card (``license``, ``description``).
        teacher_steps: distill: the teacher's DDIM steps (its full sampler's, 20); the student
            runs on a subset of these timesteps.
        fast_steps: distill: the student's default steps (the card's; the app uses them).
        distill_samples: distill: teacher results to make (pairs cycled in a seeded order, one
            seed and one pair of guidance scales each); each costs one full teacher edit.
        text_guidance_range, image_guidance_range: distill: the guidance scales drawn
            (uniform in ``[low, high]``); the engine uses the student only inside them.
        default_guidance_share: distill: share of draws at the engine's default guidance (7.5, 1.5).
        guidance_dim: distill: width of the guidance embedding per scale (the student's
            ``time_cond_proj_dim`` is twice this).
        fast_grid_share: distill: share of training timesteps drawn from the ``fast_steps``
            grid (the rest from all the teacher's timesteps).
        teacher_batch: distill: draws per teacher sampling batch.
        rollout_share: distill: share of the items at a later fast-grid timestep whose state comes
            from the student's own earlier steps rather than the teacher's path (the student must
            learn to reach the teacher's result from where its own steps leave it).
        student_dtype: distill: the exported student's weights on disk, ``float16`` (half the
            bytes: the model folder must stay small enough to ship and to travel to a GPU
            machine; the engine computes in its own dtype) or ``float32``.
    """

    stage: str = "stage2"
    name: str = "run"
    out_dir: str = "runs/run"
    manifest: str = ""
    extra_manifests: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train",)
    stage2_target: str = "followup"
    resolution: int = 256
    init_from: str | None = None
    vae_from: str | None = None
    arch: str = "mini"
    text_backend: str = "bert"
    text_source: str = MINILM_SOURCE
    max_tokens: int = 128
    train_projection: bool = True
    train_unet: bool = True
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    ema: bool = True
    ema_decay: float = 0.9999
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    hflip: float = 0.5
    crop_scale: float = 1.0
    dummy_prior: float = 128 / 255
    cache_latents: bool = True
    cache_text: bool = True
    cache_dir: str | None = None
    kl_weight: float = 1e-6
    latent_sample: bool = True
    instruct_target: str = "latent"
    change_scaling: float = 1.0
    change_gate: list[float] | None = None
    position_channels: int = 0
    prediction_type: str | None = None
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 0
    tensorboard: bool = False
    progress: bool = True
    data_license: str | None = None
    simulate: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    teacher_steps: int = 20
    fast_steps: int = 4
    distill_samples: int = 2000
    text_guidance_range: tuple[float, ...] = (1.0, 12.0)
    image_guidance_range: tuple[float, ...] = (1.0, 3.0)
    default_guidance_share: float = 0.25
    guidance_dim: int = 32
    fast_grid_share: float = 0.5
    teacher_batch: int = 8
    rollout_share: float = 0.5
    student_dtype: str = "float16"

    def validate(self) -> TrainConfig:
        """Checks values and combinations; returns self.

        Raises:
            InputError: naming the field and what is allowed.
        """
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(f"config: {message}")

        need(self.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        need(self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        need(self.instruct_target in INSTRUCT_TARGETS,
             f"instruct_target must be one of {', '.join(INSTRUCT_TARGETS)}, not {self.instruct_target!r}")
        need(self.change_scaling > 0, "change_scaling must be positive")
        need(self.change_gate is None or (len(self.change_gate) == 2 and 0 <= self.change_gate[0] < self.change_gate[1]),
             "change_gate must be [low, high] with 0 <= low < high")
        need(self.position_channels in (0, 1, 2), f"position_channels must be 0, 1 or 2, not {self.position_channels!r}")
        need(not self.position_channels or self.stage in ("stage1", "stage2"),
             "position_channels needs an instruct stage (stage1 or stage2)")
        need(self.prediction_type in (None, *PREDICTION_TYPES),
             f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, not {self.prediction_type!r}")
        need(self.stage2_target in STAGE2_TARGETS, f"stage2_target must be one of {', '.join(STAGE2_TARGETS)}")
        need(self.mixed_precision in PRECISIONS, f"mixed_precision must be one of {', '.join(PRECISIONS)}")
        need(bool(self.manifest), "manifest is required (images.jsonl, or pairs.jsonl for stage2)")
        need(self.resolution >= 32 and self.resolution % 8 == 0, "resolution must be a multiple of 8, >= 32")
        need(self.steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1, "steps, batch_size, grad_accum must be >= 1")
        need(self.lr > 0, "lr must be positive")
        need(self.stage == "vae" or self.train_unet or self.train_projection,
             "train_unet and train_projection are both false: nothing to train")
        for name in ("drop_text", "drop_image", "drop_both", "hflip"):
            need(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1]")
        need(self.drop_text + self.drop_image + self.drop_both <= 1, "drop_text + drop_image + drop_both must be <= 1")
        need(0 < self.crop_scale <= 1, "crop_scale must be in (0, 1]")
        need(0 <= self.dummy_prior <= 1, "dummy_prior must be in [0, 1]")
        need(0 < self.ema_decay < 1, "ema_decay must be in (0, 1)")
        need(self.ckpt_every >= 1 and self.log_every >= 1, "ckpt_every and log_every must be >= 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        if self.stage == "distill":
            need(bool(self.init_from), "stage distill needs init_from: the instruct model folder to distil (the teacher)")
            need(not self.train_projection, "stage distill trains the student UNet only: set train_projection: false "
                                            "(the student shares the teacher's text projection)")
            need(self.train_unet, "stage distill trains the student UNet: train_unet must be true")
            need(1 <= self.fast_steps <= self.teacher_steps, "fast_steps must be from 1 to teacher_steps")
            need(self.distill_samples >= 1 and self.teacher_batch >= 1, "distill_samples and teacher_batch must be >= 1")
            need(self.guidance_dim >= 4 and self.guidance_dim % 2 == 0, "guidance_dim must be even and >= 4")
            for name, default in (("text_guidance_range", 7.5), ("image_guidance_range", 1.5)):
                value = getattr(self, name)
                need(len(value) == 2 and 0 <= value[0] <= value[1],
                     f"{name} must be two numbers low,high with 0 <= low <= high")
                need(value[0] <= default <= value[1], f"{name} must contain the engine's default {default}")
            need(self.student_dtype in ("float16", "float32"), "student_dtype must be float16 or float32")
            need(all(0 <= v <= 1 for v in (self.default_guidance_share, self.fast_grid_share, self.rollout_share)),
                 "default_guidance_share, fast_grid_share and rollout_share must be in [0, 1]")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in checkpoints and cards)."""
        data = asdict(self)
        data["splits"] = list(self.splits)
        data["extra_manifests"] = list(self.extra_manifests)
        return data

    @property
    def manifests(self) -> tuple[str, ...]:
        """Every manifest trained on: ``manifest`` first, then ``extra_manifests``."""
        return (self.manifest, *self.extra_manifests)

    @property
    def cache_path(self) -> Path:
        """Where latents and text embeddings are cached."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.out_dir) / "cache"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, value: Any, hint: Any) -> Any:
    """Converts a YAML value or an override string to the field's type, or raises InputError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _convert(name, value, inner[0])
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value or [])
        return tuple(_convert(name, v, args[0]) for v in items)
    if origin is dict or hint is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InputError(f"config: {name} must be a JSON object") from exc
        if not isinstance(value, dict):
            raise InputError(f"config: {name} must be a mapping")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise InputError(f"config: {name} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise InputError(f"config: {name} must be an integer, not {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"config: {name} must be an integer, not {value!r}") from exc
        if not number.is_integer():
            raise InputError(f"config: {name} must be an integer, not {value!r}")
        return int(number)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"config: {name} must be a number, not {value!r}") from exc
    if hint is str:
        if isinstance(value, (dict, list)):
            raise InputError(f"config: {name} must be a string, not {value!r}")
        return str(value)
    return value


def config_from_dict(data: dict[str, Any], *, where: str = "config") -> TrainConfig:
    """Builds a config from a mapping, converting values to field types.

    Raises:
        InputError: unknown keys (listing the known ones) or values of the wrong type.
    """
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return TrainConfig(**{k: _convert(k, v, hints[k]) for k, v in data.items()})


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["--lr=1e-5", "steps=10"]`` -> ``{"lr": "1e-5", "steps": "10"}``.

    Raises:
        InputError: an item without ``=``.
    """
    out = {}
    for item in items:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} must look like --key=value")
        out[key.replace("-", "_")] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] = ()) -> TrainConfig:
    """Loads a YAML/JSON config and applies overrides; validated.

    Args:
        path: ``.yaml``/``.yml``/``.json`` file, or None for the defaults.
        overrides: ``--key=value`` strings or a mapping.

    Raises:
        InputError: unreadable file, unknown keys, wrong types, invalid values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist (see train/configs/)")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as exc:  # yaml and json raise their own types
            raise InputError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(f"config file {path} must hold a mapping of keys to values")
    extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    return config_from_dict({**data, **extra}, where=str(path or "config")).validate()
