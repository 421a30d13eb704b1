"""A two-minute instruction-following probe for comparing checkpoints before a full evaluation.

Six normal simulated priors (seed ``--seed``) each get six instructions ("new large left pleural
effusion", ..., "new small left pleural effusion"); the bundled classifier scores the asked
finding on the prior and on each counterfactual. Printed per instruction: the mean probability
on the priors and on the counterfactuals, how many counterfactuals score above 0.5, and for a
one-sided instruction the share of the change on the asked side (the classifier cannot tell a
left effusion from a right one).
``python -m train evaluate`` (510 pairs, about 24 min on 2 cores) stays the measure of record;
this only says whether a checkpoint is worth evaluating::

    python benchmarks/probe_instructions.py --model assets/models/journey-mini --out probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INSTRUCTIONS = (
    ("new large left pleural effusion", "Pleural Effusion"),
    ("new large right pleural effusion", "Pleural Effusion"),
    ("new severe cardiomegaly", "Cardiomegaly"),
    ("new severe pulmonary edema", "Edema"),
    ("new large right pneumothorax", "Pneumothorax"),
    ("new small left pleural effusion", "Pleural Effusion"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--classifier", default="auto")
    parser.add_argument("--priors", type=int, default=6)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--text-guidance", type=float, default=7.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--figure", default=None,
                        help="PNG contact sheet: one row per prior (the first --figure-priors), the prior then "
                             "each instruction's counterfactual")
    parser.add_argument("--figure-priors", type=int, default=3)
    args = parser.parse_args()

    import numpy as np

    import engine
    from engine.analysis.classifier import load_classifier
    from train.simulator import Findings, render, sample_nuisance, sample_patient

    eng = engine.load(args.model, device=args.device)
    clf = load_classifier(args.classifier)
    rng = np.random.default_rng(args.seed)
    priors = [render(sample_patient(rng), Findings(), sample_nuisance(rng), size=eng.resolution, noise_seed=i).image
              for i in range(args.priors)]
    t0, rows, sheet = time.perf_counter(), [], []
    for text, finding in INSTRUCTIONS:
        column = clf.index(finding)
        before = [float(clf.predict(p[None, None])[0, column]) for p in priors]
        images = [eng.counterfactual(p, text, steps=args.steps, seed=1000 + i, text_guidance=args.text_guidance).image
                  for i, p in enumerate(priors)]
        after = [float(clf.predict(img[None, None])[0, column]) for img in images]
        sheet.append(images[:args.figure_priors])
        side = asked_side(text)
        shares = [side_share(img, p, side) for img, p in zip(images, priors)] if side else []
        rows.append({"instruction": text, "finding": finding, "p_prior": float(np.mean(before)),
                     "p_counterfactual": float(np.mean(after)), "positive": int(sum(p > 0.5 for p in after)),
                     "cases": len(after), "p_each": after,
                     "asked_side_share": float(np.mean(shares)) if shares else None})
        print(f"{text:36s} prior {rows[-1]['p_prior']:.2f}  counterfactual {rows[-1]['p_counterfactual']:.2f}  "
              f"positive {rows[-1]['positive']}/{len(after)}"
              + (f"  change on the asked side {np.mean(shares):.0%}" if shares else ""), flush=True)
    result = {"model": eng.model_id, "model_hash": eng.model_hash, "steps": args.steps, "seed": args.seed,
              "text_guidance": args.text_guidance, "positive": sum(r["positive"] for r in rows),
              "cases": sum(r["cases"] for r in rows), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    print(f"positive {result['positive']}/{result['cases']} in {result['seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.figure:
        _contact_sheet(args.figure, priors[:args.figure_priors], sheet, rows)
    return 0


def asked_side(text: str) -> str | None:
    """``left`` or ``right`` when the instruction names one side, else None."""
    words = set(text.lower().split())
    sides = [s for s in ("left", "right") if s in words]
    return sides[0] if len(sides) == 1 else None


def side_share(image, prior, side: str) -> float:
    """Share of the edit's total ``|image - prior|`` on the patient's ``side``.

    Radiographs are displayed as if facing the patient: the patient's right is the image's left
    half (the simulator draws a right effusion there too).
    """
    import numpy as np

    change = np.abs(image - prior)
    half = change.shape[1] // 2
    on_side = change[:, half:] if side == "left" else change[:, :half]
    return float(on_side.sum() / max(float(change.sum()), 1e-12))


def _contact_sheet(path: str, priors, columns, rows) -> None:
    """Priors down the left, one column per instruction, each tile titled with its probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(priors), len(columns) + 1, figsize=(2.0 * (len(columns) + 1), 2.15 * len(priors)),
                             squeeze=False)
    for r, prior in enumerate(priors):
        axes[r, 0].imshow(prior, cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title("prior", fontsize=7)
        for c, (images, row) in enumerate(zip(columns, rows)):
            axes[r, c + 1].imshow(images[r], cmap="gray", vmin=0, vmax=1)
            title = row["instruction"].replace("new ", "").replace("pleural ", "")
            axes[r, c + 1].set_title(f"{title}\np={row['p_each'][r]:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle("SYNTHETIC counterfactuals (research use only)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
