"""Severity monotonicity: does the classifier's probability rise from slight to moderate to large?

For each case (a simulated prior without findings, seed ``--seed``, and one finding), the
instruction "new <finding>" is rewritten by ``engine.severity.apply_severity`` for slight,
moderate and large, three counterfactuals are made with the same seed, and the bundled
classifier scores the finding on each. A case is monotonic when p(slight) <= p(moderate) <= p(large).
Beside the probability (which saturates: two large-looking edits both score 1.00), the size of
each edit is measured as its mean absolute change from the prior, ``mean |cf - prior|`` on the
[0, 1] scale (an effusion or a heart that grows changes more pixels, more), and reported as a
second monotonic fraction.

    python benchmarks/eval_severity.py --cases 10 --out docs/severity_journey-mini.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = (
    ("new left pleural effusion", "Pleural Effusion"),
    ("new right pleural effusion", "Pleural Effusion"),
    ("new cardiomegaly", "Cardiomegaly"),
    ("new pulmonary edema", "Edema"),
    ("new right pneumothorax", "Pneumothorax"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--classifier", default="auto")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import numpy as np

    import engine
    from engine.analysis.classifier import load_classifier
    from engine.severity import apply_severity
    from train.simulator import Findings, render, sample_nuisance, sample_patient

    eng = engine.load(args.model, device=args.device)
    clf = load_classifier(args.classifier)
    rng = np.random.default_rng(args.seed)
    rows, t0 = [], time.perf_counter()
    for i in range(args.cases):
        text, finding = CASES[i % len(CASES)]
        prior = render(sample_patient(rng), Findings(), sample_nuisance(rng), size=eng.resolution, noise_seed=i).image
        probs, sizes = {}, {}
        for sev in ("slight", "moderate", "large"):
            cf = eng.counterfactual(prior, text, severity=sev, steps=args.steps, seed=1000 + i)
            probs[sev] = float(clf.predict(cf.image[None, None])[0, clf.index(finding)])
            sizes[sev] = float(np.abs(cf.image - cf.prior).mean())
        mono = probs["slight"] <= probs["moderate"] <= probs["large"]
        rows.append({"case": i, "instruction": {s: apply_severity(text, s) for s in probs}, "finding": finding,
                     "probabilities": probs, "monotonic": mono, "change_size": sizes,
                     "size_monotonic": sizes["slight"] <= sizes["moderate"] <= sizes["large"]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"cases": len(rows), "monotonic_fraction": float(np.mean([r["monotonic"] for r in rows])),
              "size_monotonic_fraction": float(np.mean([r["size_monotonic"] for r in rows])),
              "per_finding": {f: f"{sum(r['monotonic'] for r in rows if r['finding'] == f)}/"
                                 f"{sum(r['finding'] == f for r in rows)}" for f in sorted({r["finding"] for r in rows})},
              "steps": args.steps, "seed": args.seed, "classifier": getattr(clf, "name", str(args.classifier)),
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
