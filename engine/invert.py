"""The PRISM path: invert an image under a source caption, regenerate it under a target caption.

Notation (DDIM, Song et al.; null-text inversion, Mokady et al.): ``a_t`` is
``alphas_cumprod[t]``; a deterministic DDIM move from noise level ``a`` to ``a'`` with noise
prediction ``e`` is

    x' = sqrt(a') * (x - sqrt(1 - a) * e) / sqrt(a) + sqrt(1 - a') * e        (:func:`ddim_move`)

used backwards (``a' < a``) to sample and forwards (``a' > a``) to invert. Inversions:

* ``ddim``: DDIM inversion with the source caption's conditional prediction; the edit then uses
  ordinary classifier-free guidance with the empty-text embedding (at guidance 7.5 this drifts
  away from the input: the baseline the others fix);
* ``null-text``: the same trajectory, then per-step unconditional embeddings ``phi_t`` optimised
  with Adam (lr ``1e-2 * (1 - i / 100)``, at most ``inner_steps`` iterations, stop when the loss
  drops below ``1e-5 + i * 2e-5``) so that guided sampling retraces it (Mokady et al.);
* ``negative-prompt``: no optimisation; the source caption's embedding is the unconditional one
  (Miyake et al.), so guided sampling of the source equals unguided sampling;
* ``direct``: no optimisation; the source branch is put back on the inverted trajectory after
  every step (Ju et al., "PnP inversion"), the target follows through attention control.

Everything here is a pure function of tensors and a noise predictor, so it is testable without
an :class:`~engine.engine.Engine`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from engine.checkpoint import PREDICTION_TYPES
from engine.errors import InputError, ModelFolderError
from engine.guidance import cfg
from engine.instruct import append_position
from engine.p2p import AttentionController, LocalBlend, controlled

INVERSIONS = ("ddim", "null-text", "negative-prompt", "direct")
SAMPLER_OPTIONS: dict[str, object] = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
"""PRISM's sampler options, applied to every model's own noise schedule (Stable Diffusion folders
also get PRISM's betas at load time: :data:`engine.checkpoint.PRISM_SCHEDULER`)."""
NULL_TEXT_LR = 1e-2
NULL_TEXT_EPSILON = 1e-5

StepCallback = Callable[[int, int], None]


def inversion_kind(inversion: str) -> str:
    """What has to be computed and cached for an inversion choice: ``null-text`` or plain ``ddim``."""
    if inversion not in INVERSIONS:
        raise InputError(f"inversion must be one of {', '.join(INVERSIONS)}, not {inversion!r}")
    return "null-text" if inversion == "null-text" else "ddim"


class NoisePredictor:
    """A UNet as ``eps(x_t, t, states, mask)`` for text-to-image sampling.

    Text-to-image UNets take the latent alone. Instruct UNets (``in_channels == 2 * C``) also
    take an image condition: ``condition`` when given (a ``change`` model's prior, see
    :meth:`engine.engine.Engine.invert_edit`), else all zeros, the "no image" condition of
    :func:`engine.instruct.null_image_latents` (a text-to-image model with the prior withheld).
    A ``v_prediction`` UNet's output is converted to a noise prediction.

    Args:
        unet: ``UNet2DConditionModel``.
        alphas_cumprod: the scheduler's ``alphas_cumprod`` (for ``v_prediction``).
        prediction_type: ``epsilon`` or ``v_prediction``.
        condition: optional ``(1, C, h, w)`` image condition of an instruct UNet, shared by
            every batch item.
        position_channels: the card's coordinate maps, appended after the condition
            (:func:`engine.instruct.append_position`).
    """

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 condition: torch.Tensor | None = None, position_channels: int = 0) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ModelFolderError(
                f"the inversion path needs an epsilon or v_prediction model, not {prediction_type!r}"
            )
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.position_channels = position_channels
        self.condition_channels = int(unet.config.in_channels) - int(unet.config.out_channels) - position_channels
        if condition is not None and (not self.condition_channels or condition.shape[1] != self.condition_channels):
            raise ValueError(f"this UNet takes {self.condition_channels} condition channels, "
                             f"not a {tuple(condition.shape)} condition")
        self.condition = condition

    def __call__(self, x: torch.Tensor, t: int, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x``: ``(B, C, h, w)``; ``states``: ``(B, L, D)``; ``mask``: ``(B, L)`` bool or None."""
        model_in = x
        if self.condition_channels:
            condition = (x.new_zeros(x.shape[0], self.condition_channels, *x.shape[2:]) if self.condition is None
                         else self.condition.to(x).expand(x.shape[0], -1, -1, -1))
            model_in = append_position(torch.cat([x, condition], dim=1), self.position_channels)
        attention_mask = None if mask is None or bool(mask.all()) else mask.to(x.dtype)
        out = self.unet(model_in, t, encoder_hidden_states=states, encoder_attention_mask=attention_mask).sample
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t].to(x)
            out = a.sqrt() * out + (1 - a).sqrt() * x
        return out


@dataclass(frozen=True)
class Schedule:
    """The DDIM timesteps of one run, in denoising order.

    Attributes:
        timesteps: ``t_0 > t_1 > ... `` (``steps`` of them).
        alphas: ``a_{t_i}`` per step.
        alphas_prev: the noise level each step moves to (``final_alpha_cumprod`` after the last).
    """

    timesteps: tuple[int, ...]
    alphas: torch.Tensor
    alphas_prev: torch.Tensor

    @property
    def steps(self) -> int:
        """Number of denoising steps."""
        return len(self.timesteps)


def make_ddim(config: dict[str, object]) -> DDIMScheduler:
    """PRISM's DDIM scheduler (:data:`SAMPLER_OPTIONS`) on a model's noise schedule."""
    return DDIMScheduler.from_config(config, **SAMPLER_OPTIONS)


def ddim_schedule(scheduler: DDIMScheduler, steps: int) -> Schedule:
    """The timesteps and noise levels of a ``steps``-step DDIM run."""
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InputError(f"steps must be an integer from 1 to 1000, not {steps!r}")
    scheduler.set_timesteps(steps)
    timesteps = tuple(int(t) for t in scheduler.timesteps)
    ac = scheduler.alphas_cumprod
    ratio = scheduler.config.num_train_timesteps // steps
    prev = [int(t) - ratio for t in timesteps]
    alphas = torch.stack([ac[t] for t in timesteps])
    alphas_prev = torch.stack([ac[p] if p >= 0 else scheduler.final_alpha_cumprod for p in prev])
    return Schedule(timesteps, alphas.float(), alphas_prev.float())


def ddim_move(
    x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor | float, a_to: torch.Tensor | float
) -> torch.Tensor:
    """Deterministic DDIM move from noise level ``a_from`` to ``a_to`` (module docstring)."""
    a_from = torch.as_tensor(a_from, dtype=x.dtype, device=x.device)
    a_to = torch.as_tensor(a_to, dtype=x.dtype, device=x.device)
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


@dataclass(frozen=True)
class Inversion:
    """An inverted image: the DDIM trajectory and, for null-text, the optimised embeddings.

    Attributes:
        kind: ``ddim`` or ``null-text``.
        latents: ``steps + 1`` latents ``(1, C, h, w)``: ``latents[0]`` is the input's, ``latents[k]``
            the state after ``k`` inversion steps (``latents[-1]`` is the starting noise).
        null_states: for null-text, one ``(1, L, D)`` unconditional embedding per denoising step.
        seconds: wall time the inversion took.
    """

    kind: str
    latents: tuple[torch.Tensor, ...]
    null_states: tuple[torch.Tensor, ...] | None
    seconds: float

    def at_step(self, i: int) -> torch.Tensor:
        """The inverted latent that denoising step ``i`` should land on."""
        return self.latents[len(self.latents) - i - 2]


@torch.no_grad()
def ddim_invert(eps_fn: NoisePredictor, x0: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None,
                schedule: Schedule, callback: StepCallback | None = None) -> list[torch.Tensor]:
    """DDIM inversion with the conditional prediction (guidance 1), as PRISM and null-text do.

    Args:
        eps_fn: the noise predictor.
        x0: ``(1, C, h, w)`` scaled latent of the input.
        cond: ``(1, L, D)`` source caption states; cond_mask: ``(1, L)`` or None.
        schedule: the run's DDIM schedule.

    Returns:
        ``steps + 1`` latents from ``x0`` to the inverted noise.
    """
    latents = [x0]
    x = x0
    n = schedule.steps
    for k in range(n):
        i = n - 1 - k  # the denoising step this inversion step undoes
        eps = eps_fn(x, schedule.timesteps[i], cond, cond_mask)
        x = ddim_move(x, eps, schedule.alphas_prev[i], schedule.alphas[i])
        latents.append(x)
        if callback is not None:
            callback(k + 1, n)
    return latents


def null_text_optimize(
    eps_fn: NoisePredictor, latents: Sequence[torch.Tensor], cond: torch.Tensor, cond_mask: torch.Tensor | None,
    null: torch.Tensor, null_mask: torch.Tensor | None, schedule: Schedule, guidance: float, *,
    inner_steps: int = 10, epsilon: float = NULL_TEXT_EPSILON, callback: StepCallback | None = None,
) -> list[torch.Tensor]:
    """Null-text inversion: per-step unconditional embeddings that make guided DDIM retrace ``latents``.

    Only the embedding gets gradients (the UNet's weights are frozen). Each step starts from
    the previous step's result, as published. The embedding and the loss are kept in float32
    whatever the UNet's dtype (Adam steps of 1e-2 vanish in bfloat16).

    Returns:
        one ``(1, L, D)`` embedding per denoising step.
    """
    out: list[torch.Tensor] = []
    x = latents[-1]
    phi = null.detach().float().clone()
    n = schedule.steps
    for i, t in enumerate(schedule.timesteps):
        target = latents[n - i - 1]
        a, a_prev = schedule.alphas[i], schedule.alphas_prev[i]
        with torch.no_grad():
            eps_cond = eps_fn(x, t, cond, cond_mask)
        phi = phi.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([phi], lr=NULL_TEXT_LR * (1.0 - i / 100.0))
        with torch.enable_grad():
            for _ in range(inner_steps):
                eps_uncond = eps_fn(x, t, phi.to(x.dtype), null_mask)
                prev = ddim_move(x, cfg(eps_uncond, eps_cond, guidance), a, a_prev)
                loss = F.mse_loss(prev.float(), target.float())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if loss.item() < epsilon + i * 2e-5:
                    break
        phi = phi.detach()
        out.append(phi.to(null.dtype))
        with torch.no_grad():
            x = ddim_move(x, cfg(eps_fn(x, t, out[-1], null_mask), eps_cond, guidance), a, a_prev)
        if callback is not None:
            callback(i + 1, n)
    return out


def invert(
    eps_fn: NoisePredictor, x0: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None,
    null: torch.Tensor, null_mask: torch.Tensor | None, schedule: Schedule, *, inversion: str,
    guidance: float, inner_steps: int = 10, callback: StepCallback | None = None,
) -> Inversion:
    """Inverts ``x0`` under the source caption for the given inversion choice (module docstring)."""
    kind = inversion_kind(inversion)
    t0 = time.perf_counter()
    latents = ddim_invert(eps_fn, x0, cond, cond_mask, schedule, callback)
    null_states = None
    if kind == "null-text":
        null_states = tuple(null_text_optimize(
            eps_fn, latents, cond, cond_mask, null, null_mask, schedule, guidance,
            inner_steps=inner_steps, callback=callback,
        ))
    return Inversion(kind, tuple(latents), null_states, time.perf_counter() - t0)


def _cat_masks(masks: Sequence[torch.Tensor | None], length: int) -> torch.Tensor | None:
    """One ``(B, L)`` mask for a batch of texts; None stands for "every token counts"."""
    given = [m for m in masks if m is not None]
    if not given:
        return None
    full = torch.ones(1, length, dtype=torch.bool, device=given[0].device)
    return torch.cat([full if m is None else m for m in masks])


@torch.no_grad()
def sample_edit(
    eps_fn: NoisePredictor,
    schedule: Schedule,
    inversion: Inversion,
    *,
    method: str,
    source: tuple[torch.Tensor, torch.Tensor | None],
    target: tuple[torch.Tensor, torch.Tensor | None],
    null: tuple[torch.Tensor, torch.Tensor | None],
    guidance: float,
    controller: AttentionController,
    blend: LocalBlend | None = None,
    allowed: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoises the source and target branches from the inverted noise under prompt-to-prompt control.

    Args:
        eps_fn: the noise predictor (its UNet gets the controller's processors for the run).
        schedule: the same schedule the inversion used.
        inversion: the inverted trajectory (and null-text embeddings).
        method: the inversion choice (decides the unconditional embedding and the correction).
        source, target: ``(states (1, L, D), mask (1, L) or None)`` of the captions.
        null: the empty text's states and mask.
        guidance: classifier-free guidance scale.
        controller: prompt-to-prompt control for two prompts.
        blend: optional local blend.
        allowed: optional ``(1, 1, h, w)`` latent mask of where the target may differ from the
            inverted input (edit mask minus keep mask); elsewhere it is reset every step.
        callback: ``callback(step, steps)`` after every step.

    Returns:
        ``(2, C, h, w)``: the source branch (the reconstruction) and the target branch (the edit).
    """
    if method not in INVERSIONS:
        raise InputError(f"inversion must be one of {', '.join(INVERSIONS)}, not {method!r}")
    if method == "null-text" and inversion.null_states is None:
        raise InputError("null-text editing needs a null-text inversion")
    (cs, cm), (ts, tm), (ns, nm) = source, target, null
    x = torch.cat([inversion.latents[-1]] * 2)
    with controlled(eps_fn.unet, controller):
        for i, t in enumerate(schedule.timesteps):
            if method == "null-text":
                uncond, umask = inversion.null_states[i], nm
            elif method == "negative-prompt":
                uncond, umask = cs, cm
            else:
                uncond, umask = ns, nm
            states = torch.cat([uncond, uncond, cs, ts])  # (4, L, D): uncond src/tgt, cond src/tgt
            mask = _cat_masks([umask, umask, cm, tm], cs.shape[1])
            eps = eps_fn(torch.cat([x, x]), t, states, mask)
            eps_uncond, eps_cond = eps.chunk(2)
            x = ddim_move(x, cfg(eps_uncond, eps_cond, guidance), schedule.alphas[i], schedule.alphas_prev[i])
            if controller.layer_calls == 0:  # PRISM's hooks failed exactly like this, silently
                raise RuntimeError("prompt-to-prompt control reached no attention layer of this UNet")
            controller.end_step()
            reference = inversion.at_step(i)
            if method == "direct":  # PnP inversion: the source branch stays on the inverted path
                x = torch.cat([reference, x[1:]])
            if blend is not None and controller.record is not None:
                x = blend(x, controller.record, controller.step)
            if allowed is not None:
                x = torch.cat([x[:1], reference + allowed * (x[1:] - reference)])
            if callback is not None:
                callback(i + 1, schedule.steps)
    return x
