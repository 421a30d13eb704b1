"""The bundled model on real radiographs: the figure in docs/MODEL_CARD.md ("Real radiographs").

Edits pydicom-data's ``RG1_UNCR.dcm`` (a real CR chest, MONOCHROME1) and four Hannover COVID-19
images of held-out patients (CC BY 3.0, read in place from ``../shared/data/hannover-covid19``; never copied into the
repository) with effusion, cardiomegaly and device-removal instructions, and draws prior, counterfactual
and signed delta per row::

    python docs/eval/real_radiographs.py --out docs/images/journey-mini_real_radiographs.png
    python docs/eval/real_radiographs.py --devices --out docs/images/journey-mini_real_devices.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HANNOVER = ROOT.parent / "shared" / "data" / "hannover-covid19" / "png"
CASES = (  # the Hannover films are of held-out (test) patients: never trained on
    ("RG1_UNCR.dcm", "new large left pleural effusion"),
    ("hannover:2168a917.png", "new large left pleural effusion"),
    ("hannover:3b46de94.png", "new large right pleural effusion"),
    ("hannover:f8335316.png", "new large cardiomegaly"),
    ("hannover:00870a9c.png", "without support devices"),
)
DEVICE_CASES = tuple((f"hannover:{film}.png", "without support devices")  # held-out films with real lines and leads
                     for film in ("00870a9c", "6b5af975", "c4a0e11a", "33ad0dcb", "26e8db49", "d2af569b"))


def _path(name: str) -> Path:
    if name.startswith("hannover:"):
        return HANNOVER / name.split(":", 1)[1]
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", action="store_true",
                        help="the device-removal sheet instead: 'without support devices' on six held-out films with real devices")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sampler", default="auto", choices=("auto", "fast", "full"),
                        help="the model's sampler (default: what the app runs, the fast one where the folder has it)")
    parser.add_argument("--confine", default="anatomy", choices=("anatomy", "none"),
                        help="anatomy (what the app runs: edits kept to the anatomy of the findings named) or none")
    parser.add_argument("--removal", default="detect", choices=("detect", "model"),
                        help="how 'without support devices' is made (EditRequest.devices): detect (what the app "
                             "runs: the device detector's lines inpainted) or model (the model's own edit)")
    args = parser.parse_args()

    import engine
    from engine.analysis.delta import symmetric_limit
    from engine.analysis.render import ExampleRow, example_grid
    from engine.io import read_xray

    eng = engine.load(args.model, device=args.device)
    rows = []
    for name, instruction in (DEVICE_CASES if args.devices else CASES):
        path = _path(name)
        if not path.is_file():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        cf = eng.counterfactual(read_xray(path), instruction, seed=args.seed, sampler=args.sampler,
                                confine=args.confine, devices=args.removal)
        delta = cf.image - cf.prior
        row = ExampleRow(label=f"{path.name}: {instruction}", base=cf.prior)
        row.images = {"Prior": cf.prior, "Counterfactual (synthetic)": cf.image}
        row.deltas = {"Δ (counterfactual − prior)": (delta, symmetric_limit(delta, 99.5, floor=0.02))}
        rows.append(row)
    figure = example_grid(rows, ["Prior", "Counterfactual (synthetic)", "Δ (counterfactual − prior)"],
                          title=f"{eng.card.name} on real radiographs (synthetic outputs; research use only)")
    figure.savefig(args.out, dpi=110, bbox_inches="tight")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
