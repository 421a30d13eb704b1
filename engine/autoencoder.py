"""A tiny deterministic autoencoder (the TAESD family, TAEF2 variant) as a model component.

TAEF2 is Ollin Boer Bohan's tiny autoencoder of the FLUX.2 latent space (MIT licence,
``madebyollin/taesd``): 8x spatial downscaling, 32 latent channels, images in [0, 1] with three
channels. Unlike the project's small grey VAE, it was trained on natural images at scale, so it
represents real radiographs (median round-trip PSNR 34.6 dB on real 256 px films, against
16.4 dB for the v7 VAE, which had seen only simulated films).

This is the project's own implementation of the published architecture, written as a diffusers
``ModelMixin`` so that a model folder's ``vae/`` part can hold it (``config.json`` with
``"_class_name": "TinyAutoencoder"`` + safetensors) and the engine and trainer use it exactly as
they use ``AutoencoderKL``:

* ``encode(x).latent_dist.mode()`` / ``.mean`` / ``.logvar`` (a deterministic posterior: the
  latent itself, log-variance :data:`DETERMINISTIC_LOGVAR`),
* ``decode(z).sample``,
* ``config.in_channels`` (3: the engine repeats a grey film into three channels and averages the
  decode back, ``engine.engine.to_vae_channels``), ``config.latent_channels``,
  ``config.block_out_channels`` (its length gives the 8x downscaling), ``config.scaling_factor``
  (1.0: TAEF2 latents are used unscaled).

The model card's ``value_range`` must be ``[0, 1]`` (:data:`VALUE_RANGE`), the range TAEF2 was
trained on. :func:`convert_taesd_state_dict` turns the published ``*_encoder.pth`` /
``*_decoder.pth`` state dicts into this module's keys, once, at conversion time
(``python -m train convert-autoencoder``); the engine itself loads safetensors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

CLASS_NAME = "TinyAutoencoder"
VALUE_RANGE = (0.0, 1.0)
# log-variance reported for the deterministic posterior: exp(0.5 * -30) = 3e-7, so a trainer that
# samples ``mean + std * noise`` gets the latent itself.
DETERMINISTIC_LOGVAR = -30.0


def _conv(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between, a residual skip and a ReLU after the sum.

    ``normed`` adds TAEF2's global branch before the convolutions: 1x1 conv to 4x the width,
    GroupNorm(4) (whose statistics span the whole image), ReLU, 1x1 conv back, added to the input.
    """

    def __init__(self, n_in: int, n_out: int, *, normed: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if normed:
            wide = 4 * n_in
            self.pool = nn.Sequential(nn.Conv2d(n_in, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(),
                                      nn.Conv2d(wide, n_in, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class _SoftClamp(nn.Module):
    """``tanh(x / m) * m``: the decoder's first layer keeps latents within +-m."""

    def __init__(self, magnitude: float) -> None:
        super().__init__()
        self.magnitude = float(magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.magnitude) * self.magnitude


def _encoder(in_channels: int, width: int, latent_channels: int, stages: int, normed: bool) -> nn.Sequential:
    """conv, block; then per stage a stride-2 conv and three blocks (the last stage normed); conv out."""
    layers: list[nn.Module] = [_conv(in_channels, width), _Block(width, width)]
    for stage in range(stages):
        last = stage == stages - 1
        layers.append(_conv(width, width, stride=2, bias=False))
        layers += [_Block(width, width, normed=normed and last) for _ in range(3)]
    layers.append(_conv(width, latent_channels))
    return nn.Sequential(*layers)


def _decoder(out_channels: int, width: int, latent_channels: int, stages: int, normed: bool,
             magnitude: float) -> nn.Sequential:
    """clamp, conv, ReLU; per stage three blocks (the first stage normed), upsample, conv; one block; conv out."""
    layers: list[nn.Module] = [_SoftClamp(magnitude), _conv(latent_channels, width), nn.ReLU()]
    for stage in range(stages):
        layers += [_Block(width, width, normed=normed and stage == 0) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), _conv(width, width, bias=False)]
    layers += [_Block(width, width), _conv(width, out_channels)]
    return nn.Sequential(*layers)


@dataclass
class DeterministicPosterior:
    """The encoder's output in the shape of diffusers' ``DiagonalGaussianDistribution``."""

    latent: torch.Tensor  # (B, C, h, w)

    @property
    def mean(self) -> torch.Tensor:
        return self.latent

    @property
    def logvar(self) -> torch.Tensor:
        return torch.full_like(self.latent, DETERMINISTIC_LOGVAR)

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.latent)

    def mode(self) -> torch.Tensor:
        return self.latent

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:  # noqa: ARG002 (same API)
        return self.latent


@dataclass
class EncoderOutput:
    latent_dist: DeterministicPosterior


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class TinyAutoencoder(ModelMixin, ConfigMixin):
    """TAESD-family autoencoder (TAEF2 with ``normed=True``, ``latent_channels=32``).

    Images are ``(B, in_channels, H, W)`` in [0, 1]; latents ``(B, latent_channels, H/8, W/8)``,
    unscaled (``scaling_factor`` 1.0). Both directions are deterministic.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 32, width: int = 64,
                 downsampling_stages: int = 3, normed: bool = True, latent_magnitude: float = 3.0,
                 scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] | None = None,
                 force_upcast: bool = False) -> None:
        super().__init__()
        # ``block_out_channels`` exists for the code that reads the downscaling off a VAE config
        # as 2 ** (len(block_out_channels) - 1), as it does for AutoencoderKL.
        expected = [width] * (downsampling_stages + 1)
        if block_out_channels is not None and list(block_out_channels) != expected:
            raise ValueError(f"block_out_channels must be {expected} for {downsampling_stages} downsampling stages")
        self.register_to_config(block_out_channels=expected)
        self.encoder = _encoder(in_channels, width, latent_channels, downsampling_stages, normed)
        self.decoder = _decoder(out_channels, width, latent_channels, downsampling_stages, normed, latent_magnitude)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncoderOutput | tuple[DeterministicPosterior]:
        """``(B, in_channels, H, W)`` images in [0, 1] to their latents (as a posterior)."""
        posterior = DeterministicPosterior(self.encoder(x))
        return EncoderOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> DecoderOutput | tuple[torch.Tensor]:  # noqa: ARG002
        """Latents to ``(B, out_channels, H, W)`` images, nominally in [0, 1] (not clipped)."""
        image = self.decoder(z)
        return DecoderOutput(image) if return_dict else (image,)

    @property
    def _global_layers(self) -> int:
        """Decoder layers whose output depends on the whole latent (through GroupNorm statistics):
        the clamp, the first conv and ReLU and, when normed, the first stage's three blocks."""
        return 3 + (3 if self.config.normed else 0)

    @property
    def region_margin(self) -> int:
        """Latent pixels a decoded region needs around it to be exact: the receptive field of the
        decoder's layers after :attr:`_global_layers` (each 3x3 conv reaches one pixel at its own
        resolution: ten per stage after an upsampling, five in the last)."""
        stages = int(self.config.downsampling_stages)
        reach = 0.0
        for stage in range(stages):
            convs = 10 if stage < stages - 1 else 5
            if stage == 0 and not self.config.normed:
                convs += 9  # the first stage's blocks are local too
            reach += convs / 2 ** (stage + 1)
        return int(math.ceil(reach)) + 1

    def decode_region(self, z: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        """Decodes only the latent box ``(top, bottom, left, right)`` (end-exclusive) of ``z``.

        The layers that see the whole latent run on all of it; the rest runs on the box grown by
        :attr:`region_margin`, so the box's pixels equal the full decode's up to float rounding
        at a fraction of the cost when the box is small (an edit's change is local).

        Returns:
            ``(B, out_channels, 8 * (bottom - top), 8 * (right - left))`` (for 8x downscaling).
        """
        top, bottom, left, right = box
        h, w = z.shape[-2:]
        m = self.region_margin
        t, b, l, r = max(top - m, 0), min(bottom + m, h), max(left - m, 0), min(right + m, w)
        x = z
        layers = list(self.decoder)
        for layer in layers[: self._global_layers]:
            x = layer(x)
        x = x[..., t:b, l:r]
        for layer in layers[self._global_layers:]:
            x = layer(x)
        f = 2 ** int(self.config.downsampling_stages)
        return x[..., (top - t) * f:(bottom - t) * f, (left - l) * f:(right - l) * f]

    def forward(self, x: torch.Tensor) -> DecoderOutput:
        """Round trip: decode(encode(x))."""
        return self.decode(self.encode(x).latent_dist.mode())


def is_tiny_autoencoder(config: Mapping[str, Any] | Any) -> bool:
    """Whether a VAE config (a dict, e.g. a parsed ``vae/config.json``, or a module's config) is ours."""
    name = config.get("_class_name") if isinstance(config, Mapping) else getattr(config, "_class_name", None)
    return name == CLASS_NAME


def autoencoder_class(config: Mapping[str, Any]) -> type:
    """The diffusers-style class that loads a ``vae/`` folder with this config."""
    if is_tiny_autoencoder(config):
        return TinyAutoencoder
    from diffusers import AutoencoderKL

    return AutoencoderKL


def value_range_of(vae: Any) -> tuple[float, float]:
    """The pixel range a VAE module was trained on: [0, 1] for ours, [-1, 1] for diffusers' KL VAEs."""
    return VALUE_RANGE if isinstance(vae, TinyAutoencoder) else (-1.0, 1.0)


def convert_taesd_state_dict(encoder: Mapping[str, torch.Tensor], decoder: Mapping[str, torch.Tensor],
                             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The published ``taesd``-repository state dicts (``nn.Sequential`` indices) as this module's keys.

    The published encoder's keys are ``0.weight`` ... ``14.bias``, the decoder's ``1.weight`` ...
    ``19.bias`` (index 0 is the clamp, which has no weights); this module nests both under
    ``encoder.`` / ``decoder.`` with the same indices.
    """
    out = {f"encoder.{k}": v.to(dtype) for k, v in encoder.items()}
    out.update({f"decoder.{k}": v.to(dtype) for k, v in decoder.items()})
    return out
