"""``python -m train convert-autoencoder``: a published TAESD-family autoencoder as a ``vae/`` part.

Converts the two plain PyTorch state dicts the ``madebyollin/taesd`` repository publishes
(``taef2_encoder.pth`` and ``taef2_decoder.pth``) once into the project's component format: a
folder with ``config.json`` (``"_class_name": "TinyAutoencoder"``), safetensors weights, the
licence text and a provenance note with the sources' sha256. The ``.pth`` files are read with
``torch.load(..., weights_only=True)`` (tensors only, no code unpickled); the engine itself only
ever reads the safetensors::

    python -m train convert-autoencoder --source ../shared/weights/taef2 --out data/taef2
    python -m train fit --config train/configs/journey-mini-v8.yaml   # vae_from: data/taef2

The folder can be used as ``vae_from`` of a training run, and ``train export`` copies it into the
model folder as ``vae/`` (licence and provenance included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from engine.errors import InputError

PROVENANCE_FILE = "PROVENANCE.json"
LICENSE_FILE = "LICENSE"
# What the project knows about the published TAEF2 weights (../shared/weights/taef2/README.md).
TAEF2_SOURCE = {
    "name": "TAEF2 (tiny autoencoder of the FLUX.2 latent space)",
    "author": "Ollin Boer Bohan",
    "repository": "https://github.com/madebyollin/taesd",
    "commit": "5cccb12dc72074a4be35680c3b108548a7c69978",
    "license": "MIT",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_autoencoder(source: Path, out: Path, *, prefix: str = "taef2", dtype: str = "float16") -> Path:
    """Writes ``out`` (config, safetensors, LICENSE, PROVENANCE.json) from ``source/{prefix}_{encoder,decoder}.pth``.

    The folder is written next to ``out`` and renamed into place, so a failed conversion leaves
    nothing behind.

    Args:
        source: folder with the two ``.pth`` files and the ``LICENSE`` that came with them.
        out: the folder to write (must not exist).
        prefix: file-name prefix of the weights (``taef2``).
        dtype: storage dtype (``float16``, the published precision, or ``float32``).

    Returns:
        ``out``.

    Raises:
        InputError: a missing file, an existing ``out``, or weights that do not fit the architecture.
    """
    import torch

    from engine.autoencoder import TinyAutoencoder, convert_taesd_state_dict
    from engine.checkpoint import _save_network

    files = {part: source / f"{prefix}_{part}.pth" for part in ("encoder", "decoder")}
    missing = [str(p) for p in [*files.values(), source / LICENSE_FILE] if not p.is_file()]
    if missing:
        raise InputError(f"convert-autoencoder: missing {', '.join(missing)}")
    if out.exists():
        raise InputError(f"convert-autoencoder: {out} exists; choose a new folder")
    state = {part: torch.load(path, map_location="cpu", weights_only=True) for part, path in files.items()}
    latent_channels = int(state["encoder"][max(state["encoder"], key=lambda k: int(k.split(".")[0]))].shape[0])
    model = TinyAutoencoder(latent_channels=latent_channels)
    try:
        model.load_state_dict(convert_taesd_state_dict(state["encoder"], state["decoder"]), strict=True)
    except RuntimeError as exc:
        raise InputError(f"convert-autoencoder: the weights in {source} do not fit the TAEF2 architecture: {exc}") from None
    for param in model.parameters():  # storage precision (ModelMixin.to(dtype) warns about casting)
        param.data = param.data.to(getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_network(model, tmp)
        shutil.copyfile(source / LICENSE_FILE, tmp / LICENSE_FILE)
        provenance = {**TAEF2_SOURCE, "files": {p.name: _sha256(p) for p in files.values()},
                      "converted_with": "python -m train convert-autoencoder", "storage_dtype": dtype,
                      "parameters": sum(p.numel() for p in model.parameters())}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is meant to be read by others
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-autoencoder",
                       help="convert published TAEF2 weights (.pth) once into a vae/ component (safetensors)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--source", required=True, type=Path, help="folder with taef2_encoder.pth, taef2_decoder.pth, LICENSE")
    p.add_argument("--out", required=True, type=Path, help="new folder to write")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage precision (default float16, the published one)")


def run(args: argparse.Namespace) -> int:
    out = convert_autoencoder(args.source, args.out, dtype=args.dtype)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    return 0
