"""engine.graphs: the CUDA-graph UNet wrapper (eager on the CPU; graph tests need a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from engine import EditRequest, InputError
from engine.graphs import MAX_GRAPHS, GraphedUNet


def _prior() -> np.ndarray:
    yy, xx = np.mgrid[0:72, 0:64]
    return (0.5 + 0.3 * np.sin(xx / 6.0) * np.cos(yy / 8.0)).astype(np.float32)


def test_cuda_graphs_without_a_cuda_device_is_refused(tiny_model):
    with pytest.raises(InputError, match="CUDA graphs need a CUDA device"):
        engine.load(tiny_model, device="cpu", cuda_graphs=True)


def test_wrapper_is_the_eager_unet_on_the_cpu(tiny_engine):
    unet = tiny_engine.unet
    wrapped = GraphedUNet(unet)
    channels = int(unet.config.in_channels)
    sample = torch.randn(3, channels, 16, 16)
    states = torch.randn(3, 7, int(unet.config.cross_attention_dim))
    mask = torch.tensor([[True] * 5 + [False] * 2] * 3)
    t = torch.tensor(500)
    with torch.no_grad():
        expected = unet(sample, t, encoder_hidden_states=states, encoder_attention_mask=mask.float()).sample
    got = wrapped(sample, t, encoder_hidden_states=states, encoder_attention_mask=mask.float()).sample
    assert torch.equal(got, expected) and wrapped.replays == 0 and wrapped.config is unet.config


def test_engine_with_the_wrapper_gives_the_same_pixels_on_the_cpu(tiny_engine, monkeypatch):
    plain = tiny_engine.counterfactual(_prior(), "new right pleural effusion", seed=2, steps=3)
    monkeypatch.setattr(tiny_engine, "denoiser", GraphedUNet(tiny_engine.unet))
    wrapped = tiny_engine.counterfactual(_prior(), "new right pleural effusion", seed=2, steps=3)
    assert np.array_equal(plain.image, wrapped.image)


# -- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graph_replays_match_the_eager_engine(tiny_model, dtype):
    eager = engine.load(tiny_model, device="cuda", dtype=dtype)
    graphed = engine.load(tiny_model, device="cuda", dtype=dtype, cuda_graphs=True)
    assert graphed.denoiser.replays >= 1  # load() warmed up and captured the one-edit shape
    requests = [EditRequest("new right pleural effusion", seed=s, steps=6) for s in range(2)]
    for batch in (requests[:1], requests):  # one edit, then a two-rung journey (a second shape)
        before = graphed.denoiser.replays
        a = eager.counterfactuals(_prior(), batch)
        b = graphed.counterfactuals(_prior(), batch)
        assert graphed.denoiser.replays - before == 6  # every step came from a graph
        for x, y in zip(a, b):
            # the captured kernels are the eager call's: same pixels (tiny tolerance for
            # kernels whose reduction order depends on the stream they ran on)
            assert np.abs(x.image - y.image).max() < 1e-4


@pytest.mark.gpu
def test_graphs_are_bounded_and_keep_serving(tiny_model):
    graphed = engine.load(tiny_model, device="cuda", cuda_graphs=True)
    for n in range(1, MAX_GRAPHS + 3):  # more shapes than graphs kept
        graphed.counterfactuals(_prior(), [EditRequest("edema", seed=s, steps=2) for s in range(n)])
    assert len(graphed.denoiser._graphs) == MAX_GRAPHS
    again = graphed.counterfactual(_prior(), "edema", seed=0, steps=2)
    assert np.isfinite(again.image).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fast_sampler_graph_replays_match_eager(fast_model, dtype):
    """The student's step (with its guidance input) replays from a graph as the eager call computes it."""
    eager = engine.load(fast_model, device="cuda", dtype=dtype)
    graphed = engine.load(fast_model, device="cuda", dtype=dtype, cuda_graphs=True)
    assert graphed.fast_denoiser.replays >= 1  # load() warmed the fast path up too
    requests = [EditRequest("new right pleural effusion", seed=s, text_guidance=3.0 + s) for s in range(2)]
    for batch in (requests[:1], requests):
        before = graphed.fast_denoiser.replays
        a = eager.counterfactuals(_prior(), batch)
        b = graphed.counterfactuals(_prior(), batch)
        assert graphed.fast_denoiser.replays - before == 4 and all(r.sampler == "fast" for r in b)
        for x, y in zip(a, b):
            assert np.abs(x.image - y.image).max() < 1e-4
