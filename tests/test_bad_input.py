"""Bad input everywhere it enters: one table of cases, run through every entry point.

Every case in :data:`CASES` is either accepted or refused with an
:class:`engine.errors.InputError` whose message matches the case's regex, the same message at
every entry point:

* file cases: :func:`engine.io.read_xray`; the CLI (``python -m engine edit``, in-process:
  exit code 2, exactly one ``error:`` line on stderr, no output file and nothing else written);
  the UI (:meth:`journey_ui.workstation.Workstation.load`, after which the same session loads a
  good image); the trainer's image readers (:func:`train.data.load_canvas`,
  :func:`train.registration.load_canvas`), which stop with the error rather than skip the file,
  and the DICOM-folder source, which reads headers only and never raises anything else;
* instruction cases: :meth:`engine.EditRequest.validated` (and the captions of
  :meth:`engine.InvertRequest.validated`), the CLI and :meth:`Workstation.edit`;
* model cases (a model that produces NaN/Inf): :meth:`engine.Engine.counterfactual`, the CLI
  (exit 2, nothing written) and :meth:`Workstation.edit` (the session keeps its last result).

``python benchmarks/bad_input_table.py`` prints the table with the messages as observed.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from engine.errors import InputError
from fixtures_io import dicom_test_file, grey_u8, grey_variants, jpeg_bytes, make_dicom, png_bytes, png_header_only

ACCEPTED = "accepted"
GREY = grey_u8(48, 40)  # (H, W) uint8: every image is small, so every case is fast
RAMP = ((np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) * 997) % 4096).astype(np.uint16)  # 12-bit


@dataclass(frozen=True)
class Case:
    """One bad (or awkward but valid) input.

    Attributes:
        id: short name (the pytest id).
        kind: ``file`` (an upload), ``instruction`` (the progression description) or ``model``
            (what a model produces).
        description: what the input is, in words, for the documentation table.
        outcome: :data:`ACCEPTED`, or a regex the :class:`InputError` message must match at every
            entry point.
        build: ``file``: writes the input into a folder and returns its path; ``instruction``:
            returns the text; ``model``: returns the bad value the decoder produces.
        cli_outcome: the CLI's outcome where it differs (the CLI checks a missing instruction
            itself, before the engine would).
    """

    id: str
    kind: str
    description: str
    outcome: str
    build: Callable[..., object]
    cli_outcome: str | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPTED


def _file(name: str, data: Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data())
        return path

    return build


def _copy(name: str, test_file: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return Path(shutil.copy(dicom_test_file(test_file), folder / name))

    return build


def _missing(folder: Path) -> Path:
    return folder / "never-uploaded.dcm"


def _cr() -> bytes:
    return make_dicom(RAMP, WindowCenter=2048, WindowWidth=4096)


def _corrupt_dicom() -> bytes:
    data = bytearray(_cr())
    rng = np.random.default_rng(0)
    data[132:600] = rng.integers(0, 256, 468, dtype=np.uint8).tobytes()  # the header after DICM
    return bytes(data)


def _apng() -> bytes:
    frames = [Image.fromarray(GREY), Image.fromarray(255 - GREY)]
    return png_bytes(frames[0], save_all=True, append_images=frames[1:])


def _jpeg_cut() -> bytes:
    noisy = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    data = jpeg_bytes(Image.fromarray(noisy))
    return data[: len(data) // 2]


def _png_cut() -> bytes:
    noisy = np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noisy))
    return data[: len(data) // 2]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(GREY).save(buf, format="GIF")
    return buf.getvalue()


_VARIANTS = grey_variants(GREY)

CASES: list[Case] = [
    # -- DICOM --------------------------------------------------------------------------------
    Case("dicom_cr", "file", "valid CR DICOM (12-bit, MONOCHROME2, window in header)", ACCEPTED,
         _file("cr.dcm", _cr)),
    Case("dicom_no_preamble", "file", "DICOM without the 128-byte preamble and file meta", ACCEPTED,
         _file("bare.dcm", lambda: make_dicom(RAMP, preamble=False))),
    Case("dicom_rle", "file", "RLE Lossless compressed DICOM (decoded by pydicom itself)", ACCEPTED,
         _file("rle.dcm", lambda: make_dicom(RAMP, compress_with=pydicom.uid.RLELossless))),
    Case("dicom_truncated_header", "file", "DICOM cut after 300 bytes (inside the header)",
         r"is a DICOM file without pixel data: it is not an image, or the file is truncated",
         _file("cut-header.dcm", lambda: _cr()[:300])),
    Case("dicom_truncated_pixels", "file", "DICOM cut half-way through its pixel data",
         r"truncated or corrupt", _file("cut-pixels.dcm", lambda: _cr()[:-RAMP.nbytes // 2])),
    Case("dicom_corrupt_header", "file", "DICOM whose header bytes are overwritten with noise",
         r"is a DICOM file without pixel data: it is not an image, or the file is truncated",
         _file("noise.dcm", _corrupt_dicom)),
    Case("dicom_no_pixel_data", "file", "DICOM without Pixel Data (e.g. a structured report)",
         r"DICOM file without pixel data", _file("no-pixels.dcm", lambda: make_dicom(None))),
    Case("dicom_ct", "file", "CT slice (pydicom CT_small.dcm)",
         r"^DICOM modality is CT; this tool expects a chest radiograph \(CR/DX\)$", _copy("ct.dcm", "CT_small.dcm")),
    Case("dicom_mr", "file", "MR slice (pydicom MR_small.dcm)",
         r"^DICOM modality is MR; this tool expects a chest radiograph", _copy("mr.dcm", "MR_small.dcm")),
    Case("dicom_us", "file", "ultrasound image (pydicom US1_UNCR.dcm)",
         r"^DICOM modality is US; this tool expects a chest radiograph", _copy("us.dcm", "US1_UNCR.dcm")),
    Case("dicom_multiframe", "file", "multi-frame DICOM (3 frames)",
         r"has 3 frames; this tool expects a single radiograph, so export the frame you want",
         _file("frames.dcm", lambda: make_dicom(np.zeros((48, 40 * 3), np.uint16), NumberOfFrames=3))),
    Case("dicom_no_decoder", "file", "compressed transfer syntax nothing here decodes (MPEG-2)",
         r"MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\), which no installed pixel-data "
         r"decoder supports; convert it to an uncompressed DICOM",
         _file("mpeg2.dcm", lambda: make_dicom(RAMP, transfer_syntax=pydicom.uid.MPEG2MPML))),
    Case("dicom_tiny", "file", "DICOM of 16x64 px", r"is only 64x16 px; a radiograph needs at least 32 px",
         _file("tiny.dcm", lambda: make_dicom(np.zeros((16, 64), np.uint16)))),
    # -- PNG / JPEG ---------------------------------------------------------------------------
    Case("png_grey", "file", "8-bit greyscale PNG", ACCEPTED, _file("grey.png", lambda: png_bytes(_VARIANTS["L"]))),
    Case("png_16bit", "file", "16-bit greyscale PNG (value/65535)", ACCEPTED,
         _file("i16.png", lambda: png_bytes(_VARIANTS["I;16"]))),
    Case("png_rgb", "file", "RGB PNG (read as BT.601 luminance)", ACCEPTED,
         _file("rgb.png", lambda: png_bytes(_VARIANTS["RGB"]))),
    Case("png_rgba", "file", "RGBA PNG (alpha composited on black)", ACCEPTED,
         _file("rgba.png", lambda: png_bytes(_VARIANTS["RGBA"]))),
    Case("png_palette", "file", "palette PNG (read through its palette)", ACCEPTED,
         _file("palette.png", lambda: png_bytes(_VARIANTS["P"]))),
    Case("png_grey_alpha", "file", "grey + alpha PNG", ACCEPTED, _file("la.png", lambda: png_bytes(_VARIANTS["LA"]))),
    Case("jpeg_grey", "file", "8-bit greyscale JPEG", ACCEPTED,
         _file("grey.jpg", lambda: jpeg_bytes(Image.fromarray(GREY)))),
    Case("png_1x1", "file", "PNG of 1x1 px", r"is only 1x1 px; a radiograph needs at least 32 px on each side",
         _file("dot.png", lambda: png_bytes(Image.new("L", (1, 1))))),
    Case("png_bomb", "file", "decompression bomb: PNG header claiming 30000x30000 px",
         r"is too large to open safely \(DecompressionBombError: .*\); downsample it first",
         _file("bomb.png", lambda: png_header_only(30000, 30000))),
    Case("png_over_limit", "file", "PNG header claiming 8000x8000 px (64 MP, over the 50 MP limit)",
         r"is 8000x8000 px \(64,000,000 pixels\), more than the limit of 50,000,000; downsample it first",
         _file("big.png", lambda: png_header_only(8000, 8000))),
    Case("png_truncated", "file", "PNG cut in half", r"could not be decoded as PNG .*truncated or corrupt",
         _file("cut.png", _png_cut)),
    Case("jpeg_truncated", "file", "JPEG cut in half", r"could not be decoded as JPEG .*truncated or corrupt",
         _file("cut.jpg", _jpeg_cut)),
    Case("png_animated", "file", "animated PNG (2 frames)",
         r"is an animated PNG with 2 frames; export one frame as a still image", _file("anim.png", _apng)),
    Case("text_as_png", "file", "a text file named .png",
         r"is not a DICOM, PNG or JPEG image \(its content matches none of these formats, whatever its file name "
         r"says\); choose a radiograph file", _file("notes.png", lambda: b"Findings: no acute disease.\n" * 10)),
    Case("gif_as_png", "file", "a GIF named .png (unsupported format)", r"is not a DICOM, PNG or JPEG image",
         _file("picture.png", _gif)),
    Case("empty_file", "file", "an empty file", r"is empty; choose a DICOM, PNG or JPEG radiograph",
         _file("empty.png", lambda: b"")),
    Case("missing_file", "file", "a path that does not exist", r"^File not found: .*; check the path$", _missing),
    # -- the instruction ------------------------------------------------------------------------
    Case("instruction_empty", "instruction", "empty instruction",
         r"^The progression description is empty; describe the change to make$", lambda: "",
         cli_outcome=r"^--method instruct needs --instruction \(the progression description\)$"),
    Case("instruction_whitespace", "instruction", "whitespace-only instruction",
         r"^The progression description is empty; describe the change to make$", lambda: " \n\t  "),
    Case("instruction_10000", "instruction", "10,000-character instruction",
         r"^The progression description has 10000 characters; keep it under 1000$",
         lambda: ("effusion " * 1250)[:10_000]),
    Case("instruction_non_ascii", "instruction", "non-ASCII text (German, an em dash, Chinese)", ACCEPTED,
         lambda: "neuer Pleuraerguss rechts — ünd 肺"),
    Case("instruction_control", "instruction", "control characters and NUL inside a valid instruction (the tokenizer drops them)", ACCEPTED,
         lambda: "new right\x00 pleural effusion\x07\x1b"),
    Case("instruction_invisible", "instruction", "only control/format characters (NUL, BEL, a zero-width space)",
         r"^The progression description has no visible characters \(only control or format characters\); "
         r"describe the change to make$", lambda: "\x00\u200b\x07"),
    Case("instruction_not_utf8", "instruction",
         "text that is not valid Unicode (a CLI argument in another encoding arrives as lone surrogates)",
         r"^The progression description contains bytes that are not valid UTF-8 text \(at character 10\); retype it",
         lambda: "effusion \udcff"),
    # -- the model --------------------------------------------------------------------------
    Case("model_nan", "model", "the model decodes to NaN",
         r"^The model produced non-finite values \(NaN/Inf\); try --dtype fp32 or another model$",
         lambda: float("nan")),
    Case("model_inf", "model", "the model decodes to +Inf",
         r"^The model produced non-finite values \(NaN/Inf\); try --dtype fp32 or another model$",
         lambda: float("inf")),
]


FILE_CASES = [c for c in CASES if c.kind == "file"]
TEXT_CASES = [c for c in CASES if c.kind == "instruction"]
MODEL_CASES = [c for c in CASES if c.kind == "model"]
GOOD_INSTRUCTION = "new right pleural effusion"


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


def _good_png(folder: Path) -> Path:
    path = folder / "good.png"
    path.write_bytes(png_bytes(Image.fromarray(GREY)))
    return path


def _contents(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Runs the CLI in-process: (exit code, stderr lines)."""
    from engine.__main__ import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


def _cli_edit(path: Path, out: Path, model: Path, instruction: str = GOOD_INSTRUCTION) -> list[str]:
    return ["edit", str(path), "--instruction", instruction, "--out", str(out), "--model", str(model),
            "--steps", "1", "--seed", "0", "--device", "cpu", "--dtype", "fp32"]


def _assert_refused_by_cli(code: int, err: list[str], pattern: str, out_dir: Path) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0].removeprefix("error: ")), err[0]
    assert _contents(out_dir) == set()  # nothing written, not even a temporary file


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(where the input is written, where the CLI writes its output)."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    return inputs, outputs


@pytest.fixture(scope="module")
def workstation(tiny_engine):
    from journey_ui.workstation import Workstation

    return Workstation(tiny_engine, None)


@pytest.fixture()
def session():
    from journey_ui.workstation import Session

    s = Session()
    yield s
    s.close()


# ----------------------------------------------------------------------------------------------
# The table itself
# ----------------------------------------------------------------------------------------------


def test_case_ids_are_unique_and_kinds_known():
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"file", "instruction", "model"}
    for case in CASES:
        assert case.description and case.outcome
        if not case.accepted:
            re.compile(case.outcome)


# ----------------------------------------------------------------------------------------------
# Files: read_xray, CLI, UI, trainer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FILE_CASES, ids=_ids(FILE_CASES))
def test_file_read_xray(case: Case, folders):
    from engine.io import read_xray

    path = case.build(folders[0])
    if case.accepted:
        x = read_xray(path)
        assert x.pixels.dtype == np.float32 and x.shape == GREY.shape
        assert np.isfinite(x.pixels).all() and 0.0 <= x.pixels.min() <= x.pixels.max() <= 1.0
        if case.id.startswith("png_"):  # every PNG layout reads as the grey original
            np.testing.assert_allclose(x.pixels, GREY / 255.0, atol=1e-6)
        return
    with pytest.raises(InputError) as exc:
        read_xray(path)
    message = str(exc.value)
    assert "\n" not in message and re.search(case.outcome, message), message
    if path.exists():  # bytes (an upload held in memory) give the same refusal
        with pytest.raises(InputError, match=case.outcome):
            read_xray(path.read_bytes(), name=path.name)


@pytest.mark.parametrize("case", FILE_CASES, ids=_ids(FILE_CASES))
def test_file_cli(case: Case, folders, tiny_model, capsys):
    inputs, outputs = folders
    path = case.build(inputs)
    out = outputs / "cf.png"
    code, err = _cli(_cli_edit(path, out, tiny_model), capsys)
    if case.accepted:
        assert code == 0 and not err, err
        assert _contents(outputs) == {"cf.png"}
        return
    _assert_refused_by_cli(code, err, case.outcome, outputs)


@pytest.mark.parametrize("case", FILE_CASES, ids=_ids(FILE_CASES))
def test_file_ui_load_then_a_good_load(case: Case, folders, workstation, session):
    inputs = folders[0]
    path = case.build(inputs)
    good = _good_png(inputs)
    workstation.load(str(good), session)
    before = session.xray
    if case.accepted:
        image, read, meta, _ = workstation.load(str(path), session)
        assert image is not None and read and session.xray is not before
        return
    with pytest.raises(InputError) as exc:
        workstation.load(str(path), session)
    assert re.search(case.outcome, str(exc.value))
    assert session.xray is before  # the refused upload changed nothing
    image, _, _, _ = workstation.load(str(good), session)  # and the session keeps working
    assert image is not None and session.xray is not before


@pytest.mark.parametrize("case", FILE_CASES, ids=_ids(FILE_CASES))
def test_file_trainer_readers(case: Case, folders):
    from train.data import load_canvas
    from train.registration import load_canvas as registration_canvas

    path = case.build(folders[0])
    if case.accepted:
        assert tuple(load_canvas(str(path), 64).shape) == (1, 64, 64)
        assert registration_canvas(path, 64).shape == (64, 64)
        return
    for reader in (load_canvas, registration_canvas):
        with pytest.raises(InputError, match=case.outcome):
            reader(str(path), 64)


def test_dicom_folder_source_reads_only_headers_and_raises_nothing_else(tmp_path):
    """The DICOM-folder source keeps CR/DX headers it can read and skips the rest; any file it
    keeps that is bad is then refused by the trainer's reader with the case's message."""
    from train.data import load_canvas
    from train.sources.dicom_folder import load_dicom_folder

    names = {case.build(tmp_path).name: case for case in FILE_CASES if case.id != "missing_file"}
    assert len(names) == len(FILE_CASES) - 1  # one folder, no name used twice
    records = load_dicom_folder(tmp_path)
    kept = {Path(r.path).name for r in records}
    assert {"cr.dcm", "rle.dcm"} <= kept  # (a DICOM without preamble is skipped: dcmread without force)
    assert not kept & {"ct.dcm", "mr.dcm", "us.dcm", "grey.png"}  # modality (or suffix) filter
    for name in kept:
        case = names[name]
        if case.accepted:
            load_canvas(str(tmp_path / name), 64)
        else:
            with pytest.raises(InputError, match=case.outcome):
                load_canvas(str(tmp_path / name), 64)


# ----------------------------------------------------------------------------------------------
# Instructions: EditRequest / InvertRequest, CLI, UI
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TEXT_CASES, ids=_ids(TEXT_CASES))
def test_instruction_requests(case: Case):
    import engine

    text = case.build()
    requests = [
        lambda: engine.EditRequest(text).validated(),
        lambda: engine.InvertRequest(source_prompt="chest x-ray", target_prompt=text).validated(),
    ]
    for make in requests:
        if case.accepted:
            make()
        else:
            with pytest.raises(InputError) as exc:
                make()
            if make is requests[0]:
                assert re.search(case.outcome, str(exc.value)), str(exc.value)


@pytest.mark.parametrize("case", TEXT_CASES, ids=_ids(TEXT_CASES))
def test_instruction_cli(case: Case, folders, tiny_model, capsys):
    inputs, outputs = folders
    out = outputs / "cf.png"
    code, err = _cli(_cli_edit(_good_png(inputs), out, tiny_model, case.build()), capsys)
    if case.accepted:
        assert code == 0 and not err, err
        assert _contents(outputs) == {"cf.png"}
        return
    _assert_refused_by_cli(code, err, case.cli_outcome or case.outcome, outputs)


@pytest.mark.parametrize("case", TEXT_CASES, ids=_ids(TEXT_CASES))
def test_instruction_ui_edit(case: Case, folders, workstation, session):
    from journey_ui.workstation import METHODS

    workstation.load(str(_good_png(folders[0])), session)
    args = (METHODS[0], case.build(), "none", "", "", "direct", 1.0, "", 1, 7.5, 1.5, 0, False)
    if case.accepted:
        result = workstation.edit(session, *args)
        assert session.result is result and np.isfinite(result.image).all()
        return
    with pytest.raises(InputError, match=case.outcome):
        workstation.edit(session, *args)
    assert session.result is None
    workstation.edit(session, METHODS[0], GOOD_INSTRUCTION, *args[2:])  # the session keeps working
    assert session.result is not None


# ----------------------------------------------------------------------------------------------
# A model that produces NaN/Inf: engine, CLI, UI
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def broken_decoder(monkeypatch):
    """Makes every Engine's decoder return ``state["value"]`` everywhere once the test sets it."""
    from engine.engine import Engine

    state: dict[str, float | None] = {"value": None}
    real = Engine.decode

    def decode(self, latents, *, clip=True):
        out = real(self, latents, clip=clip)
        return out if state["value"] is None else torch.full_like(out, state["value"])

    monkeypatch.setattr(Engine, "decode", decode)
    return state


@pytest.mark.parametrize("case", MODEL_CASES, ids=_ids(MODEL_CASES))
def test_non_finite_model_output(case: Case, broken_decoder, tiny_engine, tiny_model, folders, workstation,
                                 session, capsys):
    from journey_ui.workstation import METHODS

    inputs, outputs = folders
    good = _good_png(inputs)
    workstation.load(str(good), session)
    args = (METHODS[0], GOOD_INSTRUCTION, "none", "", "", "direct", 1.0, "", 1, 7.5, 1.5, 0, False)
    workstation.edit(session, *args)  # a good result first: a failed edit must not replace it
    kept = session.result

    broken_decoder["value"] = case.build()
    with pytest.raises(InputError, match=case.outcome):
        tiny_engine.counterfactual(np.full((64, 64), 0.5, np.float32), GOOD_INSTRUCTION, steps=1, seed=0)
    with pytest.raises(InputError, match=case.outcome):
        workstation.edit(session, *args)
    assert session.result is kept
    code, err = _cli(_cli_edit(good, outputs / "cf.png", tiny_model), capsys)
    _assert_refused_by_cli(code, err, case.outcome, outputs)


MASK_CASES = [c for c in FILE_CASES
              if c.id in ("text_as_png", "empty_file", "png_truncated", "png_bomb", "missing_file")]


@pytest.mark.parametrize("case", MASK_CASES, ids=_ids(MASK_CASES))
def test_cli_mask_files(case: Case, folders, tiny_model, capsys):
    """A painted mask (``--edit-mask``/``--keep-mask``) is a file too: the same rules."""
    inputs, outputs = folders
    mask = case.build(inputs)
    argv = [*_cli_edit(_good_png(inputs), outputs / "cf.png", tiny_model), "--edit-mask", str(mask)]
    code, err = _cli(argv, capsys)  # (a printed warning would be a second line on stderr)
    _assert_refused_by_cli(code, err, r"[Mm]ask|not an image file", outputs)
