"""What the engine takes and gives: the requests, the results and their provenance.

The UI, the CLI and the batch runner talk to the :class:`~engine.engine.Engine` only through
these frozen dataclasses: an :class:`EditRequest` in and a :class:`Counterfactual` out for the
instruct method, an :class:`InvertRequest` in and an :class:`InvertEdit` (with its
:class:`AttentionMaps`) out for the invert method. A request checks its own fields
(``validated``); a result carries the JSON record of how it was made (``provenance``).
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from engine.errors import InputError
from engine.instruct import SCHEDULERS
from engine.io import SquareTransform
from engine.severity import SEVERITIES, apply_severity

SAMPLERS = ("auto", "fast", "full")
CONFINES = ("none", "anatomy")
"""``EditRequest.confine``: ``anatomy`` keeps the edit inside the anatomy of the findings the
instruction names (:func:`engine.regions.anatomy_regions`); ``none`` lets it reach anywhere."""
DEVICE_MODES = ("detect", "model")
"""``EditRequest.devices``: how "without support devices" is made (:mod:`engine.devices`)."""
MAX_INSTRUCTION_CHARS = 1000
SYNTHETIC_LABEL = "SYNTHETIC - research use only, not for diagnosis"
DETAIL_THRESHOLD = 0.04  # a change model's output is the decoded edit where the decoded change exceeds this


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
        confine: ``none`` (the model's edit as it comes) or ``anatomy``: the edit may change
            only the anatomy of the findings the instruction names, found by the bundled
            segmenter on the prior (a left effusion: the left lung grown by 3 % of the canvas;
            cardiomegaly: the heart grown by 8 %), feathered at the edge, RadEdit-style
            (:mod:`engine.regions`). Devices and "no change" are never confined. Explicit
            ``regions`` given to :meth:`Engine.counterfactuals` take precedence. The workstation
            and the command line default to ``anatomy``.
        devices: how a device removal ("without support devices", "lines and tubes removed",
            "ETT removed") is made: ``detect`` (the default: the bundled device detector marks the
            devices, or the named kind's on the named side, on the prior and they are inpainted
            from the film around them; the model then makes the rest of the instruction, or no
            change, on that prior; :mod:`engine.devices`) or ``model`` (the model's own edit). A
            device the detector has no kind for ("clips removed") is the model's.
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
    confine: str = "none"
    devices: str = "detect"

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
        if self.confine not in CONFINES:
            raise InputError(f"confine must be one of {', '.join(CONFINES)}, not {self.confine!r}")
        if self.devices not in DEVICE_MODES:
            raise InputError(f"devices must be one of {', '.join(DEVICE_MODES)}, not {self.devices!r}")
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
        instruction_applied: the instruction after the severity rule: the text the model
            received, except where devices were removed by detection (``devices_removed``
            then records the rest the model made).
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
        devices_removed: how a device removal was made (``method``: ``detect+inpaint`` with the
            ``detector``, the detected ``area`` fraction of the canvas and what the model was
            then asked; or ``model`` with a ``note`` why), None when the instruction removes no
            device.
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
    devices_removed: dict[str, Any] | None = None
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
        if self.devices_removed is not None:
            record["devices_removed"] = self.devices_removed
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
