"""The NoiseCLR loss against a plain double loop written straight from the paper's formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from noiseclr.discovery.loss import delta_features, noiseclr_loss, symmetric_noiseclr_loss


def reference_loss(deltas: torch.Tensor, tau: float, j: int) -> float:
    n_img, n_dir = deltas.shape[:2]
    flat = deltas.flatten(2).double()

    def sim(u, v):
        return float(F.cosine_similarity(u, v, dim=0))

    pos = sum(
        math.exp(sim(flat[a, j], flat[b, j]) / tau) for a in range(n_img) for b in range(n_img) if a != b
    )
    neg = sum(
        math.exp(sim(flat[a, j], flat[a, i]) / tau) for a in range(n_img) for i in range(n_dir) if i != j
    )
    return -math.log(pos / neg)


@pytest.mark.parametrize("anchor", [0, 3])
@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_paper_loss_matches_the_formula(anchor, tau):
    deltas = torch.randn(5, 6, 4, 8, 8, generator=torch.Generator().manual_seed(anchor))
    assert noiseclr_loss(deltas, tau, anchor).item() == pytest.approx(
        reference_loss(deltas, tau, anchor), abs=1e-5
    )


def test_symmetric_loss_is_the_mean_over_anchors():
    deltas = torch.randn(4, 5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = sum(reference_loss(deltas, 0.5, j) for j in range(5)) / 5
    assert symmetric_noiseclr_loss(deltas, 0.5).item() == pytest.approx(expected, abs=1e-5)


def test_loss_rewards_consistent_directions():
    # Direction 0 does the same thing to every image and differs from the others: low loss.
    g = torch.Generator().manual_seed(0)
    per_dir = torch.randn(1, 4, 64, generator=g)
    consistent = per_dir.expand(6, 4, 64) + 0.1 * torch.randn(6, 4, 64, generator=g)
    random = torch.randn(6, 4, 64, generator=g)
    assert noiseclr_loss(consistent, 0.5) < noiseclr_loss(random, 0.5) - 1.0


def test_loss_needs_two_images_and_two_directions():
    with pytest.raises(ValueError, match="at least 2 images"):
        noiseclr_loss(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="at least 2 directions"):
        noiseclr_loss(torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match=">= 2 images"):
        symmetric_noiseclr_loss(torch.randn(1, 4, 8))


def test_delta_features_default_is_the_papers_flat_difference():
    deltas = torch.randn(3, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(delta_features(deltas), deltas.flatten(2))


def test_delta_features_pool_and_center():
    deltas = torch.randn(3, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pooled = delta_features(deltas, pool=4)
    assert pooled.shape == (3, 4, 4 * 2 * 2)
    top_left = deltas[1, 2, 3, :4, :4].mean()
    torch.testing.assert_close(pooled[1, 2].view(4, 2, 2)[3, 0, 0], top_left)
    centered = delta_features(deltas, center=True)
    torch.testing.assert_close(centered.mean(1), torch.zeros(3, 4 * 8 * 8), atol=1e-6, rtol=0)
    # a part every direction shares does not change the centered features
    shared = deltas + torch.randn(3, 1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(delta_features(shared, center=True), centered, atol=1e-5, rtol=0)


def test_strength_penalty_matches_a_plain_loop_and_spares_strong_directions():
    from noiseclr.discovery.loss import strength_penalty

    torch.manual_seed(0)
    deltas = torch.randn(3, 4, 2, 5, 5) * torch.tensor([1e-3, 0.02, 0.2, 1.0]).view(1, 4, 1, 1, 1)
    target = 0.05
    plain = 0.0
    for s in range(4):
        rms = math.sqrt(sum(float(v) ** 2 for v in deltas[:, s].flatten()) / deltas[:, s].numel())
        plain += max(0.0, math.log(target) - math.log(rms)) / 4
    assert strength_penalty(deltas, target).item() == pytest.approx(plain, rel=1e-5)
    # the strong directions (rms 0.2, 1.0) add nothing and get no gradient; a weak one is pushed up
    d = deltas.clone().requires_grad_(True)
    strength_penalty(d, target).backward()
    assert d.grad[:, 2:].abs().max() == 0 and d.grad[:, 0].abs().max() > 0
    assert (d.grad[:, 0] * deltas[:, 0]).sum() < 0  # descending the loss grows the weak difference


def test_the_strength_term_enters_the_objective_only_when_weighted():
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.loss import strength_penalty
    from noiseclr.discovery.step import objective

    torch.manual_seed(1)
    deltas = torch.randn(3, 4, 2, 5, 5) * 1e-3
    base = objective(DiscoveryConfig(k=4, negatives=3), deltas)
    weighted = objective(DiscoveryConfig(k=4, negatives=3, strength_weight=0.5, strength_target=0.1), deltas)
    assert weighted.item() == pytest.approx(
        base.item() + 0.5 * strength_penalty(deltas, 0.1).item(), rel=1e-6
    )
