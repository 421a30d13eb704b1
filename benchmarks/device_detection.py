"""The device detector alone: what it marks on held-out films, and what inpainting that removes.

On the removal pairs of ``data/real-test-devices`` (devices rendered on device-free films of
held-out patients; the film itself is the truth) it measures the detector's recall and precision
against the pair's change mask, and the share of the device's contrast that inpainting the
detected pixels takes away (as ``benchmarks/eval_real_devices.py`` measures the whole edit); on
the held-out device-free films as acquired, the area it marks (false alarms)::

    python benchmarks/device_detection.py --pairs data/real-test-devices/pairs.jsonl \\
        --device-free train/configs/hannover-device-free.txt --detector assets/models/cxr-devices-mini \\
        --out docs/eval/device_detection.json

With ``--kinds-pairs`` (removal pairs whose masks hold the device-kind bits, e.g.
``data/real-test-devices-kinds``, made by the same command as ``data/real-test-devices``), it
also asks for each device of each prior by name ("the left chest tube removed", as the
simulator's reports name it) and measures how much of that device's contrast inpainting the
named detection takes away, and how much of the prior's other devices it leaves::

    python benchmarks/device_detection.py ... --kinds-pairs data/real-test-devices-kinds/pairs.jsonl

Prints a table (one row per detector) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(spec: str, pairs: list, folder: Path, plain: list[Path], threshold: float, grow: bool = True) -> dict:
    """Recall, precision and removed share over the pairs; marked area on the plain films."""
    from engine.devices import device_mask, inpaint, load_device_detector
    from engine.io import read_xray

    detector = load_device_detector(spec)
    rows = []
    for p in pairs:
        prior = read_xray(folder / p.prior_path).pixels
        truth = read_xray(folder / p.followup_path).pixels
        change = read_xray(folder / p.extra["change_mask_path"]).pixels > 0.5
        mask = device_mask(detector, prior, grow=grow)
        out = inpaint(prior, mask)
        before = np.abs(prior - truth)[change].sum()
        share = 1.0 - np.abs(out - truth)[change].sum() / before if before > 0 else float("nan")
        rows.append({"pair": p.pair_id, "recall": float((mask & change).sum() / max(change.sum(), 1)),
                     "precision": float((mask & change).sum() / max(mask.sum(), 1)),
                     "removed_share": float(share), "removed": bool(share >= threshold)})
    marked = [float(device_mask(detector, read_xray(f).pixels, grow=grow).mean()) for f in plain]
    return {"detector": spec, "grow": grow, "pairs": len(rows), "removed": int(sum(r["removed"] for r in rows)),
            "removed_share_median": float(np.nanmedian([r["removed_share"] for r in rows])),
            "recall_mean": float(np.mean([r["recall"] for r in rows])),
            "precision_mean": float(np.mean([r["precision"] for r in rows])),
            "device_free_films": len(marked), "device_free_marked_mean": float(np.mean(marked)) if marked else None,
            "device_free_marked_max": float(np.max(marked)) if marked else None, "rows": rows}


def score_named(spec: str, pairs: list, folder: Path, threshold: float, grow: bool = True,
                kinds: str | None = "auto") -> dict:
    """Each device of each removal pair's prior asked for by name: the named device's contrast
    removed, the other devices' contrast kept (both against the device-free film)."""
    from PIL import Image

    from train.manifest import read_images
    from train.simulator.anatomy import structure_mask
    from train.simulator.params import Device
    from train.simulator.text import device_noun

    from engine.devices import detects, device_mask, device_removal, inpaint, load_device_detector
    from engine.io import read_xray

    detector = load_device_detector(spec, kinds=kinds)
    masks = {r.image_id: r.extra["mask_path"] for r in read_images(folder / "images.jsonl")}
    rows = []
    for p in pairs:
        prior = read_xray(folder / p.prior_path).pixels
        film = read_xray(folder / p.followup_path).pixels
        with Image.open(folder / masks[p.prior_id]) as im:
            bits = np.asarray(im).astype(np.int64)
        shown = structure_mask(bits, "devices")
        for change in p.extra["changes"]:
            kind = "pacemaker" if change["name"] == "icd" else change["name"]
            words = f"{device_noun(Device(change['name'], side=change['side']))} removed"
            named = device_removal(words).named
            if not detects(detector, named):
                rows.append({"pair": p.pair_id, "asked": words, "detected": False})
                continue
            own = structure_mask(bits, f"device_{kind}")
            others = shown & ~own
            out = inpaint(prior, device_mask(detector, prior, None, named, grow=grow))
            base = np.abs(prior - film)
            removed = 1.0 - np.abs(out - film)[own].sum() / max(base[own].sum(), 1e-9)
            kept = float(1.0 - np.abs(out - prior)[others].sum() / base[others].sum()) if others.any() else None
            rows.append({"pair": p.pair_id, "kind": kind, "asked": words, "detected": True, "removed_share": float(removed),
                         "removed": bool(removed >= threshold), "others_kept_share": kept})
    asked = [r for r in rows if r["detected"]]
    kept = [r["others_kept_share"] for r in asked if r["others_kept_share"] is not None]
    by_kind: dict[str, list[int]] = {}
    for r in asked:
        by_kind.setdefault(r["kind"], [0, 0])
        by_kind[r["kind"]][0] += int(r["removed"])
        by_kind[r["kind"]][1] += 1
    by = getattr(detector, "kinds", None)
    return {"detector": spec, "kinds_by": by.name if by is not None else spec, "asked": len(rows), "detected_kinds": len(asked),
            "removed": int(sum(r["removed"] for r in asked)),
            "removed_share_median": float(np.median([r["removed_share"] for r in asked])) if asked else None,
            "with_other_devices": len(kept), "others_kept_share_median": float(np.median(kept)) if kept else None,
            "others_kept_share_min": float(np.min(kept)) if kept else None,
            "removed_by_kind": {k: f"{v[0]} of {v[1]}" for k, v in sorted(by_kind.items())}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, help="pairs.jsonl of real-anatomy removal pairs")
    p.add_argument("--device-free", required=True, help="film ids without devices (one per line, # comments)")
    p.add_argument("--detector", action="append", required=True, help="detector folder or auto (repeatable)")
    p.add_argument("--threshold", type=float, default=0.5, help="removed share that counts as removed")
    p.add_argument("--kinds-pairs", default=None, help="pairs.jsonl of removal pairs with device-kind mask bits: "
                   "each device asked for by name")
    p.add_argument("--kinds", default="auto", help="the device-kind network for named devices (default auto: the "
                   "bundled cxr-device-kinds-mini; none: the detector's own kind channels only)")
    p.add_argument("--no-grow", action="store_true", help="the detector's pixels only (not followed along "
                   "the lines connected to them, engine.devices.grow_along_lines)")
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
    reports = [score(spec, pairs, folder, plain, args.threshold, grow=not args.no_grow) for spec in args.detector]
    print(f"{len(pairs)} removal pairs, {len(plain)} device-free films (held-out patients)")
    print("| detector | removed by inpainting | removed share, median | recall | precision | device-free films: area marked, mean (max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in reports:
        print(f"| {r['detector']} | {r['removed']} of {r['pairs']} | {r['removed_share_median']:.2f} | "
              f"{r['recall_mean']:.2f} | {r['precision_mean']:.2f} | "
              f"{100 * (r['device_free_marked_mean'] or 0):.2f} % ({100 * (r['device_free_marked_max'] or 0):.2f} %) |")
    named = []
    if args.kinds_pairs:
        kinds_folder = Path(args.kinds_pairs).parent
        kinds_pairs = [r for r in read_pairs(args.kinds_pairs) if (r.extra or {}).get("edit") == "devices"]
        kinds = None if args.kinds == "none" else args.kinds
        named = [score_named(spec, kinds_pairs, kinds_folder, args.threshold, grow=not args.no_grow, kinds=kinds)
                 for spec in args.detector]
        print(f"\neach device asked for by name ({named[0]['asked']} devices on {len(kinds_pairs)} priors)")
        print("| detector (kinds by) | kinds it can find | named device removed | its removed share, median | "
              "other devices kept, median (min) |")
        print("| --- | --- | --- | --- | --- |")
        for r in named:
            if not r["detected_kinds"]:
                print(f"| {r['detector']} | none | – | – | – |")
                continue
            print(f"| {r['detector']} ({r['kinds_by']}) | {r['detected_kinds']} of {r['asked']} | {r['removed']} of {r['detected_kinds']} | "
                  f"{r['removed_share_median']:.2f} | {r['others_kept_share_median']:.2f} "
                  f"({r['others_kept_share_min']:.2f}) of {r['with_other_devices']} |")
        for r in named:
            if r["detected_kinds"]:
                print(f"{r['detector']}, removed by kind: " + ", ".join(f"{k} {v}" for k, v in r["removed_by_kind"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "reports": reports,
                                          "named": named}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
