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


def main(argv: list[str] | None = None) -> int:
    """Parses arguments (also from CXR_* environment variables), loads the model, serves."""
    parser = argparse.ArgumentParser(description="CXR Journey workstation (research use only)")
    parser.add_argument("--model", default=os.environ.get("CXR_MODEL"),
                        help="model folder or hub id (default: the bundled journey-mini)")
    parser.add_argument("--host", default=os.environ.get("CXR_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CXR_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    parser.add_argument("--device", default=os.environ.get("CXR_DEVICE", "auto"), help="auto, cpu or cuda")
    args = parser.parse_args(argv)

    import engine
    from journey_ui import build

    try:
        eng = engine.load(args.model, device=args.device)
    except engine.InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    build(eng).queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
