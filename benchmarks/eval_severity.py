"""Severity monotonicity: does the edit grow from slight to moderate to large?

For each case (a simulated prior without findings, seed ``--seed``, and one finding), the
instruction "new <finding>" is rewritten by ``engine.severity.apply_severity`` for slight,
moderate and large, and three counterfactuals are made with the same seed. Three things are
measured on each, and a case counts as monotonic for a measure when slight <= moderate <= large
and large > slight (three equal values, an edit that ignores the severity, do not count):

* ``probability``: the bundled classifier's probability of the finding. It saturates (two
  large-looking edits both score 1.00), so ties are decided by the third decimal.
* ``finding size``: the finding's own size, measured on the image as a reader would
  (the segmenter's masks are taken on the prior):

  ============  ==========================================================================
  finding       measure
  ============  ==========================================================================
  cardiomegaly  cardiothoracic ratio on the counterfactual's segmentation
  effusion      mean brightening of the asked lung (fluid is opaque)
  pneumothorax  mean darkening of the asked lung (pleural air has no lung markings)
  edema         mean brightening of both lungs
  ============  ==========================================================================

  The measure is validated on the simulator's exact counterfactuals of the same prior, with
  the finding at the middle of each grade's range (1/6, 1/2, 5/6 of full severity; the grades
  are those of docs/SIMULATOR.md): ``exact_size_monotonic_fraction`` says whether the measure
  itself orders true severities, and the per-grade means show how far the model's edits fall
  short of (or overshoot) the truth.
* ``change size``: the edit's mean absolute change anywhere, ``mean |cf - prior|`` (the
  coarsest measure; a change in the wrong place counts too).

    python benchmarks/eval_severity.py --cases 30 --out docs/eval/severity_journey-mini.json
    (``--sampler full`` / ``--sampler fast --steps N``: a given sampler; default the app's)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GRADES = ("slight", "moderate", "large")
GRADE_VALUES = {"slight": 1 / 6, "moderate": 1 / 2, "large": 5 / 6}
"""The middle of each grade's severity range in the simulator (docs/SIMULATOR.md, "Text")."""

# instruction, classifier label, simulator finding, side (patient's)
CASES = (
    ("new left pleural effusion", "Pleural Effusion", "effusion", "left"),
    ("new right pleural effusion", "Pleural Effusion", "effusion", "right"),
    ("new cardiomegaly", "Cardiomegaly", "cardiomegaly", None),
    ("new pulmonary edema", "Edema", "edema", None),
    ("new right pneumothorax", "Pneumothorax", "pneumothorax", "right"),
)


def finding_size(finding: str, side: str | None, prior, image, prior_masks, segmenter) -> float:
    """The finding's size on ``image`` (see the module docstring's table)."""
    import numpy as np

    from engine.analysis.segmentation import cardiothoracic_ratio

    if finding == "cardiomegaly":
        return cardiothoracic_ratio(segmenter.segment(image[None, None])[0])
    lungs = [f"{side}_lung"] if side else ["left_lung", "right_lung"]
    region = np.logical_or.reduce([prior_masks[name] for name in lungs])
    mean_change = float((image - prior)[region].mean())
    return -mean_change if finding == "pneumothorax" else mean_change


def is_monotonic(values: dict[str, float]) -> bool:
    """slight <= moderate <= large, and large > slight (an edit that does nothing is not monotonic)."""
    return values["slight"] <= values["moderate"] <= values["large"] and values["large"] > values["slight"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--classifier", default="auto")
    parser.add_argument("--segmenter", default="auto")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the sampler's own)")
    parser.add_argument("--sampler", default="auto", choices=("auto", "fast", "full"),
                        help="auto (the app's: the model's fast sampler when it has one), fast or full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import numpy as np

    import engine
    from engine.analysis.classifier import load_classifier
    from engine.analysis.segmentation import load_segmenter
    from engine.severity import apply_severity
    from train.simulator import Findings, render, sample_nuisance, sample_patient
    from train.simulator.params import Severity

    eng = engine.load(args.model, device=args.device)
    clf = load_classifier(args.classifier)
    seg = load_segmenter(args.segmenter)
    rng = np.random.default_rng(args.seed)
    rows, t0 = [], time.perf_counter()
    for i in range(args.cases):
        text, label, finding, side = CASES[i % len(CASES)]
        patient, nuisance = sample_patient(rng), sample_nuisance(rng)
        prior = render(patient, Findings(), nuisance, size=eng.resolution, noise_seed=i).image
        prior_masks = seg.segment(prior[None, None])[0]
        probs, sizes, changes, exact = {}, {}, {}, {}
        for grade in GRADES:
            result = eng.counterfactual(prior, text, severity=grade, steps=args.steps, seed=1000 + i,
                                        sampler=args.sampler)
            used = f"{result.request.sampler} {result.request.steps}"
            cf = result.image
            probs[grade] = float(clf.predict(cf[None, None])[0, clf.index(label)])
            sizes[grade] = finding_size(finding, side, prior, cf, prior_masks, seg)
            changes[grade] = float(np.abs(cf - prior).mean())
            truth = render(patient, Findings(**{finding: Severity(GRADE_VALUES[grade], side=side)}), nuisance,
                           size=eng.resolution, noise_seed=i).image
            exact[grade] = finding_size(finding, side, prior, truth, prior_masks, seg)
        rows.append({"case": i, "instruction": {g: apply_severity(text, g) for g in GRADES}, "finding": label,
                     "probabilities": probs, "monotonic": is_monotonic(probs),
                     "finding_size": sizes, "finding_size_monotonic": is_monotonic(sizes),
                     "exact_finding_size": exact, "exact_finding_size_monotonic": is_monotonic(exact),
                     "change_size": changes, "size_monotonic": is_monotonic(changes)})
        print(json.dumps(rows[-1]), flush=True)

    def per_finding(key: str) -> dict[str, str]:
        return {f: f"{sum(r[key] for r in rows if r['finding'] == f)}/{sum(r['finding'] == f for r in rows)}"
                for f in sorted({r["finding"] for r in rows})}

    def grade_means(key: str) -> dict[str, dict[str, float]]:
        return {f: {g: round(float(np.mean([r[key][g] for r in rows if r["finding"] == f])), 4) for g in GRADES}
                for f in sorted({r["finding"] for r in rows})}

    result = {
        "cases": len(rows),
        "monotonic_fraction": float(np.mean([r["monotonic"] for r in rows])),
        "finding_size_monotonic_fraction": float(np.mean([r["finding_size_monotonic"] for r in rows])),
        "exact_finding_size_monotonic_fraction": float(np.mean([r["exact_finding_size_monotonic"] for r in rows])),
        "size_monotonic_fraction": float(np.mean([r["size_monotonic"] for r in rows])),
        "per_finding": per_finding("monotonic"),
        "per_finding_finding_size": per_finding("finding_size_monotonic"),
        "finding_size_means": grade_means("finding_size"),
        "exact_finding_size_means": grade_means("exact_finding_size"),
        "grade_values": GRADE_VALUES,
        "steps": args.steps, "sampler": used if rows else None, "seed": args.seed, "classifier": getattr(clf, "name", str(args.classifier)),
        "segmenter": getattr(seg, "name", str(args.segmenter)),
        "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
