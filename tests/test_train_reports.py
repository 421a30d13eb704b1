"""Reports: section extraction on real (Indiana) reports, rule-based labels and descriptions, LLM client."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from train.reports import (LLMDescriber, LLMError, describe_change, extract_sections, findings_from_text,
                           indiana_reports, report_text, swap_laterality)


def _indiana_tgz() -> Path:
    import torchxrayvision

    return Path(torchxrayvision.__file__).parent / "data" / "NLMCXR_reports.tgz"


@pytest.fixture(scope="module")
def indiana() -> list[tuple[str, dict[str, str]]]:
    reports = []
    for i, item in enumerate(indiana_reports(_indiana_tgz())):
        reports.append(item)
        if i >= 400:
            break
    return reports


def test_indiana_sections_round_trip(indiana):
    """Real reports rendered as free text (MIMIC-style headers) give back every section exactly."""
    assert len(indiana) > 400
    checked = 0
    for _, sections in indiana:
        text = "\n\n".join(f" {name.upper()}:  {body}" for name, body in sections.items())
        out = extract_sections("FINAL REPORT\n" + text)
        for name, body in sections.items():
            assert out[name] == body
        assert out["preamble"] == "FINAL REPORT"
        if "findings" in sections and "impression" in sections:
            assert report_text(text) == (sections["findings"] + " " + sections["impression"])[:1000].strip()
            checked += 1
    assert checked > 200


def test_mimic_style_report_sections():
    text = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
    s = extract_sections(text)
    assert s["examination"] == "CHEST (PA AND LAT)"
    assert s["findings"].startswith("There is no focal consolidation") and "nipple shadows." in s["findings"]
    assert s["impression"] == "No acute cardiopulmonary process."
    assert report_text(text).endswith("No acute cardiopulmonary process.")


def test_rule_labels_negation_uncertainty_laterality(indiana):
    f = findings_from_text("Moderate right pleural effusion. No pneumothorax. Possible left lower lobe atelectasis. "
                           "Right PICC line tip in the SVC.")
    assert f["Pleural Effusion"].state == 1 and f["Pleural Effusion"].laterality == "right"
    assert f["Pleural Effusion"].size == "moderate"
    assert f["Pneumothorax"].state == 0
    assert f["Atelectasis"].state == -1 and f["Atelectasis"].laterality == "left"
    assert f["Support Devices"].state == 1
    assert f["No Finding"].state == 0
    normal = findings_from_text(dict(indiana[0][1])["findings"])  # report 1: a normal study
    assert all(v.state == 0 for k, v in normal.items() if k != "No Finding") and normal["No Finding"].state == 1


def test_describe_change_rules():
    prior = findings_from_text("Heart is enlarged. Small right pleural effusion. Endotracheal tube in place.")
    later = findings_from_text("Heart is enlarged. Large right pleural effusion. New left pneumothorax. "
                               "Endotracheal tube has been removed.")
    text = describe_change(prior, later)
    assert "increasing right pleural effusion, now large" in text
    assert "new left pneumothorax" in text
    assert "removed support devices" in text
    assert "heart size unchanged" in text
    assert describe_change({"Edema": 1.0}, {"Edema": 0.0}) == "resolved pulmonary edema"
    assert describe_change({"Edema": 0.0}, {"Edema": 0.0}) == "no significant interval change"
    assert describe_change({}, {"Pleural Effusion": 1.0}) == "new pleural effusion"


def test_swap_laterality():
    assert swap_laterality("New Right effusion, left pneumothorax; bright") == "New Left effusion, right pneumothorax; bright"


class _FakeLLM(BaseHTTPRequestHandler):
    calls: list[dict] = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        answer = {"choices": [{"message": {"role": "assistant", "content": ' "new small left pleural effusion" '}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_llm():
    _FakeLLM.calls = []
    _FakeLLM.fail_first = 0
    server = HTTPServer(("127.0.0.1", 0), _FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _FakeLLM
    server.shutdown()


def test_llm_client_retries_caches_and_prompts(fake_llm, tmp_path):
    url, handler = fake_llm
    handler.fail_first = 2
    cache = tmp_path / "llm.jsonl"
    llm = LLMDescriber(url, "fake-model", api_key="k", cache_path=cache, retries=3, backoff=0.01)
    text = llm.describe("FINDINGS: No effusion.", "FINDINGS: Small left effusion.")
    assert text == "new small left pleural effusion"
    assert len(handler.calls) == 3 and all(c["path"] == "/v1/chat/completions" for c in handler.calls)
    body = handler.calls[-1]["body"]
    assert body["model"] == "fake-model" and handler.calls[-1]["auth"] == "Bearer k"
    assert "Small left effusion" in body["messages"][0]["content"]
    # a second client reads the cache: no request
    again = LLMDescriber(url, "fake-model", cache_path=cache)
    assert again.describe("FINDINGS: No effusion.", "FINDINGS: Small left effusion.") == text
    assert len(handler.calls) == 3 and len(cache.read_text().splitlines()) == 1


def test_llm_client_gives_up_and_needs_config(fake_llm, monkeypatch):
    url, handler = fake_llm
    handler.fail_first = 10
    llm = LLMDescriber(url, "m", retries=1, backoff=0.01)
    with pytest.raises(LLMError):
        llm.describe("a", "b")
    assert len(handler.calls) == 2
    monkeypatch.delenv("CXR_LLM_URL", raising=False)
    monkeypatch.delenv("CXR_LLM_MODEL", raising=False)
    with pytest.raises(ValueError, match="CXR_LLM_URL"):
        LLMDescriber()
