"""Loading a model into an :class:`~engine.engine.Engine`.

:func:`load` reads a model folder or hub id (the bundled model unless told otherwise:
:func:`default_model`), picks the device and the compute dtype (:func:`resolve_device`,
:func:`resolve_dtype`), loads the text encoder the card names and checks that its width fits
the model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.checkpoint import load_model_parts
from engine.errors import InputError, ModelFolderError
from engine.text import load_text_encoder

if TYPE_CHECKING:
    from engine.engine import Engine

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "models" / "journey-mini"


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
    from engine.engine import Engine  # not at the top: engine.engine imports this module

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
