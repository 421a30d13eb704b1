"""The bundled small classifier and segmenter: architecture and folder format.

A small network is a folder, like every model part in this project::

    cxr-classifier-mini/
      config.json        # SmallNetConfig: kind, architecture, targets, input resolution/range, widths
      model.safetensors  # the weights (no pickles)
      card.json          # intended use, training data and licence, metrics, description

``kind`` is ``classifier`` (multi-label sigmoid over ``targets``, e.g. CheXpert findings) or
``segmenter`` (one sigmoid mask per structure in ``targets``; structures may overlap, e.g. the
heart inside the mediastinum). Inputs are ``(B, 1, R, R)`` images in ``input_range`` (default
[-1, 1]); :func:`to_net_range` converts from the [0, 1] contract.

Architectures (kept under ~2 M parameters at the default widths, 128-256 px):

* ``cxr-small-cnn``: per stage a stride-2 3x3 conv and a 3x3 conv, GroupNorm + SiLU; global
  pooling (``pool``: ``avg``, or ``avgmax``, average and max concatenated, so that small findings
  such as a thin pleural line or catheter are not diluted) and a linear head. The last stage's
  feature map is Grad-CAM's layer.
* ``cxr-small-unet``: the same encoder with a U-Net decoder (nearest upsampling, skip
  concatenation), a 1x1 conv to one logit per structure at full resolution.

The demo-model issue trains and commits them; tests build tiny random or briefly trained ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engine.errors import InputError, ModelFolderError

ARCHITECTURES = {"classifier": "cxr-small-cnn", "segmenter": "cxr-small-unet"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "card.json"
FORMAT_VERSION = 1
POOLS = ("avg", "avgmax")


@dataclass(frozen=True)
class SmallNetConfig:
    """Everything that rebuilds a small network (``config.json``).

    Attributes:
        kind: ``classifier`` or ``segmenter``.
        targets: finding names (classifier) or structure names (segmenter), in output order.
        input_resolution: square side the network expects.
        input_range: the value range of its input (``[0, 1]`` images are mapped onto it).
        widths: channels per encoder stage (each stage halves the resolution).
        groups: GroupNorm groups (must divide every width).
        pool: classifier global pooling, ``avg`` (default; folders without the key) or ``avgmax``
            (average and max pooling concatenated before the linear head).
        architecture: ``cxr-small-cnn`` or ``cxr-small-unet`` (follows from ``kind``).
        format_version: folder format version.
        test_resolutions: a segmenter's further input sides, each run and its sided structures'
            (the lungs') probabilities averaged with ``input_resolution``'s (a test-time
            multi-scale, chosen for a trained network on held-out data; a network trained again
            starts without it).
    """

    kind: str
    targets: tuple[str, ...]
    input_resolution: int = 128
    input_range: tuple[float, float] = (-1.0, 1.0)
    widths: tuple[int, ...] = (32, 64, 128, 256)
    groups: int = 8
    pool: str = "avg"
    architecture: str = ""
    format_version: int = FORMAT_VERSION
    test_resolutions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "test_resolutions", tuple(int(r) for r in self.test_resolutions))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "input_range", tuple(float(v) for v in self.input_range))
        if self.kind not in ARCHITECTURES:
            raise ModelFolderError(f"small network kind must be 'classifier' or 'segmenter', not {self.kind!r}")
        if not self.architecture:
            object.__setattr__(self, "architecture", ARCHITECTURES[self.kind])
        if self.architecture != ARCHITECTURES[self.kind]:
            raise ModelFolderError(
                f"a {self.kind} uses architecture {ARCHITECTURES[self.kind]!r}, not {self.architecture!r}"
            )
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ModelFolderError("targets must be a non-empty list of distinct names")
        if not self.widths or any(w <= 0 or w % self.groups for w in self.widths):
            raise ModelFolderError(f"every width must be a positive multiple of groups={self.groups}, got {self.widths}")
        if self.input_resolution % (2 ** len(self.widths)) or self.input_resolution < 2 ** len(self.widths):
            raise ModelFolderError(
                f"input_resolution {self.input_resolution} must be a multiple of 2**{len(self.widths)} (one halving per stage)"
            )
        step = 2 ** len(self.widths)
        if any(r < step or r % step for r in self.test_resolutions) or self.input_resolution in self.test_resolutions:
            raise ModelFolderError(
                f"test_resolutions {list(self.test_resolutions)} must be multiples of 2**{len(self.widths)} "
                f"other than input_resolution {self.input_resolution}"
            )
        if self.test_resolutions and self.kind != "segmenter":
            raise ModelFolderError("test_resolutions are for segmenters")
        if self.pool not in POOLS:
            raise ModelFolderError(f"pool must be one of {POOLS}, not {self.pool!r}")
        lo, hi = self.input_range
        if not hi > lo:
            raise ModelFolderError(f"input_range must be increasing, got {self.input_range}")
        if self.format_version != FORMAT_VERSION:
            raise ModelFolderError(f"small network folder format {self.format_version} is not supported (expected {FORMAT_VERSION})")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SmallNetConfig:
        """From ``config.json``'s dict.

        Raises:
            ModelFolderError: unknown or missing keys, or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelFolderError(f"config.json has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if "kind" not in data or "targets" not in data:
            raise ModelFolderError("config.json must give 'kind' and 'targets'")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelFolderError(f"config.json is malformed: {exc}") from exc


@dataclass(frozen=True)
class SmallNetCard:
    """``card.json``: what the network is for and what it was trained on.

    Attributes:
        name: short name.
        intended_use: what it may be used for (research analysis, never diagnosis).
        training_data: data sets, each ``{"name", "license"}``.
        license: licence of the weights.
        metrics: held-out metrics by name.
        description: free text.
        limits: what the numbers of this network cannot be trusted for, in one or two sentences
            (the workstation shows it beside every analysis that uses the network).
    """

    name: str
    intended_use: str = "Research analysis of generated chest radiographs. Not for diagnosis."
    training_data: tuple[dict[str, str], ...] = ()
    license: str = "MIT"
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""
    limits: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["training_data"] = list(d["training_data"])
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SmallNetCard:
        """From ``card.json``'s dict (unknown keys are kept out, missing ones defaulted)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["training_data"] = tuple(kwargs.get("training_data", ()))
        if "name" not in kwargs:
            raise ModelFolderError("card.json must give a 'name'")
        return cls(**kwargs)


def to_net_range(images01: torch.Tensor, input_range: tuple[float, float]) -> torch.Tensor:
    """[0, 1] images to a small network's input range (linear, differentiable)."""
    lo, hi = input_range
    return images01 * (hi - lo) + lo


def _block(cin: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
    )


class SmallEncoder(nn.Module):
    """Stride-2 stages; returns every stage's output (the last is the deepest)."""

    def __init__(self, widths: tuple[int, ...], groups: int) -> None:
        super().__init__()
        chans = (1, *widths)
        self.stages = nn.ModuleList(_block(chans[i], chans[i + 1], 2, groups) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class SmallClassifierNet(nn.Module):
    """``cxr-small-cnn``: encoder, global average (or average + max) pool, linear head (one logit
    per target)."""

    def __init__(self, config: SmallNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SmallEncoder(config.widths, config.groups)
        pooled = config.widths[-1] * (2 if config.pool == "avgmax" else 1)
        self.head = nn.Linear(pooled, len(config.targets))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, R, R)`` net-range input to the last feature map ``(B, C, R/2^n, R/2^n)``."""
        return self.encoder(x)[-1]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map to logits ``(B, T)``."""
        pooled = features.mean(dim=(2, 3))
        if self.config.pool == "avgmax":
            pooled = torch.cat([pooled, features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class SmallUNet(nn.Module):
    """``cxr-small-unet``: the encoder plus a decoder with skips; logits ``(B, S, R, R)``."""

    def __init__(self, config: SmallNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.encoder = SmallEncoder(w, config.groups)
        self.decoder = nn.ModuleList(
            _block(w[i + 1] + w[i], w[i], 1, config.groups) for i in reversed(range(len(w) - 1))
        )
        self.top = _block(w[0] + 1, w[0], 1, config.groups)
        self.out = nn.Conv2d(w[0], len(config.targets), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)
        h = skips[-1]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        h = self.top(torch.cat([F.interpolate(h, size=x.shape[-2:], mode="nearest"), x], dim=1))
        return self.out(h)


def build(config: SmallNetConfig, generator: torch.Generator | None = None) -> nn.Module:
    """A freshly initialised network for ``config`` (Kaiming-normal convs, seeded by ``generator``)."""
    net: nn.Module = SmallClassifierNet(config) if config.kind == "classifier" else SmallUNet(config)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(m.bias)
    return net.eval()


def save(net: nn.Module, folder: str | os.PathLike[str], card: SmallNetCard) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and ``card.json`` into ``folder``.

    The weights are stored in fp16 (:func:`load` builds the network in fp32 and upcasts them):
    half the bytes in the repository, while the outputs move by about 1e-3 in probability.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    config: SmallNetConfig = net.config  # type: ignore[assignment]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "kind": config.kind})
    (out / CARD_NAME).write_text(json.dumps(card.to_json(), indent=2) + "\n")
    return out


def load(folder: str | os.PathLike[str], kind: str | None = None) -> tuple[nn.Module, SmallNetCard]:
    """Reads a small-network folder.

    Args:
        folder: the folder written by :func:`save`.
        kind: if given, the folder must hold this kind (``classifier`` or ``segmenter``).

    Returns:
        ``(network in eval mode, card)``.

    Raises:
        ModelFolderError: missing files, wrong kind, or weights that do not match the config.
    """
    from safetensors.torch import load_file

    root = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        if not (root / name).is_file():
            raise ModelFolderError(
                f"{root} is not a small-network folder: {name} is missing (expected {CONFIG_NAME}, "
                f"{WEIGHTS_NAME} and {CARD_NAME})"
            )
    try:
        config = SmallNetConfig.from_json(json.loads((root / CONFIG_NAME).read_text()))
        card = SmallNetCard.from_json(json.loads((root / CARD_NAME).read_text()))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{root}: a JSON file is malformed ({exc})") from exc
    if kind is not None and config.kind != kind:
        raise ModelFolderError(f"{root} holds a {config.kind}, but a {kind} was asked for")
    net = build(config)
    try:
        net.load_state_dict(load_file(str(root / WEIGHTS_NAME)))
    except RuntimeError as exc:
        raise ModelFolderError(f"{root}: the weights do not match config.json ({str(exc).splitlines()[0]})") from exc
    return net.eval(), card


def parameter_count(net: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in net.parameters())


class SmallNetBackend:
    """What the bundled small classifier and segmenter share: a network of one ``kind`` with its
    card and device, read from and written to a folder of this module's format."""

    kind: str = ""

    def _hold(self, net: nn.Module, card: SmallNetCard | None, device: torch.device | str) -> None:
        if net.config.kind != self.kind:
            raise InputError(f"{type(self).__name__} needs a {self.kind} network, not a {net.config.kind}")
        self.net = net.to(device).eval()
        self.card = card or SmallNetCard(name=f"small-{self.kind}")
        self.name = self.card.name
        self.input_resolution = net.config.input_resolution
        self.input_range = net.config.input_range
        self.device = torch.device(device)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: torch.device | str = "cpu"):
        """Reads a folder of this backend's kind.

        Raises:
            ModelFolderError: missing files, wrong kind, or mismatched weights.
        """
        net, card = load(folder, kind=cls.kind)
        return cls(net, card, device)  # type: ignore[call-arg]

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Writes the folder (config, safetensors weights, card)."""
        return save(self.net, folder, self.card)
