"""``python -m train <command>``: the training-side command line.

Commands are registered in :data:`COMMANDS` as (add-arguments, run) pairs, so ``prepare``,
``fit``, ``evaluate`` and ``export`` slot in next to ``simulate``. Bad arguments exit with code
2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


# --------------------------------------------------------------------------------------------
# simulate


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="write a simulated dataset of patient journeys with exact counterfactuals",
        description="Simulates patient journeys of PA chest radiographs and writes images, "
                    "masks, reports, images.jsonl and pairs.jsonl (see docs/SIMULATOR.md).",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--patients", type=_int_in(1), default=10, help="number of patients (default 10)")
    p.add_argument("--visits", type=_int_in(1), default=4, help="visits per patient (default 4)")
    p.add_argument("--size", type=_int_in(128, 1024), default=256, help="square image size, 128-1024 (default 256)")
    p.add_argument("--seed", type=_int_in(0), default=0, help="master seed (default 0)")
    p.add_argument("--dicom", action="store_true", help="also write CR DICOM files")
    p.add_argument("--bits", type=int, choices=(8, 16), default=8, help="bits per pixel (default 8)")
    p.add_argument("--workers", type=_int_in(1), default=1, help="worker processes (default 1)")
    p.add_argument("--edits", action="store_true",
                   help="instead of journeys, one prior per patient with the single edits a user asks for "
                        "(new finding at each severity, progression, device removal, no change) and their "
                        "exact counterfactuals; --visits is ignored")
    p.add_argument("--edit-kinds", default=None, metavar="KIND[,KIND...]",
                   help="with --edits, draw only these kinds of edit: severity, progress, devices, none "
                        "(e.g. devices: a set of device removals); default every kind")
    p.add_argument("--removal-devices", default=None, metavar="KIND[,KIND...]",
                   help="with --edits, the device kinds a removal edit adds to its prior (1-3 of them), "
                        "among ett, ng_tube, cvc, pacemaker, icd, ecg, chest_tube, sternal_wires; "
                        "default ett,ng_tube,cvc,ecg")
    p.add_argument("--on-films", type=Path, default=None, metavar="DIR",
                   help="real-anatomy pairs: render the single edits on the real films in DIR (any PNG, JPEG or "
                        "DICOM below it, or a Hannover-layout folder) instead of simulated patients; "
                        "see docs/SIMULATOR.md")
    p.add_argument("--masks", default="auto",
                   help="with --on-films: lung masks from 'auto' (V7 masks where a film has one, else the "
                        "segmenter), 'v7' (films with a V7 mask only) or a folder of masks named like the films")
    p.add_argument("--segmenter", default="auto", help="with --on-films --masks auto: the segmenter model folder")
    p.add_argument("--edits-per-film", type=_int_in(1), default=4, help="with --on-films: edit draws per film")
    p.add_argument("--splits", default="train,validate,test",
                   help="with --on-films: the patient splits to write (patients are split 60/10/30 by id)")
    p.add_argument("--device-free", type=Path, default=None, metavar="FILE",
                   help="with --on-films: film ids (one per line) that show no devices; removal pairs are "
                        "made from these films only")
    p.add_argument("--device-gain", default=None, metavar="LOW,HIGH",
                   help="with --on-films: scale each rendered device set's contrast by a factor drawn from "
                        "LOW-HIGH (default 1,1; e.g. 0.25,1 for a device detector: real leads are often faint)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already holds a dataset")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _run_simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from train.simulator.edits import REMOVAL_DEVICES
    from train.simulator.writer import SimulationConfig, write_dataset

    out: Path = args.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; choose a folder")
    if (out / "images.jsonl").exists() and not args.overwrite:
        parser.error(f"--out {out} already holds a dataset; choose a new folder or pass --overwrite")
    if args.on_films is not None:
        return _run_on_films(args, parser, out)
    edit_kinds = None
    if args.edit_kinds is not None:
        if not args.edits:
            parser.error("--edit-kinds needs --edits")
        edit_kinds = tuple(k.strip() for k in args.edit_kinds.split(",") if k.strip())
    removal_devices = REMOVAL_DEVICES
    if args.removal_devices is not None:
        if not args.edits:
            parser.error("--removal-devices needs --edits")
        removal_devices = tuple(k.strip() for k in args.removal_devices.split(",") if k.strip())
    try:
        config = SimulationConfig(out=str(out), patients=args.patients, visits=args.visits, size=args.size,
                                  seed=args.seed, dicom=args.dicom, bits=args.bits, workers=args.workers,
                                  edits=args.edits, edit_kinds=edit_kinds,
                                  removal_devices=removal_devices)
    except ValueError as exc:
        parser.error(str(exc))

    def progress(done: int, total: int) -> None:
        if not args.quiet and (done == total or done % max(1, total // 20) == 0):
            sys.stderr.write(f"\rsimulated {done}/{total} patients")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    summary = write_dataset(config, progress=progress)
    print(f"wrote {summary.images} images and {summary.pairs} pairs to {out} in {summary.seconds:.1f} s "
          f"({summary.renders_per_second:.1f} rendered images/s)")
    return 0


def _run_on_films(args: argparse.Namespace, parser: argparse.ArgumentParser, out: Path) -> int:
    """``simulate --on-films DIR``: real-anatomy pairs (train.simulator.filmpairs)."""
    from train.simulator.filmpairs import FilmPairsConfig, write_film_pairs

    device_free: tuple[str, ...] = ()
    if args.device_free is not None:
        if not args.device_free.is_file():
            parser.error(f"--device-free {args.device_free} is not a file")
        device_free = tuple(line.split("#")[0].strip() for line in args.device_free.read_text().splitlines()
                            if line.split("#")[0].strip())
    kwargs: dict = {}
    if args.edit_kinds is not None:
        kwargs["edit_kinds"] = tuple(k.strip() for k in args.edit_kinds.split(",") if k.strip())
    if args.removal_devices is not None:
        kwargs["removal_devices"] = tuple(k.strip() for k in args.removal_devices.split(",") if k.strip())
    if args.device_gain is not None:
        try:
            low, high = (float(v) for v in args.device_gain.split(","))
        except ValueError:
            parser.error(f"--device-gain must be LOW,HIGH (two numbers), not {args.device_gain!r}")
        kwargs["device_gain"] = (low, high)
    try:
        config = FilmPairsConfig(films=str(args.on_films), out=str(out), size=args.size, seed=args.seed,
                                 edits_per_film=args.edits_per_film, masks=args.masks, segmenter=args.segmenter,
                                 splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
                                 device_free=device_free, workers=args.workers, **kwargs)
    except ValueError as exc:
        parser.error(str(exc))

    def progress(done: int, total: int) -> None:
        if not args.quiet and (done == total or done % max(1, total // 20) == 0):
            sys.stderr.write(f"\rrendered on {done}/{total} films")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    summary = write_film_pairs(config, progress=progress)
    print(f"wrote {summary.images} images and {summary.pairs} pairs from {summary.films} films to {out} "
          f"({summary.skipped} films skipped, reasons in films.jsonl) in {summary.seconds:.1f} s")
    return 0


def _trainer_commands() -> dict[str, tuple[Callable, Callable]]:
    from train import autoencoder, evaluate, evaluate_real, export, fit, prepare, train_analysis

    return {
        "prepare": (prepare.add_parser, lambda args, parser: prepare.run(args)),
        "register": (prepare.add_register_parser, lambda args, parser: prepare.run_register(args)),
        "fit": (fit.add_parser, lambda args, parser: fit.run(args)),
        "export": (export.add_parser, lambda args, parser: export.run(args)),
        "evaluate": (evaluate.add_parser, lambda args, parser: evaluate.run(args)),
        "evaluate-real": (evaluate_real.add_parser, lambda args, parser: evaluate_real.run(args)),
        "analysis": (train_analysis.add_parser, lambda args, parser: train_analysis.run(args)),
        "convert-autoencoder": (autoencoder.add_parser, lambda args, parser: autoencoder.run(args)),
    }


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None],
                          Callable[[argparse.Namespace, argparse.ArgumentParser], int]]] = {
    "simulate": (_add_simulate, _run_simulate),
    **_trainer_commands(),
}
"""Subcommand name -> (add its parser, run it). ``fit``, ``prepare``, ``evaluate``, ``export``
register here."""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` parser with every registered subcommand."""
    parser = _Parser(prog="python -m train", description="CXR Journey training tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (2 for bad arguments or input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    try:
        return COMMANDS[args.command][1](args, command_parser)
    except ValueError as e:  # includes engine.errors.InputError
        sys.stderr.write(f"python -m train {args.command}: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
