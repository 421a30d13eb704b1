"""Real lung masks: V7 Labs' COVID-19 X-ray lung annotations, shipped inside torchxrayvision.

The pinned ``torchxrayvision`` wheel carries ``torchxrayvision/data/semantic_masks_v7labs_lungs.zip``
(V7 Labs, CC BY 4.0): 517 masks, both lungs in one image, 0/255 (some JPEG-compressed), named by
the source image's id. 77 of them belong to films of the Hannover COVID-19 repository
(``../shared/data/hannover-covid19``, same image ids). The masks were drawn on the films resized
to a square, so :meth:`V7LungMasks.mask` resizes each back to the film's own shape.

A few masks were drawn on another crop or rotation of the film than the one in the repository:
resized back, they lie partly on the film's blank border (3 of the 77 Hannover films, by 6-12 %
of their area, each shifted by several percent of the width). :func:`on_blank_border` measures
that, and :class:`train.simulator.filmpairs.MaskSource` does not use a mask above
:data:`MAX_ON_BORDER` (``auto`` takes the segmenter's lungs instead).

Licence: CC BY 4.0. Attribution: V7 Labs, "COVID-19 X-ray dataset" lung annotations
(https://github.com/v7labs/covid-19-xray-dataset), as redistributed by torchxrayvision.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from engine.errors import InputError

LICENSE = "CC BY 4.0"
ATTRIBUTION = ("V7 Labs COVID-19 X-ray lung annotations (https://github.com/v7labs/covid-19-xray-dataset), "
               "redistributed in torchxrayvision 1.5.7 as data/semantic_masks_v7labs_lungs.zip")


MAX_ON_BORDER = 0.03
"""Largest share of a mask's area on the film's blank border that still counts as drawn on this film."""
BLANK_LEVEL = 0.03
"""Pixels below this (film range [0, 1]) that connect to the image's edge are its blank border."""


def on_blank_border(mask: np.ndarray, pixels: np.ndarray) -> float:
    """The share of ``mask``'s area lying on the film's blank border (dark pixels connected to its edge).

    Lungs never lie there, so a share above a few percent means the mask was drawn on another
    crop or rotation of the film.

    Args:
        mask: bool ``(H, W)`` on the film's grid.
        pixels: ``(H, W)`` float film in [0, 1].
    """
    if mask.shape != pixels.shape:
        raise ValueError(f"mask {mask.shape} and film {pixels.shape} differ in shape")
    area = int(mask.sum())
    if area == 0:
        return 0.0
    labels, _ = ndimage.label(pixels < BLANK_LEVEL)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = np.isin(labels, edge[edge > 0])
    return float((mask & border).sum()) / area


def default_zip() -> Path:
    """The zip inside the installed torchxrayvision package."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.origin:
        raise InputError("torchxrayvision is not installed; it carries the V7 lung masks")
    path = Path(spec.origin).parent / "data" / "semantic_masks_v7labs_lungs.zip"
    if not path.is_file():
        raise InputError(f"{path} is missing; reinstall torchxrayvision==1.5.7")
    return path


class V7LungMasks:
    """Lung masks by image id (the file name's stem)."""

    def __init__(self, zip_path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(zip_path) if zip_path is not None else default_zip()
        with zipfile.ZipFile(self.path) as z:
            self._names = {Path(n).stem: n for n in z.namelist() if not n.endswith("/")}

    def ids(self) -> set[str]:
        """Every image id with a mask."""
        return set(self._names)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._names

    def mask(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """The lung mask of ``image_id`` as bool ``shape`` (the film's (H, W)).

        Raises:
            KeyError: no mask for this id.
        """
        from PIL import Image

        name = self._names[image_id]
        with zipfile.ZipFile(self.path) as z:
            data = z.read(name)
        with Image.open(io.BytesIO(data)) as im:
            grey = im.convert("L").resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR)
        return np.asarray(grey) > 127
