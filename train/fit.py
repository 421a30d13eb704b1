"""The training loop: every stage in one loop you can read top to bottom.

``python -m train fit --config train/configs/tiny.yaml [--key=value ...]`` runs
:func:`fit`. Multi-GPU and multi-node go through accelerate, unchanged::

    accelerate launch --num_processes 8 -m train fit --config train/configs/biomedjourney-stage2.yaml

Losses (``t`` uniform in 0..999, ``eps ~ N(0, I)``, ``z = scaling * E(x)`` sampled from the
VAE posterior, ``alpha_bar`` from the scheduler):

* stage 1 / stage 2 (BiomedJourney = InstructPix2Pix conditioning):
  ``|| eps - eps_theta(sqrt(alpha_bar) z + sqrt(1 - alpha_bar) eps, t, [c_I], c_T) ||^2`` where the
  prior latent ``c_I`` (unscaled posterior mode) is concatenated on the channel axis and ``c_T``
  (projected text states) enters through cross-attention; ``c_I`` is the encoded mid-grey
  image in stage 1. Dropout: 5% text only, 5% image only, 5% both (zeros image, ``""`` text).
* prism: the same without ``c_I`` (text-to-image fine-tuning on captions).
* vae (stage 0): ``|x - D(z)|_1 + kl_weight * KL(q(z|x) || N(0, I))``.

Determinism: data order is a function of (seed, batch number); noise, timesteps, dropout and
augmentation come from a generator seeded by (seed, step, micro-step, rank); the global torch
RNG (anything inside a network that draws from it) is reseeded from (seed, step, rank) every
step; the learning rate is a function of the step; nothing draws from numpy's or Python's
global RNGs. A checkpoint holds the step, the weights, EMA and optimizer state, so a resumed
run continues exactly as an uninterrupted one (on the same hardware and software; not yet
across an fp16 run's loss scaler, whose state is not saved).

Faults: checkpoints are written atomically with a manifest of sha256 hashes (see the
checkpoints section), and verified before a run resumes from one or exports one. A run killed
with ``kill -9`` at any moment, mid-checkpoint included, resumes from the last complete
checkpoint when started again with the same command.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.engine import to_model_range, to_vae_channels
from engine.errors import InputError
from engine.instruct import append_position
from engine.text import project
from train.config import TrainConfig
from train.data import (CachedDataset, EpochSampler, ImageDataset, TensorStore, augment, collate, content_key,
                        derive_seed, flip_text, load_canvas, load_config_items)
from train.models import Models, build_models

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
LOG_FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s")


class TrainingInterrupted(RuntimeError):
    """Raised by ``fit(..., stop_at_step=N)`` after step N: a stand-in for a killed run."""


# -- the trained module, EMA ---------------------------------------------------------------

class Trainee(torch.nn.Module):
    """What the optimizer trains, as one module (so DDP wraps one thing).

    Stages 1/2/prism: the UNet (with ``train_unet``) and the text projection (with
    ``train_projection``); stage 0: the VAE. Their gradients are set here, whatever the loader
    left them as: a model folder from ``init_from`` comes through the engine's loader, which
    freezes every part for inference (before this, runs started from one trained only the
    projection and any widened conv_in, with the rest of the UNet frozen).
    """

    def __init__(self, models: Models, train_projection: bool, position_channels: int = 0,
                 train_unet: bool = True) -> None:
        super().__init__()
        self.position_channels = position_channels if models.method == "instruct" else 0
        self.vae = models.vae if models.stage == "vae" else None
        self.unet = models.unet
        if self.unet is not None:
            self.unet.requires_grad_(train_unet)
        self.projection = models.projection
        if self.projection is not None:
            self.projection.requires_grad_(train_projection)

    def forward(self, model_in: torch.Tensor, t: torch.Tensor, states: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> Any:
        """Noise prediction ``(B, C, h, w)`` from the UNet input and raw text states.

        ``cond``: a distilled student's guidance embedding (``timestep_cond``).
        Stage 0 instead: ``model_in`` is the image in model range and ``t`` the posterior noise;
        returns ``(reconstruction, mean, logvar)``.
        """
        if self.vae is not None:
            dist = self.vae.encode(model_in).latent_dist
            return self.vae.decode(dist.mean + dist.std * t).sample, dist.mean, dist.logvar
        context = project(states, self.projection)
        model_in = append_position(model_in, self.position_channels)
        extra = {} if cond is None else {"timestep_cond": cond}
        return self.unet(model_in, t, encoder_hidden_states=context, encoder_attention_mask=mask, **extra).sample


class EMA:
    """Exponential moving average of parameters, with diffusers' warm-up of the decay."""

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.nn.Parameter]) -> None:
        """One EMA step towards the current parameters."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        keys = list(named)
        # One multi-tensor kernel per call instead of one per parameter (hundreds of launches on a GPU).
        torch._foreach_lerp_([self.shadow[k] for k in keys], [named[k].detach().float() for k in keys], 1 - decay)


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``cfg``'s settings; the fused kernel on CUDA (one launch per step).

    On the CPU the default (for-each) implementation runs, so CPU runs stay bit-identical across
    resumes and machines.
    """
    return torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named parameters that require gradients."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


# -- checkpoints -----------------------------------------------------------------------------
#
# A checkpoint is a folder ``checkpoints/step-NNNNNNN`` of safetensors + JSON files and a
# ``manifest.json`` listing every other file with its size and sha256. It is written as
# ``.step-NNNNNNN.tmp`` (files, then fsync, then the manifest, fsynced last), renamed into
# place, and only then named by the ``latest`` pointer (written to ``.latest.tmp`` and renamed),
# so a run killed at any moment leaves ``latest`` naming a complete checkpoint. Leftover
# ``.*.tmp`` / ``.*.old`` folders of a killed write or prune are removed when the run restarts.

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "cxr-journey-checkpoint/1"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")  # + ema.safetensors


class CheckpointError(InputError):
    """A checkpoint folder that is missing, incomplete or corrupt.

    Attributes:
        path: the checkpoint folder.
        problem: what is wrong, e.g. ``model.safetensors sha256 mismatch``.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str,
                 hint: str = "delete it or use an earlier checkpoint") -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"checkpoint {path} is corrupt: {problem}; {hint}")


def _fsync_dir(folder: Path) -> None:
    """Makes a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every file in a checkpoint folder except the manifest, sorted."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST)


def write_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Fsyncs every file of a checkpoint folder, then writes (and fsyncs) its ``manifest.json``.

    Format::

        {"format": "cxr-journey-checkpoint/1",
         "files": {"model.safetensors": {"bytes": 18050840, "sha256": "9f2c..."}, ...}}

    Paths are relative to the folder (``/``-separated). :func:`save_checkpoint` calls this
    last, before the folder is renamed into place. It also turns a folder written before
    checkpoints carried manifests into one :func:`load_checkpoint` accepts (check it first).

    Returns:
        The manifest.
    """
    folder = Path(folder)
    files = {}
    for name in _checkpoint_files(folder):
        path = folder / name
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        files[name] = {"bytes": path.stat().st_size, "sha256": digest}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    _write_durably(folder / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(folder)
    return manifest


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Checks a checkpoint folder against its manifest: every file present, of its size and sha256.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the folder and every problem found (a missing manifest or
            file, a truncated or grown file, a sha256 mismatch).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "the folder does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, f"it has no {MANIFEST} (written before checkpoints carried hashes? "
                                    "check it, then add one with train.fit.write_manifest)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"{MANIFEST} is unreadable ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                       for v in files.values())):
        raise CheckpointError(path, f"{MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    problems = []
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        size = file.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{name} is {'truncated' if size < want['bytes'] else 'too long'} "
                            f"({size} bytes, the manifest says {want['bytes']})")
        elif _sha256(file) != want["sha256"]:
            problems.append(f"{name} sha256 mismatch")
    if problems:
        raise CheckpointError(path, ", ".join(problems))
    return manifest


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a ``step-NNNNNNN`` folder."""
    return int(Path(path).name.removeprefix("step-"))


def _checkpoint_folders(root: Path) -> list[Path]:
    """The ``step-*`` folders under ``checkpoints/``, oldest first (complete or not)."""
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=checkpoint_step)


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint a run resumes from (not verified: :func:`load_checkpoint` does that), or None.

    That is the folder ``checkpoints/latest`` names. When the pointer is missing (a run killed
    between its first checkpoint's rename and the pointer's) or names a folder that no longer
    exists (one deleted by hand after a corruption message), it is the newest ``step-*`` folder
    that has a manifest, with a warning in the second case.
    """
    root = Path(out_dir) / CHECKPOINTS
    pointer = root / LATEST
    named = None
    if pointer.is_file():
        named = pointer.read_text(encoding="utf-8").strip()
        if named and (root / named).is_dir():
            return root / named
    found = [p for p in _checkpoint_folders(root) if (p / MANIFEST).is_file()]
    if named:
        instead = f"using {found[-1].name}, the newest checkpoint left" if found else "no checkpoint is left: starting over"
        log.warning("%s names %s, which does not exist; %s", pointer, named, instead)
    return found[-1] if found else None


def _point_latest(root: Path, name: str) -> None:
    """Atomically makes ``checkpoints/latest`` name ``name``."""
    tmp = root / f".{LATEST}.tmp"
    _write_durably(tmp, name)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _discard(folder: Path) -> None:
    """Removes a checkpoint folder: renamed aside first, so a kill mid-delete leaves no half folder under its name."""
    trash = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_incomplete(out_dir: str | os.PathLike[str]) -> list[str]:
    """Removes what a killed checkpoint write or prune left behind (``.*.tmp``, ``.*.old``).

    Returns:
        The names removed (each also logged as a warning).
    """
    root = Path(out_dir) / CHECKPOINTS
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for leftover in sorted(root.glob(".*.tmp")) + sorted(root.glob(".*.old")):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
        removed.append(leftover.name)
        log.warning("removed %s: a checkpoint write or delete that was cut short", leftover)
    return removed


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, values in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for key, tensor in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir: Path, step: int, trainee: Trainee, optimizer: torch.optim.Optimizer, ema: EMA | None,
                    cfg: TrainConfig, extra: dict[str, Any], keep: int) -> Path:
    """Writes ``checkpoints/step-NNNNNNN`` atomically, points ``latest`` at it, prunes old ones.

    Everything is safetensors + JSON (nothing is pickled): trained weights, EMA weights,
    AdamW state, ``state.json`` with the step, the full config and the CPU thread count
    (:func:`cpu_threads`), and ``manifest.json``
    (see :func:`write_manifest`). Pruning keeps the ``keep`` newest checkpoints up to this
    step and removes any later one (left by a run that was resumed from an earlier checkpoint).
    """
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainee.state_dict().items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    state = {"step": step, "ema_updates": ema.updates if ema else 0, "config": cfg.to_dict(), **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    write_manifest(tmp)
    final = root / name
    if final.exists():  # a later timeline's, or one renamed just before a kill cut the pointer update
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _point_latest(root, name)
    folders = _checkpoint_folders(root)
    stale = [p for p in folders if checkpoint_step(p) > step]
    for old in [p for p in folders if checkpoint_step(p) <= step][:-keep] + stale:
        _discard(old)
    return final


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verifies a checkpoint folder (:func:`verify_checkpoint`) and reads it.

    Returns:
        ``{"state", "model", "ema", "optimizer"}`` (``ema`` None when the run kept none).

    Raises:
        CheckpointError: the folder is missing, incomplete or corrupt.
    """
    path = Path(path)
    files = verify_checkpoint(path)["files"]
    unlisted = [name for name in CHECKPOINT_FILES if name not in files]
    if unlisted:
        raise CheckpointError(path, f"{MANIFEST} does not list {', '.join(unlisted)}")
    state = json.loads((path / "state.json").read_text())
    ema = load_file(str(path / "ema.safetensors")) if "ema.safetensors" in files else None
    optimizer = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                     json.loads((path / "optimizer.json").read_text()))
    return {"state": state, "model": load_file(str(path / "model.safetensors")), "ema": ema, "optimizer": optimizer}


def earlier_intact(path: Path) -> Path | None:
    """The newest checkpoint of the same run before ``path`` that passes verification."""
    for folder in reversed(_checkpoint_folders(path.parent)):
        if checkpoint_step(folder) < checkpoint_step(path):
            try:
                verify_checkpoint(folder)
            except CheckpointError:
                continue
            return folder
    return None


def cpu_threads() -> int:
    """The CPU threads torch computes with here (``OMP_NUM_THREADS``, ``torch.set_num_threads``).

    Recorded in every checkpoint's ``state.json`` (``threads``): a CPU reduction splits its sum
    by thread, so the same step at another thread count rounds differently (in about the 8th
    significant digit), and a resumed run is bit-identical to an uninterrupted one only at the
    thread count of the run that wrote its checkpoint.
    """
    return int(torch.get_num_threads())


def thread_change_note(state: dict[str, Any], name: str) -> str | None:
    """The log line for a resume at another CPU thread count than the checkpoint's, else None
    (also None for checkpoints written before ``threads`` was recorded)."""
    written = state.get("threads")
    now = cpu_threads()
    if written is None or int(written) == now:
        return None
    return (f"{name} was written with {written} CPU thread(s), this run uses {now}: float sums are split "
            f"differently, so the result will not be bit-identical to an uninterrupted run (set "
            f"OMP_NUM_THREADS={written} to resume exactly)")


def resume_checkpoint(out_dir: Path, resume: str | os.PathLike[str] | None = None
                      ) -> tuple[Path | None, dict[str, Any] | None]:
    """Finds, verifies and reads the checkpoint a run continues from.

    Args:
        out_dir: the run folder.
        resume: a checkpoint folder of this run (``<out_dir>/checkpoints/step-NNNNNNN``), or None
            for the run's latest (:func:`latest_checkpoint`).

    Returns:
        ``(folder, checkpoint)``, or ``(None, None)`` for a fresh start.

    Raises:
        CheckpointError: the checkpoint is corrupt. A corrupt latest checkpoint is never
            skipped silently: the message names the newest intact earlier one to pass as
            ``--resume`` (or says to delete the corrupt one to start over).
        InputError: ``resume`` is not a checkpoint folder of this run.
    """
    root = out_dir / CHECKPOINTS
    if resume is None:
        path = latest_checkpoint(out_dir)
        if path is None:
            return None, None
    else:
        path = Path(resume)
        if not path.name.startswith("step-") or path.resolve().parent != root.resolve():
            raise InputError(f"--resume {resume}: not a checkpoint of {out_dir} (expected {root}/step-NNNNNNN)")
        if not path.is_dir():
            have = ", ".join(p.name for p in _checkpoint_folders(root)) or "none"
            raise InputError(f"--resume {resume} does not exist (checkpoints of this run: {have})")
    try:
        return path, load_checkpoint(path)
    except CheckpointError as exc:
        earlier = earlier_intact(path)
        hint = (f"delete it or resume from an earlier one with --resume {earlier}" if earlier is not None
                else "delete it to start the run over (no earlier checkpoint is intact)")
        raise CheckpointError(path, exc.problem, hint) from None


# -- caches --------------------------------------------------------------------------------

def latent_key(vae_id: str, path: str, resolution: int, flip: int = 0) -> str:
    """The latent cache's key of one image: the autoencoder, the file (path and mtime), the
    resolution and whether it is flipped."""
    return content_key("latent", vae_id, path, os.path.getmtime(path), resolution, flip)


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """``(B, 1, S, S)`` [0, 1] images to posterior parameters ``(B, 2C, h, w)`` (mean, logvar)."""
    dist = vae.encode(to_vae_channels(vae, to_model_range(images, value_range))).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1).float()


def build_latent_cache(cfg: TrainConfig, models: Models, items, device: torch.device) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Encodes every image (as is and, when ``hflip`` is on, flipped) once with the frozen VAE into a TensorStore.

    Returns:
        The store folder and, per image path, the keys of its plain and flipped posteriors
        (both the plain one's when ``hflip`` is 0: flipped posteriors are then never used).
    """
    folder = cfg.cache_path / "latents"
    store = TensorStore(folder)
    paths = sorted({p for item in items for p in (item.image, item.prior) if p is not None})
    flips = (0, 1) if cfg.hflip > 0 else (0, 0)
    keys = {p: tuple(latent_key(models.vae_id, p, cfg.resolution, f) for f in flips) for p in paths}
    todo = [p for p in paths if keys[p][0] not in store or keys[p][1] not in store]
    if todo:
        log.info("caching VAE latents of %d images in %s", len(todo), folder)
        vae = models.vae.to(device)

        def encoded():
            for start in range(0, len(todo), 32):
                chunk = todo[start:start + 32]
                x = torch.stack([load_canvas(p, cfg.resolution) for p in chunk]).to(device)
                plain = encode_posterior(vae, x, models.value_range)
                flipped = encode_posterior(vae, x.flip(-1), models.value_range) if cfg.hflip > 0 else None
                for i, p in enumerate(chunk):
                    yield keys[p][0], {"params": plain[i]}
                    if flipped is not None:
                        yield keys[p][1], {"params": flipped[i]}

        store.write(encoded())
    return folder, keys


class TextCache:
    """Frozen text-encoder states per text: in a TensorStore when caching, else computed each time."""

    def __init__(self, cfg: TrainConfig, models: Models, texts: list[str]) -> None:
        self.encoder = models.text_encoder
        self.spec = json.dumps(models.text_spec.__dict__ if models.text_spec else {}, sort_keys=True)
        self.store = TensorStore(cfg.cache_path / "text") if cfg.cache_text else None
        if self.store is not None:
            wanted = sorted(set(texts) | {flip_text(t) for t in texts} | {""})
            todo = [t for t in wanted if self._key(t) not in self.store]
            if todo:
                log.info("caching text states of %d texts in %s", len(todo), self.store.folder)

                def encoded():
                    for start in range(0, len(todo), 64):
                        chunk = todo[start:start + 64]
                        states, mask = self.encoder.encode(chunk)
                        for i, text in enumerate(chunk):
                            yield self._key(text), {"states": states[i], "mask": mask[i]}

                self.store.write(encoded())

    def _key(self, text: str) -> str:
        return content_key("text", self.spec, text)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states (B, L, W), mask (B, L))`` on the CPU."""
        if self.store is None:
            return self.encoder.encode(texts)
        rows = [self.store.get(self._key(t)) for t in texts]
        return torch.stack([r["states"] for r in rows]), torch.stack([r["mask"] for r in rows])


# -- losses ------------------------------------------------------------------------------------

def dropout_masks(batch: int, cfg: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructPix2Pix conditioning dropout: ``(drop_text, drop_image)`` bool ``(B,)``.

    One uniform draw per item: ``[0, p_t)`` drops the text, ``[p_t, p_t + p_b)`` both,
    ``[p_t + p_b, p_t + p_b + p_i)`` the image.
    """
    r = torch.rand(batch, generator=generator)
    text_only = r < cfg.drop_text
    both = (r >= cfg.drop_text) & (r < cfg.drop_text + cfg.drop_both)
    image_only = (r >= cfg.drop_text + cfg.drop_both) & (r < cfg.drop_text + cfg.drop_both + cfg.drop_image)
    return text_only | both, image_only | both


def diffusion_loss(trainee: torch.nn.Module, scheduler, target_latents: torch.Tensor, prior_latents: torch.Tensor | None,
                   states: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Diffusion MSE at a uniformly drawn timestep, against the scheduler's ``prediction_type``
    (the noise for ``epsilon``, ``sqrt(a) eps - sqrt(1 - a) z`` for ``v_prediction``).

    Args:
        target_latents: ``(B, C, h, w)`` scaled latents ``z``.
        prior_latents: ``(B, C, h, w)`` unscaled prior modes ``c_I`` (None: text-to-image).
        states, mask: text states ``(B, L, W)`` and mask ``(B, L)``, dropout already applied.
    """
    device = target_latents.device
    noise = torch.randn(target_latents.shape, generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (target_latents.shape[0],), generator=generator).to(device)
    noisy = scheduler.add_noise(target_latents, noise, t)  # sqrt(a_bar) z + sqrt(1 - a_bar) eps
    model_in = noisy if prior_latents is None else torch.cat([noisy, prior_latents], dim=1)  # (B, 2C, h, w)
    attention_mask = None if bool(mask.all()) else mask.to(device)
    pred = trainee(model_in, t, states.to(device), attention_mask)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(target_latents, noise, t)
    return F.mse_loss(pred.float(), target.float())


def sample_latents(params: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(B, 2C, h, w)`` -> ``(sample, mode)``, the sample drawn from ``generator``."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean + std * eps, mean


def vae_loss(model: torch.nn.Module, vae, images: torch.Tensor, value_range: tuple[float, float], kl_weight: float,
             generator: torch.Generator) -> torch.Tensor:
    """Stage 0: L1 reconstruction in model range + ``kl_weight`` x KL(q(z|x) || N(0, I)).

    Args:
        model: the (possibly DDP-wrapped) :class:`Trainee` holding ``vae``.
        vae: the bare VAE (for its config).
    """
    x = to_vae_channels(vae, to_model_range(images, value_range))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (x.shape[0], int(vae.config.latent_channels), x.shape[-2] // factor, x.shape[-1] // factor)
    noise = torch.randn(shape, generator=generator).to(x.device)
    recon, mean, logvar = model(x, noise)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    return F.l1_loss(recon.float(), x.float()) + kl_weight * kl


# -- the loop ---------------------------------------------------------------------------------------

def _mixed_precision(cfg: TrainConfig) -> str:
    if not torch.cuda.is_available():
        return "no"
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cfg.mixed_precision


class CsvLog:
    """``log.csv`` of a run; on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, start_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if path.is_file() and start_step > 0:
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        tmp = path.with_name(f".{path.name}.tmp")  # rewritten aside: a kill now keeps the old log
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        """Appends one row."""
        if self.enabled:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, LOG_FIELDS).writerow(row)


def fit(cfg: TrainConfig, *, stop_at_step: int | None = None, resume: str | os.PathLike[str] | None = None) -> Path:
    """Trains one stage; resumes from the run's latest checkpoint when there is one.

    The checkpoint is verified against its manifest before anything is built. A corrupt latest
    checkpoint stops the run with a :class:`CheckpointError` that names the newest intact
    earlier one; training never silently falls back to it. Pass that one as ``resume`` (it
    becomes ``latest``; the later checkpoints are removed at the next checkpoint), or delete
    the corrupt folder (the run then resumes from the newest one left, with a warning).
    Leftovers of a checkpoint write cut short by a kill are removed first.

    Args:
        cfg: the validated config.
        stop_at_step: raise :class:`TrainingInterrupted` right after this step (tests of resume).
        resume: a checkpoint folder of this run to continue from instead of the latest.

    Returns:
        The run folder (``cfg.out_dir``).

    Raises:
        CheckpointError: the checkpoint to resume from is corrupt or incomplete.
        InputError: bad data or config (message says what to change).
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    # 1. Set-up: processes, output folder, networks, data.
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), gradient_accumulation_steps=cfg.grad_accum)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out_dir = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_durably(out_dir / ".config.json.tmp", json.dumps(cfg.to_dict(), indent=2))
        os.replace(out_dir / ".config.json.tmp", out_dir / "config.json")
        clean_incomplete(out_dir)
    resume_path, ckpt = resume_checkpoint(out_dir, resume)  # fails here, before anything is built
    if resume is not None and accelerator.is_main_process:
        later = [p.name for p in _checkpoint_folders(out_dir / CHECKPOINTS)
                 if checkpoint_step(p) > checkpoint_step(resume_path)]
        _point_latest(out_dir / CHECKPOINTS, resume_path.name)
        if later:
            log.warning("resuming from %s: the later checkpoint(s) %s are removed at the next checkpoint",
                        resume_path.name, ", ".join(later))
    with accelerator.main_process_first():
        if cfg.simulate and not Path(cfg.manifest).is_file() and accelerator.is_main_process:
            simulate_data(cfg)
    models = build_models(cfg)
    items = load_config_items(cfg)
    scheduler = DDPMScheduler.from_config(models.scheduler_config)

    # 2. Caches (frozen encoders; distill: the teacher's results), built once by the main process.
    use_latent_cache = cfg.cache_latents and cfg.stage not in ("vae", "distill")
    with accelerator.main_process_first():
        if cfg.stage == "distill":
            from train.distill import DistillDataset, build_teacher_results, draws

            run_draws = draws(cfg, items)
            texts = TextCache(cfg, models, [d.text for d in run_draws])
            build_teacher_results(cfg, models, run_draws, texts, models.teacher_digest, device)
            dataset = DistillDataset(run_draws, cfg.cache_path, models.vae_id, models.teacher_digest, cfg)
            models.teacher = None  # frees the teacher: the student learns from its cached results
        elif use_latent_cache:
            if cfg.crop_scale < 1:
                log.info("crop_scale ignored: random crops are off when latents are cached")
            latent_folder, latent_keys = build_latent_cache(cfg, models, items, device)
            dataset = CachedDataset(items, latent_folder, latent_keys)
        else:
            dataset = ImageDataset(items, cfg.resolution)
        if cfg.stage != "distill":
            texts = TextCache(cfg, models, [item.text for item in items]) if models.text_encoder is not None else None
    if models.text_encoder is not None:
        models.text_encoder.to(device)
    null_states, null_mask = texts([""]) if texts is not None else (None, None)
    models.vae.to(device)

    # 3. Trained module, optimizer, EMA; resume if a checkpoint exists.
    trainee = Trainee(models, cfg.train_projection, models.position_channels, cfg.train_unet).to(device)
    if cfg.stage == "vae":
        trainee.vae.requires_grad_(True).train()
    else:
        trainee.unet.train()
    if cfg.gradient_checkpointing:
        (trainee.vae if cfg.stage == "vae" else trainee.unet).enable_gradient_checkpointing()
    params = trainable(trainee)
    optimizer = make_optimizer(params, cfg, device)
    ema = EMA(params, cfg.ema_decay) if cfg.ema else None
    start_step = 0
    if ckpt is not None:
        trainee.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None and ckpt["ema"] is not None:
            ema.shadow = {k: v.to(device) for k, v in ckpt["ema"].items()}
            ema.updates = int(ckpt["state"].get("ema_updates", 0))
        start_step = int(ckpt["state"]["step"])
        if accelerator.is_main_process:
            log.info("resuming %s from %s (step %d)", out_dir, resume_path.name, start_step)
            if (note := thread_change_note(ckpt["state"], resume_path.name)) is not None:
                log.warning("%s", note)
        ckpt = None  # frees the loaded tensors
    if ema is not None:
        ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    model, optimizer = accelerator.prepare(trainee, optimizer)
    dummy_prior = None
    if cfg.stage == "stage1":  # BiomedJourney's stage-1 prior: a constant mid-grey image, encoded
        grey = torch.full((1, 1, cfg.resolution, cfg.resolution), cfg.dummy_prior, device=device)
        dummy_prior = encode_posterior(models.vae, grey, models.value_range).chunk(2, dim=1)[0]

    # 4. Data order: batch k is a pure function of (seed, k, rank), so resuming needs only the step.
    sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, rank, world, start=start_step * cfg.grad_accum)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    batches = iter(loader)
    csv_log = CsvLog(out_dir / "log.csv", start_step, accelerator.is_main_process)
    board = _tensorboard(cfg, out_dir) if accelerator.is_main_process else None
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.name} {cfg.stage}", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    started, window_loss, window_steps, window_start = time.perf_counter(), 0.0, 0, time.perf_counter()
    step = start_step

    # 5. The loop.
    while step < cfg.steps:
        torch.manual_seed(derive_seed(cfg.seed, "global", step, rank))  # for anything that draws from the global RNG
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "step", step, micro, rank))
            with accelerator.accumulate(model), accelerator.autocast():
                loss = _stage_loss(cfg, models, model, scheduler, texts, null_states, null_mask, dummy_prior,
                                   batch, use_latent_cache, gen, device)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += float(loss.detach()) / cfg.grad_accum
        step += 1
        if ema is not None:
            ema.update(params)
        window_steps += 1
        bar.update()

        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_value = float(accelerator.reduce(torch.tensor(window_loss / window_steps, device=device), "mean"))
            seconds = time.perf_counter() - window_start
            row = {"step": step, "epoch": sampler.position(step * cfg.grad_accum)["epoch"], "loss": f"{loss_value:.6f}",
                   "lr": f"{lr:.3g}", "images_per_s": f"{window_steps * cfg.grad_accum * cfg.batch_size * world / seconds:.2f}",
                   "elapsed_s": f"{time.perf_counter() - started:.1f}"}
            csv_log.write(row)
            if board is not None:
                board.add_scalar("loss", loss_value, step)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out_dir, step, accelerator.unwrap_model(model), optimizer, ema, cfg,
                                {"data": sampler.position(step * cfg.grad_accum), "world": world,
                                 "vae_id": models.vae_id, "items": len(dataset), "threads": cpu_threads(),
                                 "teacher": models.teacher_digest,
                                 "resumed_from": resume_path.name if resume_path else None}, cfg.keep_checkpoints)
        if stop_at_step is not None and step == stop_at_step:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {step}")
    bar.close()
    if board is not None:
        board.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


def _stage_loss(cfg: TrainConfig, models: Models, model: torch.nn.Module, scheduler, texts, null_states, null_mask,
                dummy_prior, batch: dict[str, Any], cached: bool, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """One micro-batch's loss for the config's stage: augmentation, conditioning, dropout, loss."""
    if cfg.stage == "distill":
        from train.distill import distill_loss

        return distill_loss(cfg, models, model, texts, batch, gen, device)
    if cfg.stage == "vae":
        images = batch["image"].to(device)
        (images,), _, _ = augment([images], [""] * images.shape[0], hflip=cfg.hflip, crop_scale=cfg.crop_scale, generator=gen)
        return vae_loss(model, models.vae, images, models.value_range, cfg.kl_weight, gen)

    text = list(batch["text"])
    if cached:  # pick the plain or flipped posterior of each item
        flipped = torch.rand(len(text), generator=gen) < cfg.hflip
        choose = flipped.long()
        target_params = batch["image_params"][torch.arange(len(text)), choose].to(device)
        prior_params = batch["prior_params"][torch.arange(len(text)), choose].to(device) if "prior_params" in batch else None
        text = [flip_text(t) if f else t for t, f in zip(text, flipped.tolist())]
    else:
        images = [batch["image"].to(device)] + ([batch["prior"].to(device)] if "prior" in batch else [])
        images, text, _ = augment(images, text, hflip=cfg.hflip, crop_scale=cfg.crop_scale, generator=gen)
        with torch.no_grad():
            target_params = encode_posterior(models.vae, images[0], models.value_range)
            prior_params = encode_posterior(models.vae, images[1], models.value_range) if len(images) > 1 else None

    sampled, mode = sample_latents(target_params, gen)  # draw either way: the random stream stays the same
    latents = sampled if cfg.latent_sample else mode
    states, mask = texts(text)
    drop_text, drop_image = dropout_masks(len(text), cfg, gen)
    states = torch.where(drop_text[:, None, None], null_states.expand_as(states), states)
    mask = torch.where(drop_text[:, None], null_mask.expand_as(mask), mask)
    prior = None
    if models.method == "instruct":
        if cfg.stage == "stage1":
            prior = dummy_prior.expand_as(latents)
        else:
            prior = prior_params.chunk(2, dim=1)[0]  # the posterior mode, unscaled (InstructPix2Pix)
        if cfg.instruct_target == "change":  # the change from the prior, even when the prior is dropped
            latents = (latents - prior) * cfg.change_scaling
        prior = torch.where(drop_image[:, None, None, None].to(device), torch.zeros_like(prior), prior)
    return diffusion_loss(model, scheduler, latents * models.latent_scaling, prior, states, mask, gen)


def simulate_data(cfg: TrainConfig) -> None:
    """Writes a simulated data set into the manifest's folder (``cfg.simulate`` patients)."""
    from train.simulator.writer import SimulationConfig, write_dataset

    folder = Path(cfg.manifest).parent
    log.info("simulating %d patients into %s", cfg.simulate, folder)
    write_dataset(SimulationConfig(out=str(folder), patients=cfg.simulate, visits=4,
                                   size=max(128, cfg.resolution), seed=cfg.seed))


def _tensorboard(cfg: TrainConfig, out_dir: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise InputError("tensorboard=true needs the tensorboard package (`pip install tensorboard`)") from exc
    return SummaryWriter(str(out_dir / "tensorboard"))


# -- command line ------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    """Adds ``fit``: ``--config FILE`` plus one ``--key=value`` option per config field."""
    import typing
    from dataclasses import fields

    p = subparsers.add_parser("fit", help="train a stage (vae, stage1, stage2, prism) from a config",
                              description="Trains one stage; resumes from the run's latest checkpoint. "
                                          "Every config key can be overridden as --key=value. "
                                          "Multi-GPU: accelerate launch -m train fit --config FILE.")
    p.add_argument("--config", default=None, help="YAML/JSON config (see train/configs/)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="a checkpoint folder of this run to continue from instead of the latest "
                        "(e.g. an earlier one when the latest is corrupt; later ones are then removed)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name}", dest=f"override_{f.name}", default=None, metavar=hints[f.name].__name__.upper() if isinstance(hints[f.name], type) else "VALUE",
                       help=argparse_help(f.name))


def argparse_help(name: str) -> str:
    """One line of help per config key, from :class:`TrainConfig`'s docstring."""
    doc = TrainConfig.__doc__ or ""
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(f"{name}:") or stripped.startswith(f"{name},"):
            return stripped.split(":", 1)[1].strip()
    return "see TrainConfig"


def run(args) -> int:
    """Runs ``fit``."""
    from train.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k.removeprefix("override_"): v for k, v in vars(args).items() if k.startswith("override_") and v is not None}
    cfg = load_config(args.config, overrides)
    out = fit(cfg, resume=args.resume)
    final = latest_checkpoint(out)
    state = json.loads((final / "state.json").read_text()) if final is not None else {}
    print(json.dumps({"run": str(out), "checkpoint": str(final), "resumed_from": state.get("resumed_from")}))
    return 0
