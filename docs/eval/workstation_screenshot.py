"""The README's workstation screenshot on a real film: starts ``python app.py`` (bundled model,
127.0.0.1, offline), uploads a film in headless Chromium, generates and saves the page::

    python docs/eval/workstation_screenshot.py --film ../shared/data/hannover-covid19/png/2168a917.png \
        --instruction "new large left pleural effusion" --out docs/images/workstation.png

Needs Chromium (``/usr/bin/chromium`` or ``CXR_CHROMIUM``) and Playwright (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--film", required=True, help="the film to upload (DICOM, PNG or JPEG)")
    parser.add_argument("--instruction", default="new large left pleural effusion")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each step")
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("app.py did not start", file=sys.stderr)
                    return 1
                time.sleep(1)
        wait_ms = args.timeout * 1000
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(Path(args.film).resolve()))
            page.get_by_text("Read: ").first.wait_for(timeout=wait_ms)
            box = page.locator("#instruction textarea")
            box.fill(args.instruction)
            expect(page.locator("#live-info")).to_contain_text(args.instruction.split()[-1], timeout=wait_ms)
            page.locator("#generate").click()
            for elem in ("out-cf", "out-delta", "out-attention", "out-seg"):
                page.locator(f"#{elem} img").wait_for(timeout=wait_ms)
            page.wait_for_timeout(1500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
