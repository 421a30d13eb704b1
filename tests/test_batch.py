"""``python -m engine batch``: a jobs CSV in one process, bad rows reported, reruns resumed, shards."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.batch import read_jobs, run_batch, write_results_csv
from engine.io import read_xray

ROOT = Path(__file__).resolve().parent.parent


def _film(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:80, 0:70]
    img = np.clip(0.5 + 0.3 * np.sin(xx / (6.0 + seed)) * np.cos(yy / 9.0) + 0.05 * rng.standard_normal((80, 70)), 0, 1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


def _jobs(tmp: Path, rows: list[dict[str, str]]) -> Path:
    films = tmp / "films"
    films.mkdir(exist_ok=True)
    for i in range(3):
        _film(films / f"f{i}.png", i)
    (films / "notes.png").write_text("not an image")
    path = tmp / "jobs.csv"
    header = sorted({k for r in rows for k in r}, key=lambda k: (k != "film", k))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


GOOD = [
    {"film": "films/f0.png", "instruction": "new left pleural effusion", "severity": "large", "seed": "3"},
    {"film": "films/f1.png", "instruction": "new right pneumothorax", "id": "case-b"},
    {"film": "films/f2.png", "instruction": "worsening edema", "seed": "5", "sampler": "full", "steps": "3"},
]
BAD = [
    {"film": "films/missing.png", "instruction": "edema"},
    {"film": "films/notes.png", "instruction": "edema"},
    {"film": "films/f0.png", "instruction": ""},
    {"film": "films/f0.png", "instruction": "edema", "severity": "huge"},
    {"film": "films/f0.png", "instruction": "edema", "seed": "x"},
    {"film": "films/f0.png", "instruction": "edema", "id": "../escape"},
    {"film": "films/f0.png", "instruction": "edema", "id": "case-b"},
]


def test_a_folder_of_edits_with_bad_rows_reported(fast_model, tmp_path):
    jobs = _jobs(tmp_path, [*GOOD, *BAD])
    out = tmp_path / "out"
    lines: list[str] = []
    progress = run_batch(jobs, out, model=str(fast_model), device="cpu", dtype="fp32", batch_size=2,
                         report=lines.append)
    write_results_csv(out, read_jobs(jobs))
    assert (progress.done, progress.errors, progress.rows) == (3, 7, 10)
    assert lines and all(line.startswith("batch: ") for line in lines) and "images/s" in lines[-1]
    rows = _results(out)
    assert [r["status"] for r in rows] == ["done"] * 3 + ["error"] * 7
    messages = [r["message"] for r in rows[3:]]
    assert "not found" in messages[0].lower() or "no such file" in messages[0].lower()
    assert "empty" in messages[2] and "severity must be one of" in messages[3] and "seed must be an integer" in messages[4]
    assert "not a file name" in messages[5] and "used by row 2" in messages[6]
    assert sorted(p.name for p in out.glob("*.png")) == ["case-b.png", "row-00001.png", "row-00003.png"]
    assert rows[0]["sampler"] == "fast" and rows[2]["sampler"] == "full" and rows[2]["steps"] == "3"
    # each output is the counterfactual an edit of the same row makes, in the film's geometry, with provenance
    eng = engine.load(fast_model, device="cpu", dtype="fp32")
    film = read_xray(tmp_path / "films" / "f0.png")
    single = eng.counterfactual(film, "new left pleural effusion", severity="large", seed=3, confine="anatomy")
    written = read_xray(out / "row-00001.png")
    assert written.pixels.shape == film.pixels.shape
    assert np.abs(written.pixels - single.image_input).max() <= 1.0 / 255 + 1e-6
    prov = json.loads(rows[0]["provenance"])
    assert prov["seed"] == 3 and prov["sampler"]["path"] == "fast" and prov["synthetic"]
    assert prov["request"]["confine"] == "anatomy"  # batch confines by default, as edit and the app do
    assert prov["request"]["devices"] == "detect"  # and removes every device by detection
    with Image.open(out / "row-00001.png") as im:
        assert json.loads(im.text["cxr-journey"])["batch_row"] == {"row": 1, "id": "row-00001"}
    seeds = {r["id"]: r["seed"] for r in rows[:3]}
    assert seeds["case-b"].isdigit()  # derived from the row, recorded


def test_a_rerun_after_an_interruption_skips_finished_rows(fast_model, tmp_path):
    jobs = _jobs(tmp_path, [*GOOD, BAD[0]])
    out = tmp_path / "out"

    def stop_after_first_batch(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, out, model=str(fast_model), device="cpu", dtype="fp32", batch_size=2,
                  report=stop_after_first_batch)
    first = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in first] == [1, 2]
    loads = []

    def factory(*args, **kwargs):
        loads.append(args)
        return engine.load(*args, **kwargs)

    again = run_batch(jobs, out, model=str(fast_model), device="cpu", dtype="fp32", batch_size=2,
                      engine_factory=factory, report=lambda line: None)
    assert (again.skipped, again.done, again.errors) == (2, 1, 1)
    everything = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in everything) == [1, 2, 3, 4]  # bad rows are recorded before the batch runs
    done = run_batch(jobs, out, model=str(fast_model), device="cpu", dtype="fp32", engine_factory=factory,
                     report=lambda line: None)
    assert (done.skipped, done.done, done.errors) == (3, 0, 1)  # the bad row is tried again, nothing else
    (out / "row-00001.png").unlink()  # an output deleted by hand is made again
    redo = run_batch(jobs, out, model=str(fast_model), device="cpu", dtype="fp32", report=lambda line: None)
    assert redo.done == 1 and (out / "row-00001.png").is_file()


def test_the_jobs_file_itself_is_checked(tmp_path):
    from engine.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        read_jobs(tmp_path / "none.csv")
    (tmp_path / "nofilm.csv").write_text("image,instruction\na.png,edema\n")
    with pytest.raises(InputError, match="no 'film' column"):
        read_jobs(tmp_path / "nofilm.csv")
    (tmp_path / "extra.csv").write_text("film,instructions\na.png,edema\n")
    with pytest.raises(InputError, match="unknown column.*instructions"):
        read_jobs(tmp_path / "extra.csv")


def test_cli_exit_codes_and_summary(fast_model, tmp_path, capsys):
    from engine.__main__ import main

    jobs = _jobs(tmp_path, [GOOD[0], BAD[0]])
    code = main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--model", str(fast_model), "--device", "cpu",
                 "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["done"] == 1 and summary["errors"] == 1  # finished; the bad row is reported
    assert summary["images_per_s"] > 0 and summary["bad_rows"][0].startswith("row 2:")
    assert main(["batch", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o2"), "--model", str(fast_model)]) == 2


def test_processes_share_the_rows_and_the_first_writes_the_results(fast_model, tmp_path):
    """Two processes as ``accelerate launch`` / ``torchrun`` start them (RANK, WORLD_SIZE, LOCAL_RANK)."""
    jobs = _jobs(tmp_path, [*GOOD, BAD[2]])
    out = tmp_path / "out"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "engine", "batch",
                           str(jobs), "--out", str(out),
                           "--model", str(fast_model), "--device", "cpu", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a bad row is reported, it fails no process
    assert sorted(p.name for p in out.glob("results*.jsonl")) == ["results-rank0.jsonl", "results-rank1.jsonl"]
    rank0 = [json.loads(x)["row"] for x in (out / "results-rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(x)["row"] for x in (out / "results-rank1.jsonl").read_text().splitlines()]
    assert sorted(rank0) == [1, 3] and sorted(rank1) == [2, 4]
    assert [r["status"] for r in _results(out)] == ["done", "done", "done", "error"]
