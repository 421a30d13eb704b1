"""Real lung masks: V7 Labs' COVID-19 X-ray lung annotations, shipped inside torchxrayvision.

The pinned ``torchxrayvision`` wheel carries ``torchxrayvision/data/semantic_masks_v7labs_lungs.zip``
(V7 Labs, CC BY 4.0): 517 masks, both lungs in one image, 0/255 (some JPEG-compressed), named by
the source image's id. 77 of them belong to films of the Hannover COVID-19 repository
(``../shared/data/hannover-covid19``, same image ids). The masks were drawn on the films resized
to a square, so :meth:`V7LungMasks.mask` resizes each back to the film's own shape.

Licence: CC BY 4.0. Attribution: V7 Labs, "COVID-19 X-ray dataset" lung annotations
(https://github.com/v7labs/covid-19-xray-dataset), as redistributed by torchxrayvision.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from engine.errors import InputError

LICENSE = "CC BY 4.0"
ATTRIBUTION = ("V7 Labs COVID-19 X-ray lung annotations (https://github.com/v7labs/covid-19-xray-dataset), "
               "redistributed in torchxrayvision 1.5.7 as data/semantic_masks_v7labs_lungs.zip")


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
