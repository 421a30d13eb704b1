"""Exports: DICOM Secondary Capture, GIF, figures, provenance, atomic writes (engine.export)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

import engine.export as export
import engine.io.writing as io_module
from engine.errors import InputError
from engine.export import (
    burn_synthetic_label,
    dicom_secondary_capture,
    edit_figure,
    software_versions,
    write_dicom,
    write_figure,
    write_gif,
    write_provenance,
)
from engine.io import XRayMeta, read_xray

PROVENANCE = {"model_id": "assets/models/tiny", "model_hash": "ab12cd34", "seed": 1234, "method": "instruct"}
INSTRUCTION = "new moderate right pleural effusion, heart size unchanged"


def _synthetic(h: int = 96, w: int = 80) -> np.ndarray:
    """A smooth float32 test image in [0.2, 0.8] (never the banner's black/white)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return (0.5 + 0.3 * np.sin(yy / 9.0) * np.cos(xx / 7.0)).astype(np.float32)


@pytest.fixture(scope="module")
def identified_dicom(rg1_dicom: Path, tmp_path_factory: pytest.TempPathFactory):
    """RG1 with patient/study identifiers added, read back with read_xray: (path, xray)."""
    ds = pydicom.dcmread(rg1_dicom)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "12345"
    ds.StudyDate = "20240131"
    ds.StudyID = "S77"
    ds.InstitutionName = "General Hospital"
    ds.PatientBirthDate = "19600101"
    ds.PixelSpacing = [0.2, 0.2]
    path = tmp_path_factory.mktemp("src") / "Doe_Jane_12345.dcm"
    ds.save_as(path)
    return path, read_xray(path)


# ---------------------------------------------------------------------------------------------
# DICOM


def test_dicom_export_is_anonymous_secondary_capture(identified_dicom, tmp_path: Path) -> None:
    src_path, xray = identified_dicom
    assert xray.meta.patient_name == "Doe^Jane"
    image = _synthetic()
    out = write_dicom(tmp_path / "cf.dcm", image, source=xray.meta, instruction=INSTRUCTION, provenance=PROVENANCE)
    assert out == tmp_path / "cf.dcm"
    src = pydicom.dcmread(src_path)
    ds = pydicom.dcmread(out)  # no force: a full file meta header is present

    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert ds[key].value != src[key].value, key
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert INSTRUCTION in ds.DerivationDescription
    assert "ab12cd34" in ds.DerivationDescription and "1234" in ds.DerivationDescription
    assert ds.BurnedInAnnotation == "YES"
    assert ds.ConversionType == "WSD"
    assert ds.Modality == "OT"
    assert "synthetic" in ds.ImageComments.lower() and "research" in ds.ImageComments.lower()
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (
        "MONOCHROME2", 16, 12, 0)
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (96, 80, 1)
    assert [float(v) for v in ds.PixelSpacing] == [0.2, 0.2]

    stored = ds.pixel_array.astype(np.float64) / 4095.0
    assert np.abs(stored[:6] - image[:6]).max() > 0.3  # the banner is burned into the top rows
    np.testing.assert_allclose(stored[-20:], image[-20:], atol=1 / 4095)  # the rest is the image

    assert str(ds.PatientName) not in ("Doe^Jane", "") and ds.PatientID != "12345"
    assert "InstitutionName" not in ds
    assert not ds.get("StudyDate") and not ds.get("StudyID") and not ds.get("PatientBirthDate")
    assert ds.PatientIdentityRemoved == "YES"
    assert "PS3.15" in "".join(ds.DeidentificationMethod)
    assert b"Doe_Jane" not in out.read_bytes()  # the file name is never copied

    back = read_xray(out)
    assert back.shape == (96, 80) and back.meta.modality == "OT" and not back.meta.inverted
    np.testing.assert_allclose(back.pixels[-20:], image[-20:], atol=1e-3)


def test_dicom_keep_identifiers_makes_a_new_series_of_the_study(identified_dicom, tmp_path: Path) -> None:
    src_path, xray = identified_dicom
    out = write_dicom(tmp_path / "kept.dcm", _synthetic(), source=xray.meta, instruction=INSTRUCTION,
                      provenance=PROVENANCE, keep_identifiers=True)
    src, ds = pydicom.dcmread(src_path), pydicom.dcmread(out)
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "12345"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    assert ds.StudyDate == "20240131" and ds.StudyID == "S77"
    assert ds.PatientIdentityRemoved == "NO"
    assert "InstitutionName" not in ds and not ds.get("PatientBirthDate")
    assert read_xray(out).meta.patient_id == "12345"


def test_dicom_checks_and_safe_truncation() -> None:
    ds = dicom_secondary_capture(_synthetic(), source=None, instruction="x " * 2000, provenance=PROVENANCE,
                                 patient_name="SUBJ^007")
    assert len(ds.DerivationDescription) <= 1024 and "ab12cd34" in ds.DerivationDescription
    assert str(ds.PatientName) == "SUBJ^007" and "PixelSpacing" not in ds
    with pytest.raises(InputError, match="keep_identifiers"):
        dicom_secondary_capture(_synthetic(), source=None, instruction="x", provenance={}, keep_identifiers=True)
    with pytest.raises(InputError, match="instruction"):
        dicom_secondary_capture(_synthetic(), source=None, instruction="  ", provenance={})
    with pytest.raises(InputError):
        dicom_secondary_capture(_synthetic() * 3, source=None, instruction="x", provenance={})


NOTES = ("Segmenter and classifier were trained on simulated radiographs only: on a real radiograph the "
         "probabilities, attention, anatomy and ratios are not reliable.",
         "Attention is shown for Pleural Effusion, the finding the instruction names: 0.10 -> 0.80.")


def test_dicom_carries_the_notes_shown_beside_the_numbers() -> None:
    ds = dicom_secondary_capture(_synthetic(), source=None, instruction=INSTRUCTION, provenance=PROVENANCE,
                                 notes=NOTES)
    assert ds.DerivationDescription.endswith("Notes: " + " ".join(NOTES))
    assert ds.ImageComments.startswith("SYNTHETIC image") and ds.ImageComments.endswith(" ".join(NOTES))
    long_notes = [f"note {k}: " + "caveat " * 40 for k in range(8)]  # more than DerivationDescription holds
    ds = dicom_secondary_capture(_synthetic(), source=None, instruction=INSTRUCTION, provenance=PROVENANCE,
                                 notes=long_notes)
    assert len(ds.DerivationDescription) <= 1024 and f'"{INSTRUCTION}"' in ds.DerivationDescription
    assert ds.DerivationDescription.endswith("(all notes in Image Comments)")
    assert all(" ".join(n.split()) in ds.ImageComments for n in long_notes)
    plain = dicom_secondary_capture(_synthetic(), source=None, instruction=INSTRUCTION, provenance=PROVENANCE)
    assert "Notes" not in plain.DerivationDescription and "Notes" not in plain.ImageComments


def test_dicom_spacing_follows_the_exported_grid() -> None:
    meta = XRayMeta(source_format="dicom", pixel_spacing=(0.2, 0.3))
    ds = dicom_secondary_capture(_synthetic(96, 80), source=meta, instruction="x", provenance={},
                                 source_shape=(192, 160))
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.4, 0.6])


def test_public_dict_drops_patient_name() -> None:
    meta = XRayMeta(source_format="dicom", patient_name="Doe^Jane", patient_id="1")
    assert "patient_name" in XRayMeta.IDENTIFYING_FIELDS
    assert meta.as_dict()["patient_name"] == "Doe^Jane"
    assert "patient_name" not in meta.public_dict() and "patient_id" not in meta.public_dict()


# ---------------------------------------------------------------------------------------------
# Labels and GIF


def test_burn_synthetic_label_marks_only_the_top() -> None:
    image = _synthetic(128, 128)
    out = burn_synthetic_label(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[:4].max() < 0.05  # dark band above the text
    assert out[:20].max() > 0.9  # white text
    np.testing.assert_array_equal(out[40:], image[40:])
    assert not np.shares_memory(out, image)
    small = burn_synthetic_label(np.full((40, 40), 0.5, np.float32))  # wraps, stays inside
    assert small.shape == (40, 40) and small[:3].max() < 0.05


def test_write_gif_frames_loop_and_labels(tmp_path: Path) -> None:
    frames = [_synthetic(96, 80), _synthetic(48, 40) * 0.5, 1.0 - _synthetic(96, 80)]
    out = write_gif(tmp_path / "journey.gif", frames, captions=["prior", "day 3", ""], duration_ms=300,
                    label_synthetic=[False, True, True])
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3
        assert gif.info.get("loop") == 0
        assert gif.size == (80, 96)
        gif.seek(0)
        first = np.asarray(gif.convert("L"), dtype=np.float64) / 255.0
    assert np.abs(first[:6] - frames[0][:6]).max() > 0.3  # labelled at the top
    assert np.abs(first[-6:] - frames[0][-6:]).max() > 0.3  # caption at the bottom
    with pytest.raises(InputError, match="captions"):
        write_gif(tmp_path / "bad.gif", frames, captions=["one"])
    with pytest.raises(InputError, match="label_synthetic"):
        write_gif(tmp_path / "bad.gif", frames, label_synthetic=[True])
    assert not (tmp_path / "bad.gif").exists()


def test_gif_frames_of_simulated_films_say_simulated(tmp_path: Path) -> None:
    """A film of the phantom simulator was never acquired: its frames are not labelled so."""
    frames = [_synthetic(96, 80), _synthetic(96, 80) * 0.5, _synthetic(96, 80) * 0.9]
    out = write_gif(tmp_path / "j.gif", frames, label_synthetic=[False, True, False], simulated=[True, False, False])
    expected = [export.SIMULATED_BANNER, export.SYNTHETIC_BANNER, export.ACQUIRED_BANNER]
    with Image.open(out) as gif:
        for k, banner in enumerate(expected):
            gif.seek(k)
            top = np.asarray(gif.convert("L"), dtype=np.float32)[:10] / 255.0
            for other in expected:
                drawn = burn_synthetic_label(frames[k], other)[:10]
                assert (np.abs(top - drawn).max() < 0.02) == (other == banner), (k, other)
    assert export.ACQUIRED_BANNER == "ACQUIRED"  # not "PRIOR": a registered follow-up is acquired too
    with pytest.raises(InputError, match="simulated"):
        write_gif(tmp_path / "bad.gif", frames, simulated=[True])


# ---------------------------------------------------------------------------------------------
# Figures


def test_edit_figure_full_and_minimal(tmp_path: Path) -> None:
    prior = _synthetic(64, 64)
    cf = np.clip(prior + 0.1, 0, 1)
    delta = cf - prior
    rgb = np.repeat(prior[..., None], 3, axis=2)
    fig = edit_figure(prior=prior, counterfactual=cf, delta=delta, delta_limit=0.1,
                      attention_rgb=(rgb * 255).astype(np.uint8), segmentation_rgb=rgb,
                      probabilities={"Effusion": (0.1, 0.8), "Cardiomegaly": (0.3, 0.31)},
                      captions={"counterfactual": "After"}, footer="model tiny; seed 1234; " * 20,
                      title=INSTRUCTION)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 5
    assert "synthetic" in images[1].get_title().lower()
    assert not any("Note:" in t.get_text() for ax in fig.axes for t in ax.texts)
    assert any("Δ intensity (counterfactual − prior)" == ax.get_ylabel() for ax in fig.axes)
    png, pdf = write_figure(fig, tmp_path / "edit")
    assert (png, pdf) == (tmp_path / "edit.png", tmp_path / "edit.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 1000

    fig = edit_figure(prior=prior, counterfactual=cf, delta=delta, delta_limit=0.1, attention_rgb=None,
                      segmentation_rgb=None, probabilities=None, captions={}, footer="x")
    assert len([ax for ax in fig.axes if ax.images]) == 3
    png, pdf = write_figure(fig, tmp_path / "minimal.png")
    assert png.name == "minimal.png" and pdf.exists()

    fig = edit_figure(prior=prior, counterfactual=cf, delta=delta, delta_limit=0.1, attention_rgb=None,
                      segmentation_rgb=None, probabilities=None, captions={}, footer="model tiny", notes=NOTES)
    text = " ".join(" ".join(t.get_text() for ax in fig.axes for t in ax.texts).split())
    assert all(f"Note: {n}" in text for n in NOTES) and text.index("model tiny") < text.index("Note:")

    with pytest.raises(InputError, match="caption"):
        edit_figure(prior=prior, counterfactual=cf, delta=delta, delta_limit=0.1, attention_rgb=None,
                    segmentation_rgb=None, probabilities=None, captions={"cf": "x"}, footer="")
    with pytest.raises(InputError, match="one grid"):
        edit_figure(prior=prior[:32], counterfactual=cf, delta=delta, delta_limit=0.1, attention_rgb=None,
                    segmentation_rgb=None, probabilities=None, captions={}, footer="")


# ---------------------------------------------------------------------------------------------
# Provenance


def test_write_provenance_guards_identifiers(tmp_path: Path) -> None:
    record = {**PROVENANCE, "source": {"meta": {"patient_id": "123", "modality": "CR"}},
              "value": np.float32(0.5)}
    with pytest.raises(InputError, match="source.meta.patient_id"):
        write_provenance(tmp_path / "p.json", record)
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(InputError, match="name"):  # a serialized XRayMeta's file name
        write_provenance(tmp_path / "p.json", {"source": XRayMeta("png", name="Doe_Jane.png").as_dict()})

    ok = {**PROVENANCE, "card": {"name": "tiny-test"}, "source": XRayMeta("png").as_dict(),
          "timings_s": {"total": 1.0}}
    data = json.loads(write_provenance(tmp_path / "ok.json", ok, timings={"export": 0.25}).read_text())
    assert data["software"] == software_versions() and "exported_at" in data
    assert data["timings_s"] == {"total": 1.0, "export": 0.25}

    out = write_provenance(tmp_path / "kept.json", record, keep_identifiers=True)
    data = json.loads(out.read_text())
    assert data["source"]["meta"]["patient_id"] == "123" and data["value"] == 0.5
    assert out.read_text().index('"exported_at"') < out.read_text().index('"model_hash"')  # sorted keys


def test_software_versions_does_not_import() -> None:
    versions = software_versions()
    for key in ("python", "numpy", "torch", "diffusers", "transformers", "gradio", "pydicom", "SimpleITK",
                "torchxrayvision", "cxr-journey"):
        assert isinstance(versions[key], str) and versions[key], key
    assert versions["cxr-journey"] != "not installed"


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_missing_folder_raises_and_leaves_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="does not exist"):
        write_provenance(missing / "p.json", PROVENANCE)
    with pytest.raises(InputError, match="does not exist"):
        write_dicom(missing / "x.dcm", _synthetic(), source=None, instruction="x", provenance={})
    with pytest.raises(InputError, match="does not exist"):
        write_figure(edit_figure(prior=_synthetic(), counterfactual=_synthetic(), delta=np.zeros((96, 80)),
                                 delta_limit=0.1, attention_rgb=None, segmentation_rgb=None,
                                 probabilities=None, captions={}, footer=""), missing / "f")
    assert not missing.exists() and list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "old.gif"
    target.write_bytes(b"previous")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.os, "replace", fail)
    with pytest.raises(InputError, match="No space left"):
        write_gif(target, [_synthetic()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gif"]
    assert target.read_bytes() == b"previous"  # the old file is untouched


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    out = write_provenance(tmp_path / "p.json", PROVENANCE)
    assert os.stat(out).st_mode & 0o777 == io_module._file_mode(tmp_path / "absent")


def test_export_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, engine.export; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
