"""The Engine's invert method (PRISM): edits by inversion and prompt-to-prompt, on any model.

:class:`InvertPath` holds the :class:`~engine.engine.Engine` methods of ``method="invert"``:
``invert_edit`` and the inversion cache it keeps. The tensor work is :mod:`engine.invert`'s
(schedule, inversions, the two-branch edit sampler) and :mod:`engine.p2p`'s (attention
control, local blend); this module runs them on the Engine's models and caches. It is mixed
into the Engine and keeps no state of its own, like :class:`~engine.instruct_path.InstructPath`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.errors import InputError
from engine.instruct import gate_change
from engine.io import XRay
from engine.records import AttentionMaps, InvertEdit, InvertRequest
from engine.regions import Regions, composite, latent_mask

if TYPE_CHECKING:
    from engine.analysis.clip_score import ClipScorer

INVERSION_CACHE_SIZE = 8
SELF_REPLACE_MAX_QUERIES = 16 * 16  # prompt-to-prompt replaces self-attention at <= 16x16 layers
LOCAL_BLEND_START = 0.2  # local blend acts from 20% of the steps on, as in prompt-to-prompt


class InvertPath:
    """The invert method of :class:`~engine.engine.Engine` (a mixin: the state is the Engine's)."""

    # -- the invert method (PRISM) ---------------------------------------------------------------
    def invert_edit(
        self,
        image: XRay | np.ndarray,
        request: InvertRequest | str,
        target_prompt: str | None = None,
        *,
        regions: Regions | None = None,
        scorer: ClipScorer | None = None,
        callback: Callable[[str, int, int], None] | None = None,
        **options: Any,
    ) -> InvertEdit:
        """Edits ``image`` by inversion (method ``invert``): PRISM's path on any text-to-image model.

        The image is inverted under the source caption (cached per image, caption, model and
        settings, so further edits of the same image skip it), then the source and target
        branches are denoised side by side under prompt-to-prompt control.

        An instruct model that diffuses the image latent runs as a text-to-image model with the
        prior withheld (the UNet's image channels get the all-zero "no image" condition, as in
        guidance dropout). A ``change`` model diffuses the change from its prior, so it runs on
        the variable it was trained on: the input is its own prior, the inverted latent is "no
        change" (zeros), the target branch regenerates the change the target caption asks for,
        and the images are the input plus the decoded change (:meth:`decode_change`). The
        reconstruction is then the input itself, and pixels the edit leaves alone keep their
        values. (Withholding the prior instead would make the whole image a "change from
        nothing", far outside what such a model saw in training.)

        Args:
            image: the input radiograph (:class:`~engine.io.XRay` or ``(H, W)`` float32 in [0, 1]).
            request: an :class:`InvertRequest`, or the source caption (then ``target_prompt``
                and ``**options`` give the rest).
            target_prompt: the target caption when ``request`` is a string.
            regions: optional edit/keep masks in the input's geometry (:mod:`engine.regions`).
            scorer: optional :class:`engine.analysis.clip_score.ClipScorer` for the edit score.
            callback: ``callback(stage, step, steps)`` with stage ``invert`` or ``edit``.
            **options: fields of :class:`InvertRequest` when ``request`` is a string.

        Raises:
            InputError: bad input or settings; non-finite model output.
        """
        from engine.invert import NoisePredictor, ddim_schedule, invert, make_ddim, sample_edit
        from engine.p2p import AttentionController, AttentionRecord, plan_edit, word_maps, word_tokens

        if isinstance(request, str):
            if target_prompt is None:
                raise InputError("give a target prompt (the caption of the wanted image)")
            request = InvertRequest(request, target_prompt, **options)
        request = request.validated()
        canvas, transform = self.prepare(image)
        allowed_canvas = regions.canvas(transform) if regions is not None else None

        def stage(name: str) -> Callable[[int, int], None] | None:
            return None if callback is None else (lambda i, n: callback(name, i, n))

        with self._lock:
            t0 = time.perf_counter()
            (src, tgt, null), masks = self._embed_each([request.source_prompt, request.target_prompt, ""])
            t1 = time.perf_counter()
            entry = self._prior_entries([canvas])[0]
            if self.card.diffuses_change:  # invert "no change" from the input, the input as the prior
                condition = entry["latent"][None]
                x0 = torch.zeros_like(condition)
            else:  # a text-to-image model, or an instruct model with the prior withheld
                condition, x0 = None, entry["latent"][None] * self.card.latent_scaling
            scheduler = make_ddim(self.parts.scheduler_config)
            schedule = ddim_schedule(scheduler, request.steps)
            eps_fn = NoisePredictor(self.unet, scheduler.alphas_cumprod.to(self.device),
                                    str(scheduler.config.get("prediction_type", "epsilon")), condition,
                                    self.card.position_channels)
            t2 = time.perf_counter()
            key = self._inversion_key(canvas, request)
            inversion = self._inversions.get(key)
            cache_hit = inversion is not None
            if inversion is None:
                inversion = invert(eps_fn, x0, src, masks[0], null, masks[2], schedule, inversion=request.inversion,
                                   guidance=request.guidance, inner_steps=request.inner_steps,
                                   callback=stage("invert"))
                self._inversions[key] = inversion
                while len(self._inversions) > INVERSION_CACHE_SIZE:
                    self._inversions.popitem(last=False)
            self._inversions.move_to_end(key)
            t3 = time.perf_counter()

            tokenizer = self.text_encoder.tokenizer
            max_tokens = int(src.shape[1])
            plan = plan_edit(
                tokenizer, request.source_prompt, request.target_prompt, max_tokens=max_tokens,
                steps=request.steps, cross_replace=request.cross_replace, self_replace=request.self_replace,
                word_weight=request.word_weight, weighted_words=request.weighted_words,
                self_max_tokens=SELF_REPLACE_MAX_QUERIES,
            )
            lengths = [len(word_tokens(tokenizer, p)[2]) for p in (request.source_prompt, request.target_prompt)]
            record = AttentionRecord(tuple(x0.shape[-2:]), keep_tokens=min(max_tokens, 1 + max(lengths)))
            controller = AttentionController(2, plan, record)
            blend = self._local_blend(request, tokenizer, max_tokens) if request.local_blend else None
            allowed = None if allowed_canvas is None else latent_mask(allowed_canvas, tuple(x0.shape[-2:])).to(x0)
            latents = sample_edit(
                eps_fn, schedule, inversion, method=request.inversion, source=(src, masks[0]),
                target=(tgt, masks[1]), null=(null, masks[2]), guidance=request.guidance, controller=controller,
                blend=blend, allowed=allowed, callback=stage("edit"),
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t4 = time.perf_counter()
            if self.card.diffuses_change:  # the input plus the decoded change, as in decode_change
                canvases = torch.from_numpy(np.stack([canvas, canvas]))[:, None]
                if self.card.change_gate is not None:  # the same noise floor as the instruct path's samples
                    latents = gate_change(latents, self.card.change_gate, self.card.change_factor)
                images = self.decode_change(canvases, torch.cat([condition] * 2), latents,
                                            self._prior_decodes([entry, entry]), request.detail_threshold)
            else:
                images = self.decode(latents)
            images = images[:, 0].float().cpu().numpy()
            t5 = time.perf_counter()
        if not np.isfinite(images).all():
            raise InputError("The model produced non-finite values (NaN/Inf); try --dtype fp32 or another model")
        reconstruction, edited = images.astype(np.float32)
        blend_mask = None
        if blend is not None:
            # The last step's mask (the record then holds every step). Outside it the latents
            # already equal the reconstruction's; the decoder's group norms still couple distant
            # pixels, so the decoded images are blended with the same mask too.
            m = blend.mask(record)
            blend_mask = torch.nn.functional.interpolate(m, size=canvas.shape, mode="nearest")[0, 0].numpy() > 0.5
            edited = composite(edited, reconstruction, blend_mask.astype(np.float32))
        if request.residual:  # the input's own pixels wherever the edit equals the reconstruction
            edited = np.clip(canvas + (edited - reconstruction), 0.0, 1.0).astype(np.float32)
        if allowed_canvas is not None:  # outside the allowed region the output is the input, exactly
            edited = composite(edited, canvas, allowed_canvas)
        source_words, source_maps = word_maps(record, tokenizer, request.source_prompt, 0, max_tokens)
        target_words, target_maps = word_maps(record, tokenizer, request.target_prompt, 1, max_tokens)
        score = None
        if scorer is not None:
            score = scorer.directional_similarity(canvas, edited, request.source_prompt, request.target_prompt)
        return InvertEdit(
            image=edited,
            image_input=transform.invert(edited),
            reconstruction=reconstruction,
            prior=canvas,
            request=request,
            edit_mode=plan.mode,
            model_id=self.model_id,
            model_hash=self.model_hash,
            transform=transform,
            device=self.device.type,
            dtype=str(self.dtype).removeprefix("torch."),
            timings={"text": t1 - t0, "encode": t2 - t1, "invert": t3 - t2, "edit": t4 - t3, "decode": t5 - t4,
                     "total": t5 - t0},
            cache_hit=cache_hit,
            attention=AttentionMaps(tuple(source_words), tuple(target_words), source_maps, target_maps,
                                    self.resolution),
            edit_score=score,
            regions=None if regions is None else regions.summary(),
            blend_mask=blend_mask,
        )

    def _inversion_key(self, canvas: np.ndarray, request: InvertRequest) -> tuple:
        """What an inversion depends on: the pixels, the source caption, the model and the settings.

        ``ddim``, ``negative-prompt`` and ``direct`` share the plain DDIM inversion; null-text's
        embeddings also depend on the guidance scale and the inner steps.
        """
        from engine.invert import inversion_kind

        kind = inversion_kind(request.inversion)
        return (hashlib.sha256(canvas.tobytes()).hexdigest(), request.source_prompt, self.model_hash, kind,
                request.steps, str(self.dtype), self.device.type,
                (request.guidance, request.inner_steps) if kind == "null-text" else None)

    def clear_inversion_cache(self) -> None:
        """Forgets every cached inversion (benchmarks time a cold edit with it)."""
        with self._lock:
            self._inversions.clear()

    def _embed_each(self, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Each text's ``(1, L, D)`` states and ``(1, L)`` mask (None where every token counts)."""
        states, mask = self._embed(texts)
        return ([states[i : i + 1] for i in range(len(texts))],
                [None if bool(mask[i].all()) else mask[i : i + 1] for i in range(len(texts))])

    def _local_blend(self, request: InvertRequest, tokenizer: Any, max_tokens: int):
        """Prompt-to-prompt's local blend over the request's blend words (each in either prompt)."""
        from engine.p2p import LocalBlend, prompt_words, token_positions

        found = {}
        for name, prompt in (("source", request.source_prompt), ("target", request.target_prompt)):
            words = [w for w in request.local_blend if w in prompt_words(prompt)]
            found[name] = tuple(token_positions(tokenizer, prompt, words, max_tokens)) if words else ()
        missing = [w for w in request.local_blend
                   if w not in prompt_words(request.source_prompt) and w not in prompt_words(request.target_prompt)]
        if missing:
            raise InputError(
                f"local-blend word(s) {', '.join(missing)} are in neither prompt; pick words of the prompts"
            )
        return LocalBlend(found["source"], found["target"], request.blend_threshold,
                          start=int(round(LOCAL_BLEND_START * request.steps)))
