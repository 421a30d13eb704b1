"""The BiomedJourney sampler: instruction-conditioned latent diffusion with dual guidance.

The UNet sees the noisy latent concatenated with the prior image's latent (channel axis) and
the progression description through cross-attention. Conventions (shared with the trainer, so
that a model trained here samples correctly, and the same as InstructPix2Pix so that
diffusers' ``StableDiffusionInstructPix2PixPipeline`` runs our weights unchanged):

* the prior latent is the VAE posterior mode, *unscaled* (no ``latent_scaling``);
* "no prior image" is an all-zero prior latent (:func:`null_image_latents`);
* "no text" is the encoding of the empty string;
* the noisy latent is scaled by ``latent_scaling`` as in Stable Diffusion;
* a model whose card has ``position_channels`` also gets that many fixed coordinate maps after
  the prior latent (:func:`append_position`), in every branch.

All three guidance branches run in one batched UNet call per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from engine.guidance import dual_cfg
from engine.regions import blend_region

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
}
_SCHEDULER_OPTIONS: dict[str, dict[str, object]] = {
    "ddim": {},
    "euler_a": {},
    "dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2},
}

StepCallback = Callable[[int, int], None]


def make_scheduler(name: str, config: dict[str, object]):
    """A fresh scheduler of kind ``name`` built on a model's saved noise schedule.

    Schedulers keep per-run state, so every sampling call gets its own.

    Args:
        name: ``ddim``, ``euler_a`` (Euler ancestral) or ``dpmpp`` (DPM-Solver++ 2M).
        config: the model's ``scheduler_config.json``.

    Raises:
        ValueError: unknown scheduler name.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")
    return SCHEDULERS[name].from_config(config, **_SCHEDULER_OPTIONS[name])


def append_position(model_in: torch.Tensor, channels: int) -> torch.Tensor:
    """``model_in`` with ``channels`` fixed coordinate maps appended on the channel axis.

    Map 0 is the column's x and map 1 the row's y, each running from -1 (image left, top) to 1
    (image right, bottom). Convolutions and attention without positional encodings see the same
    thing on both sides of a nearly symmetric chest, so a UNet without these maps cannot tell a
    left effusion from a right one; with them it reads laterality off its input. Trainer and
    engine append them the same way (``card.position_channels``; 0 appends nothing).

    Args:
        model_in: ``(B, K, h, w)``.
        channels: 0, 1 (x) or 2 (x and y).
    """
    if channels == 0:
        return model_in
    if channels not in (1, 2):
        raise ValueError(f"position channels must be 0, 1 or 2, not {channels!r}")
    batch, _, h, w = model_in.shape
    xs = torch.linspace(-1.0, 1.0, w, device=model_in.device, dtype=model_in.dtype).expand(h, w)
    ys = torch.linspace(-1.0, 1.0, h, device=model_in.device, dtype=model_in.dtype)[:, None].expand(h, w)
    grid = torch.stack([xs, ys][:channels])  # (channels, h, w)
    return torch.cat([model_in, grid.expand(batch, -1, -1, -1)], dim=1)


def null_image_latents(prior_latents: torch.Tensor) -> torch.Tensor:
    """The "no prior image" condition: zeros shaped like the prior latent."""
    return torch.zeros_like(prior_latents)


def initial_noise(
    shape: Sequence[int], generators: Sequence[torch.Generator], *, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Draws the starting noise, one generator per batch item.

    Item ``i`` depends only on ``generators[i]``, so a batch equals the same items drawn one
    at a time. Noise is drawn on the generators' device (the CPU) and then moved, so a seed
    gives the same start on every device.
    """
    return torch.cat(
        [randn_tensor((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    ).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_instruct(
    unet: torch.nn.Module,
    scheduler,
    prior_latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    *,
    text_scale: torch.Tensor | float,
    image_scale: torch.Tensor | float,
    steps: int,
    generators: Sequence[torch.Generator],
    callback: StepCallback | None = None,
    allowed: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    trim_padding: bool = True,
    position_channels: int = 0,
) -> torch.Tensor:
    """Runs the reverse diffusion for a batch of (prior, instruction) pairs.

    Args:
        unet: UNet with ``in_channels == 2 * latent_channels``.
        scheduler: a fresh diffusers scheduler (:func:`make_scheduler`).
        prior_latents: ``(B, C, h, w)`` unscaled VAE modes of the priors.
        text: ``(B, L, D)`` projected instruction embeddings.
        text_mask: ``(B, L)`` bool, True for real tokens.
        null_text: ``(1, L, D)`` projected embedding of the empty text.
        null_mask: ``(1, L)``.
        text_scale: ``s_txt``, a float or a ``(B,)`` tensor (per item).
        image_scale: ``s_img``, a float or a ``(B,)`` tensor.
        steps: denoising steps.
        generators: one ``torch.Generator`` per item (start noise and ancestral noise).
        callback: called as ``callback(step, steps)`` after every step.
        allowed: optional ``(B, 1, h, w)`` latent mask of where change is allowed (RadEdit;
            :mod:`engine.regions`); elsewhere the latent is reset before every step to
            ``reference`` noised to that step's level, and to ``reference`` itself at the end.
        reference: ``(B, C, h, w)`` the "unchanged" output in the scaled latent space (the
            prior's latent, or zeros for a ``change`` model); needed with ``allowed``.
        trim_padding: drop the token positions that are padding in every branch
            (:func:`drop_shared_padding`): cross-attention over 77 positions shrinks to the
            longest text's, with the same result up to rounding.
        position_channels: coordinate maps appended after the prior latent
            (:func:`append_position`; the card's ``position_channels``).

    Returns:
        ``(B, C, h, w)`` denoised latents in the scaled latent space.
    """
    batch = prior_latents.shape[0]
    if len(generators) != batch:
        raise ValueError(f"need one generator per item: {len(generators)} for batch {batch}")
    device, dtype = prior_latents.device, prior_latents.dtype
    scheduler.set_timesteps(steps, device=device)
    latents = initial_noise(prior_latents.shape, generators, dtype=dtype, device=device)
    latents = latents * scheduler.init_noise_sigma

    # Branch order: (text, image), (no text, image), (no text, no image).
    null = null_text.to(device=device, dtype=dtype).expand(batch, -1, -1)
    nmask = null_mask.to(device).expand(batch, -1)
    encoder_states = torch.cat([text.to(device=device, dtype=dtype), null, null])  # (3B, L, D)
    encoder_mask = torch.cat([text_mask.to(device), nmask, nmask])  # (3B, L)
    if trim_padding:
        encoder_states, encoder_mask = drop_shared_padding(encoder_states, encoder_mask)
    attention_mask = None if bool(encoder_mask.all()) else encoder_mask.to(dtype)
    image_cond = append_position(torch.cat([prior_latents, prior_latents, null_image_latents(prior_latents)]),
                                 position_channels)
    s_txt = _per_item(text_scale, batch, device, dtype)
    s_img = _per_item(image_scale, batch, device, dtype)
    if allowed is not None:
        if reference is None or reference.shape != prior_latents.shape:
            raise ValueError("a region mask needs a reference latent shaped like the prior latents")
        allowed = allowed.to(device=device, dtype=dtype)
        reference = reference.to(device=device, dtype=dtype)
        region_noise = initial_noise(prior_latents.shape, generators, dtype=dtype, device=device)

    for i, t in enumerate(scheduler.timesteps):
        if allowed is not None:
            noised = scheduler.add_noise(reference, region_noise, t.reshape(1))
            latents = blend_region(latents, noised, allowed)
        model_in = scheduler.scale_model_input(torch.cat([latents] * 3), t)
        model_in = torch.cat([model_in, image_cond], dim=1)  # (3B, 2C + position channels, h, w)
        eps = unet(
            model_in, t, encoder_hidden_states=encoder_states,
            encoder_attention_mask=attention_mask,
        ).sample
        eps_full, eps_image, eps_uncond = eps.chunk(3)
        eps = dual_cfg(eps_uncond, eps_image, eps_full, text_scale=s_txt, image_scale=s_img)
        latents = scheduler.step(eps, t, latents, generator=list(generators)).prev_sample
        if callback is not None:
            callback(i + 1, steps)
    if allowed is not None:
        latents = blend_region(latents, reference, allowed)
    return latents


def drop_shared_padding(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the token positions that are masked out in every row.

    A masked key gets a -10000 attention bias, i.e. a softmax weight that underflows to exactly
    zero, so removing the positions that no row attends to changes the result only by summation
    order (a mini-UNet step at 256 px is ~10 % faster on the CPU with 8 of 77 positions kept).
    Encoders without a mask (CLIP attends to its padding) keep every position.

    Args:
        states: ``(N, L, D)`` text states.
        mask: ``(N, L)`` bool, True for real tokens.

    Returns:
        ``(states, mask)`` with only the positions some row attends to.
    """
    used = mask.any(dim=0)
    if bool(used.all()):
        return states, mask
    return states[:, used], mask[:, used]


def _per_item(scale: torch.Tensor | float, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A guidance scale as a ``(B, 1, 1, 1)`` tensor for broadcasting."""
    value = torch.as_tensor(scale, dtype=dtype, device=device).reshape(-1)
    if value.numel() == 1:
        value = value.expand(batch)
    if value.numel() != batch:
        raise ValueError(f"need one guidance scale or one per item, got {value.numel()} for {batch}")
    return value.reshape(batch, 1, 1, 1)


def gate_change(change: torch.Tensor, gate: tuple[float, float], change_factor: float = 1.0) -> torch.Tensor:
    """A sampled change with its noise floor removed (:attr:`ModelCard.change_gate`).

    Per latent position the largest ``|change|`` over the channels (divided by ``change_factor``)
    sets a weight: 0 below ``gate[0]``, 1 above ``gate[1]``, smoothstep between; the weight is
    grown by one latent pixel (a finding's rim is weaker than its core) and multiplies every
    channel. Where the model meant no change the change becomes exactly zero, so the prior's own
    pixels come back there.

    Args:
        change: ``(B, C, h, w)`` the change as the UNet diffuses it.
        gate: ``(low, high)`` in latent units.
        change_factor: the card's :attr:`ModelCard.change_factor`.
    """
    low, high = gate
    strength = (change.float() / change_factor).abs().amax(dim=1, keepdim=True)
    weight = ((strength - low) / (high - low)).clamp(0.0, 1.0)
    weight = weight * weight * (3.0 - 2.0 * weight)
    weight = torch.nn.functional.max_pool2d(weight, kernel_size=3, stride=1, padding=1)
    return change * weight.to(change.dtype)
