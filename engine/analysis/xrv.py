"""torchxrayvision at the edge: weight files offline, its [-1024, 1024] range, and its models.

torchxrayvision downloads weights on first use. This workstation is offline, so before any
torchxrayvision constructor runs we look for the weight file ourselves and, when it is missing,
raise an :class:`~engine.errors.InputError` naming the file, the folder to put it in and the
URL the package would fetch it from. The constructors themselves are torchxrayvision's own
(``xrv.models.DenseNet(weights=...)``, ``xrv.baseline_models.chestx_det.PSPNet()``, the race
and age models), so what loads is exactly what the package loads.

Where weights live: ``cache_dir`` if given, else ``$CXR_JOURNEY_XRV_CACHE``, else the package's
own cache ``~/.torchxrayvision/models_data/``. torchxrayvision's race and age models read only
the package cache (their constructors take no folder); the message says so.

Safety: torchxrayvision's DenseNet/ResNet weight files are whole pickled modules, loaded with
``torch.load(weights_only=False)`` by the package. Only place files you downloaded from the URLs
below. (The PSPNet and race weights are plain state dicts loaded with ``weights_only=True``; the
age model is TorchScript.)

Importing torchxrayvision installs a global ``warnings.filterwarnings("ignore")``; we import it
inside ``warnings.catch_warnings()`` so the process's warning filters are left as they were.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from engine.errors import InputError

CACHE_ENV = "CXR_JOURNEY_XRV_CACHE"
"""Environment variable naming a folder of torchxrayvision weight files."""

XRV_RANGE = (-1024.0, 1024.0)
"""torchxrayvision's input range: ``xrv.utils.normalize(img, maxval)`` maps [0, maxval] onto it."""

RELEASES = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"

PSPNET_URL = RELEASES + "pspnet_chestxray_best_model_4.pth"
RACE_URL = RELEASES + "resnet_race_detection_val-loss_0.157_mimic_public.pt"
AGE_URL = RELEASES + "baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt"
"""Weight URLs hard-coded inside torchxrayvision 1.5.7's constructors (a test checks they still are)."""

PSPNET_RESOLUTION = 512
RACE_AGE_RESOLUTION = 320


def to_xrv_range(x):
    """[0, 1] images to torchxrayvision's [-1024, 1024] (``(2x - 1) * 1024``), differentiable.

    Equals ``xrv.utils.normalize(img, maxval=1)``. Works on numpy arrays and torch tensors.
    """
    lo, hi = XRV_RANGE
    return x * (hi - lo) + lo


def from_xrv_range(x):
    """torchxrayvision's [-1024, 1024] back to [0, 1] (not clipped)."""
    lo, hi = XRV_RANGE
    return (x - lo) / (hi - lo)


def import_xrv() -> ModuleType:
    """Imports torchxrayvision without letting it install a global warnings filter.

    Raises:
        InputError: the package is not installed.
    """
    try:
        with warnings.catch_warnings():
            import torchxrayvision
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise InputError("torchxrayvision is not installed; pip install torchxrayvision==1.5.7") from exc
    return torchxrayvision


def package_cache_dir() -> Path:
    """torchxrayvision's own cache folder, ``~/.torchxrayvision/models_data``."""
    return Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data")))


def cache_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """Where to look for weights: ``configured``, else ``$CXR_JOURNEY_XRV_CACHE``, else the package cache."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return package_cache_dir()


@dataclass(frozen=True)
class WeightFile:
    """One torchxrayvision weight file: its name, where it is expected and where it comes from."""

    model: str
    filename: str
    url: str
    folder: Path

    @property
    def path(self) -> Path:
        """Full expected path."""
        return self.folder / self.filename

    def exists(self) -> bool:
        """True if the file is in place."""
        return self.path.is_file()

    def require(self) -> Path:
        """The path, or an InputError saying which file to place where.

        Raises:
            InputError: the file is missing.
        """
        if not self.exists():
            raise InputError(
                f"torchxrayvision weights for {self.model} are not on this machine (no network here). "
                f"Place {self.filename} in {self.folder} (download it from {self.url}, e.g. "
                f"`wget {self.url} -O {self.path}`), or point --xrv-cache / ${CACHE_ENV} at the "
                "folder that holds it."
            )
        return self.path


def classifier_weights_names() -> list[str]:
    """torchxrayvision's pathology-classifier weight names (``densenet121-res224-all``, ...)."""
    xrv = import_xrv()
    return sorted(k for k in xrv.models.model_urls if k.startswith(("densenet", "resnet")))


def classifier_weight_file(weights: str, folder: str | os.PathLike[str] | None = None) -> WeightFile:
    """The weight file of a torchxrayvision DenseNet/ResNet classifier.

    Raises:
        InputError: unknown weight name (the message lists the known ones).
    """
    xrv = import_xrv()
    urls = xrv.models.model_urls
    if weights not in urls or not weights.startswith(("densenet", "resnet")):
        raise InputError(
            f"Unknown torchxrayvision classifier {weights!r}; choose one of {', '.join(classifier_weights_names())}"
        )
    url = urls[weights]["weights_url"]
    return WeightFile(weights, os.path.basename(url), url, cache_dir(folder))


def pspnet_weight_file(folder: str | os.PathLike[str] | None = None) -> WeightFile:
    """The weight file of torchxrayvision's ChestX-Det PSPNet (14 anatomical structures)."""
    return WeightFile("chestx_det PSPNet", os.path.basename(PSPNET_URL), PSPNET_URL, cache_dir(folder))


def race_weight_file() -> WeightFile:
    """The Emory HITI race model's weights (torchxrayvision reads them only from its own cache)."""
    return WeightFile("emory_hiti RaceModel", os.path.basename(RACE_URL), RACE_URL, package_cache_dir())


def age_weight_file() -> WeightFile:
    """The RIKEN age model's TorchScript file (torchxrayvision reads it only from its own cache)."""
    return WeightFile("riken AgeModel", os.path.basename(AGE_URL), AGE_URL, package_cache_dir())


def load_classifier_module(weights: str = "densenet121-res224-all", folder: str | os.PathLike[str] | None = None) -> Any:
    """torchxrayvision's own classifier constructor, after checking the weight file offline.

    Returns:
        ``xrv.models.DenseNet`` or ``xrv.models.ResNet`` in eval mode, with ``targets``,
        ``op_threshs`` and ``input_resolution`` as the package sets them.

    Raises:
        InputError: unknown name or missing file (saying which file to place where).
    """
    wf = classifier_weight_file(weights, folder)
    wf.require()
    xrv = import_xrv()
    cls = xrv.models.DenseNet if weights.startswith("densenet") else xrv.models.ResNet
    with warnings.catch_warnings():
        model = cls(weights=weights, cache_dir=str(wf.folder))
    return model.eval()


def load_pspnet_module(folder: str | os.PathLike[str] | None = None) -> Any:
    """``xrv.baseline_models.chestx_det.PSPNet`` after checking its weight file offline.

    Raises:
        InputError: the weight file is missing.
    """
    wf = pspnet_weight_file(folder)
    wf.require()
    xrv = import_xrv()
    with warnings.catch_warnings():
        model = xrv.baseline_models.chestx_det.PSPNet(cache_dir=str(wf.folder))
    return model.eval()


def load_race_module(folder: str | os.PathLike[str] | None = None) -> Any:
    """``xrv.baseline_models.emory_hiti.RaceModel`` after checking its weight file offline.

    Raises:
        InputError: the file is missing from torchxrayvision's cache (the only place the
            package reads it from), including when it is only in ``folder``.
    """
    return _load_fixed_cache(race_weight_file(), folder, lambda xrv: xrv.baseline_models.emory_hiti.RaceModel())


def load_age_module(folder: str | os.PathLike[str] | None = None) -> Any:
    """``xrv.baseline_models.riken.AgeModel`` after checking its weight file offline.

    Raises:
        InputError: the file is missing from torchxrayvision's cache.
    """
    return _load_fixed_cache(age_weight_file(), folder, lambda xrv: xrv.baseline_models.riken.AgeModel())


def _load_fixed_cache(wf: WeightFile, folder: str | os.PathLike[str] | None, build) -> Any:
    if not wf.exists():
        elsewhere = cache_dir(folder) / wf.filename
        if elsewhere.is_file() and elsewhere != wf.path:
            raise InputError(
                f"{wf.filename} is in {elsewhere.parent}, but torchxrayvision's {wf.model} reads it only "
                f"from {wf.folder}; copy or link it there"
            )
        wf.require()
    xrv = import_xrv()
    with warnings.catch_warnings():
        model = build(xrv)
    return model.eval()


def available(model: str, folder: str | os.PathLike[str] | None = None) -> bool:
    """Whether a torchxrayvision model's weights are in place: ``race``, ``age``, ``pspnet`` or a
    classifier weight name. Never raises for a missing file (unknown names are False)."""
    try:
        if model == "race":
            return race_weight_file().exists()
        if model == "age":
            return age_weight_file().exists()
        if model == "pspnet":
            return pspnet_weight_file(folder).exists()
        return classifier_weight_file(model, folder).exists()
    except InputError:
        return False
