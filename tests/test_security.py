"""Security properties: no unpickling, no remote code, no path traversal, 127.0.0.1, pinned versions.

* a static scan (AST, so docstrings and comments don't count) of the project's Python for
  unpickling calls, ``trust_remote_code``, ``allow_pickle``, ``weights_only=False`` and
  ``use_safetensors=False``; torchxrayvision's own loader (pickled whole modules, behind
  :mod:`engine.analysis.xrv`) is the one documented exception and the scan checks it is
  documented there;
* model folders whose weights are only ``.bin``/``.pt``/``.ckpt`` are refused with a message,
  and loading a model never unpickles (``torch.load`` and ``pickle`` made to raise; booby-trapped
  pickles next to the safetensors are never opened);
* the app binds 127.0.0.1 with no share link unless told otherwise;
* export names are generated: a hostile upload name never reaches an export path;
* every requirement is pinned with ``==``.

pip-audit's report of the pinned versions is in ``docs/eval/pip_audit.txt``.
"""

from __future__ import annotations

import ast
import functools
import os
import pickle
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCANNED = [ROOT / "app.py", *sorted(p for d in ("engine", "train", "journey_ui") for p in (ROOT / d).rglob("*.py"))]
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
DOCUMENTED_EXCEPTION = ROOT / "engine" / "analysis" / "xrv.py"
CONVERTER = ROOT / "train" / "autoencoder.py"  # reads published .pth state dicts once (weights_only=True)


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


@functools.cache
def _nodes(path: Path) -> tuple[ast.AST, ...]:
    return tuple(ast.walk(_tree(path)))


def _dotted(node: ast.AST) -> str:
    """``torch.serialization.load`` for an attribute chain, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _constant(node: ast.AST, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_uses(source: str | Path) -> list[tuple[int, str]]:
    """(line, what) for every risky call or import in ``source`` (Python text or a file)."""
    found = []
    for node in ast.walk(ast.parse(source)) if isinstance(source, str) else _nodes(source):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in UNPICKLERS:
                found.append((node.lineno, f"from {module} import ..."))
            if module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                found.append((node.lineno, f"from {module} import load"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("torch.load", "torch.serialization.load", "torch.jit.load") or (
                    name.split(".")[0] in UNPICKLERS and name.rsplit(".", 1)[-1] in ("load", "loads", "Unpickler", "open")):
                found.append((node.lineno, f"{name}("))
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and not _constant(kw.value, False):
                    found.append((node.lineno, "trust_remote_code not False"))
                elif kw.arg == "allow_pickle" and not _constant(kw.value, False):
                    found.append((node.lineno, "allow_pickle not False"))
                elif kw.arg == "weights_only" and not _constant(kw.value, True):
                    found.append((node.lineno, "weights_only not True"))
                elif kw.arg == "use_safetensors" and not _constant(kw.value, True):
                    found.append((node.lineno, "use_safetensors not True"))
    return found


# -- (a) static scan -------------------------------------------------------------------------------
def test_the_scanner_catches_what_it_looks_for():
    bad = ("import pickle\nfrom torch import load\nimport torch\nx = torch.load('m.pt')\n"
           "AutoModel.from_pretrained('x', trust_remote_code=True)\nnp.load('a.npy', allow_pickle=True)\n"
           "torch.load('m.pt', weights_only=False)\nUNet.from_pretrained('u', use_safetensors=False)\n"
           "joblib.load('m.joblib')\n")
    whats = [w for _, w in unsafe_uses(bad)]
    assert whats.count("torch.load(") == 2 and "import pickle" in whats and "from torch import load" in whats
    assert {"trust_remote_code not False", "allow_pickle not False", "weights_only not True",
            "use_safetensors not True", "joblib.load("} <= set(whats)
    assert unsafe_uses('"""torch.load(weights_only=False) in a docstring"""\n# pickle.load(f)\n'
                       "m.from_pretrained('x', use_safetensors=True, trust_remote_code=False)\n") == []


def test_project_code_never_unpickles_or_runs_remote_code():
    assert len(SCANNED) > 30, "the scan found too few files; did the layout change?"
    problems = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in SCANNED
                for line, what in unsafe_uses(p) if not (p == CONVERTER and what == "torch.load(")]
    assert not problems, "unsafe loading in the project's code:\n" + "\n".join(problems)


def test_the_one_torch_load_converts_published_weights_with_weights_only():
    """``python -m train convert-autoencoder`` reads the published TAEF2 ``.pth`` state dicts once,
    with ``weights_only=True`` (tensors only, no code), and writes safetensors; the engine never
    loads a ``.pth``. The scan above lets ``torch.load`` through in that module only, and here it
    checks every such call there says ``weights_only=True`` and the docstring says why."""
    calls = [node for node in _nodes(CONVERTER) if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load"]
    assert calls, "the converter no longer calls torch.load: drop this exception"
    for call in calls:
        assert any(kw.arg == "weights_only" and _constant(kw.value, True) for kw in call.keywords)
    assert "weights_only=True" in ast.get_docstring(_tree(CONVERTER))
    engine_files = [p for p in SCANNED if p.is_relative_to(ROOT / "engine")]
    assert not any(what == "torch.load(" for p in engine_files for _, what in unsafe_uses(p))


def test_every_from_pretrained_of_weights_asks_for_safetensors():
    """Tokenizers and schedulers hold no weights; every network load says ``use_safetensors=True``."""
    missing = []
    for p in SCANNED:
        for node in _nodes(p):
            if isinstance(node, ast.Call) and _dotted(node.func).endswith(".from_pretrained"):
                owner = _dotted(node.func)
                if "Tokenizer" in owner or "Scheduler" in owner or "Processor" in owner:
                    continue
                if not any(kw.arg == "use_safetensors" for kw in node.keywords):
                    missing.append(f"{p.relative_to(ROOT)}:{node.lineno}: {owner}(...)")
    assert not missing, "from_pretrained without use_safetensors=True:\n" + "\n".join(missing)


def test_torchxrayvision_is_the_documented_exception_and_only_behind_its_module():
    """torchxrayvision's DenseNet/ResNet weights are whole pickled modules that the package
    itself loads; that is documented in engine/analysis/xrv.py, the only module importing it."""
    doc = ast.get_docstring(_tree(DOCUMENTED_EXCEPTION))
    assert "weights_only=False" in doc and "pickled" in doc
    importers = set()
    for p in SCANNED:
        for node in _nodes(p):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "torchxrayvision" for n in names):
                importers.add(p)
    assert importers == {DOCUMENTED_EXCEPTION}


def test_the_ui_never_loads_a_model_from_a_user_given_path():
    """The model is chosen when the app starts (app.py); no UI callback loads weights."""
    for p in (ROOT / "journey_ui").rglob("*.py"):
        for node in _nodes(p):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                assert not name.endswith(("from_pretrained", "load_model_parts", "engine.load", "load_file")), \
                    f"{p.relative_to(ROOT)}:{node.lineno}: {name}"


# -- (b) model folders: safetensors only, nothing unpickled ----------------------------------------
class _Canary:
    """Unpickling this creates ``path``: proof that something unpickled a weight file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.makedirs, (str(self.path),)


def _plant_pickles(folder: Path, marker: Path, names=("pytorch_model.bin", "diffusion_pytorch_model.bin",
                                                     "model.pt", "model.ckpt")) -> None:
    for name in names:
        torch.save({"weight": torch.zeros(1), "canary": _Canary(marker)}, folder / name)


@pytest.fixture()
def no_unpickling(monkeypatch):
    """``torch.load`` and ``pickle`` raise while the test runs."""
    def refuse(*_, **__):
        raise AssertionError("something tried to unpickle a file")

    for target, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)


def test_canary_pickles_do_fire_when_unpickled(tmp_path):
    """The booby trap works, so its absence below means nothing was unpickled."""
    _plant_pickles(tmp_path, tmp_path / "fired", names=("x.bin",))
    torch.load(tmp_path / "x.bin", weights_only=False)
    assert (tmp_path / "fired").is_dir()


@pytest.mark.parametrize("part, message", [
    ("vae", r"vae has no \.safetensors weights \(other weight formats are not loaded\)"),
    ("unet", r"unet has no \.safetensors weights \(other weight formats are not loaded\)"),
    ("text_projection", r"text_projection is not a valid text projection: .*model\.safetensors"),
    ("text_encoder", r"Could not load a BERT-family text encoder .*no file named model\.safetensors"),
])
def test_a_part_with_only_pickled_weights_is_refused(tiny_model, tmp_path, no_unpickling, part, message):
    import engine
    from engine.errors import ModelFolderError

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    for f in (model / part).glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "unpickled"
    _plant_pickles(model / part, marker)
    with pytest.raises(ModelFolderError, match=message):
        engine.load(model, device="cpu", dtype="fp32")
    assert not marker.exists()


def test_a_unet_override_must_be_safetensors(tiny_model, tmp_path, no_unpickling):
    import engine
    from engine.errors import ModelFolderError

    _plant_pickles(tmp_path, tmp_path / "unpickled", names=("unet.ckpt",))
    with pytest.raises(ModelFolderError, match=r"not a \.safetensors file"):
        engine.load(tiny_model, device="cpu", dtype="fp32", unet=tmp_path / "unet.ckpt")
    assert not (tmp_path / "unpickled").exists()


def test_loading_reads_safetensors_and_ignores_pickles_beside_them(tiny_model, tmp_path, no_unpickling):
    import engine

    model = tmp_path / "mixed"
    shutil.copytree(tiny_model, model)
    marker = tmp_path / "unpickled"
    for part in ("vae", "unet", "text_encoder", "text_projection"):
        _plant_pickles(model / part, marker)
    eng = engine.load(model, device="cpu", dtype="fp32")
    assert eng.card.method == "instruct"
    assert not marker.exists()


# -- (c) the server binds 127.0.0.1 ------------------------------------------------------------------
@pytest.fixture()
def launched(monkeypatch):
    """Runs ``app.main`` with the model load and the server replaced; returns launch()'s kwargs."""
    import app
    import engine
    import journey_ui

    calls: dict = {}

    class Demo:
        def queue(self, **kw):
            calls["queue"] = kw
            return self

        def launch(self, **kw):
            calls["launch"] = kw

    monkeypatch.setattr(engine, "load", lambda model, device="auto", **options: calls.setdefault("load", (model, device)))
    monkeypatch.setattr(journey_ui, "build", lambda eng, concurrency=None: Demo())
    for var in ("CXR_HOST", "GRADIO_SERVER_NAME", "CXR_SHARE", "CXR_MODEL", "CXR_PORT", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(var, raising=False)

    def run(*argv: str) -> dict:
        calls.clear()
        assert app.main(list(argv)) == 0
        return calls["launch"]

    return run


def test_app_binds_localhost_without_a_share_link_by_default(launched):
    kw = launched()
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False


def test_cxr_host_and_host_flag_override_the_interface(launched, monkeypatch):
    monkeypatch.setenv("CXR_HOST", "0.0.0.0")
    assert launched()["server_name"] == "0.0.0.0"
    assert launched("--host", "10.1.2.3")["server_name"] == "10.1.2.3"
    monkeypatch.setenv("CXR_SHARE", "1")
    assert launched()["share"] is True


def test_app_does_not_phone_home():
    """app.py turns Gradio analytics off and keeps the hub offline before anything imports them."""
    source = (ROOT / "app.py").read_text(encoding="utf-8")
    first_import = min(source.index("import argparse"), source.index("import engine"))
    for line in ('os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")',
                 'os.environ.setdefault("HF_HUB_OFFLINE", "1")'):
        assert -1 < source.index(line) < first_import


# -- (d) export names are generated, not user-given -------------------------------------------------
HOSTILE_NAMES = ("..%2f..%2fx.dcm", "....passwd.dcm", "$(touch pwned).dcm", "a;rm -rf ~.dcm", "..\\..\\x.dcm")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_exports_land_in_the_session_folder_whatever_the_upload_was_called(tiny_engine, rg1_dicom, tmp_path, name):
    from journey_ui.workstation import Session, Workstation

    upload = tmp_path / "uploads" / "etc" / "sub"
    upload.mkdir(parents=True)
    hostile = upload / name
    shutil.copy(rg1_dicom, hostile)
    dotted = str(upload / ".." / ".." / "etc" / "sub" / name)  # a path with ../ in it, as given
    ws = Workstation(tiny_engine, None)
    s = Session()
    try:
        assert stat.S_IMODE(s.folder.stat().st_mode) == 0o700  # private to the server's user
        ws.load(dotted, s)
        ws.edit(s, "Instruction model", "new right pleural effusion", "none", "", "", "negative-prompt", 2.0, "",
                1, 7.5, 1.5, 0, False)
        outputs = [ws.export_dicom(s, False), ws.export_dicom(s, True), ws.export_provenance(s)]
        for out in map(Path, outputs):
            assert out.resolve().parent == s.folder.resolve(), out
            assert re.fullmatch(r"(counterfactual|provenance)-\d{8}-\d{6}-\d{3}-[a-z0-9_]{1,8}\.(dcm|json)", out.name), out.name
            assert name not in str(out) and ".." not in out.name
        assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [name]  # nothing written beside it
    finally:
        s.close()


# -- (e) pinned dependencies ----------------------------------------------------------------------------
PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!-]+")


@pytest.mark.parametrize("file", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_pinned(file):
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / file).read_text().splitlines()]
    lines = [line for line in lines if line]
    assert lines
    for line in lines:
        if line.startswith("-r "):
            assert (ROOT / line[3:].strip()).is_file(), f"{file}: {line} names no file in the repo"
            continue
        assert PIN.fullmatch(line), f"{file}: {line!r} is not pinned as name==version"
