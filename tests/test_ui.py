"""The workstation: every control's handler with a tiny engine, then the app served on 127.0.0.1
and driven through gradio_client (the real-browser test is tests/test_browser.py)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from engine.errors import InputError
from journey_ui import views
from journey_ui.app import example_files, series_example, simulated_examples
from journey_ui.workstation import (
    EXAMPLE_INSTRUCTIONS, METHODS, REGION_ANATOMY, REGION_ANYWHERE, Session, Workstation, close_session, ladder_instructions, order_series, painted_mask,
    target_finding, target_structure,
)

SETTINGS = dict(steps=2, text_g=7.5, image_g=1.5, seed=3, random_seed=False)


def edit_args(method: str = METHODS[0], instruction: str = "new right pleural effusion", severity: str = "large",
              **overrides):
    s = {**SETTINGS, **overrides}
    return (method, instruction, severity, "chest x-ray with support devices", "chest x-ray without support devices",
            "negative-prompt", 2.0, "", s["steps"], s["text_g"], s["image_g"], s["seed"], s["random_seed"])


@pytest.fixture(scope="module")
def analyst():
    from engine.analyse import Analyst

    return Analyst(device="cpu")


@pytest.fixture(scope="module")
def ws(tiny_engine, analyst):
    return Workstation(tiny_engine, analyst, simulated_files=simulated_examples())


@pytest.fixture()
def session(ws, rg1_dicom):
    s = Session()
    ws.load(str(rg1_dicom), s)
    yield s
    s.close()


@pytest.fixture()
def identified_dicom(tmp_path, rg1_dicom) -> Path:
    """RG1_UNCR.dcm with identifying tags added, as a PACS would export it."""
    ds = pydicom.dcmread(rg1_dicom)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-12345"
    ds.StudyDate = "20240102"
    ds.InstitutionName = "St Example Hospital"
    out = tmp_path / "identified.dcm"
    ds.save_as(out)
    return out


# -- pure helpers ----------------------------------------------------------------------------------
def test_mark_synthetic_is_visible_and_enlarges_small_images():
    out = views.mark_synthetic(np.full((64, 64), 0.5, np.float32))
    assert out.shape == (views.DISPLAY_MIN_SIDE, views.DISPLAY_MIN_SIDE, 3) and out.dtype == np.uint8
    banner = out[-10:].reshape(-1, 3).mean(axis=0)
    assert banner[0] > 120 and banner[1] < 80  # red banner along the bottom (Gradio overlays the top)
    assert np.allclose(out[:300].mean(), 128, atol=2)  # the image above it untouched


def test_delta_panel_has_a_colour_bar_beside_the_map():
    rgb = np.full((64, 64, 3), 200, np.uint8)
    panel = views.delta_panel(rgb, 0.2)
    assert panel.shape[1] > panel.shape[0]  # the colour bar widens the panel
    right = panel[:, views.DISPLAY_MIN_SIDE:].reshape(-1, 3).astype(int)
    assert (right[:, 0] - right[:, 2] > 100).any() and (right[:, 2] - right[:, 0] > 100).any()  # red and blue


def test_target_structure_follows_side_and_finding():
    names = ["left_lung", "right_lung", "heart"]
    assert target_structure("new large left pleural effusion", names) == "left_lung"
    assert target_structure("right pneumothorax has resolved", names) == "right_lung"
    assert target_structure("interval increase in cardiomegaly", names) == "heart"
    assert target_structure("new bilateral pleural effusions", names) is None
    assert target_structure("without support devices", names) is None


def test_target_finding_is_the_first_changing_finding_named():
    names = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumothorax",
             "Support Devices"]
    assert target_finding("new moderate right pleural effusion; heart size unchanged", names) == "Pleural Effusion"
    assert target_finding("interval increase in cardiomegaly", names) == "Cardiomegaly"
    assert target_finding("stable cardiomegaly and new right pneumothorax", names) == "Pneumothorax"
    assert target_finding("without support devices", names) == "Support Devices"
    assert target_finding("improving pulmonary edema", names) == "Edema"
    assert target_finding("no change", names) is None
    assert target_finding("new right pleural effusion", ["Cardiomegaly"]) is None  # not a finding it reports


def test_ladder_runs_from_improved_to_deteriorated():
    rungs = ladder_instructions("right pleural effusion")
    assert [r[0] for r in rungs] == ["resolved", "improved", "current", "slight", "moderate", "large"]
    assert rungs[2][1] is None and rungs[-1] == ("large", "new right pleural effusion", "large")
    with pytest.raises(InputError, match="Name the finding"):
        ladder_instructions("  ")


def test_painted_mask_reads_the_editor_layers_in_input_geometry():
    layer = np.zeros((100, 50, 4), np.uint8)
    layer[10:20, 5:15, 3] = 255
    mask = painted_mask({"background": None, "layers": [layer], "composite": None}, (200, 100))
    assert mask.shape == (200, 100) and mask[30, 15] and not mask[100, 80]
    assert painted_mask({"layers": [np.zeros((10, 10, 4), np.uint8)]}, (10, 10)) is None
    assert painted_mask(None, (10, 10)) is None


def test_examples_include_simulated_cases_and_the_real_cr():
    files = example_files()
    assert any(f.endswith("RG1_UNCR.dcm") for f in files)
    assert sum("sim_" in Path(f).name for f in files) == 3
    assert len(series_example()) == 4


# -- the edit tab ----------------------------------------------------------------------------------
def test_load_says_what_was_read_without_identifiers(ws, identified_dicom):
    s = Session()
    image, read, meta, s = ws.load(str(identified_dicom), s)
    assert image.ndim == 3 and "MONOCHROME1 (inverted to bone-bright)" in read and "2024-01-02" in read
    assert "patient_id" not in meta and "patient_name" not in meta and "Doe" not in json.dumps(meta)
    s.close()


def test_load_rejects_a_text_file_named_png_and_the_session_stays_usable(ws, tmp_path, rg1_dicom):
    fake = tmp_path / "scan.png"
    fake.write_text("not an image")
    s = Session()
    with pytest.raises(InputError, match="not a DICOM, PNG or JPEG"):
        ws.load(str(fake), s)
    ws.load(str(rg1_dicom), s)
    assert s.xray is not None
    s.close()


def test_instruct_edit_is_synthetic_analysed_and_reproducible(ws, session):
    first = ws.edit(session, *edit_args())
    assert first.synthetic and first.provenance["instruction_applied"] == "new large right pleural effusion"
    assert first.provenance["seed"] == 3 and first.image.shape == first.prior.shape
    a = first.analysis
    assert a.structure == "right_lung" and a.delta.shape == first.prior.shape
    assert a.finding == "Pleural Effusion" and "the finding the instruction names" in " ".join(a.notes)
    assert set(a.probabilities) == set(ws.findings) and a.attention_rgb is not None
    again = ws.edit(session, *edit_args())
    np.testing.assert_array_equal(first.image, again.image)
    random_seed = ws.edit(session, *edit_args(random_seed=True))
    assert random_seed.provenance["seed"] != 3 or not np.array_equal(random_seed.image, first.image)


def test_invert_edit_runs_on_the_instruct_model(ws, session):
    result = ws.edit(session, *edit_args(method=METHODS[1]))
    assert result.method == "invert" and result.provenance["method"] == "invert (negative-prompt)"
    assert result.provenance["request"]["word_weight"] == 2.0


def test_invert_captions_fit_the_model(ws, tmp_path, analyst):
    """Image captions (PRISM) for a latent model; "no change" -> removal for a change model,
    which reads captions as changes from the input."""
    import engine
    from conftest import build_tiny_model

    assert ws.invert_captions == ("chest x-ray with support devices", "chest x-ray without support devices")
    change = engine.load(build_tiny_model(tmp_path / "change", instruct_target="change"), device="cpu", dtype="fp32")
    assert Workstation(change, analyst).invert_captions == ("unchanged support devices", "without support devices")


def test_compare_runs_both_methods_and_the_identity_baseline(ws, session):
    results = ws.compare(session, *edit_args()[1:])
    assert [r.method for r in results] == ["instruct", "invert", "identity"]
    identity = results[-1]
    assert not identity.synthetic and np.abs(identity.analysis.delta).max() == 0
    assert session.result is results[0]


def test_painted_region_confines_the_change(ws, session):
    h, w = session.xray.shape
    layer = np.zeros((h, w, 4), np.uint8)
    layer[h // 4 : h // 2, w // 4 : w // 2, 3] = 255
    regions = ws.regions(session, {"layers": [layer]}, "none")
    result = ws.edit(session, *edit_args(), regions=regions)
    assert result.provenance["regions"]["edit_fraction"] == pytest.approx(1 / 16, abs=0.01)
    outside = np.ones(result.prior.shape, bool)
    s = result.prior.shape[0]
    outside[s // 8 : 5 * s // 8, :] = False  # generous: the letterboxed quarter lies inside this band
    np.testing.assert_array_equal(result.image[outside], result.prior[outside])


def test_structure_region_and_unknown_structure(ws, session):
    regions = ws.regions(session, None, "right_lung")
    assert regions.edit.any() and regions.edit.mean() < 0.5
    with pytest.raises(InputError):
        ws.regions(session, None, "left kidney")


def test_region_choice_confines_edits_to_the_findings_anatomy_by_default(ws, session):
    """The default region is the anatomy of the findings named; "anywhere" turns it off, and a
    structure replaces it. The choice reaches every edit's provenance."""
    assert ws.regions(session, None, REGION_ANATOMY) is None and session.confine == "anatomy"
    confined = ws.edit(session, *edit_args())  # new right pleural effusion
    assert confined.provenance["request"]["confine"] == "anatomy"
    assert confined.provenance["regions"]["source"] == "anatomy: right_lung"
    assert any("kept to the anatomy named (right lung" in n for n in confined.notes)
    assert ws.regions(session, None, REGION_ANYWHERE) is None and session.confine == "none"
    anywhere = ws.edit(session, *edit_args())
    assert anywhere.provenance["request"]["confine"] == "none" and anywhere.provenance.get("regions") is None
    assert not any("kept to the anatomy" in n for n in anywhere.notes)
    assert not np.array_equal(anywhere.image, confined.image)
    assert ws.regions(session, None, "right_lung").edit.any() and session.confine == "none"
    ws.choose_region(session, REGION_ANATOMY)


def test_reanalyse_switches_the_attention_finding(ws, session):
    ws.edit(session, *edit_args())
    other = ws.findings[-1]
    result = ws.reanalyse(session, other, "heart")
    assert result.analysis.finding == other and result.analysis.structure == "heart"


def test_edit_without_a_radiograph_is_a_plain_error(ws):
    s = Session()
    with pytest.raises(InputError, match="Load a radiograph first"):
        ws.edit(s, *edit_args())
    with pytest.raises(InputError, match="Generate a counterfactual first"):
        ws.export_dicom(s, False)
    ws.load(example_files()[0], s)
    with pytest.raises(InputError, match="empty"):
        ws.edit(s, *edit_args(instruction="   "))
    s.close()


def test_examples_cached_copy_survives_the_session_that_loaded_it(tiny_engine, rg1_dicom):
    """Gradio keeps one cached copy of each example for every user; a session's end must not
    delete it (it did: the next user clicking RG1_UNCR.dcm got 'File not found'). A user's own
    upload in the cache still goes."""
    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder())
    example_copy = cache / "test-example-hash" / "RG1_UNCR.dcm"  # where Gradio caches an example
    example_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(rg1_dicom, example_copy)
    own = cache / "test-own-upload-hash" / "sim_normal.png"
    own.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(example_files()[0], own)
    ws = Workstation(tiny_engine, None, shared_files=[rg1_dicom])
    for path in (example_copy, own):
        s = Session()
        ws.load(str(path), s)
        close_session(s)
    assert example_copy.is_file() and not own.exists()
    s = Session()
    ws.load(str(example_copy), s)  # the next user
    close_session(s)
    shutil.rmtree(example_copy.parent)


def test_require_names_what_is_missing_without_doing_work(ws):
    s = Session()
    with pytest.raises(InputError, match="Load a radiograph first"):
        ws.require("image", s)
    with pytest.raises(InputError, match="Load a patient's series first"):
        ws.require("series", None)
    ws.load(example_files()[0], s)
    ws.require("image", s)
    with pytest.raises(ValueError):
        ws.require("model", s)
    s.close()


def test_heavy_buttons_check_first_so_a_missing_image_leaves_the_panels_alone(served):
    """Each heavy event runs only after an output-less pre-check succeeded: an error in the
    pre-check is a message, not every result panel (and the seed) marked failed."""
    deps = served.config["dependencies"]
    for name in ("generate", "ladder", "chain", "series_step"):
        (event,) = [d for d in deps if d.get("api_name") == name]
        assert event["trigger_only_on_success"] and event["trigger_after"] is not None, name
        check = deps[event["trigger_after"]]
        assert check["outputs"] == [] and check["targets"][0][1] == "click", name
        # off the queue (queue=False) Gradio 6.31 showed no message for the pre-check's error (seen in Chromium)
        assert check["queue"] is not False, name
    (load,) = [d for d in deps if d.get("api_name") == "load"]  # a refused upload: a message, the panels kept
    check = deps[load["trigger_after"]]
    assert load["trigger_only_on_success"] and check["outputs"] == [] and check["targets"][0][1] == "change"


# -- the journey tab -------------------------------------------------------------------------------
def test_ladder_is_one_batch_around_the_current_image(ws, session, monkeypatch):
    calls = []
    original = ws.eng.counterfactuals
    monkeypatch.setattr(ws.eng, "counterfactuals", lambda *a, **k: calls.append(a) or original(*a, **k))
    frames = ws.ladder(session, "left pleural effusion", 2, 7.5, 1.5, 0)
    assert len(calls) == 1 and len(calls[0][1]) == 5
    assert [f[2] for f in frames] == ["synthetic", "synthetic", "acquired", "synthetic", "synthetic", "synthetic"]
    assert frames[2][1] == "current (acquired prior)"
    assert frames[5][1] == "large: new large left pleural effusion"
    np.testing.assert_array_equal(frames[2][0], session.journey[2][0])


def test_chain_edits_the_previous_result(ws, session, monkeypatch):
    inputs = []
    original = ws.eng.counterfactual
    monkeypatch.setattr(ws.eng, "counterfactual", lambda image, *a, **k: inputs.append(image) or original(image, *a, **k))
    frames = ws.chain(session, "new right pleural effusion\n\nright pleural effusion has resolved\n", 2, 7.5, 1.5, 0)
    assert len(frames) == 3 and frames[0][2] == "acquired" and frames[2][2] == "synthetic"
    assert inputs[0] is session.xray and isinstance(inputs[1], np.ndarray)
    with pytest.raises(InputError, match="one instruction per line"):
        ws.chain(session, "\n  \n", 2, 7.5, 1.5, 0)


def test_series_orders_by_date_and_compares_with_the_real_followup(ws):
    s = Session()
    files = series_example()
    random.Random(0).shuffle(files)
    items = ws.load_series(files, s)
    dates = [x.meta.study_date for x in s.series]
    assert dates == sorted(dates) and len(items) == 4 and dates[0] in items[0][1]
    frames, comparison = ws.series_step(s, 2, "new right pleural effusion", "none", 2, 7.5, 1.5, 0)
    assert [f[2] for f in frames] == ["simulated", "synthetic", "simulated"]  # the example series is simulated
    metrics = comparison.metrics()
    assert np.isfinite(metrics["registration_ncc"]) and metrics["psnr_db"] is not None
    with pytest.raises(InputError, match="Pick a prior"):
        ws.series_step(s, 3, "x", "none", 2, 7.5, 1.5, 0)
    s.close()


def test_series_refuses_two_patients(ws, identified_dicom):
    s = Session()
    with pytest.raises(InputError, match="different patients"):
        ws.load_series([series_example()[0], str(identified_dicom)], s)
    s.close()


def test_order_series_puts_undated_studies_last(rg1_dicom):
    from engine.io import read_xray

    dated = read_xray(series_example()[1])
    undated = read_xray(example_files()[0])
    assert order_series([undated, dated]) == [dated, undated]


# -- exports -----------------------------------------------------------------------------------------
def test_dicom_export_removes_identifiers_unless_kept(ws, identified_dicom):
    s = Session()
    ws.load(str(identified_dicom), s)
    ws.edit(s, *edit_args())
    plain = pydicom.dcmread(ws.export_dicom(s, False))
    assert plain.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert list(plain.ImageType)[:2] == ["DERIVED", "SECONDARY"] and plain.BurnedInAnnotation == "YES"
    assert "new large right pleural effusion" in plain.DerivationDescription
    assert "Doe" not in str(plain.PatientName) and plain.PatientID != "MRN-12345"
    assert "InstitutionName" not in plain and plain.get("StudyDate", "") != "20240102"
    assert (plain.Rows, plain.Columns) == s.xray.shape
    kept = pydicom.dcmread(ws.export_dicom(s, True))
    assert str(kept.PatientName) == "Doe^Jane" and kept.PatientID == "MRN-12345"
    s.close()


def test_figure_provenance_and_gif_exports(ws, session):
    ws.edit(session, *edit_args())
    png, pdf = ws.export_figure(session)
    assert Image.open(png).size[0] > 800 and Path(pdf).read_bytes()[:4] == b"%PDF"
    record = json.loads(Path(ws.export_provenance(session)).read_text())
    assert record["synthetic"] is True and "software" in record and "analysis" in record
    assert "patient_id" not in json.dumps(record)
    ws.chain(session, "new right pleural effusion\nright pleural effusion has resolved", 2, 7.5, 1.5, 0)
    gif = Image.open(ws.export_gif(session))
    assert gif.n_frames == 3
    assert all(Path(p).parent == session.folder for p in (png, pdf))


def test_session_files_go_when_the_session_ends(ws, rg1_dicom, tmp_path):
    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder())
    upload = cache / "test-upload-hash" / "prior.dcm"  # where Gradio puts an upload
    upload.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(rg1_dicom, upload)
    own_file = tmp_path / "mine.dcm"  # a path given through the Python API: the caller's own file
    shutil.copy(rg1_dicom, own_file)
    s = Session()
    ws.load(str(own_file), s)
    ws.load(str(upload), s)
    ws.edit(s, *edit_args())
    exported = Path(ws.export_provenance(s))
    served_copy = cache / "test-export-hash" / exported.name  # Gradio's served copy of an export
    served_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(exported, served_copy)
    close_session(s)
    assert not s.folder.exists() and not upload.exists() and not served_copy.exists()
    assert not upload.parent.exists() and own_file.exists()
    close_session(None)  # a session that never loaded anything


# -- served on 127.0.0.1 through gradio_client ------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_engine, analyst):
    from journey_ui import build

    demo = build(tiny_engine, analyst)
    demo.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
    )
    yield demo
    demo.close()


def _generate(client, instruction="new right pleural effusion", severity="large"):
    return client.predict(False, METHODS[0], instruction, severity, "chest x-ray", "chest x-ray", "negative-prompt",
                          2.0, "", 2, 7.5, 1.5, 5, False, None, REGION_ANYWHERE, api_name="/generate")


def test_served_upload_generate_export_round_trip(served, rg1_dicom, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(served.local_url, verbose=False)
    _, read, meta, *_ = client.predict(handle_file(str(rg1_dicom)), api_name="/load")
    assert meta["photometric"] == "MONOCHROME1" and meta["inverted"] is True and "patient_id" not in meta
    out = _generate(client)
    prior, cf, delta, attention, seg, probs, metrics, applied, seed, provenance = out[:10]
    assert applied == "new large right pleural effusion" and seed == 5
    assert json.loads(provenance)["synthetic"] is True
    assert all(Path(p).is_file() for p in (prior, cf, delta, attention, seg))
    files = client.predict(False, api_name="/export_dicom")
    assert pydicom.dcmread(files[-1]).BurnedInAnnotation == "YES"


def test_inversion_edit_leaves_the_seed_field_as_it_was(served, rg1_dicom):
    """Inversion edits use no seed; the seed box kept the user's value instead of going blank."""
    from gradio_client import Client, handle_file

    client = Client(served.local_url, verbose=False)
    client.predict(handle_file(str(rg1_dicom)), api_name="/load")
    out = client.predict(False, METHODS[1], "", "none", "unchanged support devices", "without support devices",
                         "direct", 2.0, "", 2, 7.5, 1.5, 5, False, None, REGION_ANYWHERE, api_name="/generate")
    record = json.loads(out[9])
    assert record["method"].startswith("invert") and "seed is not used" in record["seed_note"]
    assert out[8] == 5


def test_bad_upload_is_a_readable_error_and_server_keeps_serving(served, tmp_path, rg1_dicom):
    from gradio_client import Client, handle_file

    fake = tmp_path / "scan.png"
    fake.write_text("not an image at all")
    client = Client(served.local_url, verbose=False)
    with pytest.raises(Exception, match="'scan.png' is not a DICOM, PNG or JPEG") as info:
        client.predict(handle_file(str(fake)), api_name="/load")
    assert "/" not in str(info.value).split("'scan.png'")[0]  # the file's own name, not the server's upload folder
    with pytest.raises(Exception, match="Load a radiograph first"):
        _generate(client)
    _, _, meta, *_ = client.predict(handle_file(str(rg1_dicom)), api_name="/load")
    assert meta["modality"] == "CR"


def test_two_users_keep_separate_sessions(served, rg1_dicom):
    from gradio_client import Client, handle_file

    alice = Client(served.local_url, verbose=False)
    bob = Client(served.local_url, verbose=False)
    alice.predict(handle_file(str(rg1_dicom)), api_name="/load")
    with pytest.raises(Exception, match="Load a radiograph first"):
        _generate(bob)  # bob never loaded anything: alice's radiograph is not his
    assert _generate(alice)[7] == "new large right pleural effusion"


def test_instruction_preview_shows_the_severity_rule():
    assert Workstation.preview_instruction("new right pleural effusion", "moderate") == \
        "new moderate right pleural effusion"
    assert Workstation.preview_instruction("interval increase in cardiomegaly", "large") == \
        "interval increase in severe cardiomegaly"
    assert Workstation.preview_instruction("effusion " * 2000, "large").startswith("(too long: 18000 characters")


def test_a_ct_is_refused_in_plain_words(ws):
    from fixtures_io import dicom_test_file

    s = Session()
    with pytest.raises(InputError, match="CT"):
        ws.load(str(dicom_test_file("CT_small.dcm")), s)
    s.close()


def test_app_exits_2_with_a_message_when_the_model_is_missing(tmp_path, capsys):
    import app

    assert app.main(["--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-model" in err


def test_unexpected_errors_are_reported_plainly_and_logged_without_their_message(caplog):
    import gradio as gr

    from journey_ui.app import _handler

    def broken(path):
        raise RuntimeError(f"cannot parse {path}")

    with caplog.at_level("ERROR"), pytest.raises(gr.Error, match="still running"):
        _handler(broken)("/data/Doe_Jane_MRN12345.dcm")
    assert "RuntimeError" in caplog.text and "Doe_Jane" not in caplog.text


def test_display_images_are_written_once_under_new_names_and_pruned():
    """Gradio rewrites a cached image array in place under a name from its pixels, so two users
    shown the same image could cut off each other's download; files of their own avoid it."""
    from journey_ui.workstation import MAX_VIEW_FILES

    s = Session()
    rgb = np.zeros((8, 8, 3), np.uint8)
    first, second = s.view_file(rgb), s.view_file(rgb)
    assert first != second and Image.open(second).size == (8, 8)
    for _ in range(MAX_VIEW_FILES):
        s.view_file(rgb)
    assert not Path(first).exists() and len(list(s.folder.glob("view-*.png"))) == MAX_VIEW_FILES
    assert s.view_file(None) is None
    s.close()


# -- issue 27: trust ----------------------------------------------------------------------------------
SIM_NORMAL = example_files()[[Path(f).name for f in example_files()].index("sim_normal.png")]


def _figure_text(ws, session, monkeypatch) -> str:
    """Every text drawn on the exported figure (its title, captions, footer and notes)."""
    from engine import export

    drawn = []
    original = export.write_figure

    def capture(fig, stem):
        drawn.append(" ".join([fig._suptitle.get_text() if fig._suptitle else ""]
                              + [t.get_text() for ax in fig.axes for t in (*ax.texts, ax.title)]))
        return original(fig, stem)

    monkeypatch.setattr(export, "write_figure", capture)
    ws.export_figure(session)
    monkeypatch.undo()
    return " ".join(" ".join(drawn).split())


def test_a_new_film_clears_every_result_and_export_of_the_previous_one(ws):
    """Two films in a row: nothing of the first (its edit, comparison, journey, exports listed)
    stays to be shown or exported beside the second, and clearing the film does the same."""
    s = Session()
    ws.load(SIM_NORMAL, s)
    ws.compare(s, *edit_args()[1:])
    ws.export_dicom(s, False)
    ws.export_provenance(s)
    ws.chain(s, "new right pleural effusion", 2, 7.5, 1.5, 0)
    assert s.result is not None and s.compare and s.journey and len(s.shown_exports) == 2
    ws.load(example_files()[-1], s)  # RG1_UNCR.dcm, a real CR
    assert s.result is None and s.compare == [] and s.journey == [] and s.shown_exports == []
    for export in (ws.export_figure, ws.export_provenance, lambda s_: ws.export_dicom(s_, False)):
        with pytest.raises(InputError, match="Generate a counterfactual first"):
            export(s)
    with pytest.raises(InputError, match="Generate a journey first"):
        ws.export_gif(s)
    ws.edit(s, *edit_args())
    ws.load(None, s)  # the user clears the film
    assert s.xray is None and s.result is None and s.shown_exports == []
    s.close()


def test_a_refused_upload_keeps_the_film_and_its_results(ws, session, tmp_path):
    ws.edit(session, *edit_args())
    before = session.result
    bad = tmp_path / "scan.png"
    bad.write_text("not an image")
    with pytest.raises(InputError):
        ws.check_upload(str(bad))
    with pytest.raises(InputError):
        ws.load(str(bad), session)
    assert session.result is before and session.xray is not None


def test_exports_carry_every_note_shown_beside_the_numbers(ws, session, monkeypatch):
    """The bundled classifier and segmenter say what their numbers cannot be trusted for (the
    CTR on a real film is approximate); the screen says so beside the probabilities and ratios,
    and so must the figure, the DICOM and the JSON."""
    result = ws.edit(session, *edit_args())
    notes = list(result.analysis.notes)
    assert any("CTR are approximate" in n for n in notes)
    figure = _figure_text(ws, session, monkeypatch)
    dicom = pydicom.dcmread(ws.export_dicom(session, False))
    record = json.loads(Path(ws.export_provenance(session)).read_text())
    for note in notes:
        flat = " ".join(note.split())
        assert flat in figure, flat
        assert flat in dicom.ImageComments, flat
        assert flat in record["notes"]
    description = dicom.DerivationDescription
    assert "Notes: " in description and "CTR are approximate" in description
    assert len(dicom.DerivationDescription) <= 1024


def test_exports_and_messages_name_no_local_path(ws, session, tiny_model, monkeypatch, tmp_path):
    """The model goes by its id (folder name or hub id) and content hash; an upload by its own
    file name, never the folder the server stored it under."""
    ws.edit(session, *edit_args())
    figure = _figure_text(ws, session, monkeypatch)
    dicom = pydicom.dcmread(ws.export_dicom(session, False))
    record = Path(ws.export_provenance(session)).read_text()
    folder = str(tiny_model.parent)
    for text in (figure, dicom.DerivationDescription, dicom.ImageComments, record):
        assert folder not in text and "/tmp" not in text
    assert "model tiny (sha256" in figure and f"model tiny; sha256 {ws.eng.model_hash}" in dicom.DerivationDescription
    assert json.loads(record)["model_id"] == "tiny"
    stored = tmp_path / "gradio" / "3f2a9c0d1e" / "scan.png"  # where Gradio keeps an upload
    stored.parent.mkdir(parents=True)
    stored.write_text("not an image")
    with pytest.raises(InputError) as info:
        ws.check_upload(str(stored))
    assert str(info.value).startswith("'scan.png' is not a DICOM, PNG or JPEG") and str(tmp_path) not in str(info.value)


def test_dicom_description_says_the_instruction_once(ws, session):
    ws.edit(session, *edit_args())
    text = pydicom.dcmread(ws.export_dicom(session, False)).DerivationDescription
    assert 'Instruction as applied: "new large right pleural effusion"' in text
    assert "instruction: instruction" not in text.lower()


def test_simulated_films_are_labelled_simulated_never_acquired(ws, session, rg1_dicom, monkeypatch):
    """The examples were made by the phantom simulator: on screen, in journeys, the GIF and the
    figure they are SIMULATED; a real CR stays ACQUIRED."""
    from engine import export

    def banner(rgb):  # the banner's colour at its left end, below its text
        return tuple(int(v) for v in np.asarray(rgb)[-2, 1])

    s = Session()
    image, read, _, _ = ws.load(SIM_NORMAL, s)
    assert s.source == "simulated" and banner(image) == views.banner_colour("simulated")
    assert "simulated film" in read
    frames = ws.ladder(s, "left pleural effusion", 2, 7.5, 1.5, 0)
    assert frames[2][1:] == ("current (simulated prior)", "simulated")
    gif = Image.open(ws.export_gif(s))
    gif.seek(2)  # the current rung: the simulated film itself
    band = np.asarray(gif.convert("L"), dtype=np.float32)[:12] / 255.0  # the top banner
    frame = export._resize(frames[2][0], (gif.size[1], gif.size[0]))
    assert np.abs(band - export.burn_synthetic_label(frame, export.SIMULATED_BANNER)[:12]).max() < 0.02
    assert np.abs(band - export.burn_synthetic_label(frame, export.ACQUIRED_BANNER)[:12]).max() > 0.3
    result = ws.edit(s, *edit_args())
    assert result.prior_source == "simulated" and "Prior (simulated)" in _figure_text(ws, s, monkeypatch)
    assert any("simulated film" in n for n in result.notes)
    s.close()
    image, read, _, _ = ws.load(str(rg1_dicom), session)
    assert session.source == "acquired" and banner(image) == views.banner_colour("acquired")
    assert "simulated" not in read


def test_exports_stay_listed_until_the_film_changes(ws, session):
    ws.edit(session, *edit_args())
    png, pdf = ws.export_figure(session)
    dcm = ws.export_dicom(session, False)
    prov = ws.export_provenance(session)
    assert session.shown_exports == [png, pdf, dcm, prov]
    ws.load(SIM_NORMAL, session)
    assert session.shown_exports == []


def _undated_series(folder: Path) -> list[str]:
    from engine.io import read_xray

    pixels = read_xray(SIM_NORMAL).pixels
    paths = []
    for name, shade in (("c-third.png", 0.8), ("a-first.png", 1.0), ("b-second.png", 0.9)):
        Image.fromarray((pixels * shade * 255).astype(np.uint8)).save(folder / name)
        paths.append(str(folder / name))
    return paths


def test_a_series_without_dates_says_how_it_was_ordered_and_can_be_put_in_order(ws, tmp_path):
    s = Session()
    ws.load_series(_undated_series(tmp_path), s)
    assert [x.meta.name for x in s.series] == ["a-first.png", "b-second.png", "c-third.png"]
    summary = ws.series_summary(s)
    assert "carry no study dates, so they are listed by file name" in summary
    assert summary.index("a-first.png") < summary.index("b-second.png") < summary.index("c-third.png")
    pairing = ws.series_pairing(s, 0)
    assert "**Prior:** study 1 (`a-first.png`" in pairing and "**follow-up:** study 2 (`b-second.png`" in pairing
    assert "listed by file name" in pairing

    ws.reorder_series(s, "3, 1, 2")
    assert [x.meta.name for x in s.series] == ["c-third.png", "a-first.png", "b-second.png"]
    assert ws.series_summary(s).startswith("Ordered as you gave it")
    items = ws.reorder_series(s, "2021-05-01, 2021-03-01, 20210401")  # one date per study as listed
    assert [x.meta.name for x in s.series] == ["a-first.png", "b-second.png", "c-third.png"]
    assert [x.meta.study_date for x in s.series] == ["2021-03-01", "2021-04-01", "2021-05-01"]
    assert items[0][1] == "study 1 · 2021-03-01" and "the study dates you gave" in ws.series_pairing(s, 1)
    for bad, message in (("1, 1, 2", "not an order of studies 1 to 3"), ("2021-01-01", "Got 1 dates for 3"),
                         ("first, second", "neither a study number nor a date"),
                         ("2021-02-30, 1, 2", "not a valid date")):
        with pytest.raises(InputError, match=message):
            ws.reorder_series(s, bad)
    s.close()


def test_a_dated_series_says_it_is_ordered_by_date(ws):
    s = Session()
    ws.load_series(series_example()[::-1], s)
    assert ws.series_summary(s).startswith("Ordered by the study dates in the files.")
    assert ws.series_pairing(s, 0).startswith("**Prior:** study 1 (`visit0.dcm`")
    s.close()


class _WithCard:
    """The tiny engine under another model card (the engine reads nothing else from it here)."""

    def __init__(self, eng, card):
        self._eng, self.card = eng, card

    def __getattr__(self, name):
        return getattr(self._eng, name)


def test_an_instruction_the_model_cannot_have_learned_is_warned_about_and_still_runs(tiny_engine, analyst, rg1_dicom):
    from dataclasses import replace

    from engine.checkpoint import read_card
    from engine.engine import DEFAULT_MODEL

    card = replace(tiny_engine.card, vocabulary=read_card(DEFAULT_MODEL).vocabulary)
    ws = Workstation(_WithCard(tiny_engine, card), analyst)
    for example in (e[0] for e in EXAMPLE_INSTRUCTIONS):
        assert ws.instruction_warning(example) is None, example
    warning = ws.instruction_warning("asdfgh qwerty")
    assert "never trained on the words 'asdfgh', 'qwerty'" in warning
    assert "pleural effusion" in warning and "support devices" in warning and "worsening" in warning
    s = Session()
    ws.load(str(rg1_dicom), s)
    result = ws.edit(s, *edit_args(instruction="asdfgh qwerty", severity="none"))
    assert result.image.shape == result.prior.shape  # it ran
    assert result.warnings == (warning,) and result.notes[0] == warning
    assert warning in json.loads(Path(ws.export_provenance(s)).read_text())["notes"]
    s.close()
    plain = Workstation(tiny_engine, analyst)  # a card without a vocabulary: no warning, no crash
    assert plain.vocabulary == {} and plain.instruction_warning("asdfgh qwerty") is None


def test_served_second_film_clears_every_result_of_the_first(served, rg1_dicom):
    """Through the server: a second film's load empties every result panel and export of the
    Edit and Journey tabs in the same event; exports of one film stay listed until then."""
    from gradio_client import Client, handle_file

    client = Client(served.local_url, verbose=False)
    client.predict(handle_file(SIM_NORMAL), api_name="/load")
    _generate(client)
    assert len(client.predict(False, api_name="/export_dicom")) == 1
    assert len(client.predict(api_name="/export_provenance")) == 2  # the DICOM is still listed
    client.predict("new right pleural effusion", 2, 7.5, 1.5, 0, api_name="/chain")
    out = client.predict(handle_file(str(rg1_dicom)), api_name="/load")
    (prior, cf, delta, attention, seg, probs, metrics, applied, seed, provenance, finding, made_by, gallery, table,
     exported, timeline, slider, frame, gif, series_metrics, live, live_info) = out[4:]
    assert out[1].startswith("Read: **CR**")  # the second film is shown...
    assert prior is cf is delta is attention is seg is exported is frame is gif is live is None  # ...nothing of the first
    assert probs["data"] == [] and metrics == applied == provenance == series_metrics == made_by == live_info == ""
    assert timeline == []
    assert gallery["value"] == [] and gallery["visible"] is False and table["value"]["data"] == []
    assert finding["value"] is None and slider["value"] == 0 and "value" not in seed  # the seed is the user's, kept
    with pytest.raises(Exception, match="Generate a counterfactual first"):
        client.predict(False, api_name="/export_dicom")
    _generate(client)
    assert len(client.predict(False, api_name="/export_dicom")) == 1  # a new list for the new film


# -- the fast sampler: Generate, Refine, the live preview, the journey ------------------------------
@pytest.fixture(scope="module")
def fast_ws(fast_engine, analyst):
    return Workstation(fast_engine, analyst)


def test_generate_runs_the_fast_sampler_and_refine_the_full_one(fast_ws, rg1_dicom):
    s = Session()
    fast_ws.load(str(rg1_dicom), s)
    fast = fast_ws.edit(s, *edit_args(steps=7))
    assert fast.provenance["sampler"] == {"path": "fast", "steps": 4, "unet": "unet_fast"}
    assert "(fast sampler, 4 steps)" in fast.label and fast.analysis is not None
    refined = fast_ws.edit(s, *edit_args(steps=7), sampler="full")
    assert refined.provenance["sampler"]["path"] == "full" and refined.provenance["request"]["steps"] == 7
    assert "Refine" in fast_ws.sampler_summary and fast_ws.fast_steps == 4
    strong = fast_ws.edit(s, *edit_args(text_g=15.0))  # outside what the student learned: full, and it says why
    assert strong.provenance["sampler"]["path"] == "full" and "trained ranges" in strong.provenance["sampler"]["note"]
    s.close()


def test_the_ladder_runs_on_the_fast_sampler_unless_asked(fast_ws, rg1_dicom, monkeypatch):
    s = Session()
    fast_ws.load(str(rg1_dicom), s)
    seen = []
    original = fast_ws.eng.counterfactuals
    monkeypatch.setattr(fast_ws.eng, "counterfactuals", lambda *a, **k: seen.append(a[1]) or original(*a, **k))
    fast_ws.ladder(s, "left pleural effusion", 20, 7.5, 1.5, 0)
    fast_ws.ladder(s, "left pleural effusion", 3, 7.5, 1.5, 0, sampler="full")
    assert {(r.sampler, r.steps) for r in seen[0]} == {("auto", None)}
    assert {(r.sampler, r.steps) for r in seen[1]} == {("full", 3)}
    s.close()


def test_live_preview_shows_the_default_path_and_never_an_older_result(fast_ws, rg1_dicom, monkeypatch):
    import threading

    s = Session()
    assert fast_ws.preview(s, "new left pleural effusion", "large", 7.5, 1.5, 0) is None  # nothing loaded
    fast_ws.load(str(rg1_dicom), s)
    assert fast_ws.preview(s, "   ", "large", 7.5, 1.5, 0) is None
    shown = fast_ws.preview(s, "new left pleural effusion", "large", 7.5, 1.5, 3)
    assert shown.image.shape == (64, 64) and shown.caption.startswith("Live preview · fast sampler, 4 steps")
    assert shown.caption.endswith("new large left pleural effusion") and "seed 3" in shown.caption
    # a slow preview is overtaken by a newer one: it returns nothing, so its image never replaces the newer one
    original = fast_ws.eng.counterfactual
    started, release = threading.Event(), threading.Event()

    def slow_first(image, request, **kw):
        if request.severity == "slight":
            started.set()
            release.wait(10)
        return original(image, request, **kw)

    monkeypatch.setattr(fast_ws.eng, "counterfactual", slow_first)
    results = {}
    older = threading.Thread(target=lambda: results.setdefault(
        "older", fast_ws.preview(s, "new left pleural effusion", "slight", 7.5, 1.5, 0)))
    older.start()
    started.wait(10)
    results["newer"] = fast_ws.preview(s, "new left pleural effusion", "large", 7.5, 1.5, 0)
    release.set()
    older.join(20)
    assert results["newer"] is not None and results["older"] is None
    assert results["newer"].ticket == s.preview_ticket
    s.close()


def test_live_preview_on_a_model_without_a_fast_sampler_is_a_full_edit(ws, session):
    shown = ws.preview(session, "new left pleural effusion", "none", 7.5, 1.5, 0, steps=2)
    assert shown is not None and "full sampler, 2 steps" in shown.caption
    assert ws.fast_steps is None and "no fast sampler" in ws.sampler_summary


def test_served_live_preview_and_refine(fast_engine, analyst, rg1_dicom):
    from gradio_client import Client, handle_file

    from journey_ui import build

    demo = build(fast_engine, analyst)
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=None,
                                                   prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        client.predict(handle_file(str(rg1_dicom)), api_name="/load")
        image, caption = client.predict(METHODS[0], "new left pleural effusion", "moderate", 7.5, 1.5, 2, 20,
                                        REGION_ANATOMY, api_name="/preview")
        assert Path(image).is_file() and "fast sampler, 4 steps" in caption
        out = client.predict(False, METHODS[0], "new left pleural effusion", "moderate", "a", "b", "negative-prompt",
                             2.0, "", 5, 7.5, 1.5, 2, False, None, REGION_ANYWHERE, api_name="/refine")
        assert json.loads(out[9])["sampler"]["path"] == "full" and "full sampler, 5 steps" in out[11]
        assert json.loads(out[9])["request"]["confine"] == "none"  # the region choice reaches the engine
    finally:
        demo.close()


def test_device_removal_notes_say_what_was_inpainted():
    """The note beside a device removal names what went: every detected device, the named ones
    (and when none of them was found), or the model's own edit."""
    from journey_ui.workstation import EditResult

    def notes(devices: dict) -> list[str]:
        image = np.zeros((8, 8), np.float32)
        return EditResult("instruct", "instruction: x", image, image, image,
                          {"devices_removed": devices}).notes

    every = notes({"method": "detect+inpaint", "area": 0.041, "model_instruction": "no interval change"})
    assert every == ["Devices: the detector's lines and tubes (4.1 % of the film) were inpainted from the film "
                     "around them, then the model made 'no interval change'; a device the detector missed stays."]
    named = notes({"method": "detect+inpaint", "area": 0.004, "model_instruction": "no interval change",
                   "named": ["endotracheal tube"]})
    assert named[0].startswith("Devices: the pixels the detector took for the endotracheal tube (0.4 % of the film) were")
    none = notes({"method": "detect+inpaint", "area": 0.0, "model_instruction": "no interval change",
                  "named": ["left chest tube"], "note": "the detector found no left chest tube on this film: nothing was removed"})
    assert none[1] == "Devices: the detector found no left chest tube on this film: nothing was removed."
    model = notes({"method": "model", "note": "the device detector does not know the device in 'clips removed'"})
    assert model == ["Devices: the device detector does not know the device in 'clips removed'."]
