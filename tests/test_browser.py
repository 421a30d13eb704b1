"""End to end in a real browser: ``python app.py`` with the bundled model on 127.0.0.1, driven
through Debian's headless Chromium by Playwright.

Uploads a simulated example (labelled SIMULATED), watches the live preview follow a change of
severity, generates, waits for the four analysis images, exports the figure and the DICOM, runs a
3-step chained journey, checks the downloaded files, then loads a second film (the real CR
RG1_UNCR.dcm) and checks that nothing of the first stays on either tab; saves screenshots to
``$CXR_SCREENSHOTS`` (default: the test's temporary folder). Skipped when Chromium or
Playwright is missing (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STARTUP_S = 180
OUTSIDE_REQUESTS: list[str] = []
"""Requests the page made to anything but the app (fonts, analytics, CDNs): must stay empty."""
GENERATE_S = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``python app.py`` as a user starts it (bundled model, 127.0.0.1, offline)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"app.py did not serve {url} within {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:"))
                else OUTSIDE_REQUESTS.append(r.url))
        page.goto(app_url)
        yield page
        browser.close()


def _download(page, link, folder: Path) -> Path:
    with page.expect_download() as info:
        link.click()
    target = folder / info.value.suggested_filename
    info.value.save_as(target)
    return target


def _fill_until_it_stays(page, box, text: str, tries: int = 10) -> None:
    """Fills a textbox and waits until the text has stayed two seconds.

    A tab's components mount when the tab is first shown, and Gradio then sets their configured
    value again, sometimes after a fill that came first (seen on fresh CI machines: the chain's
    two-line default came back, so a 2-step chain ran instead of the 3 typed). A person typing
    is slower than that; the test refills until its text survives.
    """
    for _ in range(tries):
        box.fill(text)
        for _ in range(2):
            page.wait_for_timeout(1000)
            if box.input_value() != text:
                break
        else:
            return
    raise AssertionError(f"the textbox kept resetting to {box.input_value()!r}")


def _banner_colour(page, image) -> tuple[int, int, int]:
    """The colour of the banner along the bottom of a displayed image (at its left end, below
    its text), read from the file the page shows."""
    import io

    from PIL import Image

    png = page.request.get(image.get_attribute("src")).body()
    rgb = Image.open(io.BytesIO(png)).convert("RGB")
    return rgb.getpixel((1, rgb.height - 2))


def test_upload_generate_journey_and_exports_then_a_second_film(page, tmp_path, rg1_dicom):
    import pydicom
    from PIL import Image
    from playwright import sync_api

    from journey_ui.views import banner_colour

    shots = Path(os.environ.get("CXR_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.locator("#upload input[type=file]").set_input_files(str(ROOT / "assets/examples/sim_normal.png"))
    page.get_by_text("Read: PNG").wait_for(timeout=60_000)
    # a simulated example was never acquired: its banner says SIMULATED (item 4 of issue 27)
    assert _banner_colour(page, page.locator("#preview img")) == banner_colour("simulated")
    assert "simulated film" in page.locator("#read-info").inner_text()
    # The live preview: loading the image previews the default instruction; a new severity updates it.
    live, info = page.locator("#live-preview img"), page.locator("#live-info")
    live.wait_for(timeout=GENERATE_S * 1000)
    sync_api.expect(info).to_contain_text("new large left pleural effusion", timeout=GENERATE_S * 1000)
    first = live.get_attribute("src")
    page.locator("#severity").get_by_label("moderate").check()
    sync_api.expect(info).to_contain_text("new moderate left pleural effusion", timeout=GENERATE_S * 1000)
    assert live.get_attribute("src") != first  # the image itself changed, not only its caption
    assert info.inner_text().startswith("Live preview · ")
    page.screenshot(path=str(shots / "workstation-preview.png"), full_page=True)
    page.locator("#severity").get_by_label("large").check()
    sync_api.expect(info).to_contain_text("new large left pleural effusion", timeout=GENERATE_S * 1000)
    page.locator("#generate").click()
    for elem in ("out-cf", "out-delta", "out-attention", "out-seg"):
        page.locator(f"#{elem} img").wait_for(timeout=GENERATE_S * 1000)
    assert page.locator("#applied textarea").input_value() == "new large left pleural effusion"
    assert _banner_colour(page, page.locator("#out-prior img")) == banner_colour("simulated")
    assert "CTR are approximate" in page.locator("#metrics").inner_text()
    sync_api.expect(page.locator("#made-by")).to_contain_text("sampler")
    page.screenshot(path=str(shots / "workstation-edit.png"), full_page=True)

    page.locator("#export-figure").click()
    pdf_link = page.locator("#exported a[download$='.pdf']")
    pdf_link.wait_for(timeout=60_000)
    assert _download(page, pdf_link, tmp_path).read_bytes()[:4] == b"%PDF"
    png = _download(page, page.locator("#exported a[download$='.png']"), tmp_path)
    assert Image.open(png).size[0] > 800

    page.locator("#export-dicom").click()
    dicom_link = page.locator("#exported a[download$='.dcm']")
    dicom_link.wait_for(timeout=60_000)
    ds = pydicom.dcmread(_download(page, dicom_link, tmp_path))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.BurnedInAnnotation == "YES"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert 'Instruction as applied: "new large left pleural effusion"' in ds.DerivationDescription
    assert "CTR are approximate" in ds.DerivationDescription
    sync_api.expect(page.locator("#exported a[download]")).to_have_count(3)  # the figure is still listed

    page.get_by_role("tab", name="Journey").click()
    page.get_by_role("tab", name="Chained edits").click()
    chain = "new moderate left pleural effusion\nleft pleural effusion has resolved\nwithout support devices"
    _fill_until_it_stays(page, page.locator("#chain-text textarea"), chain)
    page.locator("#chain").click()
    page.locator("#journey-gif a[download]").wait_for(timeout=GENERATE_S * 1000)
    gif = Image.open(_download(page, page.locator("#journey-gif a[download]"), tmp_path))
    assert gif.n_frames == 4, f"{gif.n_frames} frames: the chain ran {gif.n_frames - 1} steps, not the 3 typed"
    # The gallery and the GIF arrive in one update, but the gallery's thumbnails render after
    # the link: wait for them rather than counting at once.
    timeline = page.locator("#timeline img")
    try:
        sync_api.expect(timeline).to_have_count(4, timeout=30_000)
    except AssertionError:
        page.screenshot(path=str(shots / "workstation-journey-failed.png"), full_page=True)
        (shots / "timeline-failed.html").write_text(page.locator("#timeline").inner_html())
        raise
    page.screenshot(path=str(shots / "workstation-journey.png"), full_page=True)

    # A second film, as the next patient: nothing of the first stays on either tab (issue 27, item 1).
    page.get_by_role("tab", name="Edit", exact=True).click()
    page.locator("#upload button[aria-label=Clear]").click()  # as a user does before dropping the next file
    sync_api.expect(page.locator("#out-cf img")).to_have_count(0, timeout=10_000)  # clearing the film clears it
    page.locator("#upload input[type=file]").set_input_files(str(rg1_dicom))
    page.get_by_text("Read: CR").wait_for(timeout=60_000)
    for elem in ("out-prior", "out-cf", "out-delta", "out-attention", "out-seg"):
        sync_api.expect(page.locator(f"#{elem} img")).to_have_count(0, timeout=10_000)
    sync_api.expect(page.locator("#exported a[download]")).to_have_count(0)
    sync_api.expect(page.locator("#applied textarea")).to_have_value("")
    assert page.locator("#metrics").inner_text().strip() == ""
    assert "effusion" not in page.locator("#probs").inner_text().lower()
    page.get_by_text("Provenance of the last result").click()
    assert "model_hash" not in page.locator("#provenance").inner_text()
    assert _banner_colour(page, page.locator("#preview img")) == banner_colour("acquired")
    page.screenshot(path=str(shots / "workstation-second-film.png"), full_page=True)
    page.get_by_role("tab", name="Journey").click()
    sync_api.expect(page.locator("#timeline img")).to_have_count(0)
    sync_api.expect(page.locator("#journey-gif a[download]")).to_have_count(0)
    page.screenshot(path=str(shots / "workstation-second-film-journey.png"), full_page=True)


def test_the_page_made_no_requests_outside_the_app(page):
    """Hospitals run the workstation air-gapped: no fonts, analytics or CDN calls from the page."""
    assert not OUTSIDE_REQUESTS, f"the page reached outside 127.0.0.1: {OUTSIDE_REQUESTS[:5]}"
