"""The fast sampler's quality against its teacher: the curve of quality against steps.

    python benchmarks/eval_fast.py --model assets/models/journey-mini --out docs/eval/fast_quality.json \\
        --sim-pairs data/sim-eval500/pairs.jsonl --real-pairs data/real-v7-test/pairs.jsonl \\
        --films ../shared/data/hannover-covid19 --limit 150 --severity-cases 30 --real-films 20 [--write-card]

For each setting (default: the student at 1, 2, 4 and 8 steps, the teacher's full sampler at 20,
and the teacher at 4 steps as the no-distillation reference) it runs, one after another, the
project's own evaluations with ``--sampler`` and ``--steps``:

* ``python -m train evaluate`` on held-out simulated pairs (``--sim-pairs``): pathology AUROC,
  PSNR to the exact counterfactual outside the finding region;
* the same on held-out real-anatomy pairs (``--real-pairs``, ``simulate --on-films``);
* ``benchmarks/eval_severity.py``: how often the finding's measured size grows slight < moderate
  < large;
* ``python -m train evaluate-real`` on real films (``--films``, test patients): where the changes
  land (asked-side rate, share inside the lungs, heart ratio rises, "no change" stays small).

Each result goes to ``<out stem>/<setting>_<evaluation>.json`` (an existing one is reused, so an
interrupted run continues), and the curve to ``--out`` (JSON) and ``<out>.md`` (the table).
The targets (issue 28) compare the card's default fast setting with the teacher at 20 steps:
AUROC within 0.01 on both pair sets, PSNR outside within 1 dB, severity monotone as often, and
the real-film report no worse. ``--write-card`` puts that comparison into the model's
``card.json["fast_sampler"]["quality"]`` (the card then says what the fast path costs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_SETTINGS = ("fast:1", "fast:2", "fast:4", "fast:8", "full:20", "full:4")
AUROC_TOLERANCE = 1.0  # percentage points (evaluate reports AUROC in percent): 0.01
PSNR_TOLERANCE_DB = 1.0


def parse_setting(text: str) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    if sampler not in ("fast", "full") or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"a setting is fast:N or full:N, not {text!r}")
    return sampler, int(steps)


def _run(command: list[str], out: Path, log: Path) -> dict[str, Any] | None:
    """Runs one evaluation unless its JSON exists; returns the JSON (None when it failed)."""
    if not out.is_file():
        print("$", " ".join(command), flush=True)
        with log.open("a") as fh:
            fh.write("$ " + " ".join(command) + "\n")
            fh.flush()
            code = subprocess.run(command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
        if code != 0 or not out.is_file():
            print(f"failed ({code}); see {log}", file=sys.stderr)
            return None
    return json.loads(out.read_text())


def evaluations(args: argparse.Namespace, sampler: str, steps: int, folder: Path) -> dict[str, Any]:
    """Every evaluation of one setting (``None`` for those not asked or failed)."""
    py, name = sys.executable, f"{sampler}{steps}"
    common = ["--sampler", sampler, "--steps", str(steps)]
    log = folder / "log.txt"
    result: dict[str, Any] = {}
    for key, pairs in (("sim", args.sim_pairs), ("real_pairs", args.real_pairs)):
        if pairs:
            out = folder / f"{name}_{key}.json"
            report = _run([py, "-m", "train", "evaluate", "--model", args.model, "--pairs", pairs, "--out", str(out),
                           "--baselines", "none", "--examples", "0", "--quiet", "--device", args.device,
                           "--batch-size", str(args.batch_size), *(["--limit", str(args.limit)] if args.limit else []),
                           *common], out, log)
            result[key] = None if report is None else report["aggregate"]["model"]
    if args.severity_cases:
        out = folder / f"{name}_severity.json"
        report = _run([py, "benchmarks/eval_severity.py", "--model", args.model, "--cases", str(args.severity_cases),
                       "--device", args.device, "--out", str(out), *common], out, log)
        result["severity"] = None if report is None else {k: v for k, v in report.items() if k != "rows"}
    if args.films:
        out = folder / f"{name}_films.json"
        report = _run([py, "-m", "train", "evaluate-real", "--model", args.model, "--films", args.films, "--split",
                       "test", "--out", str(out), "--sheet", "0", "--quiet", "--device", args.device,
                       *(["--limit", str(args.real_films)] if args.real_films else []), *common], out, log)
        result["films"] = None if report is None else report["aggregate"]
    return result


def summary(row: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets and the table use, from one setting's evaluations."""
    def get(*path: str) -> float | None:
        value: Any = row
        for key in path:
            if not isinstance(value, dict) or value.get(key) is None:
                return None
            value = value[key]
        return float(value)

    return {
        "sim_auroc": get("sim", "pathology_auroc"), "sim_psnr_out": get("sim", "psnr_out"),
        "real_pairs_auroc": get("real_pairs", "pathology_auroc"), "real_pairs_psnr_out": get("real_pairs", "psnr_out"),
        "severity_size_monotone": get("severity", "finding_size_monotonic_fraction"),
        "films_left_asked_side": get("films", "left effusion", "asked_side_rate"),
        "films_right_asked_side": get("films", "right effusion", "asked_side_rate"),
        "films_effusion_inside_lungs": get("films", "left effusion", "inside_lungs_median"),
        "films_ctr_rise": get("films", "cardiomegaly", "ctr_rise_rate"),
        "films_no_change_abs": get("films", "no change", "mean_abs_median"),
    }


def verdict(fast: dict[str, float | None], teacher: dict[str, float | None]) -> dict[str, Any]:
    """Issue 28's quality targets for the fast setting against the teacher (None: not measured)."""
    def diff(key: str) -> float | None:
        a, b = fast.get(key), teacher.get(key)
        return None if a is None or b is None else a - b

    out: dict[str, Any] = {}
    for key, tol in (("sim_auroc", AUROC_TOLERANCE), ("real_pairs_auroc", AUROC_TOLERANCE),
                     ("sim_psnr_out", PSNR_TOLERANCE_DB), ("real_pairs_psnr_out", PSNR_TOLERANCE_DB)):
        d = diff(key)
        out[key] = {"fast_minus_teacher": None if d is None else round(d, 3), "tolerance": tol,
                    "met": None if d is None else d >= -tol}
    d = diff("severity_size_monotone")
    out["severity_size_monotone"] = {"fast_minus_teacher": d, "met": None if d is None else d >= 0}
    film_keys = ("films_left_asked_side", "films_right_asked_side", "films_ctr_rise", "films_effusion_inside_lungs")
    films = [diff(k) for k in film_keys]
    no_change = diff("films_no_change_abs")
    measured = [d for d in films if d is not None]
    out["films_no_worse"] = {"differences": dict(zip(film_keys, films)), "no_change_abs_difference": no_change,
                             "met": None if not measured else all(d >= 0 for d in measured)
                             and (no_change is None or no_change <= 0)}
    return out


def table(result: dict[str, Any]) -> str:
    """The curve as Markdown."""
    def f(v: float | None, digits: int = 1, pct: bool = False) -> str:
        if v is None:
            return "–"
        return f"{v:.0%}" if pct else f"{v:.{digits}f}"

    lines = ["| sampler | steps | UNet calls | sim AUROC (%) | sim PSNR out (dB) | real-anatomy AUROC (%) | "
             "real-anatomy PSNR out (dB) | severity monotone (size) | films: asked side L / R | "
             "films: CTR rises | films: 'no change' mean abs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["settings"]:
        s = row["summary"]
        calls = row["steps"] * (1 if row["sampler"] == "fast" else 3)
        lines.append(f"| {row['sampler']} | {row['steps']} | {calls} | {f(s['sim_auroc'])} | {f(s['sim_psnr_out'])} | "
                     f"{f(s['real_pairs_auroc'])} | {f(s['real_pairs_psnr_out'])} | "
                     f"{f(s['severity_size_monotone'], pct=True)} | {f(s['films_left_asked_side'], pct=True)} / "
                     f"{f(s['films_right_asked_side'], pct=True)} | {f(s['films_ctr_rise'], pct=True)} | "
                     f"{f(s['films_no_change_abs'], 4)} |")
    env = result["environment"]
    lines += ["", f"Model `{env['model']}` ({env['model_hash'][:12]}); {env['sim_pairs_note']}; "
                  f"`{env['command']}`. UNet calls = steps x branches (the full sampler runs three guidance branches "
                  "per step, batched)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "models" / "journey-mini"))
    parser.add_argument("--out", required=True, type=Path, help="the curve's JSON (the table goes next to it)")
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting(s) for s in DEFAULT_SETTINGS])
    parser.add_argument("--sim-pairs", default=None, help="held-out simulated pairs (pairs.jsonl)")
    parser.add_argument("--real-pairs", default=None, help="held-out real-anatomy pairs (pairs.jsonl)")
    parser.add_argument("--films", default=None, help="real films for evaluate-real (test patients)")
    parser.add_argument("--limit", type=int, default=None, help="first N pairs of each pair set")
    parser.add_argument("--severity-cases", type=int, default=0, help="eval_severity cases (0: skip)")
    parser.add_argument("--real-films", type=int, default=None, help="first N test films for evaluate-real")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-card", action="store_true",
                        help="write the default fast setting's comparison into card.json['fast_sampler']['quality']")
    args = parser.parse_args()

    import engine
    from engine.checkpoint import read_card

    eng = engine.load(args.model, device="cpu", dtype="fp32")
    spec = eng.fast
    folder = args.out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for sampler, steps in args.settings:
        if sampler == "fast" and spec is None:
            print(f"{args.model} has no fast sampler: skipping fast:{steps}", file=sys.stderr)
            continue
        row = {"sampler": sampler, "steps": steps, **evaluations(args, sampler, steps, folder)}
        row["summary"] = summary(row)
        rows.append(row)
    command = "python benchmarks/eval_fast.py " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {
        "environment": {"model": args.model, "model_hash": eng.model_hash, "command": command,
                        "sim_pairs_note": f"{args.limit or 'all'} pairs of each set, {args.severity_cases} severity "
                                          f"cases, {args.real_films or 'all'} test films",
                        "seconds": round(time.perf_counter() - started, 1)},
        "settings": rows,
    }
    teacher = next((r for r in rows if r["sampler"] == "full" and r["steps"] == 20), None)
    default = next((r for r in rows if spec is not None and r["sampler"] == "fast" and r["steps"] == spec.steps), None)
    if teacher and default:
        result["targets"] = {"fast_steps": spec.steps, **verdict(default["summary"], teacher["summary"])}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table(result))
    print(table(result))
    if args.write_card and "targets" in result:
        card_path = Path(args.model) / "card.json"
        card = json.loads(card_path.read_text())
        card["fast_sampler"]["quality"] = {
            "command": command, "teacher": "full sampler, 20 steps", "fast": f"fast sampler, {spec.steps} steps",
            "fast_summary": default["summary"], "teacher_summary": teacher["summary"], "targets": result["targets"],
            "curve": {f"{r['sampler']}:{r['steps']}": r["summary"] for r in rows},
        }
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        read_card(Path(args.model))  # still a valid card
        print(f"wrote the comparison into {card_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
