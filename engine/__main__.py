"""Command line: ``python -m engine edit | batch | info``.

``edit --method instruct`` (default) follows an instruction with an instruct model;
``edit --method invert --source-prompt TEXT --target-prompt TEXT [--inversion null-text|
negative-prompt|direct|ddim] [--word-weight W] [--local-blend WORDS]`` edits by inversion (PRISM).
``edit`` writes the counterfactual as a PNG (in the input's geometry, with provenance in the
PNG's text chunks) and prints one JSON object. An instruct edit takes the model's fast sampler
when it has one (``--sampler full``: the 20-step sampler). ``batch JOBS.csv --out DIR`` runs a
folder of edits in one process (:mod:`engine.batch`). Bad input exits with code 2 and one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
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

    edit = sub.add_parser(
        "edit", help="make a counterfactual of one radiograph",
        description="--method instruct (default) follows --instruction with an instruct model; "
                    "--method invert (PRISM) inverts the image under --source-prompt and regenerates it "
                    "under --target-prompt with prompt-to-prompt control, on any text-to-image model.",
    )
    edit.add_argument("input", help="prior radiograph: DICOM, PNG or JPEG")
    edit.add_argument("--out", required=True,
                      help="output file: .png (the image, provenance in its text chunks) or .dcm (a DICOM "
                           "Secondary Capture, SYNTHETIC burned in, patient identifiers removed)")
    edit.add_argument("--keep-identifiers", action="store_true",
                      help=".dcm output: copy the input DICOM's patient and study identifiers (default: removed)")
    edit.add_argument("--method", default="instruct", choices=["instruct", "invert"])
    edit.add_argument("--instruction", default=None, help="instruct: progression description")
    edit.add_argument("--source-prompt", default=None, help="invert: a caption of the input")
    edit.add_argument("--target-prompt", default=None, help="invert: the caption of the wanted image")
    edit.add_argument("--model", default=None, help="model folder or hub id (default: bundled)")
    edit.add_argument("--unet", default=None, help="UNet override: .safetensors file, folder or hub id")
    edit.add_argument("--severity", default="none", choices=["none", "slight", "moderate", "large"])
    edit.add_argument("--seed", type=int, default=None, help="instruct: random seed (default: random, printed)")
    edit.add_argument("--steps", type=int, default=None,
                      help="denoising steps (instruct: the sampler's own, 4 fast or 20 full; invert 50)")
    edit.add_argument("--sampler", default="auto", choices=["auto", "fast", "full"],
                      help="instruct: auto (the model's fast sampler when it has one and no --steps or other "
                           "scheduler is asked for), fast (the distilled student) or full (20 steps, three guidance "
                           "branches: the refined result)")
    edit.add_argument("--confine", default="anatomy", choices=["anatomy", "none"],
                      help="instruct: anatomy (default: the edit changes only the anatomy of the findings named, "
                           "e.g. the left lung for a left effusion, found by the bundled segmenter; devices and "
                           "'no change' are never confined) or none (the model's edit wherever it lands); "
                           "--edit-mask/--edit-structure/--keep-* replace it")
    edit.add_argument("--devices", default="detect", choices=["detect", "model"],
                      help="instruct: how 'without support devices' is made: detect (default: the bundled device "
                           "detector's lines and tubes, or the named ones ('ETT removed', 'left chest tube removed'), "
                           "are inpainted, then the model makes the rest of the instruction) or model (the "
                           "model's own edit)")
    edit.add_argument("--text-guidance", type=float, default=7.5, help="text guidance scale (both methods)")
    edit.add_argument("--image-guidance", type=float, default=1.5, help="instruct: image guidance scale")
    edit.add_argument("--scheduler", default="ddim", choices=["ddim", "euler_a", "dpmpp"], help="instruct only")
    edit.add_argument("--detail-threshold", default=None,
                      help="change models (both methods): where the decoded change exceeds this (0-1 scale) the output "
                           "is the decoded edit, so thin lines can be removed; 'none' adds the change to the "
                           "input everywhere (default: the engine's, 0.04)")
    edit.add_argument("--inversion", default="null-text", choices=["null-text", "negative-prompt", "direct", "ddim"])
    edit.add_argument("--word-weight", type=float, default=1.0,
                      help="invert: attention re-weighting of the edited words (PRISM: 2.0)")
    edit.add_argument("--weighted-words", default="", help="invert: words to re-weight (default: the edited words)")
    edit.add_argument("--local-blend", default="", help="invert: words whose attention confines the edit")
    edit.add_argument("--blend-threshold", type=float, default=0.3)
    edit.add_argument("--residual", action="store_true",
                      help="invert: return the input plus the edit's difference from the reconstruction, so "
                           "untouched pixels stay the input's (default: the decoded edit, as PRISM does)")
    edit.add_argument("--cross-replace", type=float, default=0.8, help="invert: fraction of steps")
    edit.add_argument("--self-replace", type=float, default=0.4, help="invert: fraction of steps")
    edit.add_argument("--edit-mask", default=None, help="image painted where change is allowed (input geometry)")
    edit.add_argument("--keep-mask", default=None, help="image painted over what must not change")
    edit.add_argument("--edit-structure", default=None, help="structure where change is allowed, e.g. 'right lung'")
    edit.add_argument("--keep-structure", default=None, help="structure that must not change, e.g. heart")
    edit.add_argument("--edit-score", default="none",
                      help="invert: CLIP folder or open_clip name for the edit score, auto, or none")
    edit.add_argument("--bits", type=int, default=8, choices=[8, 16], help="PNG bit depth (a .dcm output is always 12-bit)")
    edit.add_argument("--device", default="auto", help="auto, cpu or cuda")
    edit.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")

    batch = sub.add_parser(
        "batch", help="make the counterfactuals of a jobs CSV in one process",
        description="Runs every row of JOBS.csv (film, instruction or source_caption/target_caption, severity, "
                    "seed, method, ...) through one loaded model, in UNet batches; writes DIR/<id>.png with "
                    "provenance and DIR/results.csv. Rerun to resume after an interruption; bad rows are reported "
                    "and never stop the run. Several GPUs: accelerate launch -m engine batch JOBS.csv --out DIR.")
    batch.add_argument("jobs", help="the jobs CSV (see engine/batch.py for its columns)")
    batch.add_argument("--out", required=True, help="output folder")
    batch.add_argument("--model", default=None, help="model folder or hub id (default: bundled)")
    batch.add_argument("--batch-size", type=int, default=8, help="instruct rows per UNet batch (default 8)")
    batch.add_argument("--bits", type=int, default=8, choices=[8, 16], help="PNG bit depth")
    batch.add_argument("--device", default="auto", help="auto, cpu or cuda")
    batch.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    batch.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    info = sub.add_parser("info", help="print the model card")
    info.add_argument("--model", default=None, help="model folder or hub id (default: bundled)")
    info.add_argument("--device", default="cpu")
    return parser


def _detail_threshold(text: str | None) -> dict[str, float | None]:
    """``--detail-threshold`` as request fields: none given (the engine's default), ``none``, or a number."""
    if text is None:
        return {}
    if text.strip().lower() == "none":
        return {"detail_threshold": None}
    try:
        return {"detail_threshold": float(text)}
    except ValueError:
        raise InputError(f"--detail-threshold must be a number above 0 and at most 1, or none, not {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.replace(",", " ").split() if w)


_INSTRUCT_ONLY = {"instruction": None, "severity": "none", "seed": None, "image_guidance": 1.5, "scheduler": "ddim",
                  "sampler": "auto", "confine": "anatomy", "devices": "detect"}
_INVERT_ONLY = {"source_prompt": None, "target_prompt": None, "inversion": "null-text", "word_weight": 1.0,
                "weighted_words": "", "local_blend": "", "blend_threshold": 0.3, "cross_replace": 0.8,
                "self_replace": 0.4, "edit_score": "none", "residual": False}


def _request(args: argparse.Namespace):
    """The request the arguments describe, validated before the (slow) model load.

    Raises:
        InputError: a missing caption or instruction, or an option of the other method.
    """
    import engine

    other = _INVERT_ONLY if args.method == "instruct" else _INSTRUCT_ONLY
    stray = [name for name, default in other.items() if getattr(args, name) != default]
    if stray:
        flags = ", ".join("--" + name.replace("_", "-") for name in stray)
        raise InputError(f"{flags} do(es) not apply to --method {args.method}")

    if args.method == "instruct":
        if not args.instruction:
            raise InputError("--method instruct needs --instruction (the progression description)")
        return engine.EditRequest(
            instruction=args.instruction, severity=args.severity, steps=args.steps,
            text_guidance=args.text_guidance, image_guidance=args.image_guidance, seed=args.seed,
            scheduler=args.scheduler, sampler=args.sampler, confine=args.confine, devices=args.devices,
            **_detail_threshold(args.detail_threshold),
        ).validated()
    if not args.source_prompt or not args.target_prompt:
        raise InputError("--method invert needs --source-prompt (a caption of the input) and --target-prompt")
    return engine.InvertRequest(
        source_prompt=args.source_prompt, target_prompt=args.target_prompt, inversion=args.inversion,
        steps=50 if args.steps is None else args.steps, guidance=args.text_guidance, cross_replace=args.cross_replace,
        self_replace=args.self_replace, word_weight=args.word_weight, weighted_words=_words(args.weighted_words),
        local_blend=_words(args.local_blend), blend_threshold=args.blend_threshold, residual=args.residual,
        **_detail_threshold(args.detail_threshold),
    ).validated()


def _regions(args: argparse.Namespace, pixels):
    """Edit/keep masks from painted images and structure names (None when none was given)."""
    from engine.regions import Regions, as_mask, structure_mask

    if not any((args.edit_mask, args.keep_mask, args.edit_structure, args.keep_structure)):
        return None
    masks = {}
    segmenter = None
    for name, painted, structure in (("edit", args.edit_mask, args.edit_structure),
                                     ("keep", args.keep_mask, args.keep_structure)):
        parts = []
        if painted:
            parts.append(_read_mask(painted))
        if structure:
            if segmenter is None:
                from engine.analysis.segmentation import load_segmenter

                segmenter = load_segmenter("auto")
            parts.append(structure_mask(segmenter, pixels, [s.strip() for s in structure.split(",")]))
        masks[name] = None
        for part in parts:
            part = as_mask(part, f"{name} mask")
            masks[name] = part if masks[name] is None else masks[name] | part
    return Regions(edit=masks["edit"], keep=masks["keep"])


def _read_mask(path: str):
    """A painted mask image as float32 grey.

    Raises:
        InputError: a missing, unreadable, truncated or oversized (decompression bomb) file.
    """
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"), dtype=np.float32)
        except FileNotFoundError as exc:
            raise InputError(f"Mask file not found: {path}; check the path") from exc
        except UnidentifiedImageError as exc:
            raise InputError(f"{path} is not an image file; paint the mask as a PNG") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"The mask {path} is too large to open safely; paint it at the radiograph's size") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(
                f"The mask {path} could not be read ({reason}); the file may be truncated or corrupt"
            ) from exc


OUTPUT_SUFFIXES = (".png", ".dcm")
"""What ``edit --out`` writes: a PNG with provenance, or a DICOM Secondary Capture."""


def _edit(args: argparse.Namespace) -> dict:
    import engine
    from engine.io import read_xray, write_png

    suffix = Path(args.out).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"--out must end in .png (image) or .dcm (DICOM Secondary Capture), not {args.out!r}")
    if args.keep_identifiers and suffix != ".dcm":
        raise InputError("--keep-identifiers applies to .dcm output only (a PNG carries no patient identifiers)")
    xray = read_xray(args.input)
    request = _request(args)
    regions = _regions(args, xray.pixels)
    eng = engine.load(args.model, device=args.device, dtype=args.dtype, unet=args.unet)
    if args.method == "instruct":
        result = eng.counterfactuals(xray, [request], regions=regions)[0]
        provenance = result.provenance()
    else:
        from engine.analysis.clip_score import load_clip_scorer

        scorer, note = load_clip_scorer(args.edit_score)
        result = eng.invert_edit(xray, request, regions=regions, scorer=scorer)
        provenance = result.provenance()
        provenance["edit_score_note"] = note
    provenance["input"] = xray.meta.public_dict()
    if args.method == "instruct":
        from engine.vocabulary import instruction_warning

        warning = instruction_warning(result.instruction_applied, eng.card.vocabulary)
        if warning:  # outside what the model was trained to read: said, and the edit still made
            provenance["notes"] = [warning]
    if suffix == ".dcm":
        from engine.export import write_dicom

        applied = (result.instruction_applied if args.method == "instruct"  # "Instruction as applied: ..." once
                   else f"{result.request.source_prompt} -> {result.request.target_prompt}")
        write_dicom(args.out, result.image_input, source=xray.meta, instruction=applied, provenance=provenance,
                    keep_identifiers=args.keep_identifiers,
                    patient_name=xray.meta.patient_name if args.keep_identifiers else None,
                    notes=provenance.get("notes", ()))
    else:
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
        if args.command == "batch":
            from engine.batch import main_batch

            print(json.dumps(main_batch(args)))  # bad rows are in the summary and results.csv; the run finished
            return 0
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
