"""The trainer: config loading, a tiny run whose loss falls, exact resume, every stage, export to the engine."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.errors import InputError
from train.config import load_config
from train.fit import TrainingInterrupted, fit, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def sim_data(tmp_path_factory) -> Path:
    """A small simulated data set (8 patients x 4 visits, 128 px)."""
    from train.simulator.writer import SimulationConfig, write_dataset

    out = tmp_path_factory.mktemp("sim")
    write_dataset(SimulationConfig(out=str(out), patients=8, visits=4, size=128, seed=3))
    return out


def _cfg(tmp: Path, sim: Path, name: str, **over):
    base = {"manifest": str(sim / "pairs.jsonl"), "out_dir": str(tmp / name), "resolution": 32, "batch_size": 4,
            "steps": 6, "ckpt_every": 3, "log_every": 1, "progress": False, "simulate": 0, "warmup_steps": 0}
    return load_config(TINY, {**base, **over})


def test_config_overrides_are_typed(tmp_path):
    cfg = load_config(TINY, ["--lr=3e-5", "--ema=false", "--splits=train,test", "--init_from=none", "--steps=7"])
    assert cfg.lr == 3e-5 and cfg.ema is False and cfg.splits == ("train", "test") and cfg.init_from is None
    assert cfg.steps == 7 and cfg.stage == "stage2" and cfg.resolution == 64
    with pytest.raises(InputError, match="unknown key.*known keys"):
        load_config(TINY, ["--learning_rate=1"])
    with pytest.raises(InputError, match="steps must be an integer"):
        load_config(TINY, ["--steps=1.5"])
    with pytest.raises(InputError, match="ema must be true or false"):
        load_config(TINY, ["--ema=maybe"])
    with pytest.raises(InputError, match="stage must be one of"):
        load_config(TINY, ["--stage=stage3"])
    for name in ("biomedjourney-stage1", "biomedjourney-stage2", "prism"):
        paper = load_config(ROOT / "train" / "configs" / f"{name}.yaml")
        assert paper.lr == 1e-4 and paper.resolution == 256


def test_extra_manifests_mix_items_from_their_own_folders(tmp_path, sim_data):
    from train.data import load_config_items, load_items
    from train.simulator.writer import SimulationConfig, write_dataset

    edits = tmp_path / "elsewhere" / "edits"
    write_dataset(SimulationConfig(out=str(edits), patients=3, visits=1, size=128, seed=9, edits=True))
    journeys = load_items(sim_data / "pairs.jsonl", "stage2", ("train", "validate", "test"), "counterfactual")
    cfg = _cfg(tmp_path, sim_data, "mixed", extra_manifests=[str(edits / "pairs.jsonl")],
               splits=["train", "validate", "test"], stage2_target="counterfactual")
    assert cfg.manifests == (str(sim_data / "pairs.jsonl"), str(edits / "pairs.jsonl"))
    assert cfg.to_dict()["extra_manifests"] == [str(edits / "pairs.jsonl")]
    items = load_config_items(cfg)
    assert items[:len(journeys)] == journeys and len(items) > len(journeys)
    assert all(Path(p).is_file() for item in items for p in (item.image, item.prior))
    assert {Path(item.image).parent.parent for item in items[len(journeys):]} == {edits.resolve()}
    with pytest.raises(InputError, match="does not exist"):
        load_config_items(_cfg(tmp_path, sim_data, "missing", extra_manifests=[str(tmp_path / "no.jsonl")]))


def test_tiny_run_loss_falls(tmp_path, sim_data):
    cfg = _cfg(tmp_path, sim_data, "falls", steps=40, log_every=10, ckpt_every=40, lr=2e-3, hflip=0.0,
               drop_text=0.0, drop_image=0.0, drop_both=0.0)
    fit(cfg)
    with (Path(cfg.out_dir) / "log.csv").open() as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_after_interruption_continues_identically(tmp_path, sim_data):
    straight = _cfg(tmp_path, sim_data, "straight")
    fit(straight)
    broken = _cfg(tmp_path, sim_data, "broken")
    with pytest.raises(TrainingInterrupted):
        fit(broken, stop_at_step=4)  # dies after step 4; the last checkpoint is step 3
    assert latest_checkpoint(broken.out_dir).name == "step-0000003"
    fit(broken)  # resumes from step 3
    a, b = latest_checkpoint(straight.out_dir), latest_checkpoint(broken.out_dir)
    assert a.name == b.name == "step-0000006"
    for part in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / part)), load_file(str(b / part))
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (part, key)
    with open(Path(broken.out_dir) / "log.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5, 6]


def test_export_is_accepted_by_the_engine(tmp_path, sim_data, rg1_dicom, capsys):
    import json

    from engine.__main__ import main as engine_main
    from train.__main__ import main as train_main

    cfg = _cfg(tmp_path, sim_data, "exp", steps=2, ckpt_every=2)
    fit(cfg)
    model = tmp_path / "model"
    assert train_main(["export", "--run", cfg.out_dir, "--out", str(model)]) == 0
    capsys.readouterr()
    assert engine_main(["info", "--model", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    card = info["card"]
    assert card["method"] == "instruct" and card["resolution"] == 32 and card["extra"]["steps"] == 2
    assert card["training_data"][0]["name"] == "simulated" and card["extra"]["ema"] is True
    from train.simulator.vocabulary import instruction_vocabulary

    assert card["vocabulary"] == instruction_vocabulary()  # the workstation's warning follows the model
    assert engine_main(["edit", str(rg1_dicom), "--instruction", "new right pleural effusion", "--model", str(model),
                        "--out", str(tmp_path / "cf.png"), "--steps", "2", "--seed", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "cf.png").is_file()
    assert train_main(["export", "--run", cfg.out_dir, "--out", str(model)]) == 2  # exists, no --overwrite



def test_change_target_trains_on_the_scaled_difference_and_reaches_the_card(tmp_path, sim_data, monkeypatch):
    import json

    import train.fit as fit_module
    from train.export import export_run

    targets: list[torch.Tensor] = []
    plain_loss = fit_module.diffusion_loss

    def recording_loss(trainee, scheduler, target_latents, *args, **kwargs):
        targets.append(target_latents.detach().clone())
        return plain_loss(trainee, scheduler, target_latents, *args, **kwargs)

    monkeypatch.setattr(fit_module, "diffusion_loss", recording_loss)
    common = dict(log_every=10, ckpt_every=30, lr=2e-3, hflip=0.0, drop_text=0.0, drop_image=0.0, drop_both=0.0,
                  instruct_target="change")
    fit(_cfg(tmp_path, sim_data, "change1", steps=1, **common))
    unscaled = targets[0]
    targets.clear()
    cfg = _cfg(tmp_path, sim_data, "change", steps=30, change_scaling=4.0, **common)
    fit(cfg)
    torch.testing.assert_close(targets[0], 4.0 * unscaled)  # same batch, same seed: the change times 4
    with (Path(cfg.out_dir) / "log.csv").open() as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert losses[-1] < losses[0], losses
    model = export_run(cfg.out_dir, tmp_path / "model")
    card = json.loads((model / "card.json").read_text())
    assert card["instruct_target"] == "change" and card["change_scaling"] == 4.0
    with pytest.raises(InputError, match="instruct_target must be one of"):
        load_config(TINY, ["--instruct_target=pixels"])
    with pytest.raises(InputError, match="change_scaling must be positive"):
        load_config(TINY, ["--change_scaling=0"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_targets_the_schedulers_parametrisation(prediction_type):
    """The loss is zero for a UNet that returns exactly the noise (epsilon) or the velocity
    ``sqrt(a) eps - sqrt(1 - a) x0`` (v_prediction), worked out from the noisy input it is given."""
    from diffusers import DDPMScheduler

    from train.fit import diffusion_loss
    from train.models import noise_scheduler_config

    scheduler = DDPMScheduler.from_config(noise_scheduler_config(prediction_type))
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3.0
    a_bar = scheduler.alphas_cumprod

    def oracle(model_in, t, states, mask):
        a = a_bar[t].reshape(-1, 1, 1, 1)
        eps = (model_in[:, :4] - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    states, mask = torch.zeros(6, 3, 8), torch.ones(6, 3, dtype=torch.bool)
    loss = diffusion_loss(oracle, scheduler, x0, torch.zeros_like(x0), states, mask, torch.Generator().manual_seed(2))
    assert float(loss) < 1e-8
    wrong = "v_prediction" if prediction_type == "epsilon" else "epsilon"
    other = DDPMScheduler.from_config(noise_scheduler_config(wrong))
    assert float(diffusion_loss(oracle, other, x0, torch.zeros_like(x0), states, mask,
                                torch.Generator().manual_seed(2))) > 0.1


def test_v_prediction_run_exports_a_model_the_engine_samples_and_inverts(tmp_path, sim_data):
    import json

    import engine
    from engine.errors import ModelFolderError
    from train.export import export_run

    cfg = _cfg(tmp_path, sim_data, "vpred", steps=2, ckpt_every=2, instruct_target="change", change_scaling=20.0,
               prediction_type="v_prediction")
    fit(cfg)
    model = export_run(cfg.out_dir, tmp_path / "model")
    schedule = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert schedule["prediction_type"] == "v_prediction"
    eng = engine.load(model, device="cpu", dtype="fp32")
    prior = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    edit = eng.counterfactual(prior, "new right pleural effusion", steps=2, seed=0)
    assert edit.image.shape == prior.shape and np.isfinite(edit.image).all()
    inverted = eng.invert_edit(prior, "chest x-ray", "chest x-ray with effusion", inversion="direct", steps=2)
    assert np.isfinite(inverted.image).all()
    with pytest.raises(InputError, match="prediction_type must be one of"):
        load_config(TINY, ["--prediction_type=sample"])
    schedule["prediction_type"] = "sample"
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule))
    with pytest.raises(ModelFolderError, match="prediction_type must be one of"):
        engine.load(model, device="cpu")


@pytest.mark.slow
def test_other_stages_run_and_vae_feeds_stage1(tmp_path, sim_data):
    from train.export import export_run

    images = str(sim_data / "images.jsonl")
    vae_run = _cfg(tmp_path, sim_data, "vae", stage="vae", manifest=images, steps=2, ckpt_every=2, lr=1e-3)
    fit(vae_run)
    vae_dir = export_run(vae_run.out_dir, tmp_path / "vae-export")
    assert (vae_dir / "vae" / "config.json").is_file()
    stage1 = _cfg(tmp_path, sim_data, "s1", stage="stage1", manifest=images, vae_from=str(vae_dir), steps=2,
                  ckpt_every=2, cache_latents=False, crop_scale=0.7)
    fit(stage1)
    model = export_run(stage1.out_dir, tmp_path / "s1-model")
    stage2 = _cfg(tmp_path, sim_data, "s2", init_from=str(model), steps=2, ckpt_every=2)
    fit(stage2)
    prism = _cfg(tmp_path, sim_data, "prism", stage="prism", manifest=images, steps=2, ckpt_every=2)
    fit(prism)
    t2i = export_run(prism.out_dir, tmp_path / "prism-model")
    assert '"method": "text2image"' in (t2i / "card.json").read_text()


def test_tensor_store_keeps_finished_shards_of_an_interrupted_write(tmp_path):
    from train.data import TensorStore

    def items(n: int, fail_at: int | None = None):
        for i in range(n):
            if i == fail_at:
                raise KeyboardInterrupt("killed")
            yield f"k{i}", {"params": torch.full((2,), float(i))}

    store = TensorStore(tmp_path / "s")
    with pytest.raises(KeyboardInterrupt):
        store.write(items(10, fail_at=7), shard_items=3)  # two shards finished, the third lost
    reopened = TensorStore(tmp_path / "s")
    assert len(reopened) == 6 and torch.equal(reopened.get("k5")["params"], torch.full((2,), 5.0))
    reopened.write(items(10), shard_items=3)  # the rest only
    assert len(TensorStore(tmp_path / "s")) == 10 and len(list((tmp_path / "s").glob("shard-*"))) == 4
    (tmp_path / "s" / "index.json").unlink()  # an index lost with its shards intact: read back
    assert torch.equal(TensorStore(tmp_path / "s").get("k9")["params"], torch.full((2,), 9.0))


def test_position_channels_reach_the_unet_the_same_way_in_training_editing_and_inversion(tmp_path, sim_data):
    """A model trained with coordinate maps gets them, in the same order, from the trainer, the
    instruct sampler and the inversion path; a run started from a model without them widens its
    conv_in with zero weights, so it starts as that model."""
    import engine
    from engine.instruct import append_position
    from train.export import export_run
    from train.fit import Trainee
    from train.models import build_models

    plain_cfg = _cfg(tmp_path, sim_data, "plain", steps=2, ckpt_every=2, instruct_target="change")
    fit(plain_cfg)
    plain = export_run(plain_cfg.out_dir, tmp_path / "plain-model")
    cfg = _cfg(tmp_path, sim_data, "pos", steps=2, ckpt_every=2, instruct_target="change", position_channels=2,
               init_from=str(plain))
    widened = build_models(cfg).unet.conv_in.weight
    assert widened.shape[1] == 10 and torch.equal(widened[:, 8:], torch.zeros_like(widened[:, 8:]))
    assert torch.equal(widened[:, :8], engine.load(plain, device="cpu").unet.conv_in.weight)

    seen: list[torch.Tensor] = []

    def grab(module, args):
        seen.append(args[0].detach().clone())

    trainee = Trainee(build_models(cfg), cfg.train_projection, cfg.position_channels)
    trainee.unet.conv_in.register_forward_pre_hook(grab)
    states = torch.zeros(1, 77, trainee.projection.in_features)
    trainee(torch.randn(1, 8, 4, 4), torch.tensor([10]), states, None)
    expected = append_position(torch.zeros(1, 0, 4, 4), 2)
    assert torch.equal(seen[-1][:, 8:], expected)
    assert expected[0, 0, 0, 0] == -1 and expected[0, 0, 0, -1] == 1  # x: image left to right
    assert expected[0, 1, 0, 0] == -1 and expected[0, 1, -1, 0] == 1  # y: top to bottom

    fit(cfg)
    model = export_run(cfg.out_dir, tmp_path / "pos-model")
    eng = engine.load(model, device="cpu", dtype="fp32")
    assert eng.card.position_channels == 2 and eng.unet.config.in_channels == 10
    eng.unet.conv_in.register_forward_pre_hook(grab)
    prior = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    seen.clear()
    eng.counterfactual(prior, "new right pleural effusion", steps=2, seed=0)
    seen_invert_from = len(seen)
    eng.invert_edit(prior, "chest x-ray", "chest x-ray with effusion", inversion="direct", steps=2)
    assert seen and seen_invert_from < len(seen)
    for model_in in seen:
        grid = append_position(torch.zeros(model_in.shape[0], 0, *model_in.shape[2:]), 2)
        assert model_in.shape[1] == 10 and torch.equal(model_in[:, 8:], grid)


def test_position_channels_are_checked(tmp_path, sim_data):
    import json

    import engine
    from engine.errors import ModelFolderError

    with pytest.raises(InputError, match="position_channels must be 0, 1 or 2"):
        load_config(TINY, ["--position_channels=3"])
    with pytest.raises(InputError, match="needs an instruct stage"):
        load_config(TINY, ["--position_channels=2", "--stage=prism"])
    cfg = _cfg(tmp_path, sim_data, "pos", steps=1, ckpt_every=1, position_channels=2)
    fit(cfg)
    from train.export import export_run

    model = export_run(cfg.out_dir, tmp_path / "model")
    card = json.loads((model / "card.json").read_text())
    card["position_channels"] = 0  # the card no longer matches the UNet's ten input channels
    (model / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="position_channels=0"):
        engine.load(model, device="cpu")


def test_fine_tuning_from_a_model_folder_trains_the_whole_unet(tmp_path, sim_data):
    """``init_from`` a model folder goes through the engine's loader, which freezes every part for
    inference; the trainer must switch the UNet back on (a run once trained only its projection)."""
    import engine
    from train.export import export_run

    base_cfg = _cfg(tmp_path, sim_data, "base", steps=2, ckpt_every=2)
    fit(base_cfg)
    base = export_run(base_cfg.out_dir, tmp_path / "base-model")
    tuned_cfg = _cfg(tmp_path, sim_data, "tuned", steps=2, ckpt_every=2, init_from=str(base), ema=False)
    fit(tuned_cfg)
    tuned = export_run(tuned_cfg.out_dir, tmp_path / "tuned-model")
    before = dict(engine.load(base, device="cpu", dtype="fp32").unet.named_parameters())
    after = engine.load(tuned, device="cpu", dtype="fp32").unet
    assert after.config.in_channels == before["conv_in.weight"].shape[1]  # nothing widened
    frozen = [name for name, p in after.named_parameters() if torch.equal(p, before[name])]
    assert not frozen, f"UNet parameters left untouched by fine-tuning: {frozen[:5]}"

    # train_unet: false trains the projection alone (how journey-mini-e.yaml reproduces v3's history).
    proj_cfg = _cfg(tmp_path, sim_data, "proj", steps=2, ckpt_every=2, init_from=str(base), ema=False, train_unet=False)
    fit(proj_cfg)
    proj_only = engine.load(export_run(proj_cfg.out_dir, tmp_path / "proj-model"), device="cpu", dtype="fp32")
    assert all(torch.equal(p, before[name]) for name, p in proj_only.unet.named_parameters())
    base_projection = engine.load(base, device="cpu", dtype="fp32").projection.weight
    assert not torch.equal(proj_only.projection.weight, base_projection)
    with pytest.raises(InputError, match="nothing to train"):
        load_config(TINY, ["--train_unet=false", "--train_projection=false"])


def test_encoding_for_the_caches_builds_no_graph(tiny_model: Path) -> None:
    """The latent caches encode with the autoencoder under no_grad: a trainable VAE's weights must
    not collect a graph (memory) for every cached image."""
    from engine.checkpoint import load_model_parts
    from train.fit import encode_posterior

    vae = load_model_parts(tiny_model).vae.requires_grad_(True)
    params = encode_posterior(vae, torch.rand(2, 1, 64, 64), (-1.0, 1.0))
    assert params.shape[0] == 2 and not params.requires_grad
