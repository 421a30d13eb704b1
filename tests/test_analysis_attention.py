"""Grad-CAM and gradient saliency on a tiny CNN trained to find a planted feature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis import attention, smallnet
from engine.analysis.classifier import Classifier, SmallClassifier
from engine.errors import InputError

SIZE = 32
POSITIVE = (slice(4, 12), slice(20, 28))  # the square that makes an image positive
DECOY = (slice(20, 28), slice(4, 12))  # a dark square elsewhere: a distractor


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise; a bright square at POSITIVE makes an image positive (half of them); a dark square
    of the same size at DECOY appears independently in half of all images (a distractor)."""
    x = 0.3 + 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=generator)
    y = (torch.rand(n, generator=generator) < 0.5).float()
    decoy = torch.rand(n, generator=generator) < 0.5
    for i in range(n):
        if y[i]:
            x[i, 0, POSITIVE[0], POSITIVE[1]] = 0.9
        if decoy[i]:
            x[i, 0, DECOY[0], DECOY[1]] = 0.02
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained() -> SmallClassifier:
    g = torch.Generator().manual_seed(0)
    config = smallnet.SmallNetConfig(kind="classifier", targets=("Square",), input_resolution=SIZE, widths=(8, 16), groups=4)
    model = SmallClassifier(smallnet.build(config, g), smallnet.SmallNetCard(name="square-finder"))
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    model.net.train()
    for _ in range(40):
        x, y = make_batch(32, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logits(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.net.eval()
    x, y = make_batch(64, torch.Generator().manual_seed(99))
    accuracy = ((model.predict(x)[:, 0] > 0.5) == y.numpy().astype(bool)).mean()
    assert accuracy > 0.95, f"the tiny CNN did not learn the planted square (accuracy {accuracy:.2f})"
    return model


def _positive(seed: int = 5) -> torch.Tensor:
    """A positive image that also carries the distractor."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.1 * torch.rand(1, 1, SIZE, SIZE, generator=g)
    x[0, 0, POSITIVE[0], POSITIVE[1]] = 0.9
    x[0, 0, DECOY[0], DECOY[1]] = 0.02
    return x


def test_grad_cam_peaks_in_the_planted_square(trained):
    cam = attention.grad_cam(trained, _positive(), "Square")
    assert cam.shape == (1, SIZE, SIZE) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    peak = np.unravel_index(int(cam[0].argmax()), (SIZE, SIZE))
    assert POSITIVE[0].start <= peak[0] < POSITIVE[0].stop and POSITIVE[1].start <= peak[1] < POSITIVE[1].stop
    inside = cam[0][POSITIVE].mean()
    decoy = cam[0][DECOY].mean()
    assert inside > 1.5 * decoy


def test_gradient_saliency_concentrates_on_the_square(trained):
    sal = attention.gradient_saliency(trained, _positive(), 0)
    assert sal.shape == (1, SIZE, SIZE) and float(sal.max()) == pytest.approx(1.0)
    grown = np.zeros((SIZE, SIZE), bool)
    grown[POSITIVE[0].start - 2 : POSITIVE[0].stop + 2, POSITIVE[1].start - 2 : POSITIVE[1].stop + 2] = True
    s = sal[0].numpy()
    assert s[grown].mean() > 2 * s[~grown].mean()


def test_smoothgrad_needs_a_generator_and_is_reproducible(trained):
    with pytest.raises(InputError, match="generator"):
        attention.gradient_saliency(trained, _positive(), 0, samples=4)
    a = attention.gradient_saliency(trained, _positive(), 0, samples=4, generator=torch.Generator().manual_seed(1))
    b = attention.gradient_saliency(trained, _positive(), 0, samples=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_compare_attention_gives_probabilities_before_and_after(trained):
    prior = _positive()[0, 0].numpy().copy()
    prior[POSITIVE] = 0.35  # the square removed: the "counterfactual" of this test runs backwards
    cf = _positive()[0, 0].numpy()
    comp = attention.compare_attention(trained, prior, cf, "square")
    assert comp.finding == "Square" and comp.method == "grad_cam"
    assert comp.p_prior < 0.5 < comp.p_counterfactual
    assert comp.counterfactual_map.max() == pytest.approx(1.0)  # joint scale: the stronger map peaks at 1
    assert comp.counterfactual_map[POSITIVE].mean() > comp.prior_map[POSITIVE].mean()
    with pytest.raises(InputError, match="method"):
        attention.compare_attention(trained, prior, cf, "square", method="lime")


class _Linear(Classifier):
    """A hand-checkable classifier: features = (x, 1 - x) at full resolution; logit = 2 mean(x) - mean(1 - x)."""

    name = "linear"
    targets = ("t",)
    input_resolution = 8
    input_range = (0.0, 1.0)
    device = torch.device("cpu")

    def convert_range(self, images01):
        return images01

    def features(self, x):
        return torch.cat([x, 1 - x], dim=1)

    def head(self, features):
        return 2 * features[:, 0].mean(dim=(1, 2))[:, None] - features[:, 1].mean(dim=(1, 2))[:, None]


def test_grad_cam_matches_the_formula_by_hand():
    # alpha_k = mean_ij d logit / d A^k_ij = (2, -1) / 64; CAM = ReLU(sum_k alpha_k A^k) = ReLU(3x - 1) / 64
    x = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)
    cam = attention.grad_cam(_Linear(), x, 0, normalize=False)
    torch.testing.assert_close(cam[0], torch.relu(3 * x[0, 0] - 1) / 64)
    # saliency: d logit / d x = (2 + 1) / 64 everywhere
    sal = attention.gradient_saliency(_Linear(), x, 0, normalize=False)
    torch.testing.assert_close(sal[0], torch.full((8, 8), 3 / 64))
