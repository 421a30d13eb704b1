"""Start the CXR Journey workstation: ``python app.py [--model M] [--host H] [--port P]``.

Research use only; not for diagnosis. Binds to 127.0.0.1 unless told otherwise, makes no
outbound network calls (Gradio analytics off, hub lookups offline unless HF_HUB_OFFLINE=0).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import sys

MAX_UPLOAD = "300mb"  # a large uncompressed DICOM is < 100 MB; bigger uploads are refused by the server


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas. The server's threads otherwise each keep freed memory in
    arenas of their own: resident memory crept up by ~190 MB over 200 edits without a leak
    (object counts flat, memory after ``malloc_trim`` flat; docs/RELIABILITY.md); with two
    arenas the creep was ~80 MB. Not glibc (macOS, musl): nothing to do."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Parses arguments (also from CXR_* environment variables), loads the model, serves."""
    parser = argparse.ArgumentParser(description="CXR Journey workstation (research use only)")
    parser.add_argument("--model", default=os.environ.get("CXR_MODEL"),
                        help="model folder or hub id (default: the bundled journey-mini)")
    parser.add_argument("--host", default=os.environ.get("CXR_HOST") or os.environ.get("GRADIO_SERVER_NAME")
                        or "127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("CXR_PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--share", action="store_true", default=os.environ.get("CXR_SHARE") == "1",
                        help="ask Gradio for a public share link (off unless asked)")
    parser.add_argument("--device", default=os.environ.get("CXR_DEVICE", "auto"), help="auto, cpu or cuda")
    parser.add_argument("--cuda-graphs", action="store_true", default=os.environ.get("CXR_CUDA_GRAPHS") == "1",
                        help="replay the UNet step from CUDA graphs (CUDA only; see docs/PERFORMANCE.md)")
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("CXR_CONCURRENCY", "1")),
                        help="model calls run at once; further requests queue (default 1)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

    _limit_malloc_arenas()
    import engine
    from journey_ui import build
    from journey_ui.app import CSS

    try:
        eng = engine.load(args.model, device=args.device, cuda_graphs=args.cuda_graphs)
    except (engine.InputError, engine.ModelFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo = build(eng, concurrency=args.concurrency)
    demo.queue(default_concurrency_limit=args.concurrency).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD, ssr_mode=False,
        css=CSS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
