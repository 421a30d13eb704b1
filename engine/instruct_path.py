"""The Engine's instruct method (BiomedJourney): counterfactuals from a prior and a description.

:class:`InstructPath` holds the :class:`~engine.engine.Engine` methods of ``method="instruct"``:
deciding the sampler (``resolve``: the distilled student of :mod:`engine.fast` or the full
sampler of :mod:`engine.instruct`), batching requests (``counterfactuals``), the region of
``confine="anatomy"`` (``anatomy_region``) and making one batch from text embedding to decoded
images (``_generate``). It is mixed into the Engine and keeps no state of its own: the models,
the caches, the segmenter and the lock are the Engine's (:mod:`engine.engine`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from engine.errors import InputError
from engine.fast import fast_timesteps, sample_fast
from engine.instruct import gate_change, make_scheduler, null_image_latents, sample_instruct
from engine.io import XRay
from engine.records import Counterfactual, EditRequest
from engine.regions import Regions, composite, latent_mask

ANATOMY_CACHE_SIZE = 8  # confine="anatomy" regions and device inpaintings kept by prior

FULL_STEPS = 20  # the full sampler's default steps


class InstructPath:
    """The instruct method of :class:`~engine.engine.Engine` (a mixin: the state is the Engine's)."""

    # -- samplers -----------------------------------------------------------------------------
    def resolve(self, request: EditRequest, *, withhold_prior: bool = False) -> tuple[EditRequest, str | None]:
        """The request with its sampler and steps decided (``fast`` or ``full``, never ``auto``).

        ``auto`` takes the fast sampler when this model has one and the request asks for nothing
        the student cannot do; the reason it did not is returned beside the request.

        Args:
            request: a validated request.
            withhold_prior: the text-only baseline (the student never learned it).

        Returns:
            ``(request, note)``: note is None unless ``auto`` chose the full sampler on a model
            with a fast one.

        Raises:
            InputError: ``fast`` asked of a model without a student, or with settings it cannot take.
        """
        fast = self.fast
        why_not = None
        if fast is None:
            why_not = "this model has no fast sampler (unet_fast/); distil one with `python -m train fit` (stage distill)"
        elif withhold_prior:
            why_not = "the text-only baseline (prior withheld) runs on the full sampler"
        elif request.scheduler != "ddim":
            why_not = f"the fast sampler has its own schedule; scheduler {request.scheduler!r} is the full sampler's"
        elif not fast.covers(request.text_guidance, request.image_guidance):
            (tl, th), (il, ih) = fast.text_guidance_range, fast.image_guidance_range
            why_not = (f"guidance outside the fast sampler's trained ranges (text {tl:g}-{th:g}, "
                       f"image {il:g}-{ih:g})")
        elif request.steps is not None and not 1 <= request.steps <= fast.max_steps:
            why_not = f"the fast sampler takes 1 to {fast.max_steps} steps, not {request.steps}"
        if request.sampler == "fast":
            if why_not is not None:
                raise InputError(f"sampler 'fast' cannot run this request: {why_not}; use sampler 'full'")
            return replace(request, steps=request.steps or fast.steps), None
        if request.sampler == "auto" and why_not is None and request.steps is None:
            return replace(request, sampler="fast", steps=fast.steps), None
        note = None
        if request.sampler == "auto" and fast is not None:
            note = why_not or "steps were given, so the full sampler ran them (sampler 'fast' takes steps too)"
        return replace(request, sampler="full", steps=request.steps or FULL_STEPS), note

    def _fast_alphas(self) -> tuple[torch.Tensor, float]:
        """The schedule the student steps on: alpha-bar per timestep and DDIM's final alpha."""
        if self._fast_schedule is None:
            scheduler = make_scheduler("ddim", self.parts.scheduler_config)
            self._fast_schedule = (scheduler.alphas_cumprod.clone(), float(scheduler.final_alpha_cumprod))
        return self._fast_schedule

    # -- the API ------------------------------------------------------------------------------
    def counterfactual(self, image: XRay | np.ndarray, instruction: str | EditRequest, **options: Any) -> Counterfactual:
        """Makes one counterfactual of ``image``.

        Args:
            image: the prior radiograph (an :class:`~engine.io.XRay` or a float32 ``(H, W)``
                array in [0, 1]).
            instruction: the progression description, or a full :class:`EditRequest`.
            **options: fields of :class:`EditRequest` (severity, steps, text_guidance,
                image_guidance, seed, scheduler) when ``instruction`` is a string.

        Raises:
            InputError: bad input or settings; non-finite model output.
        """
        request = instruction if isinstance(instruction, EditRequest) else EditRequest(instruction, **options)
        return self.counterfactuals(image, [request])[0]

    def counterfactuals(
        self,
        images: XRay | np.ndarray | Sequence[XRay | np.ndarray],
        requests: Sequence[EditRequest],
        *,
        withhold_prior: bool = False,
        regions: Regions | Sequence[Regions | None] | None = None,
    ) -> list[Counterfactual]:
        """Makes several counterfactuals in batched UNet calls.

        Requests with the same steps and scheduler share one batch; each item keeps its own
        prior, seed, instruction and guidance scales, so the results equal single calls.

        Args:
            images: one prior for every request, or a list with one prior per request.
            requests: what to make.
            withhold_prior: generate from the text alone (the "text-only" baseline of the
                evaluation: the prior is replaced by the "no image" condition in every branch,
                so image guidance has no effect). The prior still fixes the output geometry,
                and a ``change`` model's change is still added to it.
            regions: optional edit/keep masks (:class:`~engine.regions.Regions`, in each
                prior's geometry), one for every request or one each: outside the allowed
                region the latent is reset to the unchanged output at every step and the
                output pixels are the prior's.

        Raises:
            InputError: bad input or settings; non-finite model output; a text-to-image model
                (those edit through :meth:`invert_edit`).
        """
        if not requests:
            return []
        if self.card.method != "instruct":
            raise InputError(
                f"{self.model_id} is a {self.card.method} model: it edits by inversion "
                "(method 'invert', Engine.invert_edit), not by instruction"
            )
        resolved = [self.resolve(r.validated(), withhold_prior=withhold_prior) for r in requests]
        requests = [r for r, _ in resolved]
        notes = [note for _, note in resolved]
        if regions is None or isinstance(regions, Regions):
            item_regions: list[Regions | None] = [regions] * len(requests)
        else:
            item_regions = list(regions)
            if len(item_regions) != len(requests):
                raise InputError(
                    f"got {len(item_regions)} region specs for {len(requests)} requests; give one or one each"
                )
        if isinstance(images, (list, tuple)):
            if len(images) != len(requests):
                raise InputError(f"got {len(images)} priors for {len(requests)} requests; give one or one each")
            prepared = [self.prepare(image) for image in images]
            inputs = list(images)
        else:
            prepared = [self.prepare(images)] * len(requests)
            inputs = [images] * len(requests)
        originals = list(prepared)  # the results' priors: the film as given
        # "without support devices": the detected devices are inpainted on the prior, and the model
        # makes the rest of the instruction on that prior (engine.devices)
        model_requests, removals = list(requests), [None] * len(requests)
        for i, r in enumerate(requests):
            model_requests[i], removals[i], canvas = self._remove_devices(r, prepared[i])
            if canvas is not None:
                prepared[i] = (canvas, prepared[i][1])
        for i, r in enumerate(model_requests):  # confine="anatomy": the region of the findings named
            if item_regions[i] is None and r.confine == "anatomy":
                item_regions[i] = self.anatomy_region(inputs[i], r.applied_instruction)
        results: dict[int, Counterfactual] = {}
        groups: dict[tuple[str, int, str, bool], list[int]] = {}
        for i, r in enumerate(requests):  # items with regions batch apart: they draw extra noise
            groups.setdefault((r.sampler, r.steps, r.scheduler, item_regions[i] is not None), []).append(i)
        with self._lock:
            for (sampler, steps, scheduler_name, constrained), index in groups.items():
                batch = [model_requests[i] for i in index]
                priors = [prepared[i][0] for i in index]
                allowed = None
                if constrained:
                    allowed = [item_regions[i].canvas(prepared[i][1]) for i in index]
                outputs, timings = self._generate(priors, batch, steps, scheduler_name, withhold_prior, allowed,
                                                  fast=sampler == "fast")
                for i, r, img in zip(index, batch, outputs):
                    prior_np, transform = originals[i]
                    results[i] = Counterfactual(
                        image=img,
                        image_input=transform.invert(img),
                        prior=prior_np,
                        request=requests[i],
                        instruction_applied=requests[i].applied_instruction,
                        model_id=self.model_id,
                        model_hash=self.model_hash,
                        transform=transform,
                        device=self.device.type,
                        dtype=str(self.dtype).removeprefix("torch."),
                        timings=timings,
                        prior_withheld=withhold_prior,
                        regions=None if item_regions[i] is None else item_regions[i].summary(),
                        sampler_note=notes[i],
                        devices_removed=removals[i],
                    )
        return [results[i] for i in range(len(requests))]

    def anatomy_region(self, image: XRay | np.ndarray, instruction: str) -> Regions | None:
        """The region ``confine="anatomy"`` allows for ``instruction`` on ``image`` (None: everywhere).

        Uses the bundled segmenter (:func:`engine.analysis.segmentation.load_segmenter`),
        loaded on first use; see :func:`engine.regions.anatomy_regions`. The last few regions are
        kept by prior and anatomy, so re-edits and live previews of one film segment it once.

        Raises:
            InputError: no anatomy segmenter is installed (the message says what to place where).
        """
        import hashlib

        from engine.regions import anatomy_regions, finding_structures

        wanted = finding_structures(instruction)
        if wanted is None:
            return None
        pixels = np.ascontiguousarray(image.pixels if isinstance(image, XRay) else np.asarray(image, np.float32))
        key = (hashlib.sha256(pixels.tobytes()).hexdigest(), pixels.shape, tuple(sorted(wanted.items())))

        def region() -> Regions | None:
            if self._anatomy_segmenter is None:
                from engine.analysis.segmentation import load_segmenter

                self._anatomy_segmenter = load_segmenter("auto")
            return anatomy_regions(self._anatomy_segmenter, pixels, instruction)

        return self._cached_by_prior(key, region)

    def _cached_by_prior(self, key: tuple, make: Any) -> Any:
        """``make()``, kept under ``key`` among the last :data:`ANATOMY_CACHE_SIZE` per-prior
        results (anatomy regions, inpainted canvases); made under the Engine's lock."""
        with self._lock:
            if key in self._anatomy:
                self._anatomy.move_to_end(key)
                return self._anatomy[key]
            value = make()
            self._anatomy[key] = value
            while len(self._anatomy) > ANATOMY_CACHE_SIZE:
                self._anatomy.popitem(last=False)
            return value

    def _remove_devices(self, request: EditRequest, prepared: tuple[np.ndarray, Any]
                        ) -> tuple[EditRequest, dict[str, Any] | None, np.ndarray | None]:
        """A device removal of ``request`` (:mod:`engine.devices`) on its letterboxed prior.

        Returns:
            ``(request the model makes, record, canvas)``: with ``devices="detect"``, the model's
            request is the rest of the instruction (or "no interval change") and ``canvas`` the
            prior with the detected devices inpainted (every device, or the named ones); a named
            device the detector has no channel for is left to the model (record with a note,
            canvas None); no removal: the request unchanged, None, None.
        """
        from engine.devices import NO_CHANGE, detects, device_removal

        removal = device_removal(request.applied_instruction)
        if removal.scope == "none":
            return request, None, None
        if request.devices == "model":
            return request, {"method": "model", "note": "devices='model': the model's own edit"}, None
        detector = self._detector()
        if removal.scope == "named" and not detects(detector, removal.named):
            unknown = ", ".join(d.describe() for d in removal.named if not detects(detector, (d,)))
            return request, {"method": "model", "note": (
                f"the device detector does not know the {unknown}: the model removes it; "
                "'without support devices' removes every detected device")}, None
        canvas, transform = prepared
        filled, area = self.devices_inpainted(canvas, transform, removal.named)
        rest = removal.rest or NO_CHANGE
        model_request = replace(request, instruction=rest, severity="none")
        record = {"method": "detect+inpaint", "detector": detector.name,
                  "inpainting": "biharmonic", "area": round(area, 5), "model_instruction": rest}
        if removal.named:
            record["named"] = [d.describe() for d in removal.named]
            record["kinds_by"] = (getattr(detector, "kinds", None) or detector).name
            if area == 0.0:
                record["note"] = f"the detector found no {', '.join(record['named'])} on this film: nothing was removed"
        return model_request, record, filled

    def _detector(self) -> Any:
        """The device detector, loaded on first use (:func:`engine.devices.load_device_detector`)."""
        from engine.devices import load_device_detector

        if self._device_detector is None:
            self._device_detector = load_device_detector("auto")
        return self._device_detector

    def devices_inpainted(self, canvas: np.ndarray, transform: Any, named: tuple[Any, ...] = ()
                          ) -> tuple[np.ndarray, float]:
        """``canvas`` (a letterboxed prior) with the bundled detector's devices (every one, or the
        ``named`` :class:`engine.devices.NamedDevice` ones) inpainted, and the inpainted fraction
        of the canvas; kept by prior like :meth:`anatomy_region`'s regions.

        Raises:
            InputError: no device detector is installed (the message says what to place where).
        """
        import hashlib

        from engine.devices import device_mask, inpaint

        canvas = np.ascontiguousarray(canvas, dtype=np.float32)
        which = tuple((d.kind, d.side) for d in named)
        key = ("devices", which, hashlib.sha256(canvas.tobytes()).hexdigest(), canvas.shape)

        def inpainted() -> tuple[np.ndarray, float]:
            mask = device_mask(self._detector(), canvas, transform.content_mask(), named)
            return inpaint(canvas, mask), float(mask.mean())

        return self._cached_by_prior(key, inpainted)

    def _generate(
        self, priors: list[np.ndarray], batch: list[EditRequest], steps: int, scheduler_name: str,
        withhold_prior: bool = False, allowed: list[np.ndarray] | None = None, *, fast: bool = False,
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        t0 = time.perf_counter()
        texts = [r.applied_instruction for r in batch]
        text, text_mask = self._embed(texts)
        null, null_mask = self._embed([""])
        t1 = time.perf_counter()
        # Encode each distinct prior once (a journey repeats one prior for every rung; re-edits hit the cache).
        entries = self._prior_entries(priors)
        prior_latents = torch.stack([e["latent"] for e in entries])  # (B, C, h, w)
        condition = null_image_latents(prior_latents) if withhold_prior else prior_latents
        region: dict[str, torch.Tensor] = {}
        if allowed is not None:  # RadEdit: the unchanged output is the prior (a zero change)
            latent_hw = tuple(prior_latents.shape[-2:])
            region["allowed"] = torch.cat([latent_mask(a, latent_hw) for a in allowed])
            region["reference"] = (
                torch.zeros_like(prior_latents) if self.card.diffuses_change
                else prior_latents * self.card.latent_scaling
            )
        t2 = time.perf_counter()
        text_scale = torch.tensor([r.text_guidance for r in batch])
        image_scale = torch.tensor([r.image_guidance for r in batch])
        generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in batch]
        if fast:  # the distilled student: one UNet call per step (engine.fast)
            alphas, final_alpha = self._fast_alphas()
            latents = sample_fast(
                self.fast_denoiser, alphas, final_alpha, condition, text, text_mask,
                text_scale=text_scale, image_scale=image_scale,
                timesteps=fast_timesteps(self.fast.teacher_timesteps, steps), guidance_dim=self.fast.guidance_dim,
                generators=generators, position_channels=self.card.position_channels, **region,
            )
        else:
            latents = sample_instruct(
                self.denoiser,
                make_scheduler(scheduler_name, self.parts.scheduler_config),
                condition,
                text,
                text_mask,
                null,
                null_mask,
                text_scale=text_scale,
                image_scale=image_scale,
                steps=steps,
                generators=generators,
                position_channels=self.card.position_channels,
                **region,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: time them fully
        t3 = time.perf_counter()
        if self.card.diffuses_change:  # withheld or not, the change applies to the prior
            canvases = torch.from_numpy(np.stack(priors))[:, None]
            reconstructed = self._prior_decodes(entries)
            thresholds = torch.tensor([np.nan if r.detail_threshold is None else r.detail_threshold for r in batch])
            if self.card.change_gate is not None:
                latents = gate_change(latents, self.card.change_gate, self.card.change_factor)
            images = self.decode_change(canvases, prior_latents, latents, reconstructed,
                                        thresholds)[:, 0].cpu().numpy()
        else:
            images = self.decode(latents)[:, 0].cpu().numpy()  # .cpu() waits for the GPU
        if allowed is not None:  # outside the allowed region the output is the prior, exactly
            images = np.stack([composite(img, p, a) for img, p, a in zip(images, priors, allowed)])
        t4 = time.perf_counter()
        if not np.isfinite(images).all():
            raise InputError(
                "The model produced non-finite values (NaN/Inf); try --dtype fp32 or another model"
            )
        timings = {"text": t1 - t0, "encode": t2 - t1, "denoise": t3 - t2, "decode": t4 - t3, "total": t4 - t0}
        return [img.astype(np.float32) for img in images], timings
