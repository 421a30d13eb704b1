"""The architecture's import boundaries (pyproject.toml's ``[tool.importlinter]`` contracts).

import-linter checks them statically, lazy imports inside functions included; these tests run it
on the project, check that each contract really catches the arrow it forbids (on a copy with the
arrows planted), and check at run time what the static "UI never imports torch" rule leaves to
the engine: that importing the UI's modules loads no torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "journey_ui", "train")
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))")


def lint(root: Path) -> tuple[int, dict[str, str], str]:
    """Runs import-linter with ``root``'s pyproject.toml on ``root``'s packages.

    Returns:
        The exit code, ``{contract name: "KEPT" | "BROKEN"}`` and the whole report.
    """
    env = {**os.environ, "COLUMNS": "400", "PYTHONPATH": str(root)}  # one line per contract
    done = subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    report = done.stdout + done.stderr
    verdicts = dict(re.findall(r"^(.+?) (KEPT|BROKEN)$", report, flags=re.MULTILINE))
    return done.returncode, verdicts, report


def contract_names() -> list[str]:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return [c["name"] for c in config["contracts"]]


def test_every_contract_is_kept() -> None:
    code, verdicts, report = lint(ROOT)
    assert code == 0, report
    assert verdicts == dict.fromkeys(contract_names(), "KEPT"), report


def test_each_contract_catches_the_arrow_it_forbids(tmp_path: Path) -> None:
    """A lazy import of each forbidden module, planted in a copy of the packages, breaks its contract."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    names = contract_names()
    assert len(names) == 4
    planted = {
        names[0]: ("engine/severity.py", "import app", "import gradio", "import journey_ui", "import train.models"),
        names[1]: ("journey_ui/views.py", "import train.data"),
        names[2]: ("journey_ui/views.py", "import torch"),
        names[3]: ("train/reports.py", "import journey_ui.views"),
    }
    for name, (path, *imports) in planted.items():
        target = tmp_path / path
        original = target.read_text()
        body = "".join(f"    {line}  # noqa: F401\n" for line in imports)
        target.write_text(f"{original}\n\ndef _planted_arrow() -> None:\n{body}")
        code, verdicts, report = lint(tmp_path)
        target.write_text(original)
        assert code == 1 and verdicts[name] == "BROKEN", report
        importer = path.removesuffix(".py").replace("/", ".")
        for line in imports:  # each planted arrow is reported
            assert f"{importer} -> {line.split()[1]}" in report, report
    assert lint(tmp_path)[0] == 0  # the copy without the arrows keeps every contract


def test_importing_the_ui_loads_no_torch() -> None:
    """The UI's module-level imports of the engine (engine, engine.io, engine.errors, engine.severity)
    are torch-free: what the static contract, which lets the UI reach torch through the engine,
    leaves to run time."""
    code = ("import sys, journey_ui, journey_ui.app, journey_ui.views, journey_ui.workstation; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
