"""Round-trip fidelity of autoencoders on real chest films (held-out Hannover patients).

    python benchmarks/autoencoder_roundtrip.py --vae assets/models/journey-mini/vae data/taef2 \\
        --split test --sizes 256 512 --json docs/eval/autoencoder_roundtrip.json

Every film is read with the engine's reader, letterboxed onto the canvas exactly as the engine
does, encoded to the posterior mode and decoded; PSNR (the [0, 1] range) and SSIM are measured on
the film's own pixels (the letterbox padding excluded). Prints one row per (autoencoder, size) and
writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hannover-covid19"


def main() -> int:
    import numpy as np
    import torch
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from engine.autoencoder import autoencoder_class, value_range_of
    from engine.engine import from_model_range, to_model_range, to_vae_channels
    from engine.io import read_xray, to_square
    from train.manifest import REAL_FILM_FRACTIONS, split_for
    from train.sources.hannover import load_hannover

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", nargs="+", required=True, help="vae/ folders (AutoencoderKL or TinyAutoencoder)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Hannover folder (data.csv + png/)")
    parser.add_argument("--split", default="test", choices=("test", "validate", "train", "all"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--limit", type=int, default=None, help="first N films only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    records = [r for r in load_hannover(args.data)
               if args.split == "all" or split_for(r.patient_id, REAL_FILM_FRACTIONS) == args.split]
    records = records[: args.limit]
    rows = []
    for folder in args.vae:
        config = json.loads((Path(folder) / "config.json").read_text())
        vae = autoencoder_class(config).from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32).eval()
        value_range = value_range_of(vae)
        for size in args.sizes:
            psnr, ssim, seconds = [], [], []
            for rec in records:
                canvas, transform = to_square(read_xray(rec.path), size)
                top, left = transform.offset
                h, w = transform.resized_shape
                x = torch.from_numpy(canvas)[None, None]
                start = time.perf_counter()
                with torch.no_grad():
                    z = vae.encode(to_vae_channels(vae, to_model_range(x, value_range))).latent_dist.mode()
                    y = vae.decode(z).sample.float().mean(dim=1, keepdim=True)
                seconds.append(time.perf_counter() - start)
                out = from_model_range(y, value_range)[0, 0].numpy()
                a, b = canvas[top:top + h, left:left + w], out[top:top + h, left:left + w]
                psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0))
                ssim.append(structural_similarity(a, b, data_range=1.0))
            row = {"vae": str(folder), "class": config.get("_class_name"), "size": size, "films": len(records),
                   "split": args.split, "psnr_median": round(statistics.median(psnr), 2),
                   "psnr_min": round(min(psnr), 2), "ssim_median": round(statistics.median(ssim), 4),
                   "ms_per_film": round(1000 * statistics.median(seconds), 1)}
            rows.append(row)
            print(f"{row['class']:>16} {Path(folder).as_posix():<40} {size:>4} px  {len(records)} films  "
                  f"PSNR median {row['psnr_median']:.2f} dB (min {row['psnr_min']:.2f})  "
                  f"SSIM {row['ssim_median']:.3f}  {row['ms_per_film']:.0f} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
