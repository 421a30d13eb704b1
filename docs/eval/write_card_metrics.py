"""Writes the bundled model's measured numbers into its ``card.json`` from the committed reports.

The card's ``metrics`` must match ``docs/EVALUATION_journey-mini.json`` and ``docs/eval/*.json``;
copying them by hand is how a card drifts. Run after re-measuring::

    python docs/eval/write_card_metrics.py

Reads (v8): the evaluation on the first 150 simulated pairs of seed 7, the evaluation on held-out real-anatomy
pairs, the real-film report (where edits land on held-out patients' films), device removal on
real anatomy and the CPU speed benchmark (``benchmarks/bench_edit.py``); each entry keeps the
command that produced it. v7's probe, severity and simulated device reports were not re-run for v8
and stay out of its card.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets" / "models" / "journey-mini"
EVAL_COMMAND = (
    "python -m train evaluate --pairs data/sim-eval500/pairs.jsonl --limit 150 --model assets/models/journey-mini "
    "--out docs/EVALUATION_journey-mini.json --baselines identity,exact,latent-ceiling --classifier auto --segmenter auto "
    "--race-age none --examples 6 --quiet --device cpu --sampler full  (data/sim-eval500 = python -m train simulate "
    "--out data/sim-eval500 --patients 170 --visits 4 --seed 7)"
)


REAL_EVAL = "docs/EVALUATION_real_journey-mini.json"
REAL_EVAL_COMMAND = (
    "python -m train evaluate --pairs data/real-test/pairs.jsonl --model assets/models/journey-mini "
    "--out docs/EVALUATION_real_journey-mini.json --baselines identity,exact,latent-ceiling --race-age none --examples 6 "
    "--quiet --device cpu --sampler full  (data/real-test = python -m train simulate --on-films ../shared/data/hannover-covid19 "
    "--out data/real-test --splits test --masks auto --segmenter assets/models/cxr-segmenter-mini --edits-per-film 3 "
    "--seed 41 --device-free train/configs/hannover-device-free.txt)"
)
REAL_FILMS = "docs/eval/real_films_journey-mini.json"
REAL_FILMS_COMMAND = ("python -m train evaluate-real --films ../shared/data/hannover-covid19 --split test "
                      "--out docs/eval/real_films_journey-mini.json --sheet 6 --device cpu --quiet --sampler full")
DEVICES = "docs/eval/real_devices_removal.json"


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def evaluation(path: str = "docs/EVALUATION_journey-mini.json", command: str = EVAL_COMMAND) -> dict:
    report = _load(path)
    agg = report["aggregate"]
    model, identity, exact, ceiling = agg["model"], agg["identity"], agg["exact"], agg["latent-ceiling"]
    return {
        "command": command, "report": path, "pairs": model["pairs"],
        "evaluated_model_hash": report["model"]["model_hash"],
        "pathology_auroc_model": round(model["pathology_auroc"], 3),
        "pathology_auroc_exact": round(exact["pathology_auroc"], 3),
        "pathology_auroc_identity": round(identity["pathology_auroc"], 3),
        "pathology_auroc_latent_ceiling": round(ceiling["pathology_auroc"], 3),
        **{f"pathology_auroc_per_finding_{name}": {k: round(v, 2) for k, v in system["pathology_auroc_per_finding"].items()}
           for name, system in (("model", model), ("exact", exact), ("identity", identity),
                                ("latent_ceiling", ceiling))},
        "psnr_out_db": round(model["psnr_out"], 2), "psnr_in_db": round(model["psnr_in"], 2),
        "ssim_out": round(model["ssim_out"], 4),
        "anatomy_dice_vs_exact": round(model["anatomy_dice_exact"], 4),
        "anatomy_dice_vs_prior": round(model["anatomy_dice"], 4),
        "cmig_model": round(model["cmig"], 3), "cmig_identity": round(identity["cmig"], 3),
        "cmig_exact": round(exact["cmig"], 3),
        "cpg_model": round(model["cpg"], 4), "cpg_exact": round(exact["cpg"], 4),
    }


def real_films() -> dict:
    data = _load(REAL_FILMS)
    out = {"command": REAL_FILMS_COMMAND, "report": REAL_FILMS, "films": data["films"], "views": data["views"],
           "evaluated_model_hash": data["model_hash"]}
    for key, agg in data["aggregate"].items():
        out[key.replace(" ", "_")] = {k: round(v, 4) if isinstance(v, float) else v for k, v in agg.items()}
    return out


def devices() -> dict:
    data = _load(DEVICES)
    return {"command": data["command"], "report": DEVICES, **data["summary"]}


def main() -> int:
    card_path = MODEL / "card.json"
    card = json.loads(card_path.read_text())
    metrics = {"evaluation_simulated_pairs": evaluation(),
               "evaluation_real_anatomy_pairs": evaluation(REAL_EVAL, REAL_EVAL_COMMAND),
               "real_films_where_edits_land": real_films(), "device_removal_real_anatomy": devices()}
    bench = _load("docs/eval/bench_edit_journey-mini.json")
    metrics["speed_cpu_2_cores_s"] = {
        "command": "python benchmarks/bench_edit.py --repeats 5 --out docs/eval/bench_edit_journey-mini.json",
        "median": round(bench["median_s"], 3), "note": "256 px, 20 steps, fp32, 2 threads",
    }
    card["metrics"] = metrics
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
