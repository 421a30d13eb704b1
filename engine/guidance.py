"""Classifier-free guidance as small pure functions (unit-tested by hand-computed cases)."""

from __future__ import annotations

import torch


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Single classifier-free guidance (Ho & Salimans): ``e(0) + s * (e(c) - e(0))``.

    With ``scale == 1`` this is the conditional prediction; with 0, the unconditional one.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def dual_cfg(
    eps_uncond: torch.Tensor,
    eps_image: torch.Tensor,
    eps_full: torch.Tensor,
    *,
    text_scale: float,
    image_scale: float,
) -> torch.Tensor:
    """Dual classifier-free guidance of InstructPix2Pix, used by BiomedJourney.

    ``eps = e(0, 0) + s_img * (e(0, I) - e(0, 0)) + s_txt * (e(T, I) - e(0, I))``

    Args:
        eps_uncond: ``e(0, 0)``, no text and no prior image.
        eps_image: ``e(0, I)``, the prior image but no text.
        eps_full: ``e(T, I)``, the prior image and the progression description.
        text_scale: ``s_txt``, how strongly to follow the text.
        image_scale: ``s_img``, how strongly to stay with the prior image.

    With both scales 1 this equals ``eps_full``.
    """
    return (
        eps_uncond
        + image_scale * (eps_image - eps_uncond)
        + text_scale * (eps_full - eps_image)
    )
