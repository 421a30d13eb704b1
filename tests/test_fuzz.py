"""Short deterministic fuzzing of the readers and the instruction checks: only InputError escapes.

The generators (seeds, byte mutations, odd text) are those of ``benchmarks/fuzz_readers.py``,
drawn here through hypothesis (derandomized, so every run tries the same inputs); the benchmark
runs them, or atheris, for minutes. Inputs the fuzzers found that escaped as another exception,
or made a decoder allocate far more than the header allows, are kept below as regression tests.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_readers import check_image, check_text, fix_png_crcs, image_input, random_text, seed_inputs
from engine.errors import InputError
from engine.io import read_xray
from fixtures_io import make_dicom

FUZZ = settings(derandomize=True, max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _draw(data: st.DataObject):
    return lambda lo, hi: data.draw(st.integers(lo, hi))


@pytest.mark.parametrize("target", ["dicom", "png", "jpeg"])
def test_seeds_are_valid_images(target):
    for seed in seed_inputs()[target]:
        assert check_image(seed) == "accepted"


@FUZZ
@given(st.data())
def test_mutated_dicom_raises_only_input_error(data):
    check_image(image_input("dicom", _draw(data)))


@FUZZ
@given(st.data())
def test_mutated_png_raises_only_input_error(data):
    check_image(image_input("png", _draw(data)))


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_mutated_jpeg_raises_only_input_error(data):
    check_image(image_input("jpeg", _draw(data)))


@FUZZ
@given(st.data())
def test_odd_instructions_raise_only_input_error(data):
    check_text(random_text(_draw(data)))


@settings(FUZZ, max_examples=100)
@given(st.text(max_size=300))
def test_any_unicode_text_raises_only_input_error(text):
    check_text(text)


def test_fix_png_crcs_repairs_only_the_checksums():
    png = seed_inputs()["png"][0]
    broken = bytearray(png)
    broken[29] ^= 0xFF  # the IHDR's CRC
    assert fix_png_crcs(bytes(broken)) == png
    assert fix_png_crcs(b"not a png") == b"not a png"


# ----------------------------------------------------------------------------------------------
# Regressions: inputs that escaped as something other than InputError
# ----------------------------------------------------------------------------------------------

RAMP = ((np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) * 997) % 4096).astype(np.uint16)


def _rle_with_a_bad_segment_offset() -> bytes:
    """An RLE Lossless DICOM whose second segment offset points into the first segment."""
    data = bytearray(make_dicom(RAMP, compress_with=pydicom.uid.RLELossless))
    pixel_data = data.index(b"\xe0\x7f\x10\x00")
    offset_table = data.index(b"\xfe\xff\x00\xe0", pixel_data)  # the Basic Offset Table item
    frame = data.index(b"\xfe\xff\x00\xe0", offset_table + 8) + 8  # the frame: the 64-byte RLE header
    data[frame + 8] = 0  # low byte of segment 2's offset
    return bytes(data)


def test_rle_decoder_panic_is_an_input_error_without_noise(capfd):
    """pylibjpeg-rle (Rust) raised pyo3's PanicException, a BaseException that ``except
    Exception`` let through, and printed a Rust backtrace on stderr; RLE is now decoded by
    pydicom's own decoder, and a panic from any Rust decoder is still caught."""
    data = _rle_with_a_bad_segment_offset()
    pytest.importorskip("rle")  # pylibjpeg-rle: show that this input makes it panic
    from pydicom.pixels.decoders.base import get_decoder

    ds = pydicom.dcmread(io.BytesIO(data))
    with pytest.raises(BaseException) as exc:
        get_decoder(pydicom.uid.RLELossless).as_array(ds, decoding_plugin="pylibjpeg")
    assert type(exc.value).__name__ == "PanicException"
    capfd.readouterr()  # the panic's report

    with pytest.raises(InputError, match=r"could not be decoded \(RLE Lossless: .*truncated or corrupt"):
        read_xray(data, name="bad-rle.dcm")
    assert capfd.readouterr().err == ""


def test_a_panic_from_any_rust_decoder_is_an_input_error(monkeypatch):
    panic = type("PanicException", (BaseException,), {})  # what pyo3 raises, by name

    def decoder_that_panics(self):
        raise panic("index out of bounds: the len is 2880 but the index is 2880")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(decoder_that_panics))
    with pytest.raises(InputError, match="PanicException: index out of bounds"):
        read_xray(make_dicom(RAMP))


def test_interrupts_are_not_swallowed_by_the_decoder_guard(monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(interrupted))
    with pytest.raises(KeyboardInterrupt):
        read_xray(make_dicom(RAMP))


@pytest.mark.parametrize("text", ["effusion \udcff", "\ud800 effusion", "right\udc80 pneumothorax"])
def test_lone_surrogates_are_refused_before_the_tokenizer(text):
    """Text that is not valid Unicode (how Python passes on command-line bytes that are not
    UTF-8) reached the Rust tokenizer and escaped as TypeError."""
    import engine

    with pytest.raises(InputError, match="not valid UTF-8 text"):
        engine.EditRequest(text).validated()
    with pytest.raises(InputError, match="not valid UTF-8 text"):
        engine.InvertRequest(source_prompt=text, target_prompt="chest x-ray").validated()
    assert check_text(text) == "refused"


def test_an_unknown_vr_in_the_window_falls_back_to_percentiles():
    """atheris: a Window Width whose VR was mutated from DS to the unknown 'FS' made pydicom raise
    NotImplementedError on access (values are converted lazily), outside any guard."""
    data = make_dicom(RAMP, WindowCenter=2048, WindowWidth=4096)
    assert data.count(b"\x28\x00\x51\x10DS") == 1
    data = data.replace(b"\x28\x00\x51\x10DS", b"\x28\x00\x51\x10FS")
    x = read_xray(data, name="fuzz.dcm")
    assert "percentiles" in x.meta.windowing and "WindowWidth unreadable" in x.meta.windowing
    assert check_image(data) == "accepted"


def test_anything_a_corrupt_header_raises_becomes_an_input_error(monkeypatch):
    import engine.io.dicom

    def lazy_conversion_fails(*args, **kwargs):
        raise NotImplementedError("Unknown Value Representation 'FS' in tag (0028,1050)")

    monkeypatch.setattr(engine.io.dicom, "_grey_pipeline", lazy_conversion_fails)
    with pytest.raises(InputError, match=r"^'x\.dcm' could not be read as DICOM \(NotImplementedError: Unknown Value "
                                         r"Representation 'FS' .*\); the file may be truncated or corrupt$"):
        read_xray(make_dicom(RAMP), name="x.dcm")


def _decoding_forbidden(monkeypatch) -> None:
    def decode(self):
        raise AssertionError("the pixel data was handed to a decoder")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(decode))


def test_jpeg2000_codestream_bigger_than_the_header_is_refused_before_decoding(monkeypatch):
    """random mutation: a 2 KB DICOM whose JPEG 2000 SIZ marker claims 36 x 2,097,192 px (Rows and
    Columns said 40 x 36) made OpenJPEG allocate ~1 GB before pydicom saw the size mismatch: a
    decompression bomb behind the header's pixel-count guard."""
    data = bytearray(make_dicom(RAMP, compress_with=pydicom.uid.JPEG2000Lossless))
    siz = data.index(b"\xff\x4f\xff\x51")
    data[siz + 12 : siz + 16] = (2_097_192).to_bytes(4, "big")  # Ysiz
    _decoding_forbidden(monkeypatch)
    with pytest.raises(InputError, match=r"holds compressed pixel data of 40x2097192 px, but its header says "
                                         r"40x48 px; the file is corrupt"):
        read_xray(bytes(data))


def test_jpeg_frame_bigger_than_the_header_is_refused_before_decoding(monkeypatch):
    from fixtures_io import dicom_test_file

    data = bytearray(dicom_test_file("SC_rgb_jpeg_dcmtk.dcm").read_bytes())  # 100 x 100, baseline JPEG
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = bytes.fromhex("ea60ea60")  # 60000 x 60000
    _decoding_forbidden(monkeypatch)
    with pytest.raises(InputError, match=r"compressed pixel data of 60000x60000 px, but its header says 100x100 px"):
        read_xray(bytes(data))
