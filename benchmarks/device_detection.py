"""The device detector alone: what it marks on held-out films, and what inpainting that removes.

On the removal pairs of ``data/real-test-devices`` (devices rendered on device-free films of
held-out patients; the film itself is the truth) it measures the detector's recall and precision
against the pair's change mask, and the share of the device's contrast that inpainting the
detected pixels takes away (as ``benchmarks/eval_real_devices.py`` measures the whole edit); on
the held-out device-free films as acquired, the area it marks (false alarms)::

    python benchmarks/device_detection.py --pairs data/real-test-devices/pairs.jsonl \\
        --device-free train/configs/hannover-device-free.txt --detector assets/models/cxr-devices-mini \\
        --out docs/eval/device_detection.json

Prints a table (one row per detector) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(spec: str, pairs: list, folder: Path, plain: list[Path], threshold: float) -> dict:
    """Recall, precision and removed share over the pairs; marked area on the plain films."""
    from engine.devices import device_mask, inpaint, load_device_detector
    from engine.io import read_xray

    detector = load_device_detector(spec)
    rows = []
    for p in pairs:
        prior = read_xray(folder / p.prior_path).pixels
        truth = read_xray(folder / p.followup_path).pixels
        change = read_xray(folder / p.extra["change_mask_path"]).pixels > 0.5
        mask = device_mask(detector, prior)
        out = inpaint(prior, mask)
        before = np.abs(prior - truth)[change].sum()
        share = 1.0 - np.abs(out - truth)[change].sum() / before if before > 0 else float("nan")
        rows.append({"pair": p.pair_id, "recall": float((mask & change).sum() / max(change.sum(), 1)),
                     "precision": float((mask & change).sum() / max(mask.sum(), 1)),
                     "removed_share": float(share), "removed": bool(share >= threshold)})
    marked = [float(device_mask(detector, read_xray(f).pixels).mean()) for f in plain]
    return {"detector": spec, "pairs": len(rows), "removed": int(sum(r["removed"] for r in rows)),
            "removed_share_median": float(np.nanmedian([r["removed_share"] for r in rows])),
            "recall_mean": float(np.mean([r["recall"] for r in rows])),
            "precision_mean": float(np.mean([r["precision"] for r in rows])),
            "device_free_films": len(marked), "device_free_marked_mean": float(np.mean(marked)) if marked else None,
            "device_free_marked_max": float(np.max(marked)) if marked else None, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, help="pairs.jsonl of real-anatomy removal pairs")
    p.add_argument("--device-free", required=True, help="film ids without devices (one per line, # comments)")
    p.add_argument("--detector", action="append", required=True, help="detector folder or auto (repeatable)")
    p.add_argument("--threshold", type=float, default=0.5, help="removed share that counts as removed")
    p.add_argument("--out", required=True, help="JSON report")
    args = p.parse_args(argv)

    from train.manifest import read_images, read_pairs

    folder = Path(args.pairs).parent
    pairs = [r for r in read_pairs(args.pairs) if (r.extra or {}).get("edit") == "devices"]
    if not pairs:
        print(f"no device-removal pairs in {args.pairs}", file=sys.stderr)
        return 2
    free = {line.split("#")[0].strip() for line in Path(args.device_free).read_text().splitlines()} - {""}
    plain = [folder / r.path for r in read_images(folder / "images.jsonl")
             if r.image_id.endswith("-film") and r.extra.get("film_id") in free]
    reports = [score(spec, pairs, folder, plain, args.threshold) for spec in args.detector]
    print(f"{len(pairs)} removal pairs, {len(plain)} device-free films (held-out patients)")
    print("| detector | removed by inpainting | removed share, median | recall | precision | device-free films: area marked, mean (max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in reports:
        print(f"| {r['detector']} | {r['removed']} of {r['pairs']} | {r['removed_share_median']:.2f} | "
              f"{r['recall_mean']:.2f} | {r['precision_mean']:.2f} | "
              f"{100 * (r['device_free_marked_mean'] or 0):.2f} % ({100 * (r['device_free_marked_max'] or 0):.2f} %) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "reports": reports}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
