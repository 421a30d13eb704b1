"""CXR Journey's Gradio workstation. Never imports torch: it talks to the engine through
its dataclasses (``EditRequest`` in, ``Counterfactual`` out) and ``engine.io``."""

from journey_ui.app import build

__all__ = ["build"]
