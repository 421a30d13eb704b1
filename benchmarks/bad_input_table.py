"""The bad-input table: every case of ``tests/test_bad_input.py`` with the message as observed.

    python benchmarks/bad_input_table.py              # Markdown table on stdout
    python benchmarks/bad_input_table.py --json out.json

File cases are read with :func:`engine.io.read_xray` and instruction cases checked with
``EditRequest.validated`` here (no model is loaded); the tests show that the CLI, the UI and the
trainer give the same message. Model cases need a model that produces NaN/Inf, so their message
is the one the tests require. Folder names are left out of the messages.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

ENTRY_POINTS = {
    "file": "read_xray, CLI, UI load, trainer load_canvas",
    "instruction": "EditRequest/InvertRequest, CLI, UI edit",
    "model": "Engine.counterfactual, CLI, UI edit",
}


def _unescape(pattern: str) -> str:
    """A plain regex (anchors and escapes only) as the text it matches."""
    return re.sub(r"\\(.)", r"\1", pattern.strip("^$"))


def observe(case, folder: Path) -> tuple[str, str]:
    """(outcome, message) of one case: ``accepted`` or ``InputError`` and its message."""
    from engine.engine import EditRequest
    from engine.errors import InputError
    from engine.io import read_xray

    try:
        if case.kind == "file":
            read_xray(case.build(folder))
        elif case.kind == "instruction":
            EditRequest(case.build()).validated()
        else:  # the message the tests require (a plain regex: unescape it)
            return "InputError", _unescape(case.outcome)
    except InputError as exc:
        return "InputError", str(exc).replace(f"{folder}/", "")
    return "accepted", ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    from test_bad_input import CASES

    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in CASES:
            folder = Path(tmp) / case.id
            folder.mkdir()
            outcome, message = observe(case, folder)
            if case.cli_outcome:
                message += f" (CLI: {_unescape(case.cli_outcome)})"
            rows.append({"case": case.id, "kind": case.kind, "input": case.description,
                         "entry_points": ENTRY_POINTS[case.kind], "outcome": outcome, "message": message})
    print("| case | input | entry points | outcome | message |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        message = r["message"].replace("|", "\\|")
        print(f"| {r['case']} | {r['input']} | {r['entry_points']} | {r['outcome']} | {message} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
