"""Training faults: kill -9 mid-run and mid-checkpoint, exact resume, corrupt checkpoints detected.

Every run here is the tiny stage-2 config at 32 px for ``N`` steps with a checkpoint every
``EVERY`` steps (3, 6, 8) and a warm-up that spans the resume points; in-process runs share
one latent and text cache, the killed subprocess builds its own. A resumed run must end with
bit-identical weights, EMA and optimizer state to the straight run.

Every run here, in this process and in the killed subprocess, computes with :data:`THREADS` CPU
threads: a float sum split over another number of threads rounds differently (the straight run
at the machine's default of 2 threads and the killed one at 1 differed in the 8th significant
digit of ``projection.bias``), so exact resume is a property of one thread count, tested on any
machine. A resume at another thread count is tested apart: it says so in its log and ends
within a stated tolerance.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_fit import sim_data  # noqa: F401  (the shared simulated data set fixture)

import train.fit as fit_module
from train.__main__ import main as train_main
from train.config import load_config
from train.fit import (MANIFEST, CheckpointError, checkpoint_step, fit, latest_checkpoint, load_checkpoint,
                       verify_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny.yaml"
N, EVERY = 8, 3
THREADS = 1
"""CPU threads of every run here (the subprocess's OMP_NUM_THREADS and this process's torch)."""
PARTS = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


class _Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing in the trainer catches it or cleans up."""


def _overrides(run: Path, sim: Path, cache: Path | None) -> dict[str, str]:
    return {"manifest": str(sim / "pairs.jsonl"), "out_dir": str(run), "cache_dir": str(cache or run / "cache"),
            "resolution": "32", "batch_size": "4", "steps": str(N), "ckpt_every": str(EVERY), "log_every": "1",
            "warmup_steps": "4", "keep_checkpoints": "2", "progress": "false", "simulate": "0"}


def _cfg(run: Path, sim: Path, cache: Path | None):
    return load_config(TINY, _overrides(run, sim, cache))


def _cli_args(run: Path, sim: Path, cache: Path | None) -> list[str]:
    return ["fit", "--config", str(TINY), *(f"--{k}={v}" for k, v in _overrides(run, sim, cache).items())]


@pytest.fixture(scope="module", autouse=True)
def same_threads():
    """This process computes with :data:`THREADS` threads, as the killed subprocess does,
    whatever the machine's core count (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def killed(tmp_path_factory, sim_data):  # noqa: F811
    """``python -m train fit`` in a subprocess, SIGKILLed by a watcher thread once its first
    checkpoint exists. Started before :func:`straight` so its start-up overlaps that run; it
    keeps its own cache. Yields ``(run folder, watcher thread, process, stderr file)``."""
    run = tmp_path_factory.mktemp("killed") / "run"
    stderr = run.parent / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "train", *_cli_args(run, sim_data, None)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)

    def watch() -> None:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not (run / "checkpoints" / "latest").is_file() and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # after the first checkpoint: mid-step or mid-checkpoint
        proc.wait()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield run, watcher, proc, stderr
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, sim_data, cache) -> Path:  # noqa: F811
    """The final checkpoint of an uninterrupted run of N steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    fit(_cfg(run, sim_data, cache))
    return latest_checkpoint(run)


def _assert_same_weights(a: Path, b: Path) -> None:
    assert a.name == b.name == f"step-{N:07d}"
    for part in PARTS:
        ta, tb = load_file(str(a / part)), load_file(str(b / part))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (part, key)


def _damage(path: Path, how: str) -> str:
    """Damages one file of a checkpoint; returns the problem the message must name."""
    if how == "truncate":
        target = path / "model.safetensors"
        size = target.stat().st_size
        with target.open("r+b") as fh:
            fh.truncate(size // 2)
        return f"model.safetensors is truncated ({size // 2} bytes, the manifest says {size})"
    if how == "flip":
        target = path / "ema.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        return "ema.safetensors sha256 mismatch"
    if how == "missing_file":
        (path / "optimizer.json").unlink()
        return "optimizer.json is missing"
    (path / MANIFEST).unlink()
    return (f"it has no {MANIFEST} (written before checkpoints carried hashes? "
            "check it, then add one with train.fit.write_manifest)")


def _copy_run(straight_ckpt: Path, run: Path) -> Path:
    """A copy of the straight run's checkpoints (step 6 and step 8) under a new run folder."""
    shutil.copytree(straight_ckpt.parent, run / "checkpoints")
    return run / "checkpoints" / straight_ckpt.name


def test_kill_9_mid_run_resumes_from_the_last_complete_checkpoint(sim_data, killed, straight, caplog):  # noqa: F811
    run, watcher, proc, stderr = killed
    watcher.join()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {stderr.read_text()}"
    last = latest_checkpoint(run)
    assert last is not None and checkpoint_step(last) < N
    verify_checkpoint(last)

    assert json.loads((last / "state.json").read_text())["threads"] == THREADS  # written by the killed run

    caplog.set_level(logging.INFO, logger="train.fit")
    fit(_cfg(run, sim_data, None))  # the same command again
    assert f"resuming {run} from {last.name}" in caplog.text
    assert "CPU thread" not in caplog.text  # the same thread count: nothing to warn about
    final = latest_checkpoint(run)
    state = json.loads((final / "state.json").read_text())
    assert state["resumed_from"] == last.name and state["threads"] == THREADS
    _assert_same_weights(straight, final)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000006", "step-0000008"]
    with (run / "log.csv").open() as fh:
        assert [int(line.split(",")[0]) for line in fh.read().splitlines()[1:]] == list(range(1, N + 1))


@pytest.mark.parametrize("moment", ["mid_file", "before_pointer"])
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(  # noqa: F811
        tmp_path, sim_data, cache, straight, caplog, monkeypatch, moment):
    """The step-6 checkpoint write dies half way through a file, or after the folder's rename
    but before ``latest`` moves; the run resumes from step 3 and ends identical."""
    run = tmp_path / "run"
    real_save_file, real_point = fit_module.save_file, fit_module._point_latest

    def dying_save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        if ".step-0000006.tmp" in filename and filename.endswith("optimizer.safetensors"):
            with open(filename, "r+b") as fh:  # the write got half way
                fh.truncate(os.path.getsize(filename) // 2)
            raise _Killed

    def dying_point(root, name):
        if name == "step-0000006":
            raise _Killed
        real_point(root, name)

    if moment == "mid_file":
        monkeypatch.setattr(fit_module, "save_file", dying_save_file)
    else:
        monkeypatch.setattr(fit_module, "_point_latest", dying_point)
    with pytest.raises(_Killed):
        fit(_cfg(run, sim_data, cache))
    monkeypatch.undo()
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ([".step-0000006.tmp", "latest", "step-0000003"] if moment == "mid_file"
                    else ["latest", "step-0000003", "step-0000006"])
    assert latest_checkpoint(run).name == "step-0000003"

    caplog.set_level(logging.INFO, logger="train.fit")
    fit(_cfg(run, sim_data, cache))  # the same command again
    if moment == "mid_file":
        assert "removed" in caplog.text and ".step-0000006.tmp" in caplog.text
    assert f"resuming {run} from step-0000003" in caplog.text
    _assert_same_weights(straight, latest_checkpoint(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000006", "step-0000008"]


@pytest.mark.parametrize("how", ["truncate", "flip", "missing_file", "missing_manifest"])
def test_a_damaged_checkpoint_is_detected_with_a_clear_message(tmp_path, straight, how):
    path = _copy_run(straight, tmp_path / "run")
    verify_checkpoint(path)
    problem = _damage(path, how)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} is corrupt: {problem}; delete it or use an earlier checkpoint"
    assert info.value.path == path


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_the_cli_refuses_a_corrupt_latest_checkpoint_and_resumes_from_the_earlier_one(
        tmp_path, sim_data, cache, straight, capsys, caplog, how):  # noqa: F811
    run = tmp_path / "run"
    path = _copy_run(straight, run)
    earlier = run / "checkpoints" / "step-0000006"
    problem = _damage(path, how)
    args = _cli_args(run, sim_data, cache)
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"python -m train fit: error: checkpoint {path} is corrupt: {problem}; "
                   f"delete it or resume from an earlier one with --resume {earlier}\n")

    if how == "truncate":  # the user deletes the corrupt one: the run goes on from the one before, with a warning
        assert train_main(["export", "--run", str(run), "--out", str(tmp_path / "model")]) == 2
        assert capsys.readouterr().err == (f"python -m train export: error: checkpoint {path} is corrupt: {problem}; "
                                           f"delete it or export an earlier one with --checkpoint {earlier.name}\n")
        shutil.rmtree(path)
        with caplog.at_level(logging.WARNING, logger="train.fit"):
            assert latest_checkpoint(run) == earlier
        assert f"names {path.name}, which does not exist; using {earlier.name}" in caplog.text
    else:  # the user passes --resume: it becomes latest, the corrupt later one is replaced
        assert train_main([*args, "--resume", str(earlier)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["resumed_from"] == earlier.name and out["checkpoint"] == str(path)
        _assert_same_weights(straight, path)
        verify_checkpoint(path)


def test_resume_must_name_a_checkpoint_of_the_run(tmp_path, sim_data, cache, straight, capsys):  # noqa: F811
    run = tmp_path / "run"
    _copy_run(straight, run)
    assert train_main([*_cli_args(run, sim_data, cache), "--resume", str(straight)]) == 2  # another run's
    assert "not a checkpoint of" in capsys.readouterr().err
    assert train_main([*_cli_args(run, sim_data, cache), "--resume", str(run / "checkpoints" / "step-0000003")]) == 2
    assert "does not exist (checkpoints of this run: step-0000006, step-0000008)" in capsys.readouterr().err


def test_a_resume_at_another_thread_count_says_so_and_ends_close(tmp_path, sim_data, cache, straight, caplog):  # noqa: F811
    """A checkpoint records its thread count; resuming with another count logs that the result will
    not be bit-identical, and ends close to the straight run.

    The tolerance, stated: AdamW moves a weight by at most about the learning rate a step, so two
    runs whose gradients round differently end at most ``lr`` per resumed step apart in the
    weights and the EMA (measured: 1.1e-4 after two steps at lr 1e-3, where a gradient near zero
    flips the direction of its update); the optimizer's moments within 1e-6 (measured: 4e-9).
    """
    run = tmp_path / "run"
    _copy_run(straight, run)
    earlier = run / "checkpoints" / "step-0000006"
    assert json.loads((earlier / "state.json").read_text())["threads"] == THREADS
    other = THREADS + 1
    torch.set_num_threads(other)
    try:
        with caplog.at_level(logging.INFO, logger="train.fit"):
            fit(_cfg(run, sim_data, cache), resume=earlier)
    finally:
        torch.set_num_threads(THREADS)
    assert (f"step-0000006 was written with {THREADS} CPU thread(s), this run uses {other}: "
            "float sums are split differently") in caplog.text
    final = latest_checkpoint(run)
    assert final.name == straight.name and json.loads((final / "state.json").read_text())["threads"] == other
    lr = float(_cfg(run, sim_data, cache).lr)
    for part in PARTS:
        atol = 1e-6 if part == "optimizer.safetensors" else lr * (N - checkpoint_step(earlier))
        ta, tb = load_file(str(straight / part)), load_file(str(final / part))
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(tb[key], ta[key], rtol=0.0, atol=atol, msg=lambda m, k=key, p=part: f"{p} {k}: {m}")
