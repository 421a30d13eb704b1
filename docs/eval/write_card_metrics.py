"""Writes the bundled model's measured numbers into its ``card.json`` from the committed reports.

The card's ``metrics`` must match ``docs/EVALUATION_journey-mini.json`` and ``docs/eval/*.json``;
copying them by hand is how a card drifts. Run after re-measuring::

    python docs/eval/write_card_metrics.py

Reads: the 510-pair evaluation, the instruction probe, severity, device removal (instruct and
invert) and the CPU speed benchmark (``benchmarks/bench_edit.py``); each entry keeps the command that produced it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets" / "models" / "journey-mini"
EVAL_COMMAND = (
    "python -m train evaluate --pairs data/sim-eval500/pairs.jsonl --model assets/models/journey-mini "
    "--out docs/EVALUATION_journey-mini.json --baselines identity,exact,latent-ceiling --classifier auto --segmenter auto "
    "--race-age none --examples 6 --quiet --device cpu  (data/sim-eval500 = python -m train simulate "
    "--out data/sim-eval500 --patients 170 --visits 4 --seed 7)"
)


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def evaluation() -> dict:
    report = _load("docs/EVALUATION_journey-mini.json")
    agg = report["aggregate"]
    model, identity, exact, ceiling = agg["model"], agg["identity"], agg["exact"], agg["latent-ceiling"]
    return {
        "command": EVAL_COMMAND, "report": "docs/EVALUATION_journey-mini.json", "pairs": model["pairs"],
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


def probe() -> dict:
    data = _load("docs/eval/probe_journey-mini.json")
    sides = {r["instruction"]: round(r["asked_side_share"], 3) for r in data["rows"] if r.get("asked_side_share") is not None}
    return {"command": "python benchmarks/probe_instructions.py --out docs/eval/probe_journey-mini.json",
            "cases": data["cases"],
            "positive": data["positive"], "asked_side_share": sides}


def severity() -> dict:
    data = _load("docs/eval/severity_journey-mini.json")
    summary = data.get("summary", data)
    return {"command": "python benchmarks/eval_severity.py --cases 30 --out docs/eval/severity_journey-mini.json",
            "cases": summary["cases"], "fraction": round(summary["monotonic_fraction"], 3),
            "size_fraction": round(summary["size_monotonic_fraction"], 3), "per_finding": summary["per_finding"],
            "finding_size_fraction": round(summary["finding_size_monotonic_fraction"], 3),
            "exact_finding_size_fraction": round(summary["exact_finding_size_monotonic_fraction"], 3),
            "per_finding_finding_size": summary["per_finding_finding_size"],
            "finding_size_means": summary["finding_size_means"],
            "exact_finding_size_means": summary["exact_finding_size_means"]}


def devices() -> dict:
    data = _load("docs/eval/invert_devices.json")
    out = {"command": data["command"]}
    for system, s in data["summary"].items():
        key = system.replace("/", "_").replace("-", "_")
        out[f"removed_{key}"] = round(s["devices_removed_fraction"], 3)
        out[f"p_devices_{key}"] = s["p_devices_edit"]
        out[f"psnr_truth_{key}_db"] = s["psnr_truth"]
    first = next(iter(data["summary"].values()))
    out["p_devices_input"] = first["p_devices_input"]
    out["psnr_input_truth_db"] = first["psnr_input_truth"]
    if first.get("p_devices_oracle") is not None:
        out["p_devices_exact_change"] = first["p_devices_oracle"]
    return out


def main() -> int:
    card_path = MODEL / "card.json"
    card = json.loads(card_path.read_text())
    metrics = {"evaluation_510_pairs": evaluation(), "instruction_probe": probe(), "severity_monotonic": severity(),
               "device_removal_6_cases": devices()}
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
