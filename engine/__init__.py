"""CXR Journey engine: counterfactual chest radiographs from a prior and a description.

The public API::

    import engine
    eng = engine.load()                       # the bundled model, or engine.load("path/or/hub-id")
    xray = engine.io.read_xray("prior.dcm")
    cf = eng.counterfactual(xray, "new moderate right pleural effusion", seed=0)
    cf.image_input                            # (H, W) float32 in [0, 1], the input's geometry
    ed = eng.invert_edit(xray, "chest x-ray with support devices",
                         "chest x-ray without support devices")   # method "invert" (PRISM)

Heavy modules (torch, diffusers) load on first use of ``load``/``Engine``, so ``engine.io`` and
``engine.errors`` stay cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import InputError, ModelFolderError

if TYPE_CHECKING:
    from engine.engine import AttentionMaps, Counterfactual, EditRequest, Engine, InvertEdit, InvertRequest, load
    from engine.regions import Regions

__all__ = [
    "AttentionMaps", "Counterfactual", "EditRequest", "Engine", "InputError", "InvertEdit", "InvertRequest",
    "ModelFolderError", "Regions", "load",
]


def __getattr__(name: str) -> Any:
    if name in {"AttentionMaps", "Counterfactual", "EditRequest", "Engine", "InvertEdit", "InvertRequest", "load"}:
        from engine import engine as _engine

        return getattr(_engine, name)
    if name == "Regions":
        from engine.regions import Regions

        return Regions
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
