"""Prompt-to-prompt attention control through diffusers attention processors.

Prompt-to-prompt (Hertz et al. 2022) edits an image by running the source caption and the
target caption side by side from the same noise and letting the target branch borrow the
source branch's attention maps. Here that happens in :class:`ControlProcessor`, an attention
processor installed with ``unet.set_attn_processor`` on every attention layer the UNet
reports; nothing is matched by class name, so a renamed diffusers class cannot switch the
control off silently (PRISM's published hooks looked for ``CrossAttention``, which diffusers
renamed to ``Attention``, so its control did nothing).

Batch layout during an edit: ``[uncond x P, cond x P]`` with ``P`` prompts (source first,
then target). Only the conditional half of the target branch is changed, as in the reference
code. Per step (``step`` counts finished denoising steps):

* cross-attention, while ``step < cross_steps``: ``A_tgt <- alpha * (A_src @ M) + (1 - alpha) *
  A_tgt`` then ``A_tgt <- A_tgt * w`` (word replacement and refinement through the token map
  ``M`` and per-token ``alpha``; re-weighting through ``w``);
* self-attention, while ``step < self_steps`` and the layer has at most ``self_max_tokens``
  queries: ``A_tgt <- A_src``.

The same processors record head-averaged cross-attention maps of the conditional branches for
local blending and for display (:class:`AttentionRecord`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError


# -- which token is which word ----------------------------------------------------------------

def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer behind an encoder's tokenizer (open_clip wraps one)."""
    if hasattr(tokenizer, "encode"):
        return tokenizer
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not hasattr(inner, "encode"):
        raise InputError("this text encoder's tokenizer cannot split words, so word-level control is unavailable")
    return inner


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt as prompt-to-prompt counts them: whitespace-separated, lower case."""
    return prompt.lower().split()


def word_tokens(tokenizer: Any, prompt: str) -> tuple[list[str], list[list[int]], list[int]]:
    """Tokenises a prompt word by word.

    Every encoder here puts one start token before the text (CLIP's ``<|startoftext|>``,
    BERT's ``[CLS]``), so word ``k``'s tokens sit at positions counted from 1.

    Args:
        tokenizer: a Hugging Face tokenizer (or an object with one in ``.tokenizer``).
        prompt: the text.

    Returns:
        ``(words, positions, ids)``: the words, each word's token positions in the encoded
        sequence, and the token ids of the whole text without special tokens.
    """
    tok = _hf_tokenizer(tokenizer)
    words = prompt_words(prompt)
    positions: list[list[int]] = []
    ids: list[int] = []
    for word in words:
        word_ids = list(tok.encode(word, add_special_tokens=False))
        positions.append(list(range(1 + len(ids), 1 + len(ids) + len(word_ids))))
        ids.extend(word_ids)
    return words, positions, ids


def token_positions(tokenizer: Any, prompt: str, chosen: tuple[str, ...] | list[str], max_tokens: int) -> list[int]:
    """Token positions of the chosen words in ``prompt`` (those that fit in ``max_tokens``).

    Raises:
        InputError: a chosen word is not in the prompt.
    """
    words, positions, _ = word_tokens(tokenizer, prompt)
    out: list[int] = []
    for word in chosen:
        key = word.lower()
        if key not in words:
            raise InputError(f"the word {word!r} is not in the prompt {prompt!r}; pick words of the prompt")
        for w, pos in zip(words, positions):
            if w == key:
                out.extend(p for p in pos if p < max_tokens)
    return sorted(set(out))


# -- the edit plan ----------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionEdit:
    """How the target branch's attention follows the source branch.

    Attributes:
        mode: ``replace`` (same number of words: word ``k`` of the target takes word ``k``'s
            maps), ``refine`` (words added or removed: shared words keep the source's maps),
            or ``none`` (identical token sequences).
        mapper: ``(L, L)`` float, ``A_tgt = A_src @ mapper``; column ``j`` says which source
            tokens target token ``j`` takes its map from.
        alphas: ``(L,)`` 1 where the target token takes the source's map, 0 where it keeps its own.
        weights: ``(L,)`` re-weighting of the target's cross-attention (1 = unchanged).
        cross_steps: replace cross-attention for the first ``cross_steps`` steps.
        self_steps: replace self-attention for the first ``self_steps`` steps.
        self_max_tokens: only self-attention layers with at most this many queries are replaced.
        edited_words: the target's words that differ from the source (the default words to
            re-weight).
    """

    mode: str
    mapper: torch.Tensor
    alphas: torch.Tensor
    weights: torch.Tensor
    cross_steps: int
    self_steps: int
    self_max_tokens: int
    edited_words: tuple[str, ...]


def plan_edit(
    tokenizer: Any,
    source: str,
    target: str,
    *,
    max_tokens: int,
    steps: int,
    cross_replace: float,
    self_replace: float,
    word_weight: float = 1.0,
    weighted_words: tuple[str, ...] = (),
    self_max_tokens: int,
) -> AttentionEdit:
    """Builds the prompt-to-prompt plan for editing ``source`` into ``target``.

    Word replacement when both prompts have the same number of words (a word may have a
    different number of tokens: a target token then averages the source word's tokens);
    refinement otherwise (tokens aligned by longest common subsequence; new tokens keep their
    own maps). The start token and padding map to themselves.

    Args:
        tokenizer: the text encoder's tokenizer.
        source, target: the captions.
        max_tokens: sequence length of the encoded text.
        steps: denoising steps of the edit.
        cross_replace, self_replace: fractions of the steps with cross-/self-attention replaced.
        word_weight: re-weighting factor for ``weighted_words`` (PRISM: 2.0).
        weighted_words: target words to re-weight; empty means the edited words.
        self_max_tokens: largest self-attention layer (queries) that is replaced.

    Raises:
        InputError: fractions outside [0, 1] or a weighted word missing from the target.
    """
    for name, value in (("cross_replace", cross_replace), ("self_replace", self_replace)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be a fraction from 0 to 1, not {value!r}")
    src_words, src_pos, src_ids = word_tokens(tokenizer, source)
    tgt_words, tgt_pos, tgt_ids = word_tokens(tokenizer, target)
    L = max_tokens
    mapper = torch.zeros(L, L)
    alphas = torch.ones(L)
    mapper[0, 0] = 1.0  # the start token
    if src_ids == tgt_ids:
        mode = "none"
        pairs: list[tuple[int, int]] = [(j, j) for j in range(1, 1 + len(tgt_ids))]
    elif len(src_words) == len(tgt_words):
        mode = "replace"
        pairs = []
        for sp, tp in zip(src_pos, tgt_pos):
            if len(sp) == len(tp):
                pairs.extend(zip(sp, tp))
            else:  # a target token takes the mean of the source word's tokens
                for j in tp:
                    if j < L:
                        for i in sp:
                            if i < L:
                                mapper[i, j] = 1.0 / len(sp)
    else:
        mode = "refine"
        matcher = difflib.SequenceMatcher(a=src_ids, b=tgt_ids, autojunk=False)
        pairs = [(1 + block.a + k, 1 + block.b + k)
                 for block in matcher.get_matching_blocks() for k in range(block.size)]
        matched = {j for _, j in pairs}
        for j in range(1, min(L, 1 + len(tgt_ids))):
            if j not in matched:
                alphas[j] = 0.0  # a new token keeps its own map
    for i, j in pairs:
        if i < L and j < L:
            mapper[i, j] = 1.0
    last = 1 + len(tgt_ids)
    for j in range(last, L):  # end token and padding: align the tails
        mapper[min(L - 1, 1 + len(src_ids) + (j - last)), j] = 1.0
    edited = tuple(w for w in tgt_words if w not in src_words)
    weights = torch.ones(L)
    if word_weight != 1.0:
        chosen = weighted_words or edited
        if not chosen:
            raise InputError("word_weight needs words to re-weight: the target has no edited words; name them")
        for p in token_positions(tokenizer, target, chosen, L):
            weights[p] = float(word_weight)
    return AttentionEdit(
        mode=mode, mapper=mapper, alphas=alphas, weights=weights,
        cross_steps=int(round(cross_replace * steps)), self_steps=int(round(self_replace * steps)),
        self_max_tokens=self_max_tokens, edited_words=edited,
    )


# -- the processors and their shared state --------------------------------------------------------

class AttentionRecord:
    """Head- and layer-averaged cross-attention maps of the conditional branches, per step.

    Attributes:
        steps: list of ``(P, T, h, w)`` float32 CPU tensors, one per finished step (``T`` tokens
            kept, ``(h, w)`` the latent size).
    """

    def __init__(self, latent_hw: tuple[int, int], keep_tokens: int) -> None:
        self.latent_hw = latent_hw
        self.keep_tokens = keep_tokens
        self.steps: list[torch.Tensor] = []
        self._sum: torch.Tensor | None = None
        self._layers = 0

    def add_layer(self, probs: torch.Tensor) -> None:
        """Adds one layer's ``(P, heads, Q, L)`` cross-attention of the conditional branches."""
        P, _, Q, _ = probs.shape
        h0, w0 = self.latent_hw
        f = math.sqrt(h0 * w0 / Q)
        h, w = int(round(h0 / f)), int(round(w0 / f))
        maps = probs.mean(1)[..., : self.keep_tokens].float()  # (P, Q, T)
        maps = maps.transpose(1, 2).reshape(P, -1, h, w)
        if (h, w) != (h0, w0):
            maps = F.interpolate(maps, size=(h0, w0), mode="bilinear", align_corners=False)
        self._sum = maps if self._sum is None else self._sum + maps
        self._layers += 1

    def end_step(self) -> None:
        """Closes a step: its maps are the mean over the layers seen since the last step."""
        if self._sum is not None:
            self.steps.append((self._sum / self._layers).cpu())
        self._sum, self._layers = None, 0

    def mean(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(P, T, h, w)`` maps averaged over steps ``start..stop-1``."""
        chosen = self.steps[start:stop]
        if not chosen:
            raise InputError(f"no attention maps recorded for steps {start}..{stop}")
        return torch.stack(chosen).mean(0)


class AttentionController:
    """State shared by the processors of one sampling run: the step, the plan, the record.

    Args:
        prompts: ``P``, the number of prompts in the batch (source first).
        edit: the prompt-to-prompt plan, or None to only record.
        record: where cross-attention maps go, or None.
    """

    def __init__(self, prompts: int, edit: AttentionEdit | None, record: AttentionRecord | None) -> None:
        self.prompts = prompts
        self.edit = edit
        self.record = record
        self.step = 0
        self.layer_calls = 0  # attention layers that ran through a ControlProcessor

    def needs_probs(self, is_cross: bool, queries: int) -> bool:
        """Whether a layer's attention probabilities are read or replaced at the current step."""
        if is_cross:
            return self.record is not None or (self.edit is not None and self.step < self.edit.cross_steps)
        return self.edit is not None and self.step < self.edit.self_steps and queries <= self.edit.self_max_tokens

    def end_step(self) -> None:
        """Called by the sampler after each denoising step."""
        if self.record is not None:
            self.record.end_step()
        self.step += 1

    def __call__(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """Edits and records one layer's attention. ``probs``: ``(B, heads, Q, K)``.

        Raises:
            ValueError: the batch is not ``[uncond x P, cond x P]`` (control would act on the wrong rows).
        """
        if probs.shape[0] != 2 * self.prompts:
            raise ValueError(f"attention control expects a batch of {2 * self.prompts}, got {probs.shape[0]}")
        P = self.prompts
        cond = probs[P:]
        edit = self.edit
        if edit is not None and P >= 2:
            src, tgt = cond[0], cond[1:]
            if is_cross and self.step < edit.cross_steps:
                mapper = edit.mapper.to(probs)
                alphas = edit.alphas.to(probs)
                weights = edit.weights.to(probs)
                mapped = src @ mapper  # (heads, Q, L)
                new = alphas * mapped + (1 - alphas) * tgt
                new = new * weights
                probs = torch.cat([probs[:P], cond[:1], new], dim=0)
            elif not is_cross and self.step < edit.self_steps and probs.shape[2] <= edit.self_max_tokens:
                probs = torch.cat([probs[:P], cond[:1], src.expand_as(tgt)], dim=0)
        if is_cross and self.record is not None:
            self.record.add_layer(probs[P:])
        return probs


class ControlProcessor:
    """A diffusers attention processor that hands the attention probabilities to a controller.

    Computes attention like diffusers' ``AttnProcessor`` (explicit probabilities, so they can
    be read and replaced), then applies :class:`AttentionController`.
    """

    def __init__(self, controller: AttentionController) -> None:
        self.controller = controller

    def __call__(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_: Any,
    ) -> torch.Tensor:
        self.controller.layer_calls += 1
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, seq_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        if self.controller.needs_probs(is_cross, query.shape[1]):
            query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
            probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, Q, K)
            probs = self.controller(probs.view(batch, heads, *probs.shape[1:]), is_cross)
            probs = probs.reshape(batch * heads, *probs.shape[2:])
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        else:  # nothing reads these probabilities: fused attention, no (Q, K) matrix in memory
            query, key, value = (attn.head_to_batch_dim(x, out_dim=4) for x in (query, key, value))
            mask = None if attention_mask is None else attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * hidden_states.shape[-1])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class controlled:
    """Context manager: installs :class:`ControlProcessor` on every attention layer, then restores.

    ``with controlled(unet, controller): ...``. The UNet's own processors come back on exit,
    even after an error.
    """

    def __init__(self, unet: Any, controller: AttentionController) -> None:
        self.unet = unet
        self.controller = controller
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> AttentionController:
        self._saved = dict(self.unet.attn_processors)
        if not self._saved:
            raise InputError("this UNet has no attention layers, so prompt-to-prompt control cannot act on it")
        processor = ControlProcessor(self.controller)
        self.unet.set_attn_processor({name: processor for name in self._saved})
        return self.controller

    def __exit__(self, *exc: Any) -> None:
        self.unet.set_attn_processor(self._saved)


# -- local blend ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalBlend:
    """Prompt-to-prompt's local blend: edit only where the chosen words attend.

    Attributes:
        source_tokens: token positions of the blend words in the source prompt.
        target_tokens: their positions in the target prompt.
        threshold: fraction of the map's maximum above which a latent pixel may change (0.3).
        start: blending acts once more than ``start`` steps have finished (P2P: 20% of the steps).
    """

    source_tokens: tuple[int, ...]
    target_tokens: tuple[int, ...]
    threshold: float
    start: int

    def mask(self, record: AttentionRecord) -> torch.Tensor:
        """``(1, 1, h, w)`` float mask (0/1): union of the source's and the target's word maps.

        Maps are averaged over the steps so far, max-pooled (3x3), normalised to their maximum
        and thresholded, as in the reference implementation.
        """
        maps = record.mean()  # (P, T, h, w)
        parts = []
        for branch, tokens in ((0, self.source_tokens), (maps.shape[0] - 1, self.target_tokens)):
            idx = [t for t in tokens if t < maps.shape[1]]
            if not idx:
                continue
            m = maps[branch, idx].sum(0, keepdim=True)[None]  # (1, 1, h, w)
            m = F.max_pool2d(m, 3, stride=1, padding=1)
            m = m / m.amax().clamp_min(1e-12)
            parts.append((m > self.threshold).float())
        if not parts:
            return torch.zeros(1, 1, *maps.shape[-2:])
        return torch.stack(parts).amax(0)

    def __call__(self, latents: torch.Tensor, record: AttentionRecord, step: int) -> torch.Tensor:
        """``latents``: ``(2, C, h, w)`` (source, target). Outside the mask the target takes the source's latent."""
        if step <= self.start:
            return latents
        m = self.mask(record).to(latents)
        return torch.cat([latents[:1], latents[:1] + m * (latents[1:] - latents[:1])])


def word_maps(
    record: AttentionRecord, tokenizer: Any, prompt: str, branch: int, max_tokens: int
) -> tuple[list[str], np.ndarray]:
    """Per-word cross-attention maps of one branch for every recorded step.

    Returns:
        ``(words, maps)`` with ``maps`` float32 ``(steps, words, h, w)`` (a word's tokens summed).
    """
    words, positions, _ = word_tokens(tokenizer, prompt)
    stacked = torch.stack(record.steps)[:, branch]  # (S, T, h, w)
    out = np.zeros((stacked.shape[0], len(words), *stacked.shape[-2:]), np.float32)
    for k, pos in enumerate(positions):
        idx = [p for p in pos if p < min(max_tokens, stacked.shape[1])]
        if idx:
            out[:, k] = stacked[:, idx].sum(1).numpy()
    return words, out
