"""The Engine: the one stateful object (models, device, dtype, caches, a lock).

``engine.load(model)`` reads a model folder; ``Engine.counterfactual(prior, instruction)``
returns a :class:`Counterfactual`, a frozen record of the image and of exactly how it was
made. The UI and the CLI talk to the engine only through these dataclasses.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.checkpoint import ModelCard, ModelParts, load_model_parts
from engine.errors import InputError, ModelFolderError
from engine.instruct import SCHEDULERS, make_scheduler, null_image_latents, sample_instruct
from engine.io import SquareTransform, XRay, to_square
from engine.severity import SEVERITIES, apply_severity
from engine.text import TextEncoder, load_text_encoder, project

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "models" / "journey-mini"
MAX_INSTRUCTION_CHARS = 1000
SYNTHETIC_LABEL = "SYNTHETIC - research use only, not for diagnosis"


@dataclass(frozen=True)
class EditRequest:
    """One counterfactual to make from a prior.

    Attributes:
        instruction: the progression description, as typed.
        severity: ``none`` (use the text as typed), ``slight``, ``moderate`` or ``large``
            (rewrites the text by the rule in :mod:`engine.severity`).
        steps: denoising steps.
        text_guidance: ``s_txt`` of dual classifier-free guidance.
        image_guidance: ``s_img``.
        seed: random seed; None draws one, and the result records it.
        scheduler: ``ddim``, ``euler_a`` or ``dpmpp``.
    """

    instruction: str
    severity: str = "none"
    steps: int = 20
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    seed: int | None = None
    scheduler: str = "ddim"

    def validated(self) -> EditRequest:
        """Checks every field and returns the request with a seed filled in.

        Raises:
            InputError: with a message naming the field and the allowed values.
        """
        text = self.instruction if isinstance(self.instruction, str) else ""
        if not text.strip():
            raise InputError("The progression description is empty; describe the change to make")
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise InputError(
                f"The progression description has {len(text)} characters; "
                f"keep it under {MAX_INSTRUCTION_CHARS}"
            )
        if self.severity not in SEVERITIES:
            raise InputError(f"severity must be one of {', '.join(SEVERITIES)}, not {self.severity!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 500:
            raise InputError(f"steps must be an integer from 1 to 500, not {self.steps!r}")
        for name in ("text_guidance", "image_guidance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or not 0 <= value <= 50:
                raise InputError(f"{name} must be a number from 0 to 50, not {value!r}")
        seed = self.seed
        if seed is None:
            seed = secrets.randbits(31)
        elif not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InputError(f"seed must be a non-negative integer, not {seed!r}")
        return replace(self, instruction=text.strip(), seed=seed)

    @property
    def applied_instruction(self) -> str:
        """The instruction exactly as the model receives it (severity rule applied)."""
        return apply_severity(self.instruction, self.severity)


@dataclass(frozen=True)
class Counterfactual:
    """A generated counterfactual and everything needed to reproduce it.

    Attributes:
        image: ``(S, S)`` float32 in [0, 1], at the model's resolution.
        image_input: ``(H, W)`` float32 in [0, 1], mapped back onto the input's geometry.
        prior: ``(S, S)`` the prior exactly as the model saw it.
        request: the request as applied (seed filled in).
        instruction_applied: the text the model received (after the severity rule).
        model_id: the model as named by the user (path or hub id).
        model_hash: sha256 of the model folder.
        transform: how the input was letterboxed onto the model canvas.
        device: where it ran (``cpu``, ``cuda``); dtype: the compute dtype.
        timings: seconds per stage (``text``, ``encode``, ``denoise``, ``decode``, ``total``),
            shared by every item of a batched call.
        prior_withheld: True for the text-only baseline (the model did not see the prior).
        synthetic: always True: this image was generated.
    """

    image: np.ndarray
    image_input: np.ndarray
    prior: np.ndarray
    request: EditRequest
    instruction_applied: str
    model_id: str
    model_hash: str
    transform: SquareTransform
    device: str
    dtype: str
    timings: dict[str, float] = field(default_factory=dict)
    prior_withheld: bool = False
    synthetic: bool = True

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record of how this image was made (no patient identifiers)."""
        return {
            "synthetic": True,
            "notice": SYNTHETIC_LABEL,
            "method": "instruct (prior withheld: text only)" if self.prior_withheld else "instruct",
            "request": asdict(self.request),
            "instruction_applied": self.instruction_applied,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "scheduler": self.request.scheduler,
            "seed": self.request.seed,
            "device": self.device,
            "dtype": self.dtype,
            "transform": self.transform.as_dict(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Raises:
        InputError: CUDA was asked for but is not available, or the name is unknown.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 (or fp16) on CUDA, fp32 on the CPU."""
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise InputError(f"dtype must be auto, fp32, fp16 or bf16, not {dtype!r}")
    return names[dtype]


def to_model_range(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """[0, 1] images to the VAE's value range (usually [-1, 1])."""
    lo, hi = value_range
    return x * (hi - lo) + lo


def from_model_range(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """The VAE's value range back to [0, 1], clipped."""
    lo, hi = value_range
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def to_vae_channels(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` grey images to the VAE's channel count (an RGB VAE gets three copies)."""
    channels = int(vae.config.in_channels)
    return x if channels == 1 else x.expand(-1, channels, -1, -1)


class Engine:
    """Counterfactual generation on one loaded model. Thread-safe: one lock around the device.

    Build it with :func:`load`.
    """

    def __init__(self, parts: ModelParts, text_encoder: TextEncoder, device: torch.device, dtype: torch.dtype) -> None:
        self.parts = parts
        self.card: ModelCard = parts.card
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        # load() reads the weights in ``dtype`` already; cast only parts built otherwise.
        self.vae = parts.vae.to(device) if parts.vae.dtype == dtype else parts.vae.to(device, dtype)
        self.unet = parts.unet.to(device) if parts.unet.dtype == dtype else parts.unet.to(device, dtype)
        self.projection = (
            parts.text_projection.to(device=device, dtype=dtype) if parts.text_projection else None
        )
        self.text_encoder.to(device)
        self._lock = threading.Lock()

    # -- what the model is -------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The model as the user named it."""
        return self.parts.model_id

    @property
    def model_hash(self) -> str:
        """sha256 of the model folder's files."""
        return self.parts.content_hash

    @property
    def resolution(self) -> int:
        """Square side the model works at."""
        return self.card.resolution

    def info(self) -> dict[str, Any]:
        """The card plus where and how the model runs."""
        return {
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "folder": str(self.parts.root),
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "card": self.card.to_dict(),
        }

    # -- building blocks -------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self.text_encoder.encode(texts)
        states = states.to(device=self.device, dtype=self.dtype)
        return project(states, self.projection), mask.to(self.device)

    @torch.no_grad()
    def encode_prior(self, prior: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)`` [0, 1] priors to unscaled VAE posterior modes ``(B, C, h, w)``."""
        x = to_model_range(prior.to(device=self.device, dtype=self.dtype), self.card.value_range)
        return self.vae.encode(to_vae_channels(self.vae, x)).latent_dist.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, clip: bool = True) -> torch.Tensor:
        """Scaled latents to ``(B, 1, S, S)`` float32 images on the [0, 1] scale.

        Args:
            clip: clip to [0, 1]; False keeps overshoot (for differences of decodes).
        """
        x = self.vae.decode(latents / self.card.latent_scaling).sample.float().mean(dim=1, keepdim=True)
        if clip:
            return from_model_range(x, self.card.value_range)
        lo, hi = self.card.value_range
        return (x - lo) / (hi - lo)

    @torch.no_grad()
    def decode_change(self, priors: torch.Tensor, prior_latents: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """Images of a ``change`` model's output: the prior plus the decoded change.

        ``prior + D(p + change) - D(p)``: where the model changed nothing the prior's pixels come
        back exactly, so the VAE's reconstruction error never reaches unchanged anatomy.

        Args:
            priors: ``(B, 1, S, S)`` [0, 1] prior canvases.
            prior_latents: ``(B, C, h, w)`` their unscaled VAE modes.
            change: ``(B, C, h, w)`` sampled changes in the scaled latent space.

        Returns:
            ``(B, 1, S, S)`` float32 images in [0, 1].
        """
        base = prior_latents * self.card.latent_scaling
        decoded = self.decode(torch.cat([base + change, base]), clip=False)
        edited, reconstructed = decoded.chunk(2)
        return (priors.to(edited.device) + edited - reconstructed).clamp(0.0, 1.0)

    def prepare(self, image: XRay | np.ndarray) -> tuple[np.ndarray, SquareTransform]:
        """Letterboxes an input onto the model's square canvas.

        Raises:
            InputError: not a finite 2-D image in [0, 1] (see :func:`engine.io.check_intensity`).
        """
        return to_square(image, self.resolution)

    # -- the API ------------------------------------------------------------------------------
    def counterfactual(self, image: XRay | np.ndarray, instruction: str | EditRequest, **options: Any) -> Counterfactual:
        """Makes one counterfactual of ``image``.

        Args:
            image: the prior radiograph (an :class:`~engine.io.XRay` or a float32 ``(H, W)``
                array in [0, 1]).
            instruction: the progression description, or a full :class:`EditRequest`.
            **options: fields of :class:`EditRequest` (severity, steps, text_guidance,
                image_guidance, seed, scheduler) when ``instruction`` is a string.

        Raises:
            InputError: bad input or settings; non-finite model output.
        """
        request = instruction if isinstance(instruction, EditRequest) else EditRequest(instruction, **options)
        return self.counterfactuals(image, [request])[0]

    def counterfactuals(
        self,
        images: XRay | np.ndarray | Sequence[XRay | np.ndarray],
        requests: Sequence[EditRequest],
        *,
        withhold_prior: bool = False,
    ) -> list[Counterfactual]:
        """Makes several counterfactuals in batched UNet calls.

        Requests with the same steps and scheduler share one batch; each item keeps its own
        prior, seed, instruction and guidance scales, so the results equal single calls.

        Args:
            images: one prior for every request, or a list with one prior per request.
            requests: what to make.
            withhold_prior: generate from the text alone (the "text-only" baseline of the
                evaluation: the prior is replaced by the "no image" condition in every branch,
                so image guidance has no effect). The prior still fixes the output geometry,
                and a ``change`` model's change is still added to it.

        Raises:
            InputError: bad input or settings; non-finite model output.
        """
        if not requests:
            return []
        requests = [r.validated() for r in requests]
        if isinstance(images, (list, tuple)):
            if len(images) != len(requests):
                raise InputError(f"got {len(images)} priors for {len(requests)} requests; give one or one each")
            prepared = [self.prepare(image) for image in images]
        else:
            prepared = [self.prepare(images)] * len(requests)
        results: dict[int, Counterfactual] = {}
        groups: dict[tuple[int, str], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.steps, r.scheduler), []).append(i)
        with self._lock:
            for (steps, scheduler_name), index in groups.items():
                batch = [requests[i] for i in index]
                priors = [prepared[i][0] for i in index]
                outputs, timings = self._generate(priors, batch, steps, scheduler_name, withhold_prior)
                for i, r, img in zip(index, batch, outputs):
                    prior_np, transform = prepared[i]
                    results[i] = Counterfactual(
                        image=img,
                        image_input=transform.invert(img),
                        prior=prior_np,
                        request=r,
                        instruction_applied=r.applied_instruction,
                        model_id=self.model_id,
                        model_hash=self.model_hash,
                        transform=transform,
                        device=self.device.type,
                        dtype=str(self.dtype).removeprefix("torch."),
                        timings=timings,
                        prior_withheld=withhold_prior,
                    )
        return [results[i] for i in range(len(requests))]

    def _generate(
        self, priors: list[np.ndarray], batch: list[EditRequest], steps: int, scheduler_name: str,
        withhold_prior: bool = False,
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        t0 = time.perf_counter()
        texts = [r.applied_instruction for r in batch]
        text, text_mask = self._embed(texts)
        null, null_mask = self._embed([""])
        t1 = time.perf_counter()
        # Encode each distinct prior once (a journey repeats one prior for every rung).
        distinct = {id(p): p for p in priors}
        order = list(distinct)
        latents_by_id = dict(zip(order, self.encode_prior(
            torch.from_numpy(np.stack([distinct[k] for k in order]))[:, None]  # (P, 1, S, S)
        )))
        prior_latents = torch.stack([latents_by_id[id(p)] for p in priors])  # (B, C, h, w)
        condition = null_image_latents(prior_latents) if withhold_prior else prior_latents
        t2 = time.perf_counter()
        latents = sample_instruct(
            self.unet,
            make_scheduler(scheduler_name, self.parts.scheduler_config),
            condition,
            text,
            text_mask,
            null,
            null_mask,
            text_scale=torch.tensor([r.text_guidance for r in batch]),
            image_scale=torch.tensor([r.image_guidance for r in batch]),
            steps=steps,
            generators=[torch.Generator("cpu").manual_seed(int(r.seed)) for r in batch],
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: time them fully
        t3 = time.perf_counter()
        if self.card.instruct_target == "change":  # withheld or not, the change applies to the prior
            canvases = torch.from_numpy(np.stack(priors))[:, None]
            images = self.decode_change(canvases, prior_latents, latents)[:, 0].cpu().numpy()
        else:
            images = self.decode(latents)[:, 0].cpu().numpy()  # .cpu() waits for the GPU
        t4 = time.perf_counter()
        if not np.isfinite(images).all():
            raise InputError(
                "The model produced non-finite values (NaN/Inf); try --dtype fp32 or another model"
            )
        timings = {"text": t1 - t0, "encode": t2 - t1, "denoise": t3 - t2, "decode": t4 - t3, "total": t4 - t0}
        return [img.astype(np.float32) for img in images], timings


def load(model: str | os.PathLike[str] | None = None, device: str = "auto", dtype: str = "auto") -> Engine:
    """Loads a model folder or hub id into an :class:`Engine`.

    Args:
        model: a folder or Hugging Face id; None means the bundled default
            (``assets/models/journey-mini``).
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16/fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16``, ``bf16``.

    Raises:
        ModelFolderError: the model is missing or inconsistent (message says what to do).
        InputError: unknown device or dtype.
    """
    if model is None:
        model = default_model()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with _quiet_loading():
        return _load(model, torch_device, torch_dtype)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hides diffusers'/transformers' per-file progress bars while a model loads."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()
            diffusers_logging.enable_progress_bar()


def _load(model: str | os.PathLike[str], torch_device: torch.device, torch_dtype: torch.dtype) -> Engine:
    parts = load_model_parts(model, torch_dtype=torch_dtype)
    if parts.card.method != "instruct":
        raise InputError(
            f"{model} is a {parts.card.method} model; this engine's edit path needs an "
            "instruct model (inversion editing arrives with method='invert')"
        )
    encoder = load_text_encoder(parts.card.text_encoder, parts.root)
    expected = parts.text_projection.in_features if parts.text_projection else int(parts.unet.config.cross_attention_dim)
    if encoder.width != expected:
        raise InputError(
            f"The text encoder gives {encoder.width}-wide states but the model expects "
            f"{expected}; the card's text_encoder does not match this model"
        )
    return Engine(parts, encoder, torch_device, torch_dtype)


def default_model() -> Path:
    """The bundled model folder.

    Raises:
        ModelFolderError: it is not there yet (it is trained and committed by the bundled-model
            work), saying how to pass another model.
    """
    if not (DEFAULT_MODEL / "card.json").is_file():
        raise ModelFolderError(
            f"The bundled model is not installed at {DEFAULT_MODEL}. Pass --model PATH_OR_HUB_ID "
            "with an instruct model folder (python -m train can make one)."
        )
    return DEFAULT_MODEL
