"""Load and soak test: ``python app.py`` on 127.0.0.1 driven by concurrent gradio_client users.

    python benchmarks/load_test.py --quick                                   # smoke: 2 clients x 3 edits
    OMP_NUM_THREADS=2 python benchmarks/load_test.py --clients 8 --edits 25 --out docs/eval/load_test.json
    python benchmarks/load_test.py --device cuda --clients 16 --edits 50      # on a GPU

What it does:

1. starts ``python app.py --port P`` (the bundled model unless ``--model``; host 127.0.0.1;
   ``HF_HUB_OFFLINE=1``; the server's temporary files in a private folder that is deleted at
   the end) and waits until it serves;
2. warms up with one load and one edit, then records the server's resident memory (RSS of the
   process and its children) as the baseline;
3. runs ``--clients`` users at once, each a thread with its own ``gradio_client.Client`` (its
   own Gradio session): a load of an example (``sim_normal.png`` or the real CR
   ``RG1_UNCR.dcm``, alternating), then ``--edits`` edits with distinct seeds, instructions and
   severities (``--steps`` steps, 20 by default as in the app), a few DICOM exports, and one
   deliberately bad upload (a text file named ``.png``) that must come back as an error while
   the user carries on with their loaded radiograph; every result is checked (its seed, the
   shape of the radiograph it was made from: sessions must not cross; the files exist);
4. the edits run in two phases with a barrier in between, so the RSS after the first half of
   the edits (warm-up growth: every session holding a radiograph and a result) can be compared
   with the RSS after all of them (a leak grows between the two); RSS is also sampled every
   second for the peak. glibc keeps memory that Python and torch freed (per-thread arenas,
   fragmentation), so raw RSS creeps up without a leak; ``--trim`` asks the server's glibc to
   return it (``malloc_trim(0)`` through ``gdb -batch -p PID``) at each reading and judges the
   leak on the trimmed numbers (raw numbers are kept too);
5. prints a table and, with ``--out``, writes JSON with the device, command line, git commit
   and every number.

The whole run is bounded by ``--timeout`` seconds (each request waits at most until then). Exit
status 0 when no request failed (bad uploads refused as expected don't count as failures), the
expected errors all arrived, and the RSS growth between the two phases (trimmed with
``--trim``) stays within ``--leak-margin-mb``; 1 otherwise; 2 when the server could not start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIM_NORMAL = ROOT / "assets" / "examples" / "sim_normal.png"
METHOD = "Instruction model"  # journey_ui.workstation.METHODS[0]; not imported so this process stays light
INSTRUCTIONS = (
    "new left pleural effusion",
    "new right pleural effusion; heart size unchanged",
    "interval increase in cardiomegaly",
    "right pleural effusion has resolved",
    "improving pulmonary edema",
    "without support devices",
    "new right pneumothorax",
    "new left lower lobe consolidation",
)
SEVERITIES = ("none", "slight", "moderate", "large")
BAD_UPLOAD_MESSAGE = "not a DICOM, PNG or JPEG"


# -- the server --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, workdir: Path, log_path: Path) -> subprocess.Popen:
    """``python app.py`` as a user starts it, with its temporary files under ``workdir``."""
    tmp = workdir / "server-tmp"
    tmp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp),
           "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    for key in ("CXR_HOST", "GRADIO_SERVER_NAME", "CXR_SHARE"):
        env.pop(key, None)  # 127.0.0.1 and no share link, whatever the caller's shell says
    env.update(args.server_env)
    cmd = [sys.executable, "app.py", "--port", str(port), "--device", args.device,
           "--concurrency", str(args.concurrency)]
    if args.model:
        cmd += ["--model", args.model]
    with log_path.open("w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until_serving(proc: subprocess.Popen, url: str, deadline: float, log_path: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not serve {url} in time:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its children (psutil, else /proc/PID/status VmRSS)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
    pids, todo = [], [pid]
    while todo:  # children via /proc/PID/task/*/children
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the server's RSS every ``interval`` seconds; keeps the peak and the series."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - self.t0, rss_bytes(self.pid)))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    @property
    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def malloc_trim(pid: int) -> bool:
    """Asks the process's glibc to hand freed memory back to the OS (gdb attaches for a moment)."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return False
    try:
        out = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex", "call (int)malloc_trim(0)"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "$1 = " in out.stdout


class Memory:
    """RSS readings of the server: raw, and after ``malloc_trim`` when ``trim`` is on."""

    def __init__(self, pid: int, trim: bool) -> None:
        self.pid, self.trim = pid, trim
        self.raw: dict[str, int] = {}
        self.trimmed: dict[str, int] = {}

    def read(self, label: str) -> None:
        self.raw[label] = rss_bytes(self.pid)
        if self.trim:
            if not malloc_trim(self.pid):
                print("warning: malloc_trim through gdb failed; leak judged on raw RSS", file=sys.stderr)
                self.trim = False
                self.trimmed.clear()
                return
            self.trimmed[label] = rss_bytes(self.pid)


# -- the users ---------------------------------------------------------------------------------------
@dataclass
class Request:
    client: int
    kind: str  # load, generate, export_dicom, bad_upload
    started: float
    latency_s: float
    ok: bool
    expected_error: bool = False
    error: str = ""
    service_s: float | None = None  # the engine's own time for a generate (from provenance)


@dataclass
class Run:
    deadline: float
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, r: Request) -> None:
        with self.lock:
            self.requests.append(r)


class Deadline(Exception):
    """The run's --timeout passed."""


def call(run: Run, client: Any, cid: int, kind: str, *args: Any, api_name: str,
         check: Callable[[Any], str | None] | None = None) -> Any:
    """One request, timed from submission to result (queueing included). ``check`` returns what
    is wrong with a result (None when it is right); a wrong result counts as a failure."""
    remaining = run.deadline - time.monotonic()
    if remaining <= 0:
        raise Deadline()
    t0 = time.monotonic()
    try:
        out = client.submit(*args, api_name=api_name).result(timeout=remaining)
    except Exception as exc:
        latency = time.monotonic() - t0
        if kind == "bad_upload":
            expected = BAD_UPLOAD_MESSAGE in str(exc)
            run.add(Request(cid, kind, t0, latency, ok=expected, expected_error=expected,
                            error="" if expected else f"{type(exc).__name__}: {exc}"[:300]))
            return None
        run.add(Request(cid, kind, t0, latency, ok=False, error=f"{type(exc).__name__}: {exc}"[:300]))
        if isinstance(exc, TimeoutError) or time.monotonic() >= run.deadline:
            raise Deadline() from exc
        return None
    latency = time.monotonic() - t0
    if kind == "bad_upload":  # accepted a text file as an image: a failure
        run.add(Request(cid, kind, t0, latency, ok=False, error="the bad upload was accepted"))
        return out
    wrong = check(out) if check is not None else None
    if wrong:
        run.add(Request(cid, kind, t0, latency, ok=False, error=f"wrong result: {wrong}"[:300]))
        return None
    service = None
    if kind == "generate":
        try:
            service = round(float(json.loads(out[9])["timings_s"]["total"]), 4)
        except (TypeError, ValueError, IndexError, KeyError):
            pass
    run.add(Request(cid, kind, t0, latency, ok=True, service_s=service))
    return out


def check_generate(seed: int, input_shape: tuple[int, int] | None) -> Callable[[Any], str | None]:
    """A generate's result must carry this user's seed and be made from this user's radiograph
    (its input shape), so sessions are not crossed under load; the images must exist."""
    def check(out: Any) -> str | None:
        try:
            record = json.loads(out[9])
        except (TypeError, ValueError, IndexError):
            return "no provenance"
        if record.get("seed") != seed or out[8] != seed:
            return f"seed {record.get('seed')} / {out[8]}, expected {seed}"
        shape = tuple(record.get("transform", {}).get("input_shape", ()))
        if input_shape is not None and shape != tuple(input_shape):
            return f"made from a {shape} image, but this user loaded {tuple(input_shape)}"
        if not all(isinstance(p, str) and Path(p).is_file() for p in out[:3]):
            return "prior, counterfactual or change map missing"
        return None
    return check


def check_dicom(out: Any) -> str | None:
    # "Exported files" lists every export since the film was loaded: the newest is last.
    if not (isinstance(out, list) and out and str(out[-1]).endswith(".dcm") and Path(out[-1]).is_file()):
        return f"no DICOM file in {out!r}"[:200]
    return None


def image_shape(path: str) -> tuple[int, int] | None:
    """(rows, columns) of an example, read here to check the server used the right one."""
    try:
        if path.lower().endswith(".dcm"):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # unreadable here: skip the shape check
        return None


def generate_args(instruction: str, severity: str, steps: int, seed: int) -> tuple:
    """/generate's inputs in the app's order (see tests/test_ui.py ``_generate``)."""
    return (False, METHOD, instruction, severity, "chest x-ray with support devices",
            "chest x-ray without support devices", "negative-prompt", 2.0, "", steps, 7.5, 1.5, seed, False, None,
            "none")


def user(cid: int, url: str, args: argparse.Namespace, run: Run, example: str, bad_file: Path,
         barrier: threading.Barrier, downloads: Path) -> None:
    """One user: load, edit ``args.edits`` times in two phases, export a few times, one bad upload."""
    from gradio_client import Client, handle_file

    half = args.edits // 2
    phases = (range(0, half), range(half, args.edits))
    exports = {0, args.edits // 2, args.edits - 1}
    bad_at = min(1, args.edits - 1)
    shape = image_shape(example)
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads / f"client{cid}"))
    try:
        try:
            call(run, client, cid, "load", handle_file(example), api_name="/load")
            for p, edits in enumerate(phases):
                for i in edits:
                    n = cid * 1000 + i
                    instruction = INSTRUCTIONS[n % len(INSTRUCTIONS)]
                    severity = SEVERITIES[(i + cid) % len(SEVERITIES)]
                    call(run, client, cid, "generate", *generate_args(instruction, severity, args.steps, n),
                         api_name="/generate", check=check_generate(n, shape))
                    if i == bad_at:  # the session must keep its radiograph after a refused upload
                        call(run, client, cid, "bad_upload", handle_file(str(bad_file)), api_name="/load")
                    if i in exports:
                        call(run, client, cid, "export_dicom", False, api_name="/export_dicom", check=check_dicom)
                if p == 0:
                    barrier.wait(timeout=max(run.deadline - time.monotonic(), 0.001))
        except (Deadline, threading.BrokenBarrierError):
            barrier.abort()
        except Exception as exc:  # the client itself broke: count it, let the others go on
            run.add(Request(cid, "client", time.monotonic(), 0.0, ok=False, error=f"{type(exc).__name__}: {exc}"[:300]))
            barrier.abort()
    finally:
        client.close()


# -- numbers -----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency_stats(reqs: list[Request]) -> dict[str, Any]:
    lat = [r.latency_s for r in reqs]
    service = [r.service_s for r in reqs if r.service_s is not None]
    out = {"n": len(reqs), "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
           "max_s": max(lat) if lat else None, "mean_s": statistics.fmean(lat) if lat else None}
    if service:
        out["engine_p50_s"] = percentile(service, 50)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def mb(x: int | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def git_commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"\nLoad test: {result['clients']} clients x {result['edits_per_client']} edits, "
          f"{result['steps']} steps, device {result['device']}, concurrency {result['concurrency']}")
    print(f"{'requests':<28}{s['sent']:>8} sent, {s['succeeded']} ok, {s['failed']} failed, "
          f"{s['expected_errors']} expected errors (bad uploads refused)")
    print(f"{'wall time':<28}{s['wall_s']:>8.1f} s; {s['generate_per_min']:.1f} edits/min, "
          f"{s['requests_per_s']:.3f} requests/s")
    print(f"\n{'kind':<14}{'n':>6}{'p50 s':>9}{'p95 s':>9}{'max s':>9}{'mean s':>9}")
    for kind, st in result["latency"].items():
        if st["n"]:
            print(f"{kind:<14}{st['n']:>6}{st['p50_s']:>9.2f}{st['p95_s']:>9.2f}{st['max_s']:>9.2f}{st['mean_s']:>9.2f}")
    eng = result["latency"].get("generate", {}).get("engine_p50_s")
    if eng is not None:
        print(f"(engine time of one edit, median: {eng:.2f} s; the rest of a generate's latency is queueing "
              "and analysis)")
    m, t = result["memory_mb"], result["memory_trimmed_mb"]
    print(f"\n{'server RSS (MB)':<28}{'raw':>8}{'trimmed' if t else '':>10}")
    for key in ("after_start", "after_warmup", "after_phase1", "after_phase2", "after_idle", "peak",
                "growth_phase1_to_phase2", "growth_warmup_to_end"):
        sign = "+" if key.startswith("growth") else ""
        raw = f"{m[key]:>{sign}8.1f}" if m.get(key) is not None else f"{'-':>8}"
        trimmed = f"{t[key]:>{sign}10.1f}" if t.get(key) is not None else ""
        print(f"  {key:<26}{raw}{trimmed}")
    print(f"  (phases: {result['edits_phase1']} then {result['edits_phase2']} edits; leak margin "
          f"{result['leak_margin_mb']} MB on the {'trimmed' if t else 'raw'} growth between them)")
    print(f"server temp files: {result['server_temp_mb']} MB; verdict: {result['verdict']}")


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--edits", type=int, default=25, help="edits per client")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per edit (the app's default: 20)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 clients x 3 edits")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled journey-mini)")
    parser.add_argument("--device", default="auto", help="the app's --device: auto, cpu or cuda")
    parser.add_argument("--concurrency", type=int, default=1, help="the app's --concurrency (default 1)")
    parser.add_argument("--timeout", type=float, default=3600, help="bound on the whole run in seconds")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--leak-margin-mb", type=float, default=100,
                        help="allowed RSS growth between the two phases (default 100 MB)")
    parser.add_argument("--idle-s", type=float, default=10, help="wait after the run before the last RSS reading")
    parser.add_argument("--trim", action="store_true",
                        help="also read RSS after malloc_trim(0) in the server (needs gdb); judge leaks on that")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server (e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--keep-log", default=None, help="copy the server's log here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.edits, args.idle_s = 2, 3, 2
    if args.clients < 1 or args.edits < 2:
        parser.error("--clients must be >= 1 and --edits >= 2 (two phases)")
    if any("=" not in kv for kv in args.server_env):
        parser.error("--server-env takes KEY=VALUE")
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if args.trim and shutil.which("gdb") is None:
        parser.error("--trim needs gdb on PATH")

    try:
        from pydicom.data import get_testdata_file

        rg1 = get_testdata_file("RG1_UNCR.dcm", download=False)
    except Exception:  # pydicom-data missing: every user loads the simulated example
        rg1 = None
    examples = [str(SIM_NORMAL), str(rg1)] if rg1 else [str(SIM_NORMAL)]

    started_at = dt.datetime.now(dt.timezone.utc)
    t_begin = time.monotonic()
    deadline = t_begin + args.timeout
    workdir = Path(tempfile.mkdtemp(prefix="cxr-load-"))
    log_path = workdir / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_server(args, port, workdir, log_path)
    sampler = None
    try:
        try:
            wait_until_serving(proc, url, min(deadline, time.monotonic() + args.startup_timeout), log_path)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        startup_s = time.monotonic() - t_begin
        memory = Memory(proc.pid, args.trim)
        memory.read("after_start")
        sampler = RssSampler(proc.pid)
        sampler.start()
        bad_file = workdir / "scan.png"
        bad_file.write_text("this is a text file, not an image\n")
        downloads = workdir / "downloads"

        # warm-up: one load and one edit (lazy model loading, first-call allocations)
        from gradio_client import Client, handle_file

        warm = Run(deadline)
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads / "warmup"))
        call(warm, client, -1, "load", handle_file(str(SIM_NORMAL)), api_name="/load")
        out = call(warm, client, -1, "generate", *generate_args(INSTRUCTIONS[0], "large", args.steps, 0),
                   api_name="/generate")
        client.close()
        if out is None or not all(r.ok for r in warm.requests):
            print(f"error: the warm-up failed: {[r.error for r in warm.requests if not r.ok]}", file=sys.stderr)
            return 1
        provenance = json.loads(out[9])
        memory.read("after_warmup")

        # the users, in two phases separated by a barrier
        run = Run(deadline)
        barrier = threading.Barrier(args.clients, action=lambda: memory.read("after_phase1"))
        threads = [threading.Thread(target=user, name=f"user{c}", daemon=True,
                                    args=(c, url, args, run, examples[c % len(examples)], bad_file, barrier,
                                          downloads))
                   for c in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(deadline - time.monotonic(), 0) + 30)
        wall = time.monotonic() - t0
        timed_out = time.monotonic() >= deadline or any(t.is_alive() for t in threads)
        memory.read("after_phase2")
        time.sleep(args.idle_s)
        memory.read("after_idle")
        sampler.stop()
        server_alive = proc.poll() is None
    finally:
        if sampler is not None:
            sampler.stop()
        stop_server(proc)

    log_text = log_path.read_text(errors="replace")
    if args.keep_log:
        Path(args.keep_log).write_text(log_text)
    temp_bytes = folder_bytes(workdir / "server-tmp")
    shutil.rmtree(workdir, ignore_errors=True)

    reqs = run.requests
    kinds = ("load", "generate", "export_dicom", "bad_upload")
    expected = [r for r in reqs if r.expected_error]
    failed = [r for r in reqs if not r.ok]
    n_generate = sum(r.kind == "generate" and r.ok for r in reqs)
    planned = {"load": args.clients, "generate": args.clients * args.edits,
               "export_dicom": args.clients * len({0, args.edits // 2, args.edits - 1}), "bad_upload": args.clients}
    missing = sum(planned.values()) - len(reqs)
    def summary(readings: dict[str, int], peak: int | None) -> dict[str, Any]:
        if not readings:
            return {}
        out = {k: mb(v) for k, v in readings.items()}
        if peak is not None:
            out["peak"] = mb(peak)
        if "after_phase1" in readings and "after_phase2" in readings:
            out["growth_phase1_to_phase2"] = mb(readings["after_phase2"] - readings["after_phase1"])
        if "after_warmup" in readings and "after_phase2" in readings:
            out["growth_warmup_to_end"] = mb(readings["after_phase2"] - readings["after_warmup"])
        return out

    judged = memory.trimmed if memory.trim else memory.raw
    growth = (judged["after_phase2"] - judged["after_phase1"]) if {"after_phase1", "after_phase2"} <= set(judged) else None
    leak_ok = growth is not None and growth <= args.leak_margin_mb * 2**20
    ok = (not failed and missing == 0 and len(expected) == args.clients and not timed_out and server_alive
          and leak_ok)
    half = args.edits // 2
    result = {
        "what": "concurrent gradio_client users against python app.py on 127.0.0.1 (benchmarks/load_test.py)",
        "date": started_at.isoformat(timespec="seconds"),
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", "python", *sys.argv]),
        "git": git_commit(),
        "device": provenance.get("device"),
        "dtype": provenance.get("dtype"),
        "model_id": provenance.get("model_id"),
        "host": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                 "python": platform.python_version(), "load_average_end": os.getloadavg()[0]},
        "clients": args.clients, "edits_per_client": args.edits, "steps": args.steps,
        "concurrency": args.concurrency, "timeout_s": args.timeout,
        "examples": [Path(e).name for e in examples],
        "startup_s": round(startup_s, 1),
        "warmup_s": [round(r.latency_s, 2) for r in warm.requests],
        "edits_phase1": args.clients * half, "edits_phase2": args.clients * args.edits,
        "summary": {
            "sent": len(reqs), "planned": sum(planned.values()), "succeeded": sum(r.ok and not r.expected_error for r in reqs),
            "failed": len(failed), "expected_errors": len(expected), "timed_out": timed_out,
            "server_alive_at_end": server_alive, "wall_s": round(wall, 1),
            "generate_per_min": round(60 * n_generate / wall, 2) if wall else None,
            "requests_per_s": round(len(reqs) / wall, 4) if wall else None,
        },
        "latency": {k: latency_stats([r for r in reqs if r.kind == k and r.ok]) for k in kinds}
                   | {"all_successful": latency_stats([r for r in reqs if r.ok and not r.expected_error])},
        "memory_mb": summary(memory.raw, sampler.peak) | {
            "samples_every_s": 1.0, "samples_shown_every_s": 10,
            "samples": [[round(t, 1), mb(r)] for t, r in sampler.samples[::10]],
        },
        "memory_trimmed_mb": summary(memory.trimmed, None),
        "leak_judged_on": "trimmed" if memory.trim else "raw",
        "leak_margin_mb": args.leak_margin_mb,
        "server_env": args.server_env,
        "server_temp_mb": mb(temp_bytes),
        "server_log_tracebacks": log_text.count("Traceback"),
        "failures": [asdict(r) for r in failed][:20],
        "verdict": "pass" if ok else "fail",
    }
    print_table(result)
    if failed:
        print("\nfailures:", *[f"  client {r.client} {r.kind}: {r.error}" for r in failed[:10]], sep="\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
