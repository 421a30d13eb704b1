"""Export a training run to the engine's model folder (``python -m train export``).

The EMA weights (or the raw ones, ``--no-ema``) of a checkpoint are written with
:func:`engine.checkpoint.save_model`, with a ``card.json`` filled from the run: method,
resolution, text encoder, the data sets and their licenses (from the manifest's sources),
steps, the config, metrics when ``<run>/metrics.json`` exists, and the vocabulary of the
instructions it was trained on (the simulator's; :func:`card_vocabulary`). Stage 0
(VAE) runs export a ``vae/`` folder that later stages use through ``vae_from``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import RESEARCH_USE, ModelCard, TextEncoderSpec, save_model
from engine.errors import InputError
from train.config import config_from_dict

log = logging.getLogger(__name__)


def source_names(manifest: str | os.PathLike[str], stage: str) -> set[str]:
    """The sources a manifest's pairs (stage 2) or images come from (``{"unknown"}`` without it)."""
    from train.manifest import read_images, read_pairs

    path = Path(manifest)
    if not path.is_file():
        return {"unknown"}
    if stage == "stage2":
        names = {p.extra.get("source") for p in read_pairs(path)}
        if None in names:  # pairs without a source (the simulator's): use the images next to them
            names.discard(None)
            images = path.parent / "images.jsonl"
            names |= {r.source for r in read_images(images)} if images.is_file() else {"unknown"}
        return names
    return {r.source for r in read_images(path)}


def training_data(manifest: str | os.PathLike[str], stage: str, fallback_license: str | None) -> tuple[dict[str, str], ...]:
    """The card's ``training_data`` entries: one per source named in the manifest."""
    from train.sources import SOURCES

    path = Path(manifest)
    if not path.is_file():
        return ({"name": str(path.name), "license": fallback_license or "unknown"},)
    entries = []
    for name in sorted(source_names(path, stage)):
        key = "simulated" if name in ("simulator", "simulated") else name
        if key == "real-anatomy":
            entries.extend(real_anatomy_entries(path.parent, fallback_license))
        elif key in SOURCES and SOURCES[key].license != "as given by the data owner":
            entries.append(SOURCES[key].card_entry())
        else:
            entries.append({"name": name, "license": fallback_license or "unknown (set data_license in the config)",
                            "attribution": ""})
    return tuple(entries)


SIMULATOR_TEXT_SOURCES = frozenset({"simulator", "simulated", "real-anatomy"})
"""Pair sources whose instructions the simulator wrote (simulated pairs, and real-anatomy pairs:
the simulator's findings and devices rendered on real films, described by the same text functions)."""


def card_vocabulary(manifests: tuple[str, ...], stage: str) -> dict[str, list[str]]:
    """``card.json["vocabulary"]`` for a model trained on ``manifests``.

    A model trained only on pairs whose instructions the simulator wrote
    (:data:`SIMULATOR_TEXT_SOURCES`) read only the simulator's words, whose vocabulary is derived
    from its text functions (:func:`train.simulator.vocabulary.instruction_vocabulary`); the
    workstation warns when an instruction falls outside it. For any other data the vocabulary is
    not known here, and the card gets none (no warning rather than a wrong one).
    """
    names = set().union(*(source_names(m, stage) for m in manifests)) if manifests else set()
    if not names or not names <= SIMULATOR_TEXT_SOURCES:
        log.info("no instruction vocabulary on the card: trained on %s, not the simulator's instructions alone",
                 ", ".join(sorted(names - SIMULATOR_TEXT_SOURCES)) or "unknown data")
        return {}
    from train.simulator.vocabulary import instruction_vocabulary

    return instruction_vocabulary()


def real_anatomy_entries(folder: Path, fallback_license: str | None) -> list[dict[str, str]]:
    """Card entries of a real-anatomy folder (``simulate --on-films``): the films' source, the lung
    masks' source and the renderer, each with its licence."""
    from train.sources import SOURCES
    from train.sources.v7masks import ATTRIBUTION as V7_ATTRIBUTION
    from train.sources.v7masks import LICENSE as V7_LICENSE

    info_file = folder / "simulation.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("film_source") == "hannover":
        films = {**SOURCES["hannover"].card_entry(), "name": "hannover (real films of training patients, "
                 "with the simulator's findings and devices rendered on them)"}
    else:
        films = {"name": f"real films ({info.get('settings', {}).get('films', folder.name)}) with rendered findings",
                 "license": fallback_license or "unknown (set data_license in the config)", "attribution": ""}
    entries = [films]
    if "v7" in info.get("mask_sources", []):
        entries.append({"name": "V7 Labs lung masks", "license": V7_LICENSE, "attribution": V7_ATTRIBUTION})
    if "segmenter" in info.get("mask_sources", []):
        entries.append({"name": "lung masks from the bundled segmenter (trained on V7 masks and simulated images)",
                        "license": "MIT", "attribution": "CXR Journey"})
    return entries


@torch.no_grad()
def _latent_std(vae, manifest: str, resolution: int, limit: int = 64) -> float:
    """Std of the VAE's posterior means over up to ``limit`` manifest images (for ``latent_scaling``)."""
    from train.data import load_canvas, load_items
    from train.fit import encode_posterior

    items = load_items(manifest, "vae", ("train", "validate", "test"))[:limit]
    x = torch.stack([load_canvas(i.image, resolution) for i in items])
    mean = encode_posterior(vae, x, (-1.0, 1.0)).chunk(2, dim=1)[0]
    return float(mean.std())


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    checkpoint: str | None = None,
    use_ema: bool = True,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a run's checkpoint as a model folder.

    Args:
        run_dir: the run (``out_dir`` of its config).
        out: destination model folder.
        checkpoint: checkpoint folder name (default: the latest).
        use_ema: export the EMA weights (when the run kept them).
        name: model name for the card (default: the config's).
        overwrite: replace an existing folder.

    Raises:
        InputError: no checkpoint, a corrupt one (``CheckpointError``, checked against its manifest),
            or ``out`` exists without ``overwrite``.
    """
    from diffusers import DDIMScheduler

    from train.fit import CHECKPOINTS, CheckpointError, Trainee, earlier_intact, latest_checkpoint, load_checkpoint
    from train.models import build_models

    run_dir, out = Path(run_dir), Path(out)
    path = run_dir / CHECKPOINTS / checkpoint if checkpoint else latest_checkpoint(run_dir)
    if path is None or not path.is_dir():
        raise InputError(f"{run_dir} has no checkpoint to export; train it with `python -m train fit` first")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        earlier = earlier_intact(path)
        hint = (f"delete it or export an earlier one with --checkpoint {earlier.name}" if earlier is not None
                else "no earlier checkpoint is intact")
        raise CheckpointError(path, exc.problem, hint) from None
    cfg = config_from_dict(ckpt["state"]["config"], where=str(path / "state.json"))
    if out.exists() and not overwrite and cfg.stage != "distill":  # a student goes into an existing folder
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    models = build_models(cfg)
    trainee = Trainee(models, cfg.train_projection, models.position_channels, cfg.train_unet)
    trainee.load_state_dict(ckpt["model"])
    used_ema = use_ema and ckpt["ema"] is not None
    if used_ema:
        params = dict(trainee.named_parameters())
        for key, value in ckpt["ema"].items():
            params[key].data.copy_(value)
    step = int(ckpt["state"]["step"])

    if cfg.stage == "distill":
        teacher = ckpt["state"].get("teacher") or models.teacher_digest  # the teacher it learned from
        return _export_student(cfg, models, teacher, run_dir, path, step, used_ema, out, overwrite)
    if cfg.stage == "vae":
        vae = models.vae
        vae.register_to_config(scaling_factor=round(1.0 / max(_latent_std(vae, cfg.manifest, cfg.resolution), 1e-6), 5))
        if out.exists():
            shutil.rmtree(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
        vae.save_pretrained(tmp / "vae", safe_serialization=True, max_shard_size="14MB")
        (tmp / "train_info.json").write_text(json.dumps({"stage": "vae", "step": step, "ema": used_ema,
                                                         "config": cfg.to_dict()}, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
        return out

    spec: TextEncoderSpec = models.text_spec
    encoder_folder = None
    staging = None
    if models.text_encoder_folder is not None:  # the encoder lived inside the init model: ship it along
        encoder_folder, spec = models.text_encoder_folder, TextEncoderSpec(spec.backend, "text_encoder", spec.max_tokens)
    elif spec.backend == "clip" and Path(spec.source).is_dir():  # an SD folder's CLIP: copy encoder + tokenizer
        staging = Path(tempfile.mkdtemp(prefix=".clip-"))
        for part in ("text_encoder", "tokenizer"):
            shutil.copytree(Path(spec.source) / part, staging / part)
        encoder_folder, spec = staging, TextEncoderSpec("clip", "text_encoder", spec.max_tokens)
    metrics_file = run_dir / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    card = ModelCard(
        name=name or cfg.name,
        method=models.method,
        resolution=cfg.resolution,
        text_encoder=spec,
        latent_scaling=models.latent_scaling,
        instruct_target=cfg.instruct_target if models.method == "instruct" else "latent",
        change_scaling=cfg.change_scaling if models.method == "instruct" and cfg.instruct_target == "change" else 1.0,
        position_channels=cfg.position_channels if models.method == "instruct" else 0,
        change_gate=(tuple(cfg.change_gate) if cfg.change_gate and models.method == "instruct"
                     and cfg.instruct_target == "change" else None),
        value_range=tuple(models.value_range),
        intended_use=RESEARCH_USE,
        training_data=tuple({json.dumps(entry, sort_keys=True): entry for manifest in cfg.manifests
                             for entry in training_data(manifest, cfg.stage, cfg.data_license)}.values()),
        license=str(cfg.extra.get("license", "Research use only; the training data's licenses apply")),
        metrics=metrics,
        description=str(cfg.extra.get("description", f"{cfg.stage} model trained with `python -m train fit`")),
        extra={"stage": cfg.stage, "steps": step, "ema": used_ema, "checkpoint": path.name,
               "arch": cfg.arch if not cfg.init_from else f"from {cfg.init_from}", "config": cfg.to_dict()},
        vocabulary=card_vocabulary(cfg.manifests, cfg.stage),
    )
    try:
        save_model(out, card=card, vae=models.vae, unet=models.unet,
                   scheduler=DDIMScheduler.from_config(models.scheduler_config),
                   text_projection=models.projection, text_encoder_folder=encoder_folder,
                   vae_files=models.vae_notices, overwrite=overwrite)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _export_student(cfg: Any, models: Any, teacher_digest: str, run_dir: Path, checkpoint: Path, step: int,
                    used_ema: bool, out: Path, overwrite: bool) -> Path:
    """A distill run's student into a teacher folder as ``unet_fast/`` (:func:`engine.checkpoint.add_fast_sampler`).

    ``out`` is the teacher's folder itself (the student goes beside the teacher), or a new
    folder, which starts as a copy of the teacher (``init_from``). A folder holding another
    teacher is refused.
    """
    from engine.checkpoint import FastSampler, add_fast_sampler
    from train.distill import fast_sampler_card

    teacher = Path(cfg.init_from)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        shutil.rmtree(tmp)
        shutil.copytree(teacher, tmp, ignore=shutil.ignore_patterns("unet_fast"))
        card_path = tmp / "card.json"
        card = json.loads(card_path.read_text())
        card.pop("fast_sampler", None)
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out)
    spec = FastSampler.from_dict(fast_sampler_card(cfg, models, teacher_digest, run=str(run_dir),
                                                   checkpoint=checkpoint.name, step=step, ema=used_ema))
    student = models.unet.to(torch.float16) if cfg.student_dtype == "float16" else models.unet
    return add_fast_sampler(out, student, spec, overwrite=overwrite)


def add_parser(subparsers) -> None:
    """Adds ``export``."""
    p = subparsers.add_parser("export", help="write a run's EMA weights as an engine model folder",
                              description="Exports a checkpoint of a `python -m train fit` run to a model folder "
                                          "(card.json filled from the run) that `python -m engine` loads.")
    p.add_argument("--run", required=True, help="the run folder (the config's out_dir)")
    p.add_argument("--out", required=True, help="model folder to write (a distill run: the teacher's folder, where "
                                                "the student goes beside it as unet_fast/, or a new copy of it)")
    p.add_argument("--checkpoint", default=None, help="checkpoint name, e.g. step-0001000 (default: latest)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--name", default=None, help="model name for the card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")


def run(args) -> int:
    """Runs ``export``."""
    out = export_run(args.run, args.out, checkpoint=args.checkpoint, use_ema=not args.no_ema, name=args.name,
                     overwrite=args.overwrite)
    print(json.dumps({"model": str(out)}))
    return 0
