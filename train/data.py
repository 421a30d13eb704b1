"""Training data: manifests to tensors, a resumable sampler, augmentation, and disk caches.

* :class:`TrainItems` turns a manifest into items: ``image`` (the target) with a ``text``, and
  for stage 2 a ``prior`` image. Images are letterboxed onto the model canvas exactly as the
  engine does at inference (:func:`engine.io.to_square`).
* :class:`EpochSampler` gives the batches: a seeded permutation per epoch, sharded over
  processes; its position is part of every checkpoint, so a resumed run sees the same data.
* :func:`augment` flips (swapping right/left in the text) and crops, from a generator.
* :class:`TensorStore` is a folder of safetensors shards keyed by content hash; the trainer
  stores VAE posteriors and text-encoder states there when those networks are frozen.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import InputError
from train.reports import swap_laterality

if TYPE_CHECKING:
    from train.config import TrainConfig


@dataclass(frozen=True)
class Item:
    """One training example (paths absolute).

    Attributes:
        image: the target image (follow-up for stage 2).
        text: the conditioning text (report, caption or progression description).
        prior: the prior image (stage 2 only).
    """

    image: str
    text: str
    prior: str | None = None


def load_items(manifest: str | os.PathLike[str], stage: str, splits: Sequence[str], target: str = "followup") -> list[Item]:
    """Reads a manifest into training items.

    Stage 2 reads pairs (the registered follow-up when registration wrote one); every other
    stage reads images with their ``report`` as text (PRISM sources put the caption there).
    ``target="counterfactual"`` makes stage 2 learn the pairs' exact counterfactuals
    (``counterfactual_path``, simulated pairs) instead of the follow-ups.

    Raises:
        InputError: the manifest is missing, of the wrong kind, or has no items in ``splits``.
    """
    from train.manifest import read_images, read_pairs

    path = Path(manifest)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist; make one with `python -m train prepare`")
    base = path.parent

    def absolute(p: str) -> str:
        return str(p if Path(p).is_absolute() else (base / p).resolve())

    items: list[Item] = []
    if stage == "stage2":
        for pair in read_pairs(path):
            if pair.split not in splits:
                continue
            if target == "counterfactual":
                if not pair.counterfactual_path:
                    raise InputError(f"pair {pair.pair_id} in {path} has no counterfactual_path; "
                                     "stage2_target=counterfactual needs simulated pairs")
                target_path = pair.counterfactual_path
            else:
                target_path = pair.extra.get("followup_registered_path") or pair.followup_path
            items.append(Item(image=absolute(target_path), text=pair.description, prior=absolute(pair.prior_path)))
    else:
        for record in read_images(path):
            if record.extra.get("split", "train") not in splits:
                continue
            items.append(Item(image=absolute(record.path), text=record.report))
    if not items:
        raise InputError(f"{path} has no {'pairs' if stage == 'stage2' else 'images'} in split(s) {', '.join(splits)}")
    return items


def load_config_items(cfg: TrainConfig) -> list[Item]:
    """The items of every manifest of a run (``cfg.manifests``), in order, each read by :func:`load_items`."""
    stage = "stage2" if cfg.stage == "distill" else cfg.stage  # a student learns from the pairs' priors and texts
    return [item for manifest in cfg.manifests
            for item in load_items(manifest, stage, cfg.splits, cfg.stage2_target)]


def load_canvas(path: str, size: int) -> torch.Tensor:
    """An image file letterboxed to ``(1, size, size)`` float32 in [0, 1]."""
    from engine.io import read_xray, to_square

    canvas, _ = to_square(read_xray(path), size)
    return torch.from_numpy(np.ascontiguousarray(canvas, dtype=np.float32))[None]


class ImageDataset(torch.utils.data.Dataset):
    """Items as tensors: ``{"index", "image" (1,S,S), "prior" (1,S,S) or absent, "text"}``."""

    def __init__(self, items: Sequence[Item], size: int) -> None:
        self.items = list(items)
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        item = self.items[index]
        out: dict[str, object] = {"index": index, "text": item.text, "image": load_canvas(item.image, self.size)}
        if item.prior is not None:
            out["prior"] = load_canvas(item.prior, self.size)
        return out


def collate(rows: list[dict[str, object]]) -> dict[str, object]:
    """Stacks tensors, keeps texts and indices as lists."""
    out: dict[str, object] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, step, micro-step, rank): same parts, same seed."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class EpochSampler:
    """Batches of indices: one seeded permutation per epoch, each process taking its share.

    Batch ``k`` (counting micro-batches from the start of training) is a pure function of
    ``(seed, k, rank)``, so a run resumed at step ``s`` continues with exactly the batches an
    uninterrupted run would have seen, whatever the loader prefetched before the kill. The last
    incomplete global batch of an epoch is dropped.

    Args:
        n: dataset size.
        batch_size: per-process batch.
        seed: run seed.
        rank, world: this process and the process count.
        start: the first batch number :meth:`__iter__` yields.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if n < batch_size * world:
            raise InputError(
                f"the data has {n} items but one step needs {batch_size * world} "
                f"(batch_size x processes); lower batch_size or add data"
            )
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch."""
        return self.n // (self.batch_size * self.world)

    def position(self, k: int) -> dict[str, int]:
        """``{"epoch", "batch"}`` of batch number ``k``."""
        return {"epoch": k // self.batches_per_epoch, "batch": k % self.batches_per_epoch}

    def batch(self, k: int) -> list[int]:
        """This process's indices for batch number ``k``."""
        epoch, position = divmod(k, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        start = position * self.batch_size * self.world + self.rank * self.batch_size
        return self._perm[1][start:start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


def flip_text(text: str) -> str:
    """The text of a horizontally flipped image: right and left swapped."""
    return swap_laterality(text)


def augment(
    images: list[torch.Tensor], texts: list[str], *, hflip: float, crop_scale: float, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[str], torch.Tensor]:
    """Random horizontal flip (text swapped) and random square crop, per item, from ``generator``.

    The same flip and crop apply to every tensor in ``images`` (e.g. prior and follow-up).

    Args:
        images: tensors ``(B, C, S, S)`` sharing their geometry.
        texts: one text per item.
        hflip: flip probability.
        crop_scale: smallest crop area fraction (1: no crop); crops are resized back to S.
        generator: a CPU generator.

    Returns:
        ``(images, texts, flipped)`` with ``flipped`` a bool ``(B,)``.
    """
    batch, size = images[0].shape[0], images[0].shape[-1]
    flipped = torch.rand(batch, generator=generator) < hflip
    sides = torch.ones(batch)
    offsets = torch.zeros(batch, 2)
    if crop_scale < 1:
        area = crop_scale + (1 - crop_scale) * torch.rand(batch, generator=generator)
        sides = area.sqrt()
        offsets = torch.rand(batch, 2, generator=generator) * (1 - sides)[:, None]
    out = []
    for x in images:
        x = torch.where(flipped[:, None, None, None].to(x.device), x.flip(-1), x)
        if crop_scale < 1:
            crops = []
            for i in range(batch):
                side = max(8, int(round(float(sides[i]) * size)))
                top, left = (int(float(o) * size) for o in offsets[i])
                top, left = min(top, size - side), min(left, size - side)
                crop = x[i:i + 1, :, top:top + side, left:left + side]
                crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
            x = torch.cat(crops)
        out.append(x)
    texts = [flip_text(t) if f else t for t, f in zip(texts, flipped.tolist())]
    return out, texts, flipped


class TensorStore:
    """A folder of safetensors shards holding named tensors per key, read lazily.

    Layout: ``index.json`` (key -> shard) and ``shard-00000.safetensors`` ... with tensors
    named ``<key>/<name>``. Shards are written atomically and the index after each one, so an
    interrupted :meth:`write` keeps every finished shard; shards missing from the index (a run
    killed by an older version) are read back into it on opening. Opened shards are cached per
    process (safe for DataLoader workers).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index = self.folder / "index.json"
        self.index: dict[str, str] = json.loads(index.read_text()) if index.is_file() else {}
        self._open: dict[str, object] = {}
        indexed = set(self.index.values())
        for shard in sorted(self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else ():
            if shard.name not in indexed:
                with safe_open(str(shard), framework="pt") as handle:
                    for name in handle.keys():
                        self.index.setdefault(name.rsplit("/", 1)[0], shard.name)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``key``."""
        shard = self.index[key]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        handle = self._open[shard]
        prefix = f"{key}/"
        return {name[len(prefix):]: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}

    def write(self, items: Iterator[tuple[str, dict[str, torch.Tensor]]], *, shard_items: int = 512) -> None:
        """Adds items (skipping keys already stored), in new shards; the index is replaced atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.folder.glob("shard-*.safetensors"))
        number = len(existing)
        pending: dict[str, torch.Tensor] = {}
        keys: list[str] = []

        def flush() -> None:
            nonlocal number, pending, keys
            if not keys:
                return
            name = f"shard-{number:05d}.safetensors"
            tmp = self.folder / f".{name}.tmp"
            save_file(pending, str(tmp))
            os.replace(tmp, self.folder / name)
            for k in keys:
                self.index[k] = name
            number, pending, keys = number + 1, {}, []
            self._write_index()

        for key, tensors in items:
            if key in self.index or key in keys:
                continue
            for name, tensor in tensors.items():
                pending[f"{key}/{name}"] = tensor.detach().cpu().contiguous()
            keys.append(key)
            if len(keys) >= shard_items:
                flush()
        flush()
        self._write_index()
        self._open.clear()

    def _write_index(self) -> None:
        tmp = self.folder / ".index.json.tmp"
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.folder / "index.json")


def content_key(*parts: object) -> str:
    """A cache key from anything printable (paths, texts, sizes, model hashes)."""
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:40]


class CachedDataset(torch.utils.data.Dataset):
    """Items with VAE posteriors read from a :class:`TensorStore` instead of pixels.

    Returns ``{"index", "text", "image_params"}`` (+ ``"prior_params"``), each params tensor
    ``(2, 2C, h, w)``: the posterior (mean, logvar) of the image as is and horizontally flipped.
    """

    def __init__(self, items: Sequence[Item], folder: str | os.PathLike[str], keys: dict[str, tuple[str, str]]) -> None:
        self.items = list(items)
        self.folder = Path(folder)
        self.keys = keys
        self.store: TensorStore | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _params(self, path: str) -> torch.Tensor:
        if self.store is None:
            self.store = TensorStore(self.folder)  # opened per worker process
        plain, flipped = self.keys[path]
        return torch.stack([self.store.get(plain)["params"], self.store.get(flipped)["params"]])

    def __getitem__(self, index: int) -> dict[str, object]:
        item = self.items[index]
        out: dict[str, object] = {"index": index, "text": item.text, "image_params": self._params(item.image)}
        if item.prior is not None:
            out["prior_params"] = self._params(item.prior)
        return out
