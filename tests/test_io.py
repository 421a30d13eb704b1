"""engine.io: DICOM/PNG/JPEG -> float32 [0, 1] (H, W), letterboxing, PNG export.

Real DICOMs come from pydicom's bundled test files and the pydicom-data package, found locally
(never downloaded). Everything else is synthesised in memory or in ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from engine.errors import InputError
from engine.io import (
    MIN_SIDE,
    SquareTransform,
    XRay,
    XRayMeta,
    check_intensity,
    encode_png,
    read_xray,
    to_square,
    write_png,
    xray_from_dataset,
)
from fixtures_io import (
    dicom_test_file,
    grey_u8,
    grey_variants,
    jpeg_bytes,
    make_dicom,
    png_bytes,
    png_header_only,
    smooth_image,
)

RAMP = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 997) % 4096  # 12-bit, all values used


def _assert_contract(x: XRay) -> None:
    assert isinstance(x, XRay)
    assert x.pixels.dtype == np.float32 and x.pixels.ndim == 2
    assert np.isfinite(x.pixels).all()
    assert x.pixels.min() >= 0.0 and x.pixels.max() <= 1.0


# ----------------------------------------------------------------------------------------------
# Real DICOMs
# ----------------------------------------------------------------------------------------------


def test_rg1_cr_monochrome1_reads_as_a_chest_film():
    path = dicom_test_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    x = read_xray(path)
    _assert_contract(x)
    assert x.pixels.shape == (ds.Rows, ds.Columns) == (1955, 1841)
    m = x.meta
    assert m.source_format == "dicom" and m.name == "RG1_UNCR.dcm"
    assert m.modality == "CR" and m.photometric == "MONOCHROME1" and m.inverted is True
    assert m.bits_stored == 15 and m.view_position == "PA"
    assert m.windowing == "window C=15000, W=30000"
    assert m.study_date == "2004-08-26" and m.patient_id == "9RG1"
    assert m.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    assert m.pixel_spacing is None  # the header says 0.000\0.000, which is no spacing at all
    # Bone bright after inversion: the mediastinum/spine (centre columns) is brighter than both
    # lungs. Skipping the inversion flips this (0.13 vs ~0.6).
    img = x.pixels
    h, w = img.shape
    band = slice(int(0.25 * h), int(0.6 * h))
    centre = img[band, int(0.45 * w) : int(0.55 * w)].mean()
    right_lung = img[band, int(0.2 * w) : int(0.35 * w)].mean()
    left_lung = img[band, int(0.65 * w) : int(0.8 * w)].mean()
    assert centre > right_lung + 0.15 and centre > left_lung + 0.15


def test_rg1_matches_pydicom_window_then_inversion():
    path = dicom_test_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    windowed = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    expected = 1.0 - windowed / (2**15 - 1)  # window output range is [0, 2**BitsStored - 1]
    np.testing.assert_allclose(read_xray(path).pixels, expected, atol=1e-6)


def test_vlut_04_applies_the_header_voi_lut():
    path = dicom_test_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    x = read_xray(path)
    _assert_contract(x)
    assert x.meta.windowing.startswith("VOI LUT")
    assert x.meta.inverted is False
    lut = np.asarray(ds.VOILUTSequence[0].LUTData)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    expected = (expected - lut.min()) / (lut.max() - lut.min())
    np.testing.assert_allclose(x.pixels, expected, atol=1e-6)


def test_jpeg2000_rg1_decodes_identically_to_the_uncompressed_file():
    x = read_xray(dicom_test_file("RG1_J2KR.dcm"))
    assert x.meta.transfer_syntax == pydicom.uid.JPEG2000Lossless
    assert np.array_equal(x.pixels, read_xray(dicom_test_file("RG1_UNCR.dcm")).pixels)


@pytest.mark.parametrize(
    ("compressed", "atol"),
    [
        ("SC_rgb_dcmtk_+eb+cr.dcm", 1.5 / 255),  # JPEG Baseline (lossy, RGB)
        ("SC_rgb_jpeg_gdcm.dcm", 1e-7),  # JPEG Lossless
        ("SC_rgb_rle.dcm", 1e-7),  # RLE Lossless
    ],
)
def test_compressed_colour_dicoms_decode_to_the_luminance_of_the_uncompressed_one(compressed, atol):
    reference = read_xray(dicom_test_file("SC_rgb.dcm"))
    x = read_xray(dicom_test_file(compressed))
    assert x.meta.transfer_syntax != pydicom.uid.ExplicitVRLittleEndian
    assert x.meta.windowing.startswith("luminance")
    assert reference.pixels.std() > 0.2  # colour bars of distinct luminance: a meaningful check
    np.testing.assert_allclose(x.pixels, reference.pixels, atol=atol)


@pytest.mark.parametrize(
    ("name", "atol"),
    [("SC_ybr_full_uncompressed.dcm", 2 / 255), ("SC_rgb_16bit.dcm", 1e-7), ("SC_rgb_expb.dcm", 1e-7)],
)
def test_colour_layouts_give_the_same_luminance(name, atol):
    reference = read_xray(dicom_test_file("SC_rgb.dcm")).pixels
    np.testing.assert_allclose(read_xray(dicom_test_file(name)).pixels, reference, atol=atol)


@pytest.mark.parametrize("uid", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless])
def test_synthetic_grey_cr_compressed_losslessly_reads_identically(uid):
    plain = read_xray(make_dicom(RAMP))
    packed = read_xray(make_dicom(RAMP, compress_with=uid))
    assert packed.meta.transfer_syntax == uid
    assert np.array_equal(packed.pixels, plain.pixels)


@pytest.mark.parametrize(("name", "modality"), [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR"), ("US1_UNCR.dcm", "US")])
def test_non_radiograph_modalities_are_rejected(name, modality):
    with pytest.raises(InputError, match=f"DICOM modality is {modality}; this tool expects a chest radiograph"):
        read_xray(dicom_test_file(name))


def test_multi_frame_dicom_is_rejected():
    with pytest.raises(InputError, match="has 2 frames"):
        read_xray(dicom_test_file("SC_rgb_2frame.dcm"))  # modality OT: only the frame count is wrong
    with pytest.raises(InputError, match="has 3 frames"):
        read_xray(make_dicom(np.zeros((64, 64 * 3), np.uint16), NumberOfFrames=3))


@pytest.mark.parametrize("keep", [200, 1_000, 100_000, 3_600_000])
def test_truncated_dicom_is_an_input_error(keep, tmp_path):
    data = dicom_test_file("RG1_UNCR.dcm").read_bytes()[:keep]
    path = tmp_path / "cut.dcm"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(InputError) as exc:
            read_xray(source)
        message = str(exc.value)
        assert "\n" not in message
        assert "truncated" in message or "not a DICOM" in message


def test_max_pixels_is_checked_from_the_header():
    with pytest.raises(InputError, match="more than the limit"):
        read_xray(dicom_test_file("RG1_UNCR.dcm"), max_pixels=1_000_000)


# ----------------------------------------------------------------------------------------------
# Synthetic DICOMs: the intensity pipeline, checked by hand
# ----------------------------------------------------------------------------------------------


def test_rescale_then_linear_window_matches_the_hand_computed_values():
    # m = 2 v - 100; LINEAR window C=1000, W=1001 -> ((m - 999.5) / 1000 + 0.5), clipped.
    x = read_xray(make_dicom(RAMP, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=1000, WindowWidth=1001))
    m = 2.0 * RAMP - 100.0
    expected = np.clip((m - 999.5) / 1000.0 + 0.5, 0.0, 1.0)
    expected[m <= 499.5] = 0.0
    expected[m > 1499.5] = 1.0
    np.testing.assert_allclose(x.pixels, expected, atol=1e-6)
    assert x.meta.windowing == "window C=1000, W=1001"


def test_first_of_several_windows_is_used():
    x = read_xray(make_dicom(RAMP, WindowCenter=[1000, 3000], WindowWidth=[1001, 401]))
    assert x.meta.windowing == "window C=1000, W=1001"


def test_voi_lut_sequence_is_preferred_and_normalised_by_its_own_range():
    from pydicom.dataset import Dataset

    item = Dataset()
    # 16 bits per entry declared, but the data are a 12-bit square-root curve.
    item.LUTDescriptor = [4096, 0, 16]
    curve = np.rint(np.sqrt(np.arange(4096) / 4095.0) * 4095).astype(int)
    item.add_new("LUTData", "OW", curve.astype("<u2").tobytes())
    item.LUTExplanation = "SQRT"
    x = read_xray(make_dicom(RAMP, VOILUTSequence=[item], WindowCenter=100, WindowWidth=10))
    assert x.meta.windowing == "VOI LUT (SQRT)"
    np.testing.assert_allclose(x.pixels, curve[RAMP] / 4095.0, atol=1e-6)


def test_without_voi_robust_percentiles_are_used():
    values = RAMP.copy()
    values[0, :5] = 0  # a few outliers
    x = read_xray(make_dicom(values))
    lo, hi = np.percentile(values.astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose(x.pixels, np.clip((values - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert x.meta.windowing.startswith("percentiles 0.5")


def test_unusable_window_falls_back_to_percentiles():
    x = read_xray(make_dicom(RAMP, WindowCenter=100, WindowWidth=0))
    assert x.meta.windowing.startswith("percentiles 0.5") and "window unusable" in x.meta.windowing
    assert x.pixels.max() == 1.0 and x.pixels.min() == 0.0


def test_monochrome1_and_presentation_lut_shape_invert_exactly_once():
    mono2 = read_xray(make_dicom(RAMP, WindowCenter=2048, WindowWidth=4096))
    mono1 = read_xray(make_dicom(RAMP, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096))
    mono2_inverse = read_xray(make_dicom(RAMP, PresentationLUTShape="INVERSE", WindowCenter=2048, WindowWidth=4096))
    mono1_inverse = read_xray(
        make_dicom(RAMP, photometric="MONOCHROME1", PresentationLUTShape="INVERSE", WindowCenter=2048, WindowWidth=4096)
    )
    assert not mono2.meta.inverted and mono1.meta.inverted and mono2_inverse.meta.inverted and mono1_inverse.meta.inverted
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    np.testing.assert_array_equal(mono2_inverse.pixels, mono1.pixels)
    np.testing.assert_array_equal(mono1_inverse.pixels, mono1.pixels)  # the DX pairing: not inverted twice


@pytest.mark.parametrize("window", [{}, {"WindowCenter": 40, "WindowWidth": 400}])
def test_constant_dicom_gives_a_finite_image(window):
    x = read_xray(make_dicom(np.full((64, 64), 500, np.uint16), **window))
    _assert_contract(x)
    assert np.ptp(x.pixels) == 0.0


def test_rescale_that_overflows_is_an_input_error():
    with pytest.raises(InputError, match="non-finite"):
        read_xray(make_dicom(np.full((64, 64), 4095, np.uint16), RescaleSlope="1e308", RescaleIntercept=0))


def test_dicom_without_pixel_data_is_rejected_clearly():
    with pytest.raises(InputError, match="DICOM file without pixel data"):
        read_xray(make_dicom(None))


def test_dicom_without_preamble_is_read_by_content():
    bare = make_dicom(RAMP, preamble=False, WindowCenter=2048, WindowWidth=4096)
    assert bare[128:132] != b"DICM"
    x = read_xray(bare)
    np.testing.assert_array_equal(x.pixels, read_xray(make_dicom(RAMP, WindowCenter=2048, WindowWidth=4096)).pixels)
    assert any("without preamble" in note for note in x.meta.notes)


def test_undecodable_transfer_syntax_names_it():
    data = make_dicom(RAMP, transfer_syntax=pydicom.uid.MPEG2MPML)
    with pytest.raises(InputError, match=r"MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\).*convert"):
        read_xray(data)


def test_missing_decoder_plugin_names_the_package(monkeypatch):
    import pydicom.pixels.decoders.base as decoders

    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg - requires pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(decoders, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(InputError, match=r"JPEG 2000 Image Compression \(Lossless Only\).*install pylibjpeg-openjpeg"):
        read_xray(dicom_test_file("RG1_J2KR.dcm"))


def test_small_dicom_is_rejected():
    with pytest.raises(InputError, match=f"at least {MIN_SIDE} px"):
        read_xray(make_dicom(np.zeros((16, 64), np.uint16)))


def test_dataset_pixel_data_is_never_modified():
    ds = pydicom.dcmread(io.BytesIO(make_dicom(RAMP, photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100)))
    raw = bytes(ds.PixelData)
    before = ds.pixel_array.copy()
    x = xray_from_dataset(ds, name="a.dcm")
    assert x.meta.inverted and x.meta.name == "a.dcm"
    assert bytes(ds.PixelData) == raw
    np.testing.assert_array_equal(ds.pixel_array, before)


def test_metadata_fields_and_public_dict():
    x = read_xray(
        make_dicom(RAMP, ImagerPixelSpacing=[0.143, 0.15], ViewPosition="AP", StudyDate="20240229"),
        name="Doe_John.dcm",
    )
    m = x.meta
    assert m.pixel_spacing == (0.143, 0.15)
    assert m.view_position == "AP" and m.study_date == "2024-02-29" and m.patient_id == "SYNTH-001"
    full = json.loads(json.dumps(m.as_dict()))
    assert full["pixel_spacing"] == [0.143, 0.15] and full["patient_id"] == "SYNTH-001"
    public = m.public_dict()
    json.dumps(public)
    for key in ("patient_id", "study_id", "study_instance_uid", "study_date", "name"):
        assert key in full and key not in public
    assert "SYNTH-001" not in json.dumps(public) and "Doe_John" not in json.dumps(public)
    assert public["modality"] == "CR" and public["view_position"] == "AP"


def test_pixel_spacing_is_preferred_over_imager_pixel_spacing():
    x = read_xray(make_dicom(RAMP, PixelSpacing=[0.2, 0.3], ImagerPixelSpacing=[0.143, 0.15]))
    assert x.meta.pixel_spacing == (0.2, 0.3)


# ----------------------------------------------------------------------------------------------
# PNG / JPEG
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "I;16", "LA", "RGB", "RGBA", "P"])
def test_png_layouts_all_read_as_the_grey_original(mode, tmp_path):
    grey = grey_u8(64, 48)
    img = grey_variants(grey)[mode]
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    img.save(path)
    with Image.open(path) as saved:
        assert saved.mode == mode
    x = read_xray(path)
    _assert_contract(x)
    assert x.pixels.shape == (64, 48)
    assert x.meta.source_format == "png" and x.meta.photometric == mode and x.meta.inverted is False
    np.testing.assert_allclose(x.pixels, grey / 255.0, atol=1e-6)


def test_16_bit_png_uses_value_over_65535():
    values = np.full((40, 40), 32768, np.uint16)
    values[:20] = 65535
    values[:, :5] = 0
    x = read_xray(png_bytes(Image.fromarray(values)))
    assert x.meta.bits_stored == 16 and "65535" in x.meta.windowing
    np.testing.assert_allclose(x.pixels, values / 65535.0, atol=1e-7)


def test_alpha_is_composited_on_black():
    grey = grey_u8(64, 48)
    rgba = grey_variants(grey)["RGBA"]
    alpha = np.full(grey.shape, 255, np.uint8)
    alpha[:, :10] = 0
    alpha[:, 10:20] = 128
    rgba.putalpha(Image.fromarray(alpha))
    x = read_xray(png_bytes(rgba))
    np.testing.assert_allclose(x.pixels, grey / 255.0 * alpha / 255.0, atol=1e-6)
    assert (x.pixels[:, :10] == 0).all()


def test_jpeg_reads_close_to_the_original():
    grey = grey_u8(96, 64)
    x = read_xray(jpeg_bytes(Image.fromarray(grey)), name="scan.jpg")
    _assert_contract(x)
    assert x.meta.source_format == "jpeg" and x.meta.name == "scan.jpg" and x.meta.photometric == "L"
    assert np.abs(x.pixels - grey / 255.0).mean() < 0.01


def test_jpeg_exif_orientation_is_applied():
    grey = grey_u8(96, 64)
    # Orientation 6: the stored image must be rotated 90 degrees clockwise for display.
    x = read_xray(jpeg_bytes(Image.fromarray(grey), orientation=6))
    assert x.pixels.shape == (64, 96)
    assert np.abs(x.pixels - np.rot90(grey, k=-1) / 255.0).mean() < 0.01


def test_bytes_input_equals_path_input(tmp_path):
    for suffix, data in [
        (".png", png_bytes(Image.fromarray(grey_u8()))),
        (".jpg", jpeg_bytes(Image.fromarray(grey_u8()))),
        (".dcm", make_dicom(RAMP)),
    ]:
        path = tmp_path / f"in{suffix}"
        path.write_bytes(data)
        a, b = read_xray(path), read_xray(data, name=path.name)
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert a.meta == b.meta


def test_format_is_detected_by_content_not_extension(tmp_path):
    path = tmp_path / "really_a_png.dcm"
    path.write_bytes(png_bytes(Image.fromarray(grey_u8())))
    assert read_xray(path).meta.source_format == "png"
    path = tmp_path / "really_a_dicom.jpg"
    path.write_bytes(make_dicom(RAMP))
    assert read_xray(path).meta.source_format == "dicom"


@pytest.mark.parametrize(
    "content",
    [b"this is not an image\n" * 20, b"\x00" * 300, os.urandom(2048), b"GIF89a" + b"\x00" * 200],
    ids=["text", "zeros", "random", "gif"],
)
def test_non_image_file_named_png_is_rejected(content, tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="is not a DICOM, PNG or JPEG image"):
        read_xray(path)


def test_missing_empty_and_directory_sources(tmp_path):
    with pytest.raises(InputError, match="File not found"):
        read_xray(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        read_xray(tmp_path / "empty.png")
    with pytest.raises(InputError, match="is empty"):
        read_xray(b"")
    with pytest.raises(InputError, match="not a file"):
        read_xray(tmp_path)


@pytest.mark.parametrize("shape", [(1, 1), (31, 200), (200, 31)])
def test_tiny_images_are_rejected(shape):
    with pytest.raises(InputError, match=f"at least {MIN_SIDE} px"):
        read_xray(png_bytes(Image.fromarray(np.zeros(shape, np.uint8))))
    read_xray(png_bytes(Image.fromarray(np.zeros((MIN_SIDE, MIN_SIDE), np.uint8))))  # the boundary is fine


@pytest.mark.parametrize(("side", "message"), [(8000, "more than the limit"), (30000, "too large to open safely")])
def test_huge_png_header_is_rejected_before_decoding(side, message):
    # 8000^2 = 64 MP trips our max_pixels (50 MP); 30000^2 = 900 MP trips Pillow's bomb check first.
    data = png_header_only(side, side)
    start = time.perf_counter()
    with pytest.raises(InputError, match=message) as exc:
        read_xray(data)
    assert "downsample it first" in str(exc.value)
    assert time.perf_counter() - start < 1.0


def test_pillow_decompression_bomb_becomes_an_input_error():
    # Our own limit raised above Pillow's: Pillow's DecompressionBombError must still be an InputError.
    with pytest.raises(InputError, match="too large to open safely"):
        read_xray(png_header_only(30000, 30000), max_pixels=10**12)


def test_pillow_decompression_bomb_warning_becomes_an_input_error():
    # 10000^2 = 100 MP: over Pillow's warning threshold (~89 MP), under its error threshold.
    with pytest.raises(InputError, match="too large to open safely"):
        read_xray(png_header_only(10000, 10000), max_pixels=10**12)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_truncated_png_and_jpeg_are_input_errors(kind):
    img = Image.fromarray(np.rint(np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8))
    data = png_bytes(img) if kind == "png" else jpeg_bytes(img)
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_xray(data[: len(data) // 2])


# ----------------------------------------------------------------------------------------------
# Letterboxing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size", "resized", "offset"),
    [
        ((300, 200), 256, (256, 171), (0, 42)),  # portrait
        ((200, 300), 256, (171, 256), (42, 0)),  # landscape
        ((1955, 1841), 512, (512, 482), (0, 15)),  # RG1's geometry
        ((128, 128), 64, (64, 64), (0, 0)),
        ((50, 40), 100, (100, 80), (0, 10)),  # upscaling
    ],
)
def test_to_square_geometry(shape, size, resized, offset):
    img = smooth_image(*shape)
    canvas, t = to_square(img, size)
    assert canvas.shape == (size, size) and canvas.dtype == np.float32
    assert t.input_shape == shape and t.resized_shape == resized and t.offset == offset
    assert t.scale == pytest.approx(size / max(shape))
    # aspect ratio preserved (to within the one-pixel rounding of the short side)
    assert abs(resized[0] / resized[1] - shape[0] / shape[1]) <= 1.0 / min(resized) + 1e-9
    mask = t.content_mask()
    assert mask.shape == (size, size) and mask.sum() == resized[0] * resized[1]
    # the content (strictly positive) fills exactly the mask; the padding is zero
    assert (canvas[~mask] == 0).all() and (canvas[mask] > 0).all()
    back = t.invert(canvas)
    assert back.shape == shape and back.dtype == np.float32
    assert 0.0 <= back.min() and back.max() <= 1.0


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (333, 517)])
def test_round_trip_of_a_smooth_image_is_close(shape):
    img = smooth_image(*shape, seed=3)
    canvas, t = to_square(XRay(pixels=img, meta=XRayMeta(source_format="png")), 256)
    back = t.invert(canvas)
    assert back.shape == shape
    assert np.abs(back - img).mean() < 0.005


def test_same_size_square_is_an_exact_copy():
    img = smooth_image(64, 64)
    canvas, t = to_square(img, 64)
    np.testing.assert_array_equal(canvas, img)
    np.testing.assert_array_equal(t.invert(canvas), img)
    assert t.content_mask().all()


def test_square_transform_dict_round_trip_and_validation():
    _, t = to_square(smooth_image(300, 200), 256)
    record = json.loads(json.dumps(t.as_dict()))
    assert SquareTransform.from_dict(record) == t
    with pytest.raises(InputError, match="inconsistent"):
        SquareTransform.from_dict({**record, "offset": [5, 5]})
    with pytest.raises(InputError, match="as_dict"):
        SquareTransform.from_dict({"size": 256})


def test_to_square_and_invert_reject_bad_input():
    _, t = to_square(smooth_image(300, 200), 256)
    with pytest.raises(InputError, match="shape"):
        t.apply(smooth_image(200, 300))
    with pytest.raises(InputError, match=r"\(256, 256\) canvas"):
        t.invert(np.zeros((128, 128), np.float32))
    with pytest.raises(InputError, match="2-D"):
        to_square(np.zeros((3, 64, 64), np.float32), 64)
    with pytest.raises(InputError, match="NaN"):
        to_square(np.full((64, 64), np.nan, np.float32), 64)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        to_square(np.full((64, 64), 2.0, np.float32), 64)
    with pytest.raises(InputError, match="positive"):
        to_square(smooth_image(64, 64), 0)


def test_check_intensity_clips_round_off_only():
    arr = np.array([[-5e-5, 0.5, 1.0 + 5e-5]], dtype=np.float32)
    out = check_intensity(arr)
    assert out.min() == 0.0 and out.max() == 1.0
    assert arr[0, 0] < 0  # the input is not modified


# ----------------------------------------------------------------------------------------------
# PNG export
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "mode", "tol"), [(8, "L", 0.5 / 255 + 1e-7), (16, "I;16", 1e-4)])
def test_png_round_trip(bits, mode, tol, tmp_path):
    img = np.random.default_rng(1).random((70, 50)).astype(np.float32)
    img[0, 0], img[0, 1] = 0.0, 1.0
    path = tmp_path / "out.png"
    write_png(path, img, bits=bits)
    with Image.open(path) as saved:
        assert saved.mode == mode
    back = read_xray(path)
    assert back.meta.bits_stored == bits
    assert np.abs(back.pixels - img).max() <= tol
    assert back.pixels[0, 0] == 0.0 and back.pixels[0, 1] == 1.0
    assert read_xray(encode_png(img, bits=bits)).pixels.tobytes() == back.pixels.tobytes()


def test_encode_png_text_chunks():
    data = encode_png(smooth_image(40, 40), text={"Comment": "synthetic", "cxr-journey": json.dumps({"k": "é" * 2000})})
    info = Image.open(io.BytesIO(data)).text
    assert info["Comment"] == "synthetic" and json.loads(info["cxr-journey"]) == {"k": "é" * 2000}


def test_write_png_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = tmp_path / "result.png"
    write_png(path, smooth_image(40, 40))
    write_png(path, smooth_image(40, 40, seed=1))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's private 0600
    good = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InputError, match="No space left"):
        write_png(path, smooth_image(40, 40, seed=2))
    assert path.read_bytes() == good  # the old file is intact, never half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]


def test_write_png_rejects_bad_input_without_creating_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_png(tmp_path / "no" / "such" / "o.png", smooth_image(40, 40))
    with pytest.raises(InputError, match="NaN"):
        write_png(tmp_path / "o.png", np.full((40, 40), np.nan, np.float32))
    with pytest.raises(InputError, match="8 or 16"):
        write_png(tmp_path / "o.png", smooth_image(40, 40), bits=12)
    assert list(tmp_path.iterdir()) == []
