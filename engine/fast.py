"""The fast sampler of instruct models: a distilled student, one UNet call per step, 1-8 steps.

The full sampler (:mod:`engine.instruct`) runs a UNet batch of three guidance branches at each of
20 DDIM steps. A model folder may also carry a *student* (``unet_fast/``, made by
``python -m train fit`` with ``stage: distill`` from the folder's own UNet, the *teacher*) that
was trained to give the teacher's guided 20-step result in a few steps of one branch each:

* **guidance as an input** (guidance distillation, Meng et al. 2023): the two guidance scales
  enter the student's timestep embedding through diffusers' ``time_cond_proj_dim``
  (``timestep_cond``: LCM's sinusoidal embedding of each scale, :func:`guidance_embedding`), so
  one call with the text and the prior stands for the three guided branches;
* **few steps on one straight path**: the teacher's deterministic DDIM trajectory from the start
  noise ``z`` ends at ``x_f``. With ``a`` the noise schedule's alpha-bar, ``a_0`` that of the
  teacher's first timestep and ``a_f`` its final alpha, the pair ``(X, e)`` that solves

      z   = sqrt(a_0) X + sqrt(1 - a_0) e
      x_f = sqrt(a_f) X + sqrt(1 - a_f) e

  (:func:`endpoints`) defines one path ``x_t = sqrt(a_t) X + sqrt(1 - a_t) e`` through both.
  The student is trained to predict ``v = sqrt(a_t) e - sqrt(1 - a_t) X`` at points of that path
  (the teacher's timesteps). A DDIM step (:func:`ddim_jump`) from any point of the path with that
  ``v`` lands on the path again, so a perfect student reproduces ``x_f`` exactly in 1, 2, 4 or 8
  steps: the distilled coupling of noise and result is the teacher's (Luhman & Luhman 2021;
  "reflow", Liu et al. 2023), and more steps only let the student correct itself.

The student runs on a subset of the teacher's timesteps (:func:`fast_timesteps`) and, like every
instruct sampler here, sees ``cat(noisy, prior latent, coordinate maps)``. It always predicts
``v`` (well conditioned at every noise level), whatever the teacher predicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from engine.instruct import append_position, drop_shared_padding, initial_noise
from engine.regions import blend_region

GUIDANCE_SCALE_FACTOR = 1000.0
"""LCM's factor on a guidance scale before its sinusoidal embedding."""

StepCallback = Callable[[int, int], None]


def guidance_embedding(text_scale: torch.Tensor, image_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """The student's guidance input: LCM's sinusoidal embedding of each scale, concatenated.

    Each scale ``w`` becomes ``[sin(1000 w f_k), cos(1000 w f_k)]`` for ``dim / 2`` frequencies
    ``f_k = 10000 ** (-k / (dim / 2 - 1))`` (diffusers' ``get_guidance_scale_embedding``).

    Args:
        text_scale: ``(B,)`` text guidance scales.
        image_scale: ``(B,)`` image guidance scales.
        dim: width per scale (even, >= 4); the student's ``time_cond_proj_dim`` is ``2 * dim``.

    Returns:
        ``(B, 2 * dim)`` float32.
    """
    if dim < 4 or dim % 2:
        raise ValueError(f"the guidance embedding needs an even width of at least 4 per scale, not {dim}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    parts = []
    for w in (text_scale, image_scale):
        angle = w.detach().float().reshape(-1, 1).cpu() * GUIDANCE_SCALE_FACTOR * freqs[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1)


def fast_timesteps(teacher_timesteps: Sequence[int], steps: int) -> list[int]:
    """The student's timesteps for ``steps`` steps: every ``n / steps``-th of the teacher's ``n``.

    The first is always the teacher's first (where the start noise lives); the rest are picked
    evenly by index (``round(k * n / steps)``), so 4 of 20 are indices 0, 5, 10, 15.

    Raises:
        ValueError: ``steps`` outside ``1..n``.
    """
    n = len(teacher_timesteps)
    if not 1 <= steps <= n:
        raise ValueError(f"the fast sampler takes 1 to {n} steps (its teacher's), not {steps}")
    return [int(teacher_timesteps[round(k * n / steps)]) for k in range(steps)]


def endpoints(z: torch.Tensor, x_final: torch.Tensor, a_start: float | torch.Tensor,
              a_final: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, e)`` of the straight path through the start noise and the teacher's result.

    Solves ``z = sqrt(a_0) X + sqrt(1 - a_0) e`` and ``x_f = sqrt(a_f) X + sqrt(1 - a_f) e``
    (module docstring) element by element.

    Args:
        z: the start noise (the sampler's first state).
        x_final: the teacher's result (the full sampler's output latent).
        a_start: alpha-bar of the teacher's first timestep.
        a_final: the scheduler's final alpha (what DDIM's last step moves to).
    """
    a0, af = torch.as_tensor(a_start, dtype=torch.float64), torch.as_tensor(a_final, dtype=torch.float64)
    s0, n0, sf, nf = a0.sqrt(), (1 - a0).sqrt(), af.sqrt(), (1 - af).sqrt()
    det = s0 * nf - n0 * sf
    if float(det.abs()) < 1e-6:
        raise ValueError("the first and final noise levels must differ")
    zd, xd = z.double(), x_final.double()
    clean = (nf * zd - n0 * xd) / det
    noise = (s0 * xd - sf * zd) / det
    return clean.to(z.dtype), noise.to(z.dtype)


def path_point(clean: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The path's state at alpha-bar ``a`` and the ``v`` a perfect student predicts there.

    Args:
        clean, noise: ``(B, C, h, w)`` from :func:`endpoints`.
        a: ``(B,)`` alpha-bar per item.

    Returns:
        ``(x_t, v)``: ``sqrt(a) X + sqrt(1 - a) e`` and ``sqrt(a) e - sqrt(1 - a) X``.
    """
    s = a.to(clean.dtype).sqrt().reshape(-1, 1, 1, 1)
    n = (1 - a.to(clean.dtype)).sqrt().reshape(-1, 1, 1, 1)
    return s * clean + n * noise, s * noise - n * clean


def ddim_jump(x: torch.Tensor, v: torch.Tensor, a: torch.Tensor | float, a_next: torch.Tensor | float) -> torch.Tensor:
    """One deterministic DDIM move from alpha-bar ``a`` to ``a_next`` given a ``v`` prediction.

    ``X = sqrt(a) x - sqrt(1 - a) v``, ``e = sqrt(1 - a) x + sqrt(a) v``, then
    ``x' = sqrt(a_next) X + sqrt(1 - a_next) e`` (Song et al. with eta 0, in v form).
    """
    a, a_next = torch.as_tensor(a, dtype=x.dtype, device=x.device), torch.as_tensor(a_next, dtype=x.dtype, device=x.device)
    clean = a.sqrt() * x - (1 - a).sqrt() * v
    noise = (1 - a).sqrt() * x + a.sqrt() * v
    return a_next.sqrt() * clean + (1 - a_next).sqrt() * noise


@torch.no_grad()
def sample_fast(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    final_alpha: float,
    prior_latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    text_scale: torch.Tensor,
    image_scale: torch.Tensor,
    timesteps: Sequence[int],
    guidance_dim: int,
    generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
    allowed: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    trim_padding: bool = True,
    position_channels: int = 0,
) -> torch.Tensor:
    """The student's reverse process for a batch of (prior, instruction) pairs: one UNet call per step.

    Args:
        unet: the student (``time_cond_proj_dim == 2 * guidance_dim``), predicting ``v``.
        alphas_cumprod: ``(T,)`` the model's noise schedule.
        final_alpha: what the last step moves to (the DDIM scheduler's ``final_alpha_cumprod``).
        prior_latents: ``(B, C, h, w)`` unscaled VAE modes of the priors.
        text: ``(B, L, D)`` projected instruction embeddings; text_mask: ``(B, L)`` bool.
        text_scale, image_scale: ``(B,)`` guidance scales (inputs of the student).
        timesteps: the student's timesteps (:func:`fast_timesteps`), first = the teacher's first.
        guidance_dim: the guidance embedding's width per scale.
        generators: one CPU generator per item (the start noise; the same draw as the full
            sampler's, so a seed starts both from the same noise).
        callback: ``callback(step, steps)`` after every step.
        allowed, reference: RadEdit regions as in :func:`engine.instruct.sample_instruct`.
        trim_padding: drop token positions that are padding in every row.
        position_channels: coordinate maps after the prior latent.

    Returns:
        ``(B, C, h, w)`` latents in the scaled latent space, as the full sampler returns them.
    """
    batch = prior_latents.shape[0]
    if len(generators) != batch:
        raise ValueError(f"need one generator per item: {len(generators)} for batch {batch}")
    device, dtype = prior_latents.device, prior_latents.dtype
    latents = initial_noise(prior_latents.shape, generators, dtype=dtype, device=device)
    states, mask = text.to(device=device, dtype=dtype), text_mask.to(device)
    if trim_padding:
        states, mask = drop_shared_padding(states, mask)
    attention_mask = None if bool(mask.all()) else mask.to(dtype)
    condition = guidance_embedding(text_scale, image_scale, guidance_dim).to(device=device, dtype=dtype)
    image_cond = append_position(prior_latents, position_channels)
    alphas = alphas_cumprod.to(device=device, dtype=torch.float32)
    if allowed is not None:
        if reference is None or reference.shape != prior_latents.shape:
            raise ValueError("a region mask needs a reference latent shaped like the prior latents")
        allowed = allowed.to(device=device, dtype=dtype)
        reference = reference.to(device=device, dtype=dtype)
        region_noise = initial_noise(prior_latents.shape, generators, dtype=dtype, device=device)
    steps = len(timesteps)
    for i, t in enumerate(timesteps):
        a = alphas[t].to(dtype)
        if allowed is not None:  # outside the region: the unchanged output at this noise level
            latents = blend_region(latents, a.sqrt() * reference + (1 - a).sqrt() * region_noise, allowed)
        model_in = torch.cat([latents, image_cond], dim=1)  # (B, 2C + position channels, h, w)
        v = unet(model_in, torch.tensor(t, device=device), encoder_hidden_states=states,
                 encoder_attention_mask=attention_mask, timestep_cond=condition).sample
        a_next = alphas[timesteps[i + 1]].to(dtype) if i + 1 < steps else torch.tensor(final_alpha, dtype=dtype)
        latents = ddim_jump(latents, v.to(dtype), a, a_next)
        if callback is not None:
            callback(i + 1, steps)
    if allowed is not None:
        latents = blend_region(latents, reference, allowed)
    return latents
