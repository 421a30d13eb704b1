"""benchmarks/gpu_kit.py (the one-call GPU measurement kit) and bench_invert's random-architecture mode,
rehearsed on the CPU: the parts that decide whether a device call brings results back."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_invert_times_a_random_architecture(tmp_path: Path) -> None:
    """--arch builds random weights of that size (no download); every inversion row and the cached re-edit come back."""
    out = tmp_path / "inv.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_invert.py", "--arch", "tiny", "--res", "64", "--steps", "2",
                           "--threads", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["arch"] == "tiny" and data["resolution"] == 64 and data["steps"] == 2
    rows = {r["inversion"]: r for r in data["rows"]}
    assert set(rows) == {"ddim", "null-text", "null-text (cached re-edit)", "negative-prompt", "direct"}
    assert rows["null-text (cached re-edit)"]["cached"] and rows["null-text (cached re-edit)"]["invert_s"] < 0.05
    assert all(r["seconds_per_edit"] > 0 for r in data["rows"])
    assert "random tiny weights" in _module("performance").table("inversions", data)


def test_kit_note_reaches_the_table(tmp_path: Path) -> None:
    """Results measured with the kit's random-weight MiniLM say so wherever their table is printed."""
    kit, performance = _module("gpu_kit"), _module("performance")
    inversions = tmp_path / "inv.json"
    inversions.write_text(json.dumps({"rows": [], "gpu": "H200", "cpu": "x", "threads": 16, "dtype": "bf16",
                                      "resolution": 512, "steps": 50, "repeats": 3, "arch": "sd15"}))
    kit.stamp(inversions, kit.KIT_NOTE)
    assert kit.KIT_NOTE in performance.table("inversions", json.loads(inversions.read_text()))
    bench = tmp_path / "bench.json"
    env = {"device_name": "H200", "threads": 16, "torch": "2.11", "diffusers": "0.42.1", "git_commit": "abc",
           "load_average_1min_start": 0.1, "command": "python benchmarks/bench_engine.py"}
    bench.write_text(json.dumps({"environment": env, "settings": {}, "rows": []}))
    kit.stamp(bench, kit.KIT_NOTE)
    assert kit.KIT_NOTE in performance.table("sd15", json.loads(bench.read_text()))


def test_capped_run_stops_with_sigterm_so_rows_are_kept(tmp_path: Path) -> None:
    """A benchmark over its cap gets SIGTERM first (bench_engine.py then keeps its finished rows), not SIGKILL."""
    kit = _module("gpu_kit")
    flag = tmp_path / "terminated"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import signal, sys, time
        def stop(signum, frame):
            open({str(flag)!r}, "w").write("rows kept")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """))
    with open(tmp_path / "log.txt", "w") as log:
        code = kit._run_capped([sys.executable, str(child)], {}, 2.0, log)
    assert code is None
    assert flag.read_text() == "rows kept"
    with open(tmp_path / "log2.txt", "w") as log:
        assert kit._run_capped([sys.executable, "-c", "print('quick')"], {}, 30.0, log) == 0


def test_bench_fast_times_every_side_and_its_table_reaches_the_doc(fast_model, tmp_path: Path) -> None:
    """The fast sampler's benchmark: cold edit, the warm sides against diffusers, the journey, the batch CLI."""
    out = tmp_path / "fast.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_fast.py", "--model", str(fast_model), "--repeats", "2",
                           "--threads", "1", "--device", "cpu", "--batch-rows", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    sides = [r["side"] for r in data["rows"]]
    assert sides == ["fast", "fast, re-edit", "full", "diffusers", "fast, 6-rung journey"]
    rows = {r["side"]: r for r in data["rows"]}
    assert rows["fast"]["unet_calls_per_edit"] == 4 and rows["full"]["unet_calls_per_edit"] == 60
    assert len(rows["fast"]["times_s"]) == 2 and rows["fast"]["x_faster_than_diffusers"] > 0
    assert data["cold"]["sampler"] == "fast" and data["cold"]["x_warm"] > 0
    assert data["batch_cli"]["done"] == 3 and data["batch_cli"]["images_per_s"] > 0
    table = _module("performance").table("fast", data)
    assert "| fast, re-edit |" in table and "python -m engine batch" in table and "Cold: model load" in table
