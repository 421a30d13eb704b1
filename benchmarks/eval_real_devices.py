"""Device removal on real anatomy: how much of a rendered device the instruct path takes away.

Removal pairs of ``python -m train simulate --on-films ... --edit-kinds devices,none`` have a real
film with rendered devices as the prior and the film itself as the exact device-free truth. For
each pair this runs the pair's own description ("lines and tubes removed", "without support
devices", ...) and measures, inside the rendered devices' change mask, the share of the device's
contrast that is gone::

    removed share = 1 - sum |counterfactual - truth| / sum |prior - truth|     (over the mask)

1 = the film exactly as without the devices, 0 = the devices untouched (negative: made worse).
A device counts as removed at a share of at least ``--threshold`` (default 0.5). Also the
bundled classifier's support-device probability before and after, and PSNR outside the mask::

    python benchmarks/eval_real_devices.py --pairs data/real-test-devices/pairs.jsonl \
        --out docs/eval/real_devices_removal.json --sheet docs/images/real_devices_removal.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="pairs.jsonl of real-anatomy pairs (device pairs are used)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", required=True, help="report JSON")
    parser.add_argument("--sheet", default=None, help="PNG contact sheet of the first --sheet-rows pairs")
    parser.add_argument("--sheet-rows", type=int, default=6)
    parser.add_argument("--limit", type=int, default=None, help="first N device pairs only")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="auto", choices=("auto", "fast", "full"))
    parser.add_argument("--devices", default="detect", choices=("detect", "model"),
                        help="how a device removal is made (EditRequest.devices; default detect: the devices, "
                             "or the named ones, detected and inpainted)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import engine
    from engine.analyse import Analyst
    from engine.analysis.metrics import psnr
    from engine.analysis.render import ExampleRow, example_grid
    from train.evaluate import _images_index, read_pair
    from train.manifest import read_pairs

    folder = Path(args.pairs).parent
    records = [p for p in read_pairs(args.pairs) if (p.extra or {}).get("edit") == "devices"]
    records = records[:args.limit] if args.limit else records
    if not records:
        print(f"no device pairs in {args.pairs}", file=sys.stderr)
        return 2
    eng = engine.load(args.model, device=args.device)
    analyst = Analyst(device=args.device)
    images_by_id = _images_index(args.pairs)
    rows, sheet = [], []
    t0 = time.perf_counter()
    for index, record in enumerate(records):
        pair = read_pair(index, record, folder, eng.card.resolution, images_by_id, args.seed)
        cf = eng.counterfactual(pair.prior_xray, record.description, seed=pair.seed, sampler=args.sampler,
                                devices=args.devices)
        prior, image = cf.prior.astype(np.float64), cf.image.astype(np.float64)
        truth, mask = pair.followup.astype(np.float64), pair.region
        before = np.abs(prior - truth)[mask].sum()
        after = np.abs(image - truth)[mask].sum()
        share = float(1.0 - after / before) if before > 0 else float("nan")
        probs = analyst.analyse(cf.prior, cf.image).probabilities.get("Support Devices", (float("nan"),) * 2)
        rows.append({"pair": record.pair_id, "film": record.extra.get("film_id"), "description": record.description,
                     "devices": [c["name"] for c in record.extra.get("changes", []) if c.get("kind") == "device"],
                     "how": str((cf.devices_removed or {}).get("method")),
                     "removed_share": round(share, 4), "removed": bool(share >= args.threshold),
                     "p_devices_prior": round(probs[0], 4), "p_devices_cf": round(probs[1], 4),
                     "psnr_outside_db": round(float(psnr(image, truth, mask=~mask)), 2)})
        if args.sheet and len(sheet) < args.sheet_rows:
            row = ExampleRow(label=f"{record.extra.get('film_id')}: {record.description}", base=cf.prior)
            row.images = {"Prior (rendered devices)": cf.prior, "Counterfactual (synthetic)": cf.image,
                          "Truth (the film)": pair.followup}
            sheet.append(row)
    shares = np.array([r["removed_share"] for r in rows])
    summary = {"pairs": len(rows), "threshold": args.threshold, "removed": int(sum(r["removed"] for r in rows)),
               "removed_fraction": round(float(np.mean([r["removed"] for r in rows])), 3),
               "removed_share_median": round(float(np.nanmedian(shares)), 3),
               "by_how": {how: f"{sum(r['removed'] for r in rows if r['how'] == how)}/{sum(r['how'] == how for r in rows)}"
                          for how in sorted({r["how"] for r in rows})},
               "p_devices_cf_below_half": int(sum(r["p_devices_cf"] < 0.5 for r in rows)),
               "psnr_outside_median_db": round(float(np.median([r["psnr_outside_db"] for r in rows])), 2),
               "seconds": round(time.perf_counter() - t0, 1)}
    report = {"command": "python " + " ".join(sys.argv), "model": eng.card.name, "model_hash": eng.model_hash,
              "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary))
    if args.sheet and sheet:
        fig = example_grid(sheet, ["Prior (rendered devices)", "Counterfactual (synthetic)", "Truth (the film)"],
                           title="Device removal on real anatomy (held-out patients; synthetic outputs)")
        fig.savefig(args.sheet, dpi=100, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
