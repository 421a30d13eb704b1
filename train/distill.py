"""``stage: distill``: a few-step student of an instruct model, trained from the model itself.

    python -m train fit --config train/configs/distill-journey-mini.yaml
    python -m train export --run runs/distill-journey-mini --out assets/models/journey-mini

The teacher is ``init_from`` (an instruct model folder). The student (:func:`student_from_teacher`)
starts as a copy of the teacher's UNet with one more input: the two guidance scales, through
diffusers' ``time_cond_proj_dim`` (:func:`engine.fast.guidance_embedding`), whose projection
starts at zero, so step 0 is the teacher's conditional branch. Training has two phases, both in
the trainer's loop (checkpoints, resume, EMA, ``accelerate launch``):

1. **Teacher results** (:func:`build_teacher_results`, once, cached and resumable like the
   latent cache): ``distill_samples`` draws of (pair of the manifests, seed, text and image
   guidance), each run through the teacher's full sampler (``teacher_steps`` DDIM steps, three
   guidance branches, the engine's own :func:`engine.instruct.sample_instruct`); the result
   latent is stored.
2. **Student** (:func:`distill_loss`): for a draw with start noise ``z`` (regenerated from its
   seed exactly as the engine draws it) and teacher result ``x_f``, a timestep ``t`` of the
   teacher's grid (half the time one of the fast grid's, ``fast_steps``), the point
   ``x_t`` of the straight path through ``z`` and ``x_f`` and the ``v`` that moves along it
   (:func:`engine.fast.endpoints`, :func:`engine.fast.path_point`); loss ``|| v_student - v ||^2``
   with the text, the prior and the guidance scales as inputs. The target is the ``v`` whose
   clean estimate is the teacher's endpoint ``X``, ``v = (sqrt(a) x_t - X) / sqrt(1 - a)``, which on
   the path is the path's own ``v``. A share of the items (``rollout_share``) at a later fast-grid
   timestep takes its state from the student's *own* steps from ``z`` instead (no gradient
   through them), with the same target: at sampling time the student's second step sees its
   first step's (imperfect) result, never the teacher's path, so it must learn to move from
   there to the teacher's result (the exposure bias of training only on the teacher's states;
   the DAgger remedy). Learned on journey-mini v7: the teacher's result depends on the start
   noise as much as on the instruction (two seeds differ by about as much as the edit itself),
   so a student that only saw the teacher's path made weaker edits (60-70 % of the change).

The export (``python -m train export`` on the run) writes the EMA student into the teacher's
folder as ``unet_fast/`` and describes it in ``card.json["fast_sampler"]``
(:func:`engine.checkpoint.add_fast_sampler`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.fast import ddim_jump, endpoints, fast_timesteps, guidance_embedding, path_point
from engine.instruct import initial_noise, make_scheduler, sample_instruct
from engine.text import project
from train.config import TrainConfig
from train.data import Item, TensorStore, content_key, derive_seed

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = (7.5, 1.5)
"""The engine's default (text, image) guidance: a share of the draws use exactly these."""


def student_from_teacher(unet: Any, guidance_dim: int) -> Any:
    """A copy of ``unet`` that also takes the guidance embedding (``time_cond_proj_dim = 2 * guidance_dim``).

    Every teacher weight is copied; the new ``time_embedding.cond_proj`` starts at zero, so the
    student starts as the teacher's conditional (text and prior) branch.
    """
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = 2 * guidance_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student if student.dtype == unet.dtype else student.to(unet.dtype)


def teacher_timesteps(scheduler_config: dict[str, Any], steps: int) -> list[int]:
    """The teacher's DDIM timesteps at ``steps`` steps (what the engine's full sampler runs)."""
    scheduler = make_scheduler("ddim", scheduler_config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def schedule(scheduler_config: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """``(alphas_cumprod, final_alpha)`` of the model's DDIM schedule."""
    scheduler = make_scheduler("ddim", scheduler_config)
    return scheduler.alphas_cumprod.clone().float(), float(scheduler.final_alpha_cumprod)


@dataclass(frozen=True)
class Draw:
    """One teacher sample: which pair, which seed, which guidance (a pure function of the run seed and its number)."""

    number: int
    prior: str
    text: str
    seed: int
    text_guidance: float
    image_guidance: float


def draws(cfg: TrainConfig, items: list[Item]) -> list[Draw]:
    """The run's ``distill_samples`` draws: pairs in a seeded order per pass over the data, a seed
    each, and guidance scales uniform in the configured ranges (``default_guidance_share`` of them
    at the engine's defaults, 7.5 and 1.5). Rounded to 0.01 so cache keys are stable."""
    n = len(items)
    out, perm, epoch = [], None, -1
    (tl, th), (il, ih) = cfg.text_guidance_range, cfg.image_guidance_range
    for i in range(cfg.distill_samples):
        e, j = divmod(i, n)
        if e != epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "distill-items", e)))
            epoch = e
        item = items[int(perm[j])]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "distill-guidance", i))
        u = torch.rand(3, generator=gen).tolist()
        if u[0] < cfg.default_guidance_share:
            text_g, image_g = DEFAULT_GUIDANCE
        else:
            text_g, image_g = round(tl + (th - tl) * u[1], 2), round(il + (ih - il) * u[2], 2)
        out.append(Draw(i, item.prior, item.text, derive_seed(cfg.seed, "distill-seed", i) % 2**31, text_g, image_g))
    return out


def draw_key(teacher: str, cfg: TrainConfig, draw: Draw) -> str:
    """The teacher result's cache key: the teacher, its steps, and everything the draw fixes."""
    return content_key("distill", teacher, cfg.resolution, cfg.teacher_steps, draw.prior, os.path.getmtime(draw.prior),
                       draw.text, draw.seed, draw.text_guidance, draw.image_guidance)


def prior_key(vae_id: str, path: str, resolution: int) -> str:
    return content_key("prior", vae_id, path, os.path.getmtime(path), resolution)


def _reuse_fit_latents(cfg: TrainConfig, vae_id: str, paths: list[str], priors: TensorStore) -> list[str]:
    """Copies into ``priors`` the latents of ``paths`` that the teacher's own run already encoded
    (``<cache_dir>/latents``, the fit stage's store, when the distill config shares the teacher's
    ``cache_dir``): the same autoencoder, file and resolution give the same posterior, whose mode is
    its first half. Returns the paths still to encode."""
    from train.fit import latent_key

    fit = TensorStore(cfg.cache_path / "latents")
    found = [p for p in paths if latent_key(vae_id, p, cfg.resolution) in fit]
    if found:
        log.info("reusing %d prior latents from the teacher's latent cache %s", len(found), fit.folder)
        priors.write((prior_key(vae_id, p, cfg.resolution),
                      {"latent": fit.get(latent_key(vae_id, p, cfg.resolution))["params"].chunk(2, dim=0)[0].clone()})
                     for p in found)
    done = set(found)
    return [p for p in paths if p not in done]


@torch.no_grad()
def build_teacher_results(cfg: TrainConfig, models: Any, all_draws: list[Draw], texts: Any, teacher: str,
                          device: torch.device) -> TensorStore:
    """Runs the teacher on every draw not yet in the cache (``<cache>/distill``); resumable.

    Prior latents (the VAE's posterior modes, unscaled) go to ``<cache>/priors``. Both stores
    write shard by shard, so a killed build continues where it stopped. Logs progress with an
    estimate of the time left.
    """
    from train.data import load_canvas
    from train.fit import encode_posterior

    priors = TensorStore(cfg.cache_path / "priors")
    paths = sorted({d.prior for d in all_draws if prior_key(models.vae_id, d.prior, cfg.resolution) not in priors})
    paths = _reuse_fit_latents(cfg, models.vae_id, paths, priors)
    if paths:
        log.info("caching prior latents of %d images in %s", len(paths), priors.folder)
        vae = models.vae.to(device)

        def encoded():
            for start in range(0, len(paths), 32):
                chunk = paths[start:start + 32]
                x = torch.stack([load_canvas(p, cfg.resolution) for p in chunk]).to(device)
                modes = encode_posterior(vae, x, models.value_range).chunk(2, dim=1)[0]
                for p, mode in zip(chunk, modes):
                    yield prior_key(models.vae_id, p, cfg.resolution), {"latent": mode}

        priors.write(encoded())
    priors = TensorStore(priors.folder)

    store = TensorStore(cfg.cache_path / "distill")
    todo = [d for d in all_draws if draw_key(teacher, cfg, d) not in store]
    if not todo:
        return store
    log.info("running the teacher (%d DDIM steps, 3 guidance branches) on %d of %d draws into %s",
             cfg.teacher_steps, len(todo), len(all_draws), store.folder)
    unet, projection = models.teacher.to(device), models.projection.to(device) if models.projection else None
    null_states, null_mask = texts([""])
    null = project(null_states.to(device), projection)
    started = time.perf_counter()

    def results():
        for start in range(0, len(todo), cfg.teacher_batch):
            chunk = todo[start:start + cfg.teacher_batch]
            prior = torch.stack([priors.get(prior_key(models.vae_id, d.prior, cfg.resolution))["latent"]
                                 for d in chunk]).to(device)
            states, mask = texts([d.text for d in chunk])
            latents = sample_instruct(
                unet, make_scheduler("ddim", models.scheduler_config), prior, project(states.to(device), projection),
                mask.to(device), null, null_mask.to(device),
                text_scale=torch.tensor([d.text_guidance for d in chunk]),
                image_scale=torch.tensor([d.image_guidance for d in chunk]), steps=cfg.teacher_steps,
                generators=[torch.Generator("cpu").manual_seed(d.seed) for d in chunk],
                position_channels=models.position_channels,
            )
            done = start + len(chunk)
            rate = done / (time.perf_counter() - started)
            if done == len(todo) or (start // cfg.teacher_batch) % max(1, 200 // cfg.teacher_batch) == 0:
                log.info("teacher results %d/%d (%.2f/s, about %.0f s left)", done, len(todo), rate,
                         (len(todo) - done) / rate)
            for d, latent in zip(chunk, latents):
                yield draw_key(teacher, cfg, d), {"result": latent.float()}

    store.write(results(), shard_items=128)
    return TensorStore(store.folder)


class DistillDataset(torch.utils.data.Dataset):
    """Draws with their cached prior latent and teacher result.

    Returns ``{"index", "text", "prior" (C, h, w), "result" (C, h, w), "seed", "text_guidance",
    "image_guidance"}``.
    """

    def __init__(self, all_draws: list[Draw], cache: Path, vae_id: str, teacher: str, cfg: TrainConfig) -> None:
        self.draws = all_draws
        self.cache, self.vae_id, self.teacher, self.cfg = cache, vae_id, teacher, cfg
        self._stores: tuple[TensorStore, TensorStore] | None = None

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, index: int) -> dict[str, object]:
        if self._stores is None:  # opened per worker process
            self._stores = (TensorStore(self.cache / "priors"), TensorStore(self.cache / "distill"))
        priors, results = self._stores
        d = self.draws[index]
        return {"index": index, "text": d.text,
                "prior": priors.get(prior_key(self.vae_id, d.prior, self.cfg.resolution))["latent"],
                "result": results.get(draw_key(self.teacher, self.cfg, d))["result"],
                "seed": torch.tensor(d.seed), "text_guidance": torch.tensor(d.text_guidance),
                "image_guidance": torch.tensor(d.image_guidance)}


def distill_loss(cfg: TrainConfig, models: Any, model: torch.nn.Module, texts: Any, batch: dict[str, Any],
                 gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """One micro-batch of the student's loss (module docstring, phase 2)."""
    result = batch["result"].to(device)
    n = len(result)
    shape = (1, *result.shape[1:])
    z = torch.cat([initial_noise(shape, [torch.Generator("cpu").manual_seed(int(s))], dtype=torch.float32,
                                 device=device) for s in batch["seed"]])  # the engine's own start noise
    grid = models.teacher_timesteps
    fast = fast_timesteps(grid, cfg.fast_steps)
    pick_fast = torch.rand(n, generator=gen) < cfg.fast_grid_share
    fast_index = torch.randint(0, len(fast), (n,), generator=gen)
    from_all = torch.tensor(grid)[torch.randint(0, len(grid), (n,), generator=gen)]
    t = torch.where(pick_fast, torch.tensor(fast)[fast_index], from_all)
    rollout = pick_fast & (fast_index > 0) & (torch.rand(n, generator=gen) < cfg.rollout_share)
    alphas, final_alpha = models.schedule
    clean, noise = endpoints(z, result, alphas[grid[0]], final_alpha)
    x_t, _ = path_point(clean, noise, alphas[t].to(device))
    states, mask = texts(list(batch["text"]))
    states, prior = states.to(device), batch["prior"].to(device)
    cond = guidance_embedding(batch["text_guidance"], batch["image_guidance"], cfg.guidance_dim).to(device)
    attention_mask = None if bool(mask.all()) else mask.to(device)
    if bool(rollout.any()):  # the student's own first steps from z, as it samples (no gradient)
        x = z.clone()
        with torch.no_grad():
            for k in range(int(fast_index[rollout].max())):
                step = torch.full((n,), fast[k])
                v_k = model(torch.cat([x, prior], dim=1), step.to(device), states, attention_mask, cond=cond)
                x = ddim_jump(x, v_k.float(), alphas[fast[k]].to(device), alphas[fast[k + 1]].to(device))
                arrived = (rollout & (fast_index == k + 1)).to(device)[:, None, None, None]
                x_t = torch.where(arrived, x, x_t)
    a = alphas[t].to(device).reshape(-1, 1, 1, 1)
    v = (a.sqrt() * x_t - clean) / (1 - a).sqrt()  # the move whose clean estimate is the teacher's endpoint
    pred = model(torch.cat([x_t, prior], dim=1), t.to(device), states, attention_mask, cond=cond)
    return F.mse_loss(pred.float(), v.float())


def fast_sampler_card(cfg: TrainConfig, models: Any, teacher: str, *, run: str, checkpoint: str, step: int,
                      ema: bool) -> dict[str, Any]:
    """The card entry (:class:`engine.checkpoint.FastSampler`) of a distill run's student."""
    return {
        "steps": cfg.fast_steps,
        "teacher_timesteps": list(models.teacher_timesteps),
        "guidance_dim": cfg.guidance_dim,
        "text_guidance_range": list(cfg.text_guidance_range),
        "image_guidance_range": list(cfg.image_guidance_range),
        "teacher": teacher,
        "prediction_type": "v_prediction",
        "part": "unet_fast",
        "made_by": f"python -m train fit --stage distill (run {run}); python -m train export --run {run}",
        "quality": {},
        "extra": {"run": run, "checkpoint": checkpoint, "steps": step, "ema": ema,
                  "teacher_steps": cfg.teacher_steps, "distill_samples": cfg.distill_samples,
                  "rollout_share": cfg.rollout_share,
                  "stored_dtype": cfg.student_dtype,
                  "manifests": list(cfg.manifests), "batch_size": cfg.batch_size, "lr": cfg.lr},
    }
