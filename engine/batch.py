"""``python -m engine batch JOBS.csv --out DIR``: a folder of counterfactuals in one process.

Every ``python -m engine edit`` pays the start-up (imports, model load: 7-9 s on the 2-core CPU)
for one edit. A batch loads the model once and runs the rows through the UNet in batches.

``JOBS.csv`` has a header and one row per film:

======================  ===================================================================
column                  meaning
======================  ===================================================================
``film``                DICOM, PNG or JPEG (relative to the CSV's folder, or absolute); required
``instruction``         instruct: the progression description
``source_caption``,     invert: a caption of the input and of the wanted image
``target_caption``
``method``              ``instruct`` (default) or ``invert``
``severity``            ``none`` (default), ``slight``, ``moderate``, ``large``
``seed``                default: derived from the film and the text, so a row is reproducible
``id``                  the output's name (letters, digits, ``.``, ``_``, ``-``); default ``row-NNNNN``
``sampler``, ``steps``, optional, as ``edit``'s options (empty: ``edit``'s defaults)
``text_guidance``,
``image_guidance``,
``confine``,
``devices``,
``inversion``
======================  ===================================================================

Writes ``DIR/<id>.png`` (the counterfactual in the film's geometry, provenance in its text
chunks, marked synthetic), appends one JSON line per finished row to ``DIR/results.jsonl``
(status ``done`` or ``error`` with the message, the output, and the provenance record) and, at
the end, ``DIR/results.csv`` (one row per job row, the latest outcome). A bad row (a missing or
unreadable film, an empty instruction, a bad value) is reported there and never stops the run.
Rerun the same command after an interruption: rows already ``done`` whose image exists are
skipped; rows that failed are tried again.

Under ``accelerate launch`` (or ``torchrun``) each process takes every ``WORLD_SIZE``-th row
(``RANK``), runs on ``cuda:LOCAL_RANK`` when CUDA is there, and writes
``results-rank<R>.jsonl``; the first process writes ``results.csv`` once all are done.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InputError

COLUMNS = ("id", "film", "method", "instruction", "source_caption", "target_caption", "severity", "seed", "sampler",
           "steps", "text_guidance", "image_guidance", "confine", "devices",
           "inversion")
RESULT_COLUMNS = ("row", "id", "film", "method", "status", "output", "message", "seed", "sampler", "steps",
                  "instruction_applied", "model_hash", "seconds", "provenance")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_ROWS = 1_000_000


@dataclass
class Job:
    """One row of the jobs file (values as typed; checked when the row runs)."""

    row: int  # 1-based data row number
    values: dict[str, str]
    name: str = ""
    error: str | None = None

    @property
    def method(self) -> str:
        return (self.values.get("method") or "instruct").strip().lower()


@dataclass
class Progress:
    """What a batch run did (the CLI prints it as JSON)."""

    rows: int = 0
    done: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0
    generate_cpu_seconds: float = 0.0
    load_seconds: float = 0.0
    rank: int = 0
    world: int = 1
    results: str = ""
    messages: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        return None if self.generate_seconds <= 0 or not self.done else self.done / self.generate_seconds

    def as_dict(self) -> dict[str, Any]:
        rate = self.images_per_s
        return {"rows": self.rows, "done": self.done, "errors": self.errors, "skipped_already_done": self.skipped,
                "seconds": round(self.seconds, 2), "load_seconds": round(self.load_seconds, 2),
                "generate_seconds": round(self.generate_seconds, 2),
                "generate_cpu_seconds": round(self.generate_cpu_seconds, 2),
                "images_per_s": None if rate is None else round(rate, 3), "rank": self.rank, "world": self.world,
                "results": self.results}


def read_jobs(path: str | os.PathLike[str]) -> list[Job]:
    """Reads the jobs file; each row's id is made (and checked) here, its values when it runs.

    Raises:
        InputError: the file is missing, not CSV text, has no ``film`` column, or unknown columns.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"jobs file {path} does not exist; give a CSV with a header (film, instruction, ...)")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = []
            for values in reader:
                rows.append({(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in values.items()})
                if len(rows) > MAX_ROWS:
                    raise InputError(f"{path} has more than {MAX_ROWS} rows; split it")
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path} is not a CSV text file ({exc})") from None
    if "film" not in header:
        raise InputError(f"{path} has no 'film' column; its header is {', '.join(header) or '(empty)'}")
    unknown = [h for h in header if h and h not in COLUMNS]
    if unknown:
        raise InputError(f"{path} has unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
    jobs, names = [], {}
    for number, values in enumerate(rows, start=1):
        job = Job(number, values)
        name = values.get("id") or f"row-{number:05d}"
        if not _ID.match(name):
            job.error = f"id {name!r} is not a file name of letters, digits, '.', '_' or '-' (at most 100)"
            name = f"row-{number:05d}"
        if name in names:
            job.error = f"id {name!r} is used by row {names[name]} too; ids must be unique"
            name = f"row-{number:05d}"
        names.setdefault(name, number)
        job.name = name
        jobs.append(job)
    return jobs


def _number(values: dict[str, str], key: str, kind: type, default: Any) -> Any:
    text = values.get(key, "")
    if text == "":
        return default
    try:
        value = float(text)
        if kind is int:
            if not value.is_integer():
                raise ValueError
            return int(value)
        return value
    except ValueError:
        raise InputError(f"{key} must be {'an integer' if kind is int else 'a number'}, not {text!r}") from None


def row_seed(job: Job) -> int:
    """The row's seed: its ``seed`` column, or one derived from the film and the texts (reproducible)."""
    given = _number(job.values, "seed", int, None)
    if given is not None:
        return given
    text = "\0".join(job.values.get(k, "") for k in ("film", "instruction", "source_caption", "target_caption",
                                                      "severity"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1


def instruct_request(job: Job):
    """The row as an :class:`engine.EditRequest` (validated).

    Raises:
        InputError: a missing instruction or a bad value (naming the column).
    """
    from engine.engine import EditRequest

    v = job.values
    if not v.get("instruction"):
        raise InputError("instruction is empty; an instruct row needs the progression description")
    return EditRequest(
        instruction=v["instruction"], severity=v.get("severity") or "none", steps=_number(v, "steps", int, None),
        text_guidance=_number(v, "text_guidance", float, 7.5), image_guidance=_number(v, "image_guidance", float, 1.5),
        seed=row_seed(job), sampler=v.get("sampler") or "auto", confine=v.get("confine") or "anatomy",
        devices=v.get("devices") or "detect",
    ).validated()


def invert_request(job: Job):
    """The row as an :class:`engine.InvertRequest` (validated; negative-prompt inversion by default)."""
    from engine.engine import InvertRequest

    v = job.values
    if not v.get("source_caption") or not v.get("target_caption"):
        raise InputError("an invert row needs source_caption and target_caption")
    return InvertRequest(v["source_caption"], v["target_caption"], inversion=v.get("inversion") or "negative-prompt",
                         steps=_number(v, "steps", int, 50), guidance=_number(v, "text_guidance", float, 7.5)).validated()


class Results:
    """The run's record: ``results[-rank<R>].jsonl`` appended line by line (fsynced), read back on a rerun."""

    def __init__(self, out: Path, rank: int, world: int) -> None:
        self.out = out
        self.path = out / ("results.jsonl" if world == 1 else f"results-rank{rank}.jsonl")

    def done(self) -> dict[int, dict[str, Any]]:
        """The latest ``done`` record per row whose output still exists, from every results file in ``out``."""
        latest: dict[int, dict[str, Any]] = {}
        for path in sorted(self.out.glob("results*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                latest[int(record["row"])] = record
        return {row: r for row, r in latest.items()
                if r.get("status") == "done" and r.get("output") and (self.out / r["output"]).is_file()}

    def add(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def write_results_csv(out: Path, jobs: Sequence[Job]) -> Path:
    """``results.csv``: one line per job row with its latest outcome (``pending`` when none)."""
    latest: dict[int, dict[str, Any]] = {}
    for path in sorted(out.glob("results*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            previous = latest.get(int(record["row"]))
            if previous is None or previous.get("status") != "done" or record.get("status") == "done":
                latest[int(record["row"])] = record
    target = out / "results.csv"
    tmp = out / ".results.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, RESULT_COLUMNS)
        writer.writeheader()
        for job in jobs:
            record = latest.get(job.row, {"row": job.row, "id": job.name, "film": job.values.get("film", ""),
                                          "method": job.method, "status": "pending"})
            writer.writerow({k: (json.dumps(record[k]) if k == "provenance" and k in record else record.get(k, ""))
                             for k in RESULT_COLUMNS})
    os.replace(tmp, target)
    return target


def _film_path(job: Job, base: Path) -> Path:
    film = job.values.get("film", "")
    if not film:
        raise InputError("film is empty; give the radiograph's path")
    path = Path(film).expanduser()
    return path if path.is_absolute() else base / path


def run_batch(jobs_file: str | os.PathLike[str], out: str | os.PathLike[str], *, model: str | None = None,
              device: str = "auto", dtype: str = "auto", batch_size: int = 8, bits: int = 8, rank: int = 0,
              world: int = 1, engine_factory: Callable[..., Any] | None = None,
              report: Callable[[str], None] | None = None) -> Progress:
    """Runs every row of ``jobs_file`` that is not done yet (see the module docstring).

    Args:
        jobs_file: the CSV.
        out: output folder (created).
        model, device, dtype: as ``engine.load``.
        batch_size: instruct rows per UNet batch.
        bits: 8 or 16 (PNG depth).
        rank, world: this process and the process count (rows ``rank, rank + world, ...``).
        engine_factory: builds the engine (tests pass one); default :func:`engine.load`.
        report: receives a progress line after every batch (default: stderr).

    Raises:
        InputError: a missing or malformed jobs file, a bad option, or a model that cannot load.
    """
    from engine.io import read_xray, write_png

    started = time.perf_counter()
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if bits not in (8, 16):
        raise InputError("--bits must be 8 or 16")
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    jobs_path = Path(jobs_file)
    jobs = read_jobs(jobs_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out, rank, world)
    progress = Progress(rank=rank, world=world, results=str(out / "results.csv"))
    mine = [job for job in jobs if (job.row - 1) % world == rank]
    done = results.done()
    todo = [job for job in mine if job.row not in done]
    progress.rows, progress.skipped = len(mine), len(mine) - len(todo)
    if progress.skipped:
        report(f"batch: {progress.skipped} of {len(mine)} rows already done in {out}; skipping them")
    eng = None
    if todo:
        import engine as engine_api

        t0 = time.perf_counter()
        eng = (engine_factory or engine_api.load)(model, device=device, dtype=dtype)
        progress.load_seconds = time.perf_counter() - t0
    base = jobs_path.parent

    def finish(job: Job, status: str, message: str = "", result: Any = None, seconds: float = 0.0,
               output: str = "") -> None:
        record: dict[str, Any] = {"row": job.row, "id": job.name, "film": job.values.get("film", ""),
                                  "method": job.method, "status": status, "output": output, "message": message,
                                  "seconds": round(seconds, 4)}
        if result is not None:
            prov = result.provenance()
            record.update(seed=prov.get("seed"), sampler=(prov.get("sampler") or {}).get("path", "invert"),
                          steps=result.request.steps, instruction_applied=getattr(result, "instruction_applied", ""),
                          model_hash=prov.get("model_hash"), provenance=prov)
        results.add(record)
        if status == "done":
            progress.done += 1
        else:
            progress.errors += 1
            progress.messages.append(f"row {job.row}: {message}")

    def save(job: Job, result: Any, xray: Any, seconds: float) -> None:
        prov = result.provenance()
        prov["input"] = xray.meta.public_dict()
        prov["batch_row"] = {"row": job.row, "id": job.name}
        name = f"{job.name}.png"
        write_png(out / name, result.image_input, bits=bits,
                  text={"Comment": prov["notice"], "cxr-journey": json.dumps(prov)})
        finish(job, "done", result=result, seconds=seconds, output=name)

    def prepare(job: Job) -> tuple[Any, Any] | None:
        """The row's film and request, or None after recording why the row cannot run."""
        try:
            if job.error:
                raise InputError(job.error)
            if job.method not in ("instruct", "invert"):
                raise InputError(f"method must be instruct or invert, not {job.method!r}")
            request = instruct_request(job) if job.method == "instruct" else invert_request(job)
            xray = read_xray(_film_path(job, base))
            return xray, request
        except InputError as exc:
            finish(job, "error", str(exc))
        except OSError as exc:
            finish(job, "error", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return None

    def generate_instruct(chunk: list[tuple[Job, Any, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            outcomes = eng.counterfactuals([x for _, x, _ in chunk], [r for _, _, r in chunk])
        except Exception:  # noqa: BLE001 - one bad row must not take the batch down: run the rows one by one
            if len(chunk) == 1:
                raise
            for item in chunk:
                _guarded(generate_instruct, [item])
            return
        each = (time.perf_counter() - t0) / len(chunk)
        for (job, xray, _), result in zip(chunk, outcomes):
            save(job, result, xray, each)

    def _guarded(fn: Callable[[list[tuple[Job, Any, Any]]], None], chunk: list[tuple[Job, Any, Any]]) -> None:
        try:
            fn(chunk)
        except InputError as exc:
            for job, _, _ in chunk:
                finish(job, "error", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported per row, the run goes on
            for job, _, _ in chunk:
                finish(job, "error", f"{type(exc).__name__}: {exc}")

    def generate_invert(chunk: list[tuple[Job, Any, Any]]) -> None:
        for job, xray, request in chunk:
            t0 = time.perf_counter()
            try:
                result = eng.invert_edit(xray, request)
            except InputError as exc:
                finish(job, "error", str(exc))
                continue
            save(job, result, xray, time.perf_counter() - t0)

    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        ready = [(job, *prepared) for job in chunk if (prepared := prepare(job)) is not None]
        t0, c0 = time.perf_counter(), time.process_time()
        _guarded(generate_instruct, [item for item in ready if item[0].method == "instruct"])
        _guarded(generate_invert, [item for item in ready if item[0].method == "invert"])
        progress.generate_seconds += time.perf_counter() - t0
        progress.generate_cpu_seconds += time.process_time() - c0
        finished = progress.done + progress.errors
        rate = progress.images_per_s
        left = (len(todo) - finished) / rate if rate else float("nan")
        report(f"batch: {finished}/{len(todo)} rows ({progress.errors} bad)"
               + (f", {rate:.2f} images/s, about {left:.0f} s left" if rate else "")
               + (f" [process {rank + 1} of {world}]" if world > 1 else ""))
    progress.seconds = time.perf_counter() - started
    return progress


def distributed() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from the environment ``accelerate launch``/``torchrun`` set (0, 1, 0 alone)."""
    def env(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return env("RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_RANK", 0)


def main_batch(args: Any) -> dict[str, Any]:
    """``python -m engine batch``: runs this process's share; with several processes, waits for all and
    lets the first write ``results.csv``.

    Returns:
        The summary printed as JSON. The exit code is 0 whenever the run finished, bad rows or
        not (they are counted in ``errors`` and listed in ``results.csv``): under a launcher a
        non-zero exit of one process stops the others.
    """
    rank, world, local_rank = distributed()
    device = args.device
    group = False
    if world > 1:
        import torch
        import torch.distributed as dist

        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        dist.init_process_group("gloo")  # a CPU barrier: no collective touches the GPUs
        group = True
    try:
        progress = run_batch(args.jobs, args.out, model=args.model, device=device, dtype=args.dtype,
                             batch_size=args.batch_size, bits=args.bits, rank=rank, world=world,
                             report=(lambda line: None) if args.quiet else None)
    finally:
        if group:
            import torch.distributed as dist

            dist.barrier()
    if rank == 0:
        write_results_csv(Path(args.out), read_jobs(args.jobs))
    if group:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    summary = progress.as_dict()
    if progress.messages:
        summary["bad_rows"] = progress.messages[:20]
    return summary
