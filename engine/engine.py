"""The Engine: the one stateful object (models, device, dtype, caches, a lock).

``engine.load(model)`` reads a model folder; ``Engine.counterfactual(prior, instruction)``
returns a :class:`Counterfactual`, a frozen record of the image and of exactly how it was
made. The UI and the CLI talk to the engine only through these dataclasses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.checkpoint import FastSampler, ModelCard, ModelParts, load_model_parts
from engine.errors import InputError, ModelFolderError
from engine.fast import fast_timesteps, sample_fast
from engine.graphs import GraphedUNet
from engine.instruct import SCHEDULERS, make_scheduler, null_image_latents, sample_instruct
from engine.io import SquareTransform, XRay, to_square
from engine.regions import Regions, composite, latent_mask
from engine.severity import SEVERITIES, apply_severity
from engine.text import TextEncoder, load_text_encoder, project

if TYPE_CHECKING:
    from engine.analysis.clip_score import ClipScorer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "models" / "journey-mini"
FULL_STEPS = 20  # the full sampler's default steps
SAMPLERS = ("auto", "fast", "full")
MAX_INSTRUCTION_CHARS = 1000
INVERSION_CACHE_SIZE = 8
TEXT_CACHE_SIZE = 32  # projected text embeddings kept on the device (a few MB at most)
PRIOR_CACHE_SIZE = 8  # priors kept with their VAE latent and decoded reconstruction (~1 MB each at 512 px)
SELF_REPLACE_MAX_QUERIES = 16 * 16  # prompt-to-prompt replaces self-attention at <= 16x16 layers
LOCAL_BLEND_START = 0.2  # local blend acts from 20% of the steps on, as in prompt-to-prompt
SYNTHETIC_LABEL = "SYNTHETIC - research use only, not for diagnosis"
DETAIL_THRESHOLD = 0.04  # a change model's output is the decoded edit where the decoded change exceeds this
DETAIL_GROW_PX = 3  # ... grown by this many pixels, and feathered over as many
CHANGE_FLOOR = 0.02  # an autoencoder that decodes regions decodes only where the latent change exceeds this


def _checked_text(value: object, name: str, advice: str) -> str:
    """A typed text (instruction or caption) the model can use, returned as given.

    Args:
        value: the text (anything else counts as empty).
        name: how to call it in messages ("The progression description", "target_prompt").
        advice: what to do when it is empty ("describe the change to make").

    Raises:
        InputError: empty or whitespace only; no visible character (only control or format
            characters such as NUL or a zero-width space); longer than
            :data:`MAX_INSTRUCTION_CHARS`; or not valid Unicode (lone surrogates, which is how
            Python passes on command-line bytes that are not UTF-8). Other non-ASCII text is
            accepted as it is (the tokenizer handles it, or maps it to unknown tokens).
    """
    text = value if isinstance(value, str) else ""
    if not text.strip():
        raise InputError(f"{name} is empty; {advice}")
    if not any(ch.isprintable() and not ch.isspace() for ch in text):
        raise InputError(f"{name} has no visible characters (only control or format characters); {advice}")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise InputError(f"{name} has {len(text)} characters; keep it under {MAX_INSTRUCTION_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{name} contains bytes that are not valid UTF-8 text (at character {exc.start + 1}); "
            "retype it, or pass it from a UTF-8 terminal"
        ) from None
    return text


def _check_detail_threshold(value: object) -> None:
    """Raises InputError unless ``value`` is None or a number in (0, 1]."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not np.isfinite(value) or not 0 < value <= 1):
        raise InputError(f"detail_threshold must be a number above 0 and at most 1, or None, not {value!r}")


@dataclass(frozen=True)
class EditRequest:
    """One counterfactual to make from a prior.

    Attributes:
        instruction: the progression description, as typed.
        severity: ``none`` (use the text as typed), ``slight``, ``moderate`` or ``large``
            (rewrites the text by the rule in :mod:`engine.severity`).
        steps: denoising steps; None: the sampler's own (the fast sampler's card value, 20 for
            the full one).
        text_guidance: ``s_txt`` of dual classifier-free guidance.
        image_guidance: ``s_img``.
        seed: random seed; None draws one, and the result records it.
        scheduler: ``ddim``, ``euler_a`` or ``dpmpp``.
        detail_threshold: ``change`` models only (:meth:`Engine.decode_change`): where the
            decoded change exceeds this on the [0, 1] scale, the output is the decoded edit
            itself rather than the input plus the change, so detail the VAE cannot hold (thin
            device lines) can be removed; None adds the change to the input everywhere.
        sampler: ``auto`` (the fast sampler when the model has one and the request asks for
            nothing it cannot do: no explicit ``steps``, the ``ddim`` scheduler, guidance
            within its trained ranges, the prior not withheld; else the full one), ``fast``
            (the distilled student, :mod:`engine.fast`: one UNet call per step) or ``full``
            (the model's own UNet with three guidance branches per step). A result's request
            records the sampler that made it, never ``auto``.
    """

    instruction: str
    severity: str = "none"
    steps: int | None = None
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    seed: int | None = None
    scheduler: str = "ddim"
    detail_threshold: float | None = DETAIL_THRESHOLD
    sampler: str = "auto"

    def validated(self) -> EditRequest:
        """Checks every field and returns the request with a seed filled in.

        Raises:
            InputError: with a message naming the field and the allowed values.
        """
        text = _checked_text(self.instruction, "The progression description", "describe the change to make")
        if self.severity not in SEVERITIES:
            raise InputError(f"severity must be one of {', '.join(SEVERITIES)}, not {self.severity!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or not 1 <= self.steps <= 500):
            raise InputError(f"steps must be an integer from 1 to 500 (or none: the sampler's own), not {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        for name in ("text_guidance", "image_guidance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or not 0 <= value <= 50:
                raise InputError(f"{name} must be a number from 0 to 50, not {value!r}")
        _check_detail_threshold(self.detail_threshold)
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
        model_id: the model's hub id or folder name (never a local path).
        model_hash: sha256 of the model folder.
        transform: how the input was letterboxed onto the model canvas.
        device: where it ran (``cpu``, ``cuda``); dtype: the compute dtype.
        timings: seconds per stage (``text``, ``encode``, ``denoise``, ``decode``, ``total``),
            shared by every item of a batched call.
        prior_withheld: True for the text-only baseline (the model did not see the prior).
        regions: area fractions of the edit/keep masks the edit was confined by, or None.
        sampler_note: why ``auto`` chose the full sampler on a model that has a fast one (None
            otherwise).
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
    regions: dict[str, float | None] | None = None
    sampler_note: str | None = None
    synthetic: bool = True

    @property
    def sampler(self) -> str:
        """``fast`` (the distilled student) or ``full`` (the model's own UNet, three branches)."""
        return self.request.sampler

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record of how this image was made (no patient identifiers)."""
        sampler = {"path": self.request.sampler, "steps": self.request.steps,
                   "unet": "unet_fast" if self.request.sampler == "fast" else "unet"}
        if self.sampler_note:
            sampler["note"] = self.sampler_note
        record = {
            "synthetic": True,
            "notice": SYNTHETIC_LABEL,
            "method": "instruct (prior withheld: text only)" if self.prior_withheld else "instruct",
            "request": asdict(self.request),
            "instruction_applied": self.instruction_applied,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "sampler": sampler,
            "scheduler": "fast (distilled DDIM)" if self.request.sampler == "fast" else self.request.scheduler,
            "seed": self.request.seed,
            "device": self.device,
            "dtype": self.dtype,
            "transform": self.transform.as_dict(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if self.regions is not None:
            record["regions"] = self.regions
        return record


@dataclass(frozen=True)
class InvertRequest:
    """One inversion edit (PRISM): invert under ``source_prompt``, regenerate under ``target_prompt``.

    Defaults are PRISM's: 50 DDIM steps, guidance 7.5, null-text inversion with up to 10 inner
    steps, cross-attention replaced for 80% of the steps and self-attention for 40%.

    Attributes:
        source_prompt: a caption of the input ("chest x-ray with support devices").
        target_prompt: the caption of the wanted image ("chest x-ray without support devices").
        inversion: ``null-text``, ``negative-prompt``, ``direct`` or ``ddim`` (see :mod:`engine.invert`).
        steps: DDIM steps of the inversion and of the edit.
        guidance: classifier-free guidance scale of the edit.
        cross_replace: fraction of steps whose target cross-attention follows the source's.
        self_replace: fraction of steps whose target self-attention is the source's.
        word_weight: re-weighting of ``weighted_words`` in the target's cross-attention
            (PRISM uses 2.0 for the edited words); 1 leaves attention as it is.
        weighted_words: target words to re-weight; empty means the edited words (target
            words not in the source).
        local_blend: words whose cross-attention defines where the edit may act (prompt-to-
            prompt local blend); empty means no blending.
        blend_threshold: fraction of the word map's maximum that counts as inside (0.3).
        inner_steps: null-text: at most this many Adam steps per denoising step.
        residual: return the input plus the decoded edit's difference from the decoded
            reconstruction (``input + D(edit) - D(reconstruction)``, clipped to [0, 1]), so
            wherever the edit left the latents alone (outside a local blend, say) the input's
            own pixels come back, not the VAE's blurred copy (what the instruct path's ``change``
            models do). Off by default: detail the VAE cannot represent (thin device lines)
            stays in the input, so removals are weaker (docs/eval/invert_devices.json); the
            default returns the decoded target branch itself, as PRISM publishes.
        detail_threshold: ``change`` models only, as :attr:`EditRequest.detail_threshold`:
            both branches are decoded by :meth:`Engine.decode_change` with it.
    """

    source_prompt: str
    target_prompt: str
    inversion: str = "null-text"
    steps: int = 50
    guidance: float = 7.5
    cross_replace: float = 0.8
    self_replace: float = 0.4
    word_weight: float = 1.0
    weighted_words: tuple[str, ...] = ()
    local_blend: tuple[str, ...] = ()
    blend_threshold: float = 0.3
    inner_steps: int = 10
    residual: bool = False
    detail_threshold: float | None = DETAIL_THRESHOLD

    def validated(self) -> InvertRequest:
        """Checks every field; returns the request with prompts stripped and word lists as tuples.

        Raises:
            InputError: naming the field and the allowed values.
        """
        from engine.invert import INVERSIONS

        prompts = {}
        for name in ("source_prompt", "target_prompt"):
            what = "input" if name == "source_prompt" else "wanted image"
            prompts[name] = _checked_text(getattr(self, name), name, f"write a caption of the {what}").strip()
        if self.inversion not in INVERSIONS:
            raise InputError(f"inversion must be one of {', '.join(INVERSIONS)}, not {self.inversion!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 500:
            raise InputError(f"steps must be an integer from 1 to 500, not {self.steps!r}")
        if not isinstance(self.inner_steps, int) or not 1 <= self.inner_steps <= 100:
            raise InputError(f"inner_steps must be an integer from 1 to 100, not {self.inner_steps!r}")
        if not isinstance(self.residual, bool):
            raise InputError(f"residual must be true or false, not {self.residual!r}")
        _check_detail_threshold(self.detail_threshold)
        checks = {"guidance": (0, 50), "cross_replace": (0, 1), "self_replace": (0, 1), "word_weight": (0, 20),
                  "blend_threshold": (0, 1)}
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or not lo <= value <= hi:
                raise InputError(f"{name} must be a number from {lo} to {hi}, not {value!r}")
        words = {}
        for name in ("weighted_words", "local_blend"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(w, str) and w.strip() and len(w.split()) == 1 for w in value):
                raise InputError(f"{name} must be single words of the prompts, not {value!r}")
            words[name] = tuple(w.strip().lower() for w in value)
        return replace(self, **prompts, **words)


@dataclass(frozen=True)
class AttentionMaps:
    """Cross-attention maps of an inversion edit, per word and per step, for display.

    Attributes:
        source_words, target_words: the prompts' words (lower case, whitespace-split).
        source, target: float32 ``(steps, words, h, w)`` maps on the latent grid (head- and
            layer-averaged attention of each word's tokens, conditional branch).
        resolution: the model canvas side; :meth:`word_map` upsamples to it.
    """

    source_words: tuple[str, ...]
    target_words: tuple[str, ...]
    source: np.ndarray
    target: np.ndarray
    resolution: int

    def word_map(self, word: str, *, prompt: str = "target", steps: tuple[int, int | None] = (0, None)) -> np.ndarray:
        """A word's map averaged over ``steps`` (start, stop), as ``(S, S)`` float32 in [0, 1].

        Raises:
            InputError: unknown prompt, a word not in it, or an empty step range.
        """
        if prompt not in ("source", "target"):
            raise InputError(f"prompt must be source or target, not {prompt!r}")
        words = self.source_words if prompt == "source" else self.target_words
        maps = self.source if prompt == "source" else self.target
        key = word.strip().lower()
        if key not in words:
            raise InputError(f"{word!r} is not a word of the {prompt} prompt ({' '.join(words)})")
        start, stop = steps
        chosen = maps[start:stop, words.index(key)]
        if chosen.shape[0] == 0:
            raise InputError(f"no steps in range {steps} (the edit ran {maps.shape[0]} steps)")
        m = torch.from_numpy(chosen.mean(0))[None, None]
        m = torch.nn.functional.interpolate(m, size=(self.resolution, self.resolution), mode="bilinear",
                                            align_corners=False)[0, 0].numpy()
        top = float(m.max())
        return (m / top if top > 0 else m).clip(0, 1).astype(np.float32)


@dataclass(frozen=True)
class InvertEdit:
    """An inversion edit and everything needed to reproduce it.

    Attributes:
        image: ``(S, S)`` float32 [0, 1] edit at the model's resolution.
        image_input: the edit mapped back onto the input's geometry.
        reconstruction: ``(S, S)`` the source branch: what the inversion gives back unedited.
        prior: ``(S, S)`` the input as the model saw it.
        request: the request as applied.
        edit_mode: prompt-to-prompt mode (``replace``, ``refine`` or ``none``).
        model_id, model_hash, transform, device, dtype: as in :class:`Counterfactual`.
        timings: seconds per stage (``text``, ``encode``, ``invert``, ``edit``, ``decode``, ``total``).
        cache_hit: the inversion came from the engine's cache.
        attention: cross-attention maps per word and step.
        edit_score: CLIP directional similarity, or None when no scorer was given.
        regions: area fractions of the edit/keep masks, or None.
        blend_mask: ``(S, S)`` bool: where local blend let the edit act (None without local blend).
        synthetic: always True.
    """

    image: np.ndarray
    image_input: np.ndarray
    reconstruction: np.ndarray
    prior: np.ndarray
    request: InvertRequest
    edit_mode: str
    model_id: str
    model_hash: str
    transform: SquareTransform
    device: str
    dtype: str
    timings: dict[str, float]
    cache_hit: bool
    attention: AttentionMaps
    edit_score: float | None = None
    regions: dict[str, float | None] | None = None
    blend_mask: np.ndarray | None = None
    synthetic: bool = True

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record of how this image was made (no patient identifiers)."""
        return {
            "synthetic": True,
            "notice": SYNTHETIC_LABEL,
            "method": f"invert ({self.request.inversion})",
            "request": asdict(self.request),
            "edit_mode": self.edit_mode,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "scheduler": "ddim",
            "device": self.device,
            "dtype": self.dtype,
            "transform": self.transform.as_dict(),
            "inversion_cache_hit": self.cache_hit,
            "edit_score": None if self.edit_score is None else round(self.edit_score, 4),
            "regions": self.regions,
            "blend_fraction": None if self.blend_mask is None else round(float(self.blend_mask.mean()), 4),
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


def replaced_region(difference: torch.Tensor, threshold: float | torch.Tensor | None) -> torch.Tensor:
    """Where a ``change`` model's output takes the decoded edit itself (see :meth:`Engine.decode_change`).

    Args:
        difference: ``(B, 1, S, S)`` the decoded change ``D(p + change) - D(p)``.
        threshold: None (nowhere), a float, or a ``(B,)`` tensor (NaN: nowhere for that item).

    Returns:
        ``(B, 1, S, S)`` weights in [0, 1]: 1 where ``|difference| > threshold``, grown by
        :data:`DETAIL_GROW_PX` pixels and feathered over as many, 0 elsewhere.
    """
    if threshold is None:
        return torch.zeros_like(difference)
    limit = torch.as_tensor(threshold, dtype=difference.dtype, device=difference.device).reshape(-1, 1, 1, 1)
    hit = (difference.abs() > limit).to(difference.dtype)  # a NaN limit compares False: nowhere
    grow = 2 * DETAIL_GROW_PX + 1
    hit = torch.nn.functional.max_pool2d(hit, grow, stride=1, padding=DETAIL_GROW_PX)
    return torch.nn.functional.avg_pool2d(hit, grow, stride=1, padding=DETAIL_GROW_PX, count_include_pad=False)


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

    def __init__(self, parts: ModelParts, text_encoder: TextEncoder, device: torch.device, dtype: torch.dtype,
                 *, cuda_graphs: bool = False, channels_last: bool = True) -> None:
        self.parts = parts
        self.card: ModelCard = parts.card
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        # load() reads the weights in ``dtype`` already; cast only parts built otherwise.
        self.vae = parts.vae.to(device) if parts.vae.dtype == dtype else parts.vae.to(device, dtype)
        self.unet = parts.unet.to(device) if parts.unet.dtype == dtype else parts.unet.to(device, dtype)
        self.fast: FastSampler | None = self.card.fast  # the distilled student's card entry, or None
        fast_unet = parts.unet_fast
        self.unet_fast = None if fast_unet is None else (
            fast_unet.to(device) if fast_unet.dtype == dtype else fast_unet.to(device, dtype))
        self.projection = (
            parts.text_projection.to(device=device, dtype=dtype) if parts.text_projection else None
        )
        self.text_encoder.to(device)
        if channels_last:  # NHWC convolutions: faster on CPUs and GPUs; pixels within ~2e-5 (tests)
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
            if self.unet_fast is not None:
                self.unet_fast.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        # The instruct samplers' UNets: replayed from CUDA graphs when asked (engine.graphs).
        self.denoiser = GraphedUNet(self.unet) if cuda_graphs else self.unet
        self.fast_denoiser = None if self.unet_fast is None else (
            GraphedUNet(self.unet_fast) if cuda_graphs else self.unet_fast)
        self._fast_schedule: tuple[torch.Tensor, float] | None = None
        self._lock = threading.Lock()
        self._inversions: OrderedDict[tuple, Any] = OrderedDict()
        self.text_cache_size = TEXT_CACHE_SIZE  # 0 turns the embedding cache off (benchmarks)
        self._texts: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.prior_cache_size = PRIOR_CACHE_SIZE  # 0 turns the prior cache off (benchmarks time cold edits)
        self._priors: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    # -- what the model is -------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The model's hub id or folder name (never its local path: see ``checkpoint.model_id``)."""
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
        """Projected ``(B, L, D)`` states and ``(B, L)`` masks of ``texts``, on the engine's device and dtype.

        An LRU of :attr:`text_cache_size` entries, keyed by the exact text list (and the device
        and dtype), keeps the result, so a repeated instruction list and the empty text skip the
        encoder, the host-to-device copy and the projection. Call with ``self._lock`` held (every
        caller does). The cached tensors are shared between calls: never modify them in place.
        """
        key = (tuple(texts), str(self.device), str(self.dtype))
        cached = self._texts.get(key)
        if cached is not None:
            self._texts.move_to_end(key)
            return cached
        states, mask = self.text_encoder.encode(texts)
        with torch.no_grad():
            states = states.to(device=self.device, dtype=self.dtype)
            result = (project(states, self.projection), mask.to(self.device))
        if self.text_cache_size > 0:
            self._texts[key] = result
            while len(self._texts) > self.text_cache_size:
                self._texts.popitem(last=False)
        return result

    def clear_text_cache(self) -> None:
        """Forgets every cached text embedding (the encoder's own per-text cache stays)."""
        with self._lock:
            self._texts.clear()

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
    def decode_change(self, priors: torch.Tensor, prior_latents: torch.Tensor, change: torch.Tensor,
                      reconstructed: torch.Tensor | None = None,
                      detail_threshold: float | torch.Tensor | None = None) -> torch.Tensor:
        """Images of a ``change`` model's output: the prior plus the decoded change.

        ``prior + D(p + change) - D(p)``: where the model changed nothing the prior's pixels come
        back exactly, so the VAE's reconstruction error never reaches unchanged anatomy. That
        sum also keeps whatever the VAE cannot represent, which is what a removal must take
        away: a device line a few pixels wide is blurred in both ``D(p + change)`` and ``D(p)``,
        so their difference misses most of it. With ``detail_threshold``, wherever
        ``|D(p + change) - D(p)|`` exceeds it (grown by :data:`DETAIL_GROW_PX` pixels and
        feathered over as many), the output is ``D(p + change)`` itself:
        ``D(p + change) + (prior - D(p)) * (1 - m)``. With the exact latent change of a device
        removal the classifier's device probability then falls below 0.5 in 4 of 6 simulated
        cases at 0.04 (6 of 6 at 0.02; none with the plain sum); unchanged pixels still come
        back exactly.

        Args:
            priors: ``(B, 1, S, S)`` [0, 1] prior canvases.
            prior_latents: ``(B, C, h, w)`` their unscaled VAE modes.
            change: ``(B, C, h, w)`` sampled changes as the UNet diffuses them (scaled latents
                times the card's ``change_scaling``).
            reconstructed: ``(B, 1, S, S)`` the priors' unclipped decodes ``D(p)`` when already
                known (the engine passes them from its prior cache, one decode per distinct
                prior); decoded here, with the edits, otherwise.
            detail_threshold: None (the sum everywhere), a float, or a ``(B,)`` tensor with
                NaN for "none" per item.

        Returns:
            ``(B, 1, S, S)`` float32 images in [0, 1].
        """
        base = prior_latents * self.card.latent_scaling
        change = change / self.card.change_factor
        if hasattr(self.vae, "decode_region"):
            return self._decode_change_local(priors, base, change, reconstructed, detail_threshold)
        if reconstructed is None:
            decoded = self.decode(torch.cat([base + change, base]), clip=False)
            edited, reconstructed = decoded[: len(base)], decoded[len(base):]
        else:
            edited = self.decode(base + change, clip=False)
        reconstructed = reconstructed.to(edited.device)
        keep = 1.0 - replaced_region(edited - reconstructed, detail_threshold)
        return (edited + (priors.to(edited.device) - reconstructed) * keep).clamp(0.0, 1.0)

    def _decode_change_local(self, priors: torch.Tensor, base: torch.Tensor, change: torch.Tensor,
                             reconstructed: torch.Tensor | None,
                             detail_threshold: float | torch.Tensor | None) -> torch.Tensor:
        """:meth:`decode_change` for an autoencoder that decodes regions (``TinyAutoencoder``).

        Only the latent box where the change exceeds :data:`CHANGE_FLOOR` (grown by one latent
        pixel) is decoded, exactly as a full decode would give it there; outside it the prior's
        own pixels come back. The decoder is the most expensive part of an edit on a CPU (its
        last stages run 64 channels at full resolution), and an edit's change is local.
        """
        lo, hi = self.card.value_range
        factor = priors.shape[-1] // base.shape[-1]
        thresholds = (detail_threshold if isinstance(detail_threshold, torch.Tensor)
                      else torch.full((len(base),), np.nan if detail_threshold is None else float(detail_threshold)))
        out = priors.to(base.device, torch.float32).clone()
        for i in range(len(base)):
            moved = change[i].abs().amax(dim=0) > CHANGE_FLOOR  # (h, w)
            if not moved.any():
                continue
            rows, cols = torch.nonzero(moved.any(dim=1)).flatten(), torch.nonzero(moved.any(dim=0)).flatten()
            h, w = moved.shape
            box = (max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, h), max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, w))
            top, bottom, left, right = (v * factor for v in box)

            def decoded(z: torch.Tensor) -> torch.Tensor:
                x = self.vae.decode_region(z[None], box).float().mean(dim=1, keepdim=True)
                return (x - lo) / (hi - lo)

            edited = decoded(base[i] + change[i])
            recon = (reconstructed[i:i + 1, :, top:bottom, left:right].to(edited.device) if reconstructed is not None
                     else decoded(base[i]))
            prior = out[i:i + 1, :, top:bottom, left:right]
            keep = 1.0 - replaced_region(edited - recon, thresholds[i:i + 1])
            out[i:i + 1, :, top:bottom, left:right] = (edited + (prior - recon) * keep).clamp(0.0, 1.0)
        return out

    @torch.no_grad()
    def latent_ceiling(self, priors: torch.Tensor, targets: torch.Tensor,
                       detail_threshold: float | None = DETAIL_THRESHOLD) -> torch.Tensor:
        """The targets as this model's latent path returns them: the best any UNet could do.

        A perfect UNet would sample exactly the target's latent (a ``change`` model: the exact
        latent change ``E(target) - E(prior)``); what it returns is then that latent through
        the same decoding as an edit (:meth:`decode_change` with ``detail_threshold`` for a
        ``change`` model, the VAE's decode otherwise). Scores of these images are the ceiling
        the autoencoder and the decoding allow, separate from what the UNet has learned.

        Args:
            priors: ``(B, 1, S, S)`` [0, 1] prior canvases.
            targets: ``(B, 1, S, S)`` [0, 1] target images on the same canvases (e.g. the
                simulator's exact counterfactuals).
            detail_threshold: as :attr:`EditRequest.detail_threshold` (``change`` models only).

        Returns:
            ``(B, 1, S, S)`` float32 images in [0, 1].
        """
        target_latents = self.encode_prior(targets) * self.card.latent_scaling
        if not self.card.diffuses_change:
            return self.decode(target_latents)
        prior_latents = self.encode_prior(priors)
        change = (target_latents - prior_latents * self.card.latent_scaling) * self.card.change_factor
        return self.decode_change(priors, prior_latents, change, detail_threshold=detail_threshold)

    def _prior_entries(self, priors: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """Each prior canvas's cache entry, ``{"latent": (C, h, w)}`` (plus ``"decoded"`` once known).

        Priors are keyed by content (sha256 of the canvas), so a journey's repeated prior and a
        re-edit of the same image skip the VAE encoder, and a ``change`` model's re-edit skips
        decoding the prior too. Distinct new priors are encoded in one batch. Call with
        ``self._lock`` held. Entries are shared: never modify their tensors in place.
        """
        keys = [hashlib.sha256(p.tobytes()).hexdigest() + str(p.shape) for p in priors]
        entries = {k: self._priors[k] for k in keys if k in self._priors}
        new = {k: p for k, p in zip(keys, priors) if k not in entries}
        if new:
            latents = self.encode_prior(torch.from_numpy(np.stack(list(new.values())))[:, None])  # (P, C, h, w)
            entries.update({k: {"latent": latent} for k, latent in zip(new, latents)})
        if self.prior_cache_size > 0:
            for k in keys:
                self._priors[k] = entries[k]
                self._priors.move_to_end(k)
        while len(self._priors) > self.prior_cache_size:
            self._priors.popitem(last=False)
        return [entries[k] for k in keys]

    @torch.no_grad()
    def _prior_decodes(self, entries: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``(B, 1, S, S)`` unclipped decodes of the entries' priors, decoding each missing one once."""
        missing = list({id(e): e for e in entries if "decoded" not in e}.values())
        if missing:
            decoded = self.decode(torch.stack([e["latent"] for e in missing]) * self.card.latent_scaling, clip=False)
            for e, image in zip(missing, decoded):
                e["decoded"] = image
        return torch.stack([e["decoded"] for e in entries])

    def warm_prior(self, image: XRay | np.ndarray) -> None:
        """Puts ``image`` in the prior cache (VAE encode, and a ``change`` model's prior decode).

        The workstation calls it when an image is loaded, while the user is still writing the
        instruction, so the first edit costs what a re-edit costs.
        """
        canvas, _ = self.prepare(image)
        with self._lock:
            entries = self._prior_entries([canvas])
            if self.card.diffuses_change:
                self._prior_decodes(entries)

    def clear_prior_cache(self) -> None:
        """Forgets every cached prior latent and reconstruction (benchmarks time cold edits)."""
        with self._lock:
            self._priors.clear()

    def warm_up(self) -> None:
        """Runs one 2-step edit of a blank image on each sampler, so the first user's edit meets
        warm kernels (and, with CUDA graphs, a captured graph for the one-edit shape)."""
        blank = np.full((self.resolution, self.resolution), 0.5, np.float32)
        self.counterfactual(blank, "no change", steps=2, seed=0, sampler="full")
        if self.fast is not None:
            self.counterfactual(blank, "no change", seed=0, sampler="fast")

    def prepare(self, image: XRay | np.ndarray) -> tuple[np.ndarray, SquareTransform]:
        """Letterboxes an input onto the model's square canvas.

        Raises:
            InputError: not a finite 2-D image in [0, 1] (see :func:`engine.io.check_intensity`).
        """
        return to_square(image, self.resolution)

    # -- samplers -----------------------------------------------------------------------------
    def resolve(self, request: EditRequest, *, withhold_prior: bool = False) -> tuple[EditRequest, str | None]:
        """The request with its sampler and steps decided (``fast`` or ``full``, never ``auto``).

        ``auto`` takes the fast sampler when this model has one and the request asks for nothing
        the student cannot do; the reason it did not is returned beside the request.

        Args:
            request: a validated request.
            withhold_prior: the text-only baseline (the student never learned it).

        Returns:
            ``(request, note)``: note is None unless ``auto`` chose the full sampler on a model
            with a fast one.

        Raises:
            InputError: ``fast`` asked of a model without a student, or with settings it cannot take.
        """
        fast = self.fast
        why_not = None
        if fast is None:
            why_not = "this model has no fast sampler (unet_fast/); distil one with `python -m train fit` (stage distill)"
        elif withhold_prior:
            why_not = "the text-only baseline (prior withheld) runs on the full sampler"
        elif request.scheduler != "ddim":
            why_not = f"the fast sampler has its own schedule; scheduler {request.scheduler!r} is the full sampler's"
        elif not fast.covers(request.text_guidance, request.image_guidance):
            (tl, th), (il, ih) = fast.text_guidance_range, fast.image_guidance_range
            why_not = (f"guidance outside the fast sampler's trained ranges (text {tl:g}-{th:g}, "
                       f"image {il:g}-{ih:g})")
        elif request.steps is not None and not 1 <= request.steps <= fast.max_steps:
            why_not = f"the fast sampler takes 1 to {fast.max_steps} steps, not {request.steps}"
        if request.sampler == "fast":
            if why_not is not None:
                raise InputError(f"sampler 'fast' cannot run this request: {why_not}; use sampler 'full'")
            return replace(request, steps=request.steps or fast.steps), None
        if request.sampler == "auto" and why_not is None and request.steps is None:
            return replace(request, sampler="fast", steps=fast.steps), None
        note = None
        if request.sampler == "auto" and fast is not None:
            note = why_not or "steps were given, so the full sampler ran them (sampler 'fast' takes steps too)"
        return replace(request, sampler="full", steps=request.steps or FULL_STEPS), note

    def _fast_alphas(self) -> tuple[torch.Tensor, float]:
        """The schedule the student steps on: alpha-bar per timestep and DDIM's final alpha."""
        if self._fast_schedule is None:
            scheduler = make_scheduler("ddim", self.parts.scheduler_config)
            self._fast_schedule = (scheduler.alphas_cumprod.clone(), float(scheduler.final_alpha_cumprod))
        return self._fast_schedule

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
        regions: Regions | Sequence[Regions | None] | None = None,
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
            regions: optional edit/keep masks (:class:`~engine.regions.Regions`, in each
                prior's geometry), one for every request or one each: outside the allowed
                region the latent is reset to the unchanged output at every step and the
                output pixels are the prior's.

        Raises:
            InputError: bad input or settings; non-finite model output; a text-to-image model
                (those edit through :meth:`invert_edit`).
        """
        if not requests:
            return []
        if self.card.method != "instruct":
            raise InputError(
                f"{self.model_id} is a {self.card.method} model: it edits by inversion "
                "(method 'invert', Engine.invert_edit), not by instruction"
            )
        resolved = [self.resolve(r.validated(), withhold_prior=withhold_prior) for r in requests]
        requests = [r for r, _ in resolved]
        notes = [note for _, note in resolved]
        if regions is None or isinstance(regions, Regions):
            item_regions: list[Regions | None] = [regions] * len(requests)
        else:
            item_regions = list(regions)
            if len(item_regions) != len(requests):
                raise InputError(
                    f"got {len(item_regions)} region specs for {len(requests)} requests; give one or one each"
                )
        if isinstance(images, (list, tuple)):
            if len(images) != len(requests):
                raise InputError(f"got {len(images)} priors for {len(requests)} requests; give one or one each")
            prepared = [self.prepare(image) for image in images]
        else:
            prepared = [self.prepare(images)] * len(requests)
        results: dict[int, Counterfactual] = {}
        groups: dict[tuple[str, int, str, bool], list[int]] = {}
        for i, r in enumerate(requests):  # items with regions batch apart: they draw extra noise
            groups.setdefault((r.sampler, r.steps, r.scheduler, item_regions[i] is not None), []).append(i)
        with self._lock:
            for (sampler, steps, scheduler_name, constrained), index in groups.items():
                batch = [requests[i] for i in index]
                priors = [prepared[i][0] for i in index]
                allowed = None
                if constrained:
                    allowed = [item_regions[i].canvas(prepared[i][1]) for i in index]
                outputs, timings = self._generate(priors, batch, steps, scheduler_name, withhold_prior, allowed,
                                                  fast=sampler == "fast")
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
                        regions=None if item_regions[i] is None else item_regions[i].summary(),
                        sampler_note=notes[i],
                    )
        return [results[i] for i in range(len(requests))]

    def _generate(
        self, priors: list[np.ndarray], batch: list[EditRequest], steps: int, scheduler_name: str,
        withhold_prior: bool = False, allowed: list[np.ndarray] | None = None, *, fast: bool = False,
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        t0 = time.perf_counter()
        texts = [r.applied_instruction for r in batch]
        text, text_mask = self._embed(texts)
        null, null_mask = self._embed([""])
        t1 = time.perf_counter()
        # Encode each distinct prior once (a journey repeats one prior for every rung; re-edits hit the cache).
        entries = self._prior_entries(priors)
        prior_latents = torch.stack([e["latent"] for e in entries])  # (B, C, h, w)
        condition = null_image_latents(prior_latents) if withhold_prior else prior_latents
        region: dict[str, torch.Tensor] = {}
        if allowed is not None:  # RadEdit: the unchanged output is the prior (a zero change)
            latent_hw = tuple(prior_latents.shape[-2:])
            region["allowed"] = torch.cat([latent_mask(a, latent_hw) for a in allowed])
            region["reference"] = (
                torch.zeros_like(prior_latents) if self.card.diffuses_change
                else prior_latents * self.card.latent_scaling
            )
        t2 = time.perf_counter()
        text_scale = torch.tensor([r.text_guidance for r in batch])
        image_scale = torch.tensor([r.image_guidance for r in batch])
        generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in batch]
        if fast:  # the distilled student: one UNet call per step (engine.fast)
            alphas, final_alpha = self._fast_alphas()
            latents = sample_fast(
                self.fast_denoiser, alphas, final_alpha, condition, text, text_mask,
                text_scale=text_scale, image_scale=image_scale,
                timesteps=fast_timesteps(self.fast.teacher_timesteps, steps), guidance_dim=self.fast.guidance_dim,
                generators=generators, position_channels=self.card.position_channels, **region,
            )
        else:
            latents = sample_instruct(
                self.denoiser,
                make_scheduler(scheduler_name, self.parts.scheduler_config),
                condition,
                text,
                text_mask,
                null,
                null_mask,
                text_scale=text_scale,
                image_scale=image_scale,
                steps=steps,
                generators=generators,
                position_channels=self.card.position_channels,
                **region,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: time them fully
        t3 = time.perf_counter()
        if self.card.diffuses_change:  # withheld or not, the change applies to the prior
            canvases = torch.from_numpy(np.stack(priors))[:, None]
            reconstructed = self._prior_decodes(entries)
            thresholds = torch.tensor([np.nan if r.detail_threshold is None else r.detail_threshold for r in batch])
            images = self.decode_change(canvases, prior_latents, latents, reconstructed,
                                        thresholds)[:, 0].cpu().numpy()
        else:
            images = self.decode(latents)[:, 0].cpu().numpy()  # .cpu() waits for the GPU
        if allowed is not None:  # outside the allowed region the output is the prior, exactly
            images = np.stack([composite(img, p, a) for img, p, a in zip(images, priors, allowed)])
        t4 = time.perf_counter()
        if not np.isfinite(images).all():
            raise InputError(
                "The model produced non-finite values (NaN/Inf); try --dtype fp32 or another model"
            )
        timings = {"text": t1 - t0, "encode": t2 - t1, "denoise": t3 - t2, "decode": t4 - t3, "total": t4 - t0}
        return [img.astype(np.float32) for img in images], timings

    # -- the invert method (PRISM) ---------------------------------------------------------------
    def invert_edit(
        self,
        image: XRay | np.ndarray,
        request: InvertRequest | str,
        target_prompt: str | None = None,
        *,
        regions: Regions | None = None,
        scorer: ClipScorer | None = None,
        callback: Callable[[str, int, int], None] | None = None,
        **options: Any,
    ) -> InvertEdit:
        """Edits ``image`` by inversion (method ``invert``): PRISM's path on any text-to-image model.

        The image is inverted under the source caption (cached per image, caption, model and
        settings, so further edits of the same image skip it), then the source and target
        branches are denoised side by side under prompt-to-prompt control.

        An instruct model that diffuses the image latent runs as a text-to-image model with the
        prior withheld (the UNet's image channels get the all-zero "no image" condition, as in
        guidance dropout). A ``change`` model diffuses the change from its prior, so it runs on
        the variable it was trained on: the input is its own prior, the inverted latent is "no
        change" (zeros), the target branch regenerates the change the target caption asks for,
        and the images are the input plus the decoded change (:meth:`decode_change`). The
        reconstruction is then the input itself, and pixels the edit leaves alone keep their
        values. (Withholding the prior instead would make the whole image a "change from
        nothing", far outside what such a model saw in training.)

        Args:
            image: the input radiograph (:class:`~engine.io.XRay` or ``(H, W)`` float32 in [0, 1]).
            request: an :class:`InvertRequest`, or the source caption (then ``target_prompt``
                and ``**options`` give the rest).
            target_prompt: the target caption when ``request`` is a string.
            regions: optional edit/keep masks in the input's geometry (:mod:`engine.regions`).
            scorer: optional :class:`engine.analysis.clip_score.ClipScorer` for the edit score.
            callback: ``callback(stage, step, steps)`` with stage ``invert`` or ``edit``.
            **options: fields of :class:`InvertRequest` when ``request`` is a string.

        Raises:
            InputError: bad input or settings; non-finite model output.
        """
        from engine.invert import NoisePredictor, ddim_schedule, invert, make_ddim, sample_edit
        from engine.p2p import AttentionController, AttentionRecord, plan_edit, word_maps, word_tokens

        if isinstance(request, str):
            if target_prompt is None:
                raise InputError("give a target prompt (the caption of the wanted image)")
            request = InvertRequest(request, target_prompt, **options)
        request = request.validated()
        canvas, transform = self.prepare(image)
        allowed_canvas = regions.canvas(transform) if regions is not None else None

        def stage(name: str) -> Callable[[int, int], None] | None:
            return None if callback is None else (lambda i, n: callback(name, i, n))

        with self._lock:
            t0 = time.perf_counter()
            (src, tgt, null), masks = self._embed_each([request.source_prompt, request.target_prompt, ""])
            t1 = time.perf_counter()
            entry = self._prior_entries([canvas])[0]
            if self.card.diffuses_change:  # invert "no change" from the input, the input as the prior
                condition = entry["latent"][None]
                x0 = torch.zeros_like(condition)
            else:  # a text-to-image model, or an instruct model with the prior withheld
                condition, x0 = None, entry["latent"][None] * self.card.latent_scaling
            scheduler = make_ddim(self.parts.scheduler_config)
            schedule = ddim_schedule(scheduler, request.steps)
            eps_fn = NoisePredictor(self.unet, scheduler.alphas_cumprod.to(self.device),
                                    str(scheduler.config.get("prediction_type", "epsilon")), condition,
                                    self.card.position_channels)
            t2 = time.perf_counter()
            key = self._inversion_key(canvas, request)
            inversion = self._inversions.get(key)
            cache_hit = inversion is not None
            if inversion is None:
                inversion = invert(eps_fn, x0, src, masks[0], null, masks[2], schedule, inversion=request.inversion,
                                   guidance=request.guidance, inner_steps=request.inner_steps,
                                   callback=stage("invert"))
                self._inversions[key] = inversion
                while len(self._inversions) > INVERSION_CACHE_SIZE:
                    self._inversions.popitem(last=False)
            self._inversions.move_to_end(key)
            t3 = time.perf_counter()

            tokenizer = self.text_encoder.tokenizer
            max_tokens = int(src.shape[1])
            plan = plan_edit(
                tokenizer, request.source_prompt, request.target_prompt, max_tokens=max_tokens,
                steps=request.steps, cross_replace=request.cross_replace, self_replace=request.self_replace,
                word_weight=request.word_weight, weighted_words=request.weighted_words,
                self_max_tokens=SELF_REPLACE_MAX_QUERIES,
            )
            lengths = [len(word_tokens(tokenizer, p)[2]) for p in (request.source_prompt, request.target_prompt)]
            record = AttentionRecord(tuple(x0.shape[-2:]), keep_tokens=min(max_tokens, 1 + max(lengths)))
            controller = AttentionController(2, plan, record)
            blend = self._local_blend(request, tokenizer, max_tokens) if request.local_blend else None
            allowed = None if allowed_canvas is None else latent_mask(allowed_canvas, tuple(x0.shape[-2:])).to(x0)
            latents = sample_edit(
                eps_fn, schedule, inversion, method=request.inversion, source=(src, masks[0]),
                target=(tgt, masks[1]), null=(null, masks[2]), guidance=request.guidance, controller=controller,
                blend=blend, allowed=allowed, callback=stage("edit"),
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t4 = time.perf_counter()
            if self.card.diffuses_change:  # the input plus the decoded change, as in decode_change
                canvases = torch.from_numpy(np.stack([canvas, canvas]))[:, None]
                images = self.decode_change(canvases, torch.cat([condition] * 2), latents,
                                            self._prior_decodes([entry, entry]), request.detail_threshold)
            else:
                images = self.decode(latents)
            images = images[:, 0].float().cpu().numpy()
            t5 = time.perf_counter()
        if not np.isfinite(images).all():
            raise InputError("The model produced non-finite values (NaN/Inf); try --dtype fp32 or another model")
        reconstruction, edited = images.astype(np.float32)
        blend_mask = None
        if blend is not None:
            # The last step's mask (the record then holds every step). Outside it the latents
            # already equal the reconstruction's; the decoder's group norms still couple distant
            # pixels, so the decoded images are blended with the same mask too.
            m = blend.mask(record)
            blend_mask = torch.nn.functional.interpolate(m, size=canvas.shape, mode="nearest")[0, 0].numpy() > 0.5
            edited = composite(edited, reconstruction, blend_mask.astype(np.float32))
        if request.residual:  # the input's own pixels wherever the edit equals the reconstruction
            edited = np.clip(canvas + (edited - reconstruction), 0.0, 1.0).astype(np.float32)
        if allowed_canvas is not None:  # outside the allowed region the output is the input, exactly
            edited = composite(edited, canvas, allowed_canvas)
        source_words, source_maps = word_maps(record, tokenizer, request.source_prompt, 0, max_tokens)
        target_words, target_maps = word_maps(record, tokenizer, request.target_prompt, 1, max_tokens)
        score = None
        if scorer is not None:
            score = scorer.directional_similarity(canvas, edited, request.source_prompt, request.target_prompt)
        return InvertEdit(
            image=edited,
            image_input=transform.invert(edited),
            reconstruction=reconstruction,
            prior=canvas,
            request=request,
            edit_mode=plan.mode,
            model_id=self.model_id,
            model_hash=self.model_hash,
            transform=transform,
            device=self.device.type,
            dtype=str(self.dtype).removeprefix("torch."),
            timings={"text": t1 - t0, "encode": t2 - t1, "invert": t3 - t2, "edit": t4 - t3, "decode": t5 - t4,
                     "total": t5 - t0},
            cache_hit=cache_hit,
            attention=AttentionMaps(tuple(source_words), tuple(target_words), source_maps, target_maps,
                                    self.resolution),
            edit_score=score,
            regions=None if regions is None else regions.summary(),
            blend_mask=blend_mask,
        )

    def _inversion_key(self, canvas: np.ndarray, request: InvertRequest) -> tuple:
        """What an inversion depends on: the pixels, the source caption, the model and the settings.

        ``ddim``, ``negative-prompt`` and ``direct`` share the plain DDIM inversion; null-text's
        embeddings also depend on the guidance scale and the inner steps.
        """
        from engine.invert import inversion_kind

        kind = inversion_kind(request.inversion)
        return (hashlib.sha256(canvas.tobytes()).hexdigest(), request.source_prompt, self.model_hash, kind,
                request.steps, str(self.dtype), self.device.type,
                (request.guidance, request.inner_steps) if kind == "null-text" else None)

    def clear_inversion_cache(self) -> None:
        """Forgets every cached inversion (benchmarks time a cold edit with it)."""
        with self._lock:
            self._inversions.clear()

    def _embed_each(self, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Each text's ``(1, L, D)`` states and ``(1, L)`` mask (None where every token counts)."""
        states, mask = self._embed(texts)
        return ([states[i : i + 1] for i in range(len(texts))],
                [None if bool(mask[i].all()) else mask[i : i + 1] for i in range(len(texts))])

    def _local_blend(self, request: InvertRequest, tokenizer: Any, max_tokens: int):
        """Prompt-to-prompt's local blend over the request's blend words (each in either prompt)."""
        from engine.p2p import LocalBlend, prompt_words, token_positions

        found = {}
        for name, prompt in (("source", request.source_prompt), ("target", request.target_prompt)):
            words = [w for w in request.local_blend if w in prompt_words(prompt)]
            found[name] = tuple(token_positions(tokenizer, prompt, words, max_tokens)) if words else ()
        missing = [w for w in request.local_blend
                   if w not in prompt_words(request.source_prompt) and w not in prompt_words(request.target_prompt)]
        if missing:
            raise InputError(
                f"local-blend word(s) {', '.join(missing)} are in neither prompt; pick words of the prompts"
            )
        return LocalBlend(found["source"], found["target"], request.blend_threshold,
                          start=int(round(LOCAL_BLEND_START * request.steps)))


def load(model: str | os.PathLike[str] | None = None, device: str = "auto", dtype: str = "auto", *,
         unet: str | os.PathLike[str] | None = None, cuda_graphs: bool = False,
         channels_last: bool = True) -> Engine:
    """Loads a model folder or hub id into an :class:`Engine`.

    Args:
        model: a folder or Hugging Face id; None means the bundled default
            (``assets/models/journey-mini``). Instruct models edit both ways (instruction and
            inversion); text-to-image models, including Stable Diffusion 1.5-layout diffusers
            folders, edit by inversion only.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16/fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16``, ``bf16``.
        unet: optional UNet override (PRISM's fine-tuned UNet on SD 1.5): a ``.safetensors``
            file, or a folder or hub id (see :func:`engine.checkpoint.load_model_parts`).
        cuda_graphs: replay the instruct sampler's UNet step from CUDA graphs
            (:mod:`engine.graphs`; CUDA only), captured here for the one-edit shape and lazily
            for others. Off by default until measured on a GPU (docs/PERFORMANCE.md).
        channels_last: keep the UNet's and VAE's weights in channels-last (NHWC) memory
            format: on the 2-core CPU one bundled-model edit takes ~15 % less time, and pixels
            move by at most ~2e-5 on the [0, 1] scale (other convolution kernels).

    Raises:
        ModelFolderError: the model is missing or inconsistent (message says what to do).
        InputError: unknown device or dtype; CUDA graphs asked for without a CUDA device.
    """
    if model is None:
        model = default_model()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if cuda_graphs and torch_device.type != "cuda":
        raise InputError(f"CUDA graphs need a CUDA device; this engine would run on {torch_device.type}")
    with _quiet_loading():
        eng = _load(model, torch_device, torch_dtype, unet, cuda_graphs, channels_last)
    if cuda_graphs and eng.card.method == "instruct":
        eng.warm_up()
    return eng


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


def _load(model: str | os.PathLike[str], torch_device: torch.device, torch_dtype: torch.dtype,
          unet: str | os.PathLike[str] | None = None, cuda_graphs: bool = False,
          channels_last: bool = True) -> Engine:
    parts = load_model_parts(model, torch_dtype=torch_dtype, unet=unet)
    encoder = load_text_encoder(parts.card.text_encoder, parts.root)
    expected = parts.text_projection.in_features if parts.text_projection else int(parts.unet.config.cross_attention_dim)
    if encoder.width != expected:
        raise InputError(
            f"The text encoder gives {encoder.width}-wide states but the model expects "
            f"{expected}; the card's text_encoder does not match this model"
        )
    return Engine(parts, encoder, torch_device, torch_dtype, cuda_graphs=cuda_graphs, channels_last=channels_last)


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
