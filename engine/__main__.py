"""Command line: ``python -m engine edit | info``.

``edit`` writes the counterfactual as a PNG (in the input's geometry, with provenance in the
PNG's text chunks) and prints one JSON object. Bad input exits with code 2 and one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from engine.errors import InputError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m engine", description="CXR Journey engine (research use only).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    edit = sub.add_parser("edit", help="make a counterfactual of one radiograph")
    edit.add_argument("input", help="prior radiograph: DICOM, PNG or JPEG")
    edit.add_argument("--instruction", required=True, help="progression description")
    edit.add_argument("--out", required=True, help="output PNG path")
    edit.add_argument("--model", default=None, help="model folder or hub id (default: bundled)")
    edit.add_argument("--severity", default="none", choices=["none", "slight", "moderate", "large"])
    edit.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    edit.add_argument("--steps", type=int, default=20)
    edit.add_argument("--text-guidance", type=float, default=7.5)
    edit.add_argument("--image-guidance", type=float, default=1.5)
    edit.add_argument("--scheduler", default="ddim", choices=["ddim", "euler_a", "dpmpp"])
    edit.add_argument("--bits", type=int, default=8, choices=[8, 16], help="PNG bit depth")
    edit.add_argument("--device", default="auto", help="auto, cpu or cuda")
    edit.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")

    info = sub.add_parser("info", help="print the model card")
    info.add_argument("--model", default=None, help="model folder or hub id (default: bundled)")
    info.add_argument("--device", default="cpu")
    return parser


def _edit(args: argparse.Namespace) -> dict:
    import engine
    from engine.io import read_xray, write_png

    xray = read_xray(args.input)
    request = engine.EditRequest(
        instruction=args.instruction,
        severity=args.severity,
        steps=args.steps,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        seed=args.seed,
        scheduler=args.scheduler,
    ).validated()  # before the (slow) model load, so bad settings fail fast
    eng = engine.load(args.model, device=args.device, dtype=args.dtype)
    result = eng.counterfactual(xray, request)
    provenance = result.provenance()
    provenance["input"] = xray.meta.public_dict()
    write_png(
        args.out,
        result.image_input,
        bits=args.bits,
        text={"Comment": provenance["notice"], "cxr-journey": json.dumps(provenance)},
    )
    provenance["output"] = str(args.out)
    return provenance


def _info(args: argparse.Namespace) -> dict:
    import engine

    return engine.load(args.model, device=args.device, dtype="fp32").info()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        out = _edit(args) if args.command == "edit" else _info(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # unwritable output, unreadable input
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(out, indent=None if args.command == "edit" else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
