"""The edit score PRISM filters edits by: CLIP directional similarity.

``cos(E_I(edit) - E_I(input), E_T(target) - E_T(source))`` with L2-normalised embeddings
(Gal et al., StyleGAN-NADA; used by InstructPix2Pix and PRISM): high when the image moved in
the direction the captions moved. Any image/text encoder pair works:

* a transformers ``CLIPModel`` folder (``config.json`` + safetensors + tokenizer files);
* an open_clip model by name (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``
  or ``ViT-B-32/openai``) when open_clip and the weights are present.

The score is optional: :func:`load_clip_scorer` returns None, with a note saying why, when no
encoder pair is installed, and the engine then reports no score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError, ModelFolderError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
AUTO_CANDIDATES = (
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    "hf-hub:timm/vit_base_patch32_clip_224.openai",
)
"""What ``auto`` tries, in order (only from the local cache when downloads are off)."""


class ClipScorer:
    """An image encoder and a text encoder that share an embedding space.

    Args:
        encode_image: ``(B, 3, s, s)`` normalised images -> ``(B, D)`` embeddings.
        encode_text: texts -> ``(B, D)`` embeddings.
        image_size: side ``s`` the image encoder expects.
        mean, std: per-channel normalisation of the image encoder.
        source: where the encoders came from (for provenance).
    """

    def __init__(
        self, encode_image: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], torch.Tensor], image_size: int, mean: tuple[float, ...],
        std: tuple[float, ...], source: str,
    ) -> None:
        self.encode_image = encode_image
        self.encode_text = encode_text
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.source = source

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Grey ``(H, W)`` [0, 1] images to the encoder's normalised ``(B, 3, s, s)`` input."""
        x = torch.stack([torch.as_tensor(np.asarray(img, np.float32)) for img in images])[:, None]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    @torch.no_grad()
    def directional_similarity(
        self, before: np.ndarray, after: np.ndarray, source_text: str, target_text: str
    ) -> float:
        """CLIP directional similarity of an edit (module docstring), in [-1, 1].

        Returns 0.0 when either direction is zero (identical images or identical captions).
        """
        images = F.normalize(self.encode_image(self.preprocess([before, after])).float(), dim=-1)
        texts = F.normalize(self.encode_text([source_text, target_text]).float(), dim=-1)
        d_image, d_text = images[1] - images[0], texts[1] - texts[0]
        if float(d_image.norm()) == 0.0 or float(d_text.norm()) == 0.0:
            return 0.0
        return float(F.cosine_similarity(d_image, d_text, dim=0))


def _transformers_scorer(folder: Path) -> ClipScorer:
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"Could not load a CLIP model from {folder}: {exc}") from exc
    mean, std = OPENAI_MEAN, OPENAI_STD
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        config = json.loads(processor.read_text())
        mean, std = tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    max_len = int(model.config.text_config.max_position_embeddings)

    def encode_text(texts: list[str]) -> torch.Tensor:
        tok = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return _features(model.get_text_features(**tok))

    def encode_image(x: torch.Tensor) -> torch.Tensor:
        return _features(model.get_image_features(pixel_values=x))

    return ClipScorer(encode_image, encode_text, int(model.config.vision_config.image_size), mean, std, str(folder))


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features``; 4.x returned the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ModelFolderError("the CLIP model returned no embedding tensor")


def _open_clip_scorer(name: str) -> ClipScorer:
    try:
        import open_clip
    except ImportError as exc:
        raise ModelFolderError(f"{name!r} needs open_clip (`pip install open_clip_torch`)") from exc
    try:
        if "/" in name and not name.startswith("hf-hub:"):
            arch, pretrained = name.split("/", 1)
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(arch)
        else:
            model, _ = open_clip.create_model_from_pretrained(name)
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip raises many types for missing weights
        raise ModelFolderError(f"Could not load open_clip model {name!r}: {exc}") from exc
    model.eval()
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))
    return ClipScorer(model.encode_image, lambda texts: model.encode_text(tokenizer(texts)), size, mean, std, name)


def load_clip_scorer(spec: str | os.PathLike[str] | None = "auto") -> tuple[ClipScorer | None, str]:
    """An edit scorer, or None with the reason.

    Args:
        spec: a transformers CLIP folder, an open_clip name (``hf-hub:...`` or ``ARCH/PRETRAINED``),
            ``auto`` (the first of :data:`AUTO_CANDIDATES` that loads), or None / ``none`` (off).

    Returns:
        ``(scorer or None, note)``: the note says which encoders score, or why there is no score.

    Raises:
        ModelFolderError: an explicitly named folder or model cannot be loaded.
    """
    if spec is None or str(spec) == "none":
        return None, "edit score off (no CLIP model asked for)"
    text = str(spec)
    if text == "auto":
        reasons = []
        for name in AUTO_CANDIDATES:
            try:
                scorer = _open_clip_scorer(name)
            except ModelFolderError as exc:
                reasons.append(str(exc).split(":")[0])
                continue
            return scorer, f"edit score: CLIP directional similarity with {name}"
        return None, ("edit score off: no CLIP image/text encoder is installed (tried "
                      + ", ".join(AUTO_CANDIDATES) + "); pass --edit-score with a CLIP folder")
    path = Path(text).expanduser()
    if path.is_dir():
        return _transformers_scorer(path), f"edit score: CLIP directional similarity with {path}"
    if path.suffix or text.startswith((".", "/", "~")):
        raise InputError(f"edit-score model {text} is not a folder")
    return _open_clip_scorer(text), f"edit score: CLIP directional similarity with {text}"
