"""Removing support devices: the invert method (each inversion choice) next to the instruct method.

    python benchmarks/eval_invert.py --images 2 --steps 5 --instruct-steps 5      # smoke run (minutes on a CPU)
    python benchmarks/eval_invert.py --images 50 --out docs/eval/invert_devices.json  # the numbers to report

Each case is a simulated patient (train.simulator) rendered twice with the same acquisition and
noise seed: once with support devices (the input) and once without them (the exact device-free
ground truth). Every system edits the input; per system the script reports

* ``p_devices``: the bundled classifier's "Support Devices" probability (``load_classifier("auto")``),
  input -> edit (lower is better);
* ``psnr_truth``: PSNR of the edit to the device-free ground truth, in dB (higher is better),
  next to the input's own PSNR to it (what doing nothing scores);
* ``psnr_truth_outside``: the same outside the devices' mask (did the rest of the image survive);
* ``psnr_vae_truth``: the truth through the model's VAE, the ceiling of any latent edit;
* for a ``change`` model (the bundled one), ``p_devices_oracle`` and ``psnr_oracle_truth``: the
  exact latent change (encoded truth minus encoded input) decoded as the model's output is
  (:meth:`engine.Engine.decode_change` at the default ``detail_threshold``): what a perfect
  change model on this VAE would return;
* ``edit_score`` (with ``--edit-score``): CLIP directional similarity, the score PRISM filters by;
* seconds per edit.

Systems: ``instruct`` ("without support devices", dual guidance) and ``invert`` with each of
``--inversions`` (source caption -> target caption, prompt-to-prompt control, the target's edited
words re-weighted by ``--word-weight``, optionally confined by ``--local-blend``), returning the
decoded edit as PRISM does (the engine's default); with ``--residual`` also
``invert/<inversion>/residual``, the input plus the edit's difference from the reconstruction
(the same inversion from the cache, so its seconds exclude the inversion). A ``change`` instruct
model (the bundled one) inverts "no change" with the input as its prior; other instruct models run
as text-to-image models with the prior withheld (see ``Engine.invert_edit``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cases(n: int, size: int, seed: int):
    """``n`` (input with devices, device-free truth, devices mask) triples."""
    import numpy as np

    from train.simulator import Findings, Nuisance, render, sample_patient
    from train.simulator.params import Device

    kinds = [("ett", None), ("ng_tube", None), ("cvc", "right"), ("cvc", "left"), ("pacemaker", "left"),
             ("ecg", None), ("chest_tube", "right")]
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        patient = sample_patient(rng)
        chosen = rng.choice(len(kinds), size=int(rng.integers(2, 4)), replace=False)
        picked = {}
        for k in chosen:  # one device of each kind
            kind, side = kinds[int(k)]
            picked.setdefault(kind, Device(kind, side=side, seed=int(rng.integers(0, 2**31 - 1))))
        devices = tuple(picked.values())
        with_devices = render(patient, Findings(), Nuisance(), devices=devices, size=size, noise_seed=seed + i)
        truth = render(patient, Findings(), Nuisance(), devices=(), size=size, noise_seed=seed + i)
        yield with_devices.image, truth.image, with_devices.device_mask, [d.kind for d in devices]


def save_figure(path: Path, shown: list, rows: list[dict]) -> None:
    """A grid: one row per case, columns input, truth and each system, titled with P(devices)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(shown[0][2])
    fig, axes = plt.subplots(len(shown), len(columns), figsize=(2.2 * len(columns), 2.7 * len(shown) + 0.4), squeeze=False)
    for r, (case, kinds, images) in enumerate(shown):
        p = {row["system"]: row["p_devices_edit"] for row in rows if row["case"] == case}
        p["input"] = next(row["p_devices_input"] for row in rows if row["case"] == case)
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(images[name], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            title = name.replace("invert/", "") + (f"\nP(dev) {p[name]:.2f}" if name in p else "\n")
            ax.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(", ".join(kinds), fontsize=7)
    fig.suptitle("SYNTHETIC edits: removing support devices (simulated inputs; research use only)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the bundled journey-mini)")
    parser.add_argument("--unet", default=None, help="optional UNet override for the invert method")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50, help="invert: DDIM steps (PRISM: 50)")
    parser.add_argument("--instruct-steps", type=int, default=20)
    parser.add_argument("--inversions", default="null-text,negative-prompt,direct")
    parser.add_argument("--source-prompt", default="with support devices")
    parser.add_argument("--target-prompt", default="without support devices")
    parser.add_argument("--instruction", default="without support devices")
    parser.add_argument("--word-weight", type=float, default=2.0, help="invert: PRISM re-weights edited words by 2")
    parser.add_argument("--guidance", type=float, default=7.5, help="text guidance of both methods")
    parser.add_argument("--image-guidance", type=float, default=1.5, help="instruct: image guidance")
    parser.add_argument("--local-blend", default="", help="invert: comma-separated words whose attention confines the edit")
    parser.add_argument("--residual", action="store_true",
                        help="also report each inversion with residual output (input + edit - reconstruction)")
    parser.add_argument("--classifier", default="auto")
    parser.add_argument("--edit-score", default="none",
                        help="CLIP folder or open_clip name: also report PRISM's edit score (CLIP directional similarity)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write per-case rows and the summary as JSON here")
    parser.add_argument("--figure", default=None,
                        help="also save a PNG of the first --figure-cases cases: input, truth and every system")
    parser.add_argument("--figure-cases", type=int, default=4)
    args = parser.parse_args()

    import numpy as np
    import torch

    import engine
    from engine.analysis.classifier import load_classifier
    from engine.engine import DETAIL_THRESHOLD
    from engine.analysis.clip_score import load_clip_scorer
    from engine.analysis.metrics import psnr

    torch.set_num_threads(args.threads)
    eng = engine.load(args.model, device=args.device, unet=args.unet)
    clf = load_classifier(args.classifier)
    scorer, score_note = load_clip_scorer(args.edit_score)
    print(score_note, flush=True)
    column = clf.index("Support Devices")
    inversions = [s.strip() for s in args.inversions.split(",") if s.strip()]
    systems = (["instruct"] if eng.card.method == "instruct" else []) + [f"invert/{inv}" for inv in inversions]
    if args.residual:
        systems += [f"invert/{inv}/residual" for inv in inversions]
    local_blend = tuple(w.strip() for w in args.local_blend.split(",") if w.strip())

    def p_devices(image: np.ndarray) -> float:
        return float(clf.predict(image[None, None])[0, column])

    def db(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float | None:
        """PSNR in dB; None (JSON null) where the images agree exactly (infinite PSNR)."""
        value = psnr(a, b, where)
        return float(value) if np.isfinite(value) else None

    def vae_round_trip(image: np.ndarray) -> np.ndarray:
        latents = eng.encode_prior(torch.from_numpy(image)[None, None]) * eng.card.latent_scaling
        return eng.decode(latents)[0, 0].cpu().numpy()

    def oracle_change(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
        return eng.latent_ceiling(torch.from_numpy(image)[None, None], torch.from_numpy(truth)[None, None],
                                  detail_threshold=DETAIL_THRESHOLD)[0, 0].cpu().numpy()

    rows = []
    shown: list[tuple[int, list[str], dict[str, np.ndarray]]] = []  # cases kept for --figure
    for case, (image, truth, mask, kinds) in enumerate(_cases(args.images, eng.resolution, args.seed)):
        outside = ~mask.astype(bool)
        ceiling = vae_round_trip(truth)  # the best a latent model can return: the truth through the VAE
        base = {"case": case, "devices": kinds, "p_devices_input": p_devices(image),
                "psnr_input_truth": db(image, truth), "psnr_input_truth_outside": db(image, truth, outside),
                "psnr_vae_truth": db(ceiling, truth)}
        if eng.card.diffuses_change:
            oracle = oracle_change(image, truth)
            base.update(p_devices_oracle=p_devices(oracle), psnr_oracle_truth=db(oracle, truth))
        for system in systems:
            t0 = time.perf_counter()
            if system == "instruct":
                edited = eng.counterfactual(image, args.instruction, steps=args.instruct_steps, seed=case,
                                            text_guidance=args.guidance, image_guidance=args.image_guidance).image
            else:
                _, inversion, *variant = system.split("/")
                edited = eng.invert_edit(image, args.source_prompt, args.target_prompt,
                                         inversion=inversion, steps=args.steps, guidance=args.guidance,
                                         word_weight=args.word_weight, local_blend=local_blend,
                                         residual=variant == ["residual"]).image
            seconds = time.perf_counter() - t0
            score = None if scorer is None else scorer.directional_similarity(
                image, edited, args.source_prompt, args.target_prompt)
            if args.figure and case < args.figure_cases:
                if not shown or shown[-1][0] != case:
                    shown.append((case, kinds, {"input": image, "device-free truth": truth}))
                shown[-1][2][system] = edited
            rows.append({**base, "system": system, "seconds": round(seconds, 3), "p_devices_edit": p_devices(edited),
                         "psnr_truth": db(edited, truth), "psnr_truth_outside": db(edited, truth, outside),
                         "edit_score": score})
            print(json.dumps(rows[-1]), flush=True)

    summary = {}
    for system in systems:
        mine = [r for r in rows if r["system"] == system]
        summary[system] = {}
        for key in ("p_devices_input", "p_devices_edit", "psnr_input_truth", "psnr_truth", "psnr_vae_truth",
                    "psnr_input_truth_outside", "psnr_truth_outside", "edit_score", "seconds",
                    "p_devices_oracle", "psnr_oracle_truth"):
            values = [r[key] for r in mine if r.get(key) is not None]
            summary[system][key] = round(statistics.fmean(values), 4) if values else None
        summary[system]["devices_removed_fraction"] = round(
            statistics.fmean(float(r["p_devices_edit"] < 0.5) for r in mine), 4)
    def show(value: float | None) -> str:
        return "exact" if value is None else f"{value:.2f}"

    print(f"\n{'system':<32} {'P(dev) in->out':>16} {'PSNR truth':>11} {'(input; VAE)':>16} "
          f"{'PSNR outside':>13} {'(input)':>8} {'s/edit':>8}")
    for system, s in summary.items():
        print(f"{system:<32} {s['p_devices_input']:>7.3f}->{s['p_devices_edit']:<7.3f} {show(s['psnr_truth']):>11} "
              f"({show(s['psnr_input_truth'])}; {show(s['psnr_vae_truth'])}) {show(s['psnr_truth_outside']):>13} "
              f"({show(s['psnr_input_truth_outside'])}) {s['seconds']:>8.1f}")
    oracle = next(iter(summary.values()), {})
    if oracle.get("p_devices_oracle") is not None:
        print(f"{'exact latent change (oracle)':<32} {oracle['p_devices_input']:>7.3f}->{oracle['p_devices_oracle']:<7.3f} "
              f"{show(oracle['psnr_oracle_truth']):>11}")
    if args.figure and shown:
        save_figure(Path(args.figure), shown, rows)
    if args.out:
        record = {"model": eng.model_id, "model_hash": eng.model_hash, "classifier": args.classifier,
                  "edit_score": score_note,
                  "settings": vars(args), "summary": summary, "rows": rows,
                  "command": "python " + " ".join(sys.argv)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
