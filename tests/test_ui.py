"""The workstation served on 127.0.0.1 and driven through gradio_client (no browser)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from journey_ui.app import DISPLAY_MIN_SIDE, mark_synthetic


def test_mark_synthetic_is_visible_and_enlarges_small_images():
    out = mark_synthetic(np.full((64, 64), 0.5, np.float32))
    assert out.shape == (DISPLAY_MIN_SIDE, DISPLAY_MIN_SIDE, 3) and out.dtype == np.uint8
    banner = out[:10].reshape(-1, 3).mean(axis=0)
    assert banner[0] > 120 and banner[1] < 80  # red banner at the top
    assert np.allclose(out[-20:].mean(), 128, atol=2)  # image below untouched


@pytest.fixture(scope="module")
def served(tiny_engine):
    from journey_ui import build

    demo = build(tiny_engine)
    demo.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
    )
    yield demo
    demo.close()


def test_upload_generate_round_trip(served, rg1_dicom):
    from gradio_client import Client, handle_file

    client = Client(served.local_url, verbose=False)
    _, meta = client.predict(handle_file(str(rg1_dicom)), api_name="/load")
    assert meta["photometric"] == "MONOCHROME1" and meta["inverted"] is True
    assert "patient_id" not in meta
    prior, cf, applied, seed, provenance = client.predict(
        "new right pleural effusion", "large", 2, 7.5, 1.5, 5, False, api_name="/generate",
    )
    assert applied == "new large right pleural effusion"
    assert seed == 5
    assert json.loads(provenance)["synthetic"] is True


def test_bad_upload_is_a_readable_error_and_server_keeps_serving(served, tmp_path, rg1_dicom):
    from gradio_client import Client, handle_file

    fake = tmp_path / "scan.png"
    fake.write_text("not an image at all")
    client = Client(served.local_url, verbose=False)
    with pytest.raises(Exception, match="not a DICOM, PNG or JPEG"):
        client.predict(handle_file(str(fake)), api_name="/load")
    with pytest.raises(Exception, match="Load a radiograph first"):
        client.predict("edema", "none", 2, 7.5, 1.5, 0, False, api_name="/generate")
    _, meta = client.predict(handle_file(str(rg1_dicom)), api_name="/load")
    assert meta["modality"] == "CR"
