"""The Engine: the one stateful object (models, device, dtype, caches, a lock).

``engine.load(model)`` reads a model folder; ``Engine.counterfactual(prior, instruction)``
returns a :class:`Counterfactual`, a frozen record of the image and of exactly how it was
made. The UI and the CLI talk to the engine only through these dataclasses.

This module holds the Engine itself (its state, its caches, and the VAE encoding and decoding
both methods share) and the converters between images and the VAE's range. Its other parts
live beside it; every name they define is importable from here too, as before they moved:

* :mod:`engine.records`: the requests and results (:class:`EditRequest`,
  :class:`Counterfactual`, :class:`InvertRequest`, :class:`InvertEdit`, :class:`AttentionMaps`).
* :mod:`engine.instruct_path`: the instruct method (``counterfactual``, ``counterfactuals``).
* :mod:`engine.invert_path`: the invert method (``invert_edit``).
* :mod:`engine.loading`: :func:`load`, the bundled model, the device and the dtype.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

# Besides what this module uses, these imports keep every name that was defined here before the
# Engine's parts moved out importable from here (load, EditRequest, FULL_STEPS, ...).
from engine.checkpoint import FastSampler, ModelCard, ModelParts
from engine.graphs import GraphedUNet
from engine.instruct_path import FULL_STEPS, InstructPath
from engine.invert_path import INVERSION_CACHE_SIZE, LOCAL_BLEND_START, SELF_REPLACE_MAX_QUERIES, InvertPath
from engine.io import SquareTransform, XRay, to_square
from engine.loading import DEFAULT_MODEL, default_model, load, resolve_device, resolve_dtype
from engine.records import (
    DETAIL_THRESHOLD,
    MAX_INSTRUCTION_CHARS,
    SAMPLERS,
    SYNTHETIC_LABEL,
    AttentionMaps,
    Counterfactual,
    EditRequest,
    InvertEdit,
    InvertRequest,
)
from engine.text import TextEncoder, project

TEXT_CACHE_SIZE = 32  # projected text embeddings kept on the device (a few MB at most)
PRIOR_CACHE_SIZE = 8  # priors kept with their VAE latent and decoded reconstruction (~1 MB each at 512 px)
DETAIL_GROW_PX = 3  # where the decoded change exceeds DETAIL_THRESHOLD, grown by this many pixels and feathered over as many
CHANGE_FLOOR = 0.02  # an autoencoder that decodes regions decodes only where the latent change exceeds this


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


class Engine(InstructPath, InvertPath):
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
        self._anatomy_segmenter: Any = None  # loaded on the first confine="anatomy" edit
        self._anatomy: OrderedDict[tuple, Any] = OrderedDict()  # its regions by prior and anatomy
        self._device_detector: Any = None  # loaded on the first "without support devices" (engine.devices)
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
        """Forgets every cached prior latent, reconstruction and anatomy region (benchmarks time cold edits)."""
        with self._lock:
            self._priors.clear()
            self._anatomy.clear()

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
