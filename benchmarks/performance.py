"""Regenerates the tables of docs/PERFORMANCE.md: runs every benchmark of a suite, then rewrites them.

    python benchmarks/performance.py                  # the suite for this machine (gpu with CUDA, else cpu)
    python benchmarks/performance.py --suite cpu --only sd15 inversions
    python benchmarks/performance.py --tables-only    # rebuild the tables from docs/eval/bench_*.json

Each benchmark writes its JSON to ``docs/eval/bench_<suite>_<name>.json`` (device, versions,
commit, command and every figure), and its table replaces the lines between
``<!-- table:<suite>_<name> -->`` and ``<!-- /table:<suite>_<name> -->`` in docs/PERFORMANCE.md.
Benchmarks run one after another, never side by side: they time the same cores.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "PERFORMANCE.md"
EVAL = ROOT / "docs" / "eval"
BENCH = [sys.executable, "benchmarks/bench_engine.py"]
FAST = [sys.executable, "benchmarks/bench_fast.py"]

SUITES: dict[str, dict[str, list[str]]] = {
    "cpu": {  # the 2-core CPU: the bundled model, and SD 1.5-sized latency at few steps
        # issue 28: the fast sampler vs the full one vs diffusers, cold and warm, and the batch CLI
        "fast": [*FAST, "--threads", "2", "--repeats", "20", "--batch-rows", "24"],
        "bundled": [*BENCH, "--threads", "2", "--method", "instruct", "--batch", "1", "6", "--compare", "diffusers"],
        "bundled_reedit": [*BENCH, "--threads", "2", "--method", "instruct", "--batch", "1", "--prior-cache",
                           "--compare", "diffusers"],
        "bundled_invert": [*BENCH, "--threads", "2", "--method", "invert", "--steps", "50", "--repeats", "3",
                           "--compare", "diffusers"],
        "sd15": [*BENCH, "--threads", "2", "--arch", "sd15", "--res", "256", "--steps", "5", "--repeats", "1",
                 "--warmup-steps", "1", "--compare", "diffusers"],
        "inversions": [sys.executable, "benchmarks/bench_invert.py", "--threads", "2", "--steps", "50"],
        "train": [sys.executable, "benchmarks/bench_train.py", "--arch", "small", "--device", "cpu",
                  "--resolution", "256", "--batch", "8", "--steps", "5", "--warmup", "2"],
    },
    "gpu": {  # issue 10's targets: SD 1.5-sized at 256 and 512 px, eager and CUDA graphs
        # issue 28: the bundled model's fast sampler at 256 and 512 px, eager and CUDA graphs
        "fast": [*FAST, "--res", "256", "512", "--repeats", "30", "--batch-rows", "64"],
        "fast_graphs": [*FAST, "--res", "256", "512", "--repeats", "30", "--cuda-graphs", "--compare", "none"],
        "sd15": [*BENCH, "--arch", "sd15", "--res", "256", "512", "--steps", "20", "--method", "instruct", "invert",
                 "--batch", "1", "6", "--compare", "diffusers"],
        "sd15_graphs": [*BENCH, "--arch", "sd15", "--res", "256", "512", "--steps", "20", "--batch", "1", "6",
                        "--cuda-graphs"],
        "bundled": [*BENCH, "--method", "instruct", "--batch", "1", "6", "--compare", "diffusers"],
        "inversions": [sys.executable, "benchmarks/bench_invert.py", "--arch", "sd15", "--res", "512", "--device", "cuda",
                       "--steps", "50", "--repeats", "3"],
        "train": [sys.executable, "benchmarks/bench_train.py", "--arch", "sd15", "--device", "cuda",
                  "--resolution", "256", "--batch", "32"],
    },
}


def out_flag(command: list[str]) -> str:
    """The option that names a benchmark's JSON output."""
    return "--json" if "benchmarks/bench_train.py" in command else "--out"


def table(name: str, data: object) -> str:
    """A benchmark's JSON as a Markdown table plus the line that says where it ran."""
    from benchmarks.bench_engine import format_table

    if isinstance(data, dict) and data.get("kind") == "fast":  # benchmarks/bench_fast.py
        from benchmarks.bench_fast import format_table as fast_table

        return fast_table(data)
    if isinstance(data, dict) and "environment" in data:  # benchmarks/bench_engine.py
        env = data["environment"]
        where = (f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, diffusers "
                 f"{env['diffusers']}, commit {env['git_commit']}, load average {env['load_average_1min_start']} "
                 f"at start; `{env['command']}`")
        if env.get("note"):
            where += f"; {env['note']}"
        return format_table(data["rows"]) + f"\n\n{where}"
    if isinstance(data, dict) and "rows" in data:  # benchmarks/bench_invert.py
        lines = ["| inversion | seconds per edit | inversion (s) | editing (s) | cached |", "|---|---|---|---|---|"]
        for r in data["rows"]:
            lines.append(f"| {r['inversion']} | {r['seconds_per_edit']:.2f} | {r['invert_s']:.2f} | "
                         f"{r['edit_s']:.2f} | {'yes' if r['cached'] else 'no'} |")
        model = f"random {data['arch']} weights" if data.get("arch") else Path(str(data.get("model", "?"))).name
        where = (f"{model}; {data.get('gpu') or data['cpu']}, {data['threads']} threads, {data['dtype']}, "
                 f"{data['resolution']} px, {data['steps']} DDIM steps, median of {data['repeats']}"
                 + (f"; {data['note']}" if data.get("note") else ""))
        return "\n".join(lines) + f"\n\n{where}"
    rows = list(data)  # benchmarks/bench_train.py
    lines = ["| stage | arch | params (M) | res | batch | ms per step | images/s | peak memory (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['arch']} | {r['params_m']} | {r['resolution']} | {r['batch']} | "
                     f"{r['ms_per_step']} | {r['images_per_s']} | {r['peak_memory_mb']} |")
    first = rows[0] if rows else {}
    return "\n".join(lines) + f"\n\n{first.get('device', '?')}, {first.get('threads', '?')} threads, {first.get('dtype', '?')}"


def rewrite(doc: Path, key: str, text: str) -> bool:
    """Replaces the block between the key's markers; False when the document has no such block."""
    source = doc.read_text()
    pattern = re.compile(rf"(<!-- table:{re.escape(key)} -->\n).*?(\n<!-- /table:{re.escape(key)} -->)", re.S)
    if not pattern.search(source):
        return False
    doc.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), source))
    return True


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", default=None, help="run these benchmarks of the suite only")
    parser.add_argument("--tables-only", action="store_true", help="run nothing; rebuild the tables from the JSON")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args()

    suite = SUITES[args.suite]
    names = args.only or list(suite)
    unknown = [n for n in names if n not in suite]
    if unknown:
        parser.error(f"{', '.join(unknown)} not in the {args.suite} suite ({', '.join(suite)})")
    failed = []
    for name in names:
        key = f"{args.suite}_{name}"
        out = EVAL / f"bench_{key}.json"
        if not args.tables_only:
            command = [*suite[name], out_flag(suite[name]), str(out)]
            print("$", " ".join(command), flush=True)
            if subprocess.run(command, cwd=ROOT).returncode != 0:
                failed.append(name)
                continue
        if not out.is_file():
            print(f"{out} is missing: run without --tables-only", file=sys.stderr)
            failed.append(name)
            continue
        if not rewrite(args.doc, key, table(name, json.loads(out.read_text()))):
            print(f"{args.doc} has no <!-- table:{key} --> block; {out} was written", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
