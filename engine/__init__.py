"""CXR Journey engine: counterfactual chest radiographs from a prior and a description.

The public API::

    import engine
    eng = engine.load()                       # the bundled model, or engine.load("path/or/hub-id")
    xray = engine.io.read_xray("prior.dcm")
    cf = eng.counterfactual(xray, "new moderate right pleural effusion", seed=0)
    cf.image_input                            # (H, W) float32 in [0, 1], the input's geometry

Heavy modules (torch, diffusers) load on first use of ``load``/``Engine``, so ``engine.io`` and
``engine.errors`` stay cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import InputError, ModelFolderError

if TYPE_CHECKING:
    from engine.engine import Counterfactual, EditRequest, Engine, load

__all__ = ["Counterfactual", "EditRequest", "Engine", "InputError", "ModelFolderError", "load"]


def __getattr__(name: str) -> Any:
    if name in {"Counterfactual", "EditRequest", "Engine", "load"}:
        from engine import engine as _engine

        return getattr(_engine, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
