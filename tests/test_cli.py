"""``python -m engine``: success paths and bad-input exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.__main__ import main
from engine.io import read_xray

ROOT = Path(__file__).resolve().parent.parent


def test_edit_rg1_dicom_keeps_aspect_ratio(tiny_model, rg1_dicom, tmp_path, capsys):
    out = tmp_path / "cf.png"
    code = main(["edit", str(rg1_dicom), "--instruction", "new right pleural effusion", "--out", str(out),
                 "--model", str(tiny_model), "--seed", "7", "--steps", "2", "--severity", "moderate",
                 "--device", "cpu"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["instruction_applied"] == "new moderate right pleural effusion"
    assert record["seed"] == 7 and record["model_hash"]
    assert "patient_id" not in json.dumps(record["input"])
    prior = read_xray(rg1_dicom)
    result = read_xray(out)
    assert result.pixels.shape == prior.pixels.shape  # the input's geometry, so its aspect ratio
    assert result.meta.source_format == "png"


def test_edit_is_reproducible_and_16_bit(tiny_model, rg1_dicom, tmp_path, capsys):
    args = ["edit", str(rg1_dicom), "--instruction", "edema", "--model", str(tiny_model), "--seed", "1",
            "--steps", "2", "--device", "cpu", "--bits", "16"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    capsys.readouterr()
    a, b = read_xray(tmp_path / "a.png"), read_xray(tmp_path / "b.png")
    assert np.array_equal(a.pixels, b.pixels)
    from PIL import Image

    assert Image.open(tmp_path / "a.png").mode.startswith("I")


@pytest.mark.parametrize("keep", [False, True])
def test_edit_to_dicom_is_a_synthetic_secondary_capture(keep, tiny_model, rg1_dicom, tmp_path, capsys):
    import pydicom

    out = tmp_path / "cf.dcm"
    args = ["edit", str(rg1_dicom), "--instruction", "new right pleural effusion", "--out", str(out),
            "--model", str(tiny_model), "--seed", "3", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--keep-identifiers"] if keep else args) == 0
    record = json.loads(capsys.readouterr().out)
    ds = pydicom.dcmread(out)
    source = pydicom.dcmread(rg1_dicom, stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.BurnedInAnnotation == "YES"
    assert "new right pleural effusion" in ds.DerivationDescription and record["model_hash"][:12] in ds.DerivationDescription
    assert 'Instruction as applied: "new right pleural effusion"' in ds.DerivationDescription  # said once
    assert "instruction: instruction" not in ds.DerivationDescription.lower()
    assert str(tiny_model.parent) not in ds.DerivationDescription and f"model {tiny_model.name};" in ds.DerivationDescription
    assert ds.pixel_array.shape == read_xray(rg1_dicom).pixels.shape
    if keep:
        assert (ds.PatientID, str(ds.PatientName)) == (source.PatientID, str(source.PatientName))
    else:  # the default: nothing of the patient's header
        assert ds.PatientID == "ANON" and source.PatientID not in ds.to_json()
        assert str(source.PatientName) not in ds.to_json() and ds.PatientIdentityRemoved == "YES"


def test_info_prints_the_card(tiny_model, capsys):
    assert main(["info", "--model", str(tiny_model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["card"]["method"] == "instruct"
    assert "not for diagnosis" in info["card"]["intended_use"]


@pytest.mark.parametrize(
    "case",
    ["text_as_png", "missing_input", "missing_model", "empty_instruction", "bad_severity", "bad_out_dir",
     "bad_detail_threshold", "zero_detail_threshold", "jpeg_out", "identifiers_in_png"],
)
def test_bad_input_exits_2_with_one_line(case, tiny_model, rg1_dicom, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    args = {
        "text_as_png": ["edit", str(fake), "--instruction", "edema", "--out", str(tmp_path / "o.png"),
                        "--model", str(tiny_model)],
        "missing_input": ["edit", str(tmp_path / "nope.dcm"), "--instruction", "edema", "--out",
                          str(tmp_path / "o.png"), "--model", str(tiny_model)],
        "missing_model": ["edit", str(rg1_dicom), "--instruction", "edema", "--out", str(tmp_path / "o.png"),
                          "--model", str(tmp_path / "no-model")],
        "empty_instruction": ["edit", str(rg1_dicom), "--instruction", " ", "--out", str(tmp_path / "o.png"),
                              "--model", str(tiny_model)],
        "bad_severity": ["edit", str(rg1_dicom), "--instruction", "edema", "--out", str(tmp_path / "o.png"),
                         "--severity", "enormous"],
        "bad_out_dir": ["edit", str(rg1_dicom), "--instruction", "edema", "--steps", "1",
                        "--out", str(tmp_path / "no" / "such" / "dir" / "o.png"), "--model", str(tiny_model)],
        "bad_detail_threshold": ["edit", str(rg1_dicom), "--instruction", "edema", "--out", str(tmp_path / "o.png"),
                                 "--model", str(tiny_model), "--detail-threshold", "fine"],
        "zero_detail_threshold": ["edit", str(rg1_dicom), "--instruction", "edema", "--out", str(tmp_path / "o.png"),
                                  "--model", str(tiny_model), "--detail-threshold", "0"],
        "jpeg_out": ["edit", str(rg1_dicom), "--instruction", "edema", "--out", str(tmp_path / "o.jpg"),
                     "--model", str(tiny_model)],
        "identifiers_in_png": ["edit", str(rg1_dicom), "--instruction", "edema", "--out", str(tmp_path / "o.png"),
                               "--model", str(tiny_model), "--keep-identifiers"],
    }[case]
    if case == "bad_severity":  # argparse's own error path
        with pytest.raises(SystemExit) as exc:
            main(args)
        code = exc.value.code
    else:
        code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.jpg").exists()


def test_detail_threshold_reaches_the_request_of_either_method():
    from engine.__main__ import _parser, _request
    from engine.engine import DETAIL_THRESHOLD

    def request(*extra):
        return _request(_parser().parse_args(["edit", "x.png", "--out", "o.png", *extra]))

    assert request("--instruction", "edema").detail_threshold == DETAIL_THRESHOLD
    assert request("--instruction", "edema", "--detail-threshold", "none").detail_threshold is None
    assert request("--method", "invert", "--source-prompt", "a", "--target-prompt", "b",
                   "--detail-threshold", "0.1").detail_threshold == 0.1


def test_subprocess_bad_file_has_no_traceback(tmp_path):
    fake = tmp_path / "x.dcm"
    fake.write_bytes(b"\x00" * 300)
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "edit", str(fake), "--instruction", "edema", "--out",
         str(tmp_path / "o.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr


def test_edit_warns_of_an_instruction_outside_the_models_vocabulary(rg1_dicom, tmp_path, capsys):
    """The bundled model's card carries its training vocabulary: "asdfgh qwerty" still runs, and
    the record (and a DICOM's description) says the model could only guess."""
    import pydicom

    from engine.engine import DEFAULT_MODEL

    out = tmp_path / "cf.dcm"
    assert main(["edit", str(rg1_dicom), "--instruction", "asdfgh qwerty", "--out", str(out), "--model",
                 str(DEFAULT_MODEL), "--seed", "1", "--steps", "2", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["notes"][0].startswith("The model was never trained on the words 'asdfgh', 'qwerty'")
    assert record["model_id"] == "journey-mini" and str(DEFAULT_MODEL.parent) not in json.dumps(record)
    assert "never trained on the words" in pydicom.dcmread(out).DerivationDescription
    assert main(["edit", str(rg1_dicom), "--instruction", "new large left pleural effusion", "--out",
                 str(tmp_path / "cf.png"), "--model", str(DEFAULT_MODEL), "--seed", "1", "--steps", "2",
                 "--device", "cpu"]) == 0
    assert "notes" not in json.loads(capsys.readouterr().out)


def test_edit_takes_the_fast_sampler_by_default_and_the_full_one_when_asked(fast_model, rg1_dicom, tmp_path, capsys):
    base = ["edit", str(rg1_dicom), "--instruction", "new right pleural effusion", "--model", str(fast_model),
            "--seed", "2", "--device", "cpu"]
    runs = {}
    for name, extra in (("default", []), ("full", ["--sampler", "full"]), ("steps", ["--steps", "3"])):
        assert main([*base, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        runs[name] = json.loads(capsys.readouterr().out)["sampler"]
    assert runs["default"] == {"path": "fast", "steps": 4, "unet": "unet_fast"}
    assert runs["full"] == {"path": "full", "steps": 20, "unet": "unet"}
    assert runs["steps"]["path"] == "full" and runs["steps"]["steps"] == 3 and "steps were given" in runs["steps"]["note"]
    assert main([*base, "--sampler", "fast", "--scheduler", "euler_a", "--out", str(tmp_path / "x.png")]) == 2
    assert "own schedule" in capsys.readouterr().err
