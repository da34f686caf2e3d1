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
    base = objective(DiscoveryConfig.of(k=4, negatives=3), deltas)
    weighted = objective(
        DiscoveryConfig.of(k=4, negatives=3, strength_weight=0.5, strength_target=0.1), deltas
    )
    assert weighted.item() == pytest.approx(
        base.item() + 0.5 * strength_penalty(deltas, 0.1).item(), rel=1e-6
    )


def test_delta_energy_mixes_the_cosine_of_centred_change_maps_into_sim():
    torch.manual_seed(0)
    d = torch.randn(3, 4, 4, 5, 5)
    cos = lambda a, b: F.cosine_similarity(a.flatten(), b.flatten(), dim=0)  # noqa: E731

    def change_map(x):  # per latent pixel, the L2 norm over channels, minus its mean
        m = torch.stack([x[:, i, j].norm() for i in range(x.shape[1]) for j in range(x.shape[2])])
        return m - m.mean()

    for w in (0.25, 1.0):
        f = delta_features(d, energy=w)
        assert torch.allclose(f.norm(dim=-1), torch.ones(3, 4), atol=1e-5)  # already unit vectors
        for (a, s), (b, t) in (((0, 1), (2, 1)), ((1, 0), (1, 3))):  # across images, across directions
            plain = (1 - w) * cos(d[a, s], d[b, t]) + w * cos(change_map(d[a, s]), change_map(d[b, t]))
            assert torch.allclose(f[a, s] @ f[b, t], plain, atol=1e-5)
    assert torch.equal(delta_features(d, energy=0.0), delta_features(d))  # the paper's form
    # A change map ignores what is written where: flipping the sign of every channel of one
    # image's difference leaves it, so energy 1 sees the same difference on both images.
    flipped = torch.stack([d[0], -d[0]])
    assert torch.allclose(delta_features(flipped, energy=1.0)[0], delta_features(flipped, energy=1.0)[1])
    # and the objective reads the option: a different loss on the same deltas
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.step import objective

    cfg = DiscoveryConfig.of(k=4, negatives=3)
    assert not torch.allclose(objective(cfg.replace(delta_energy=0.5), d), objective(cfg, d))


def test_delta_energy_per_direction_compares_each_direction_in_its_own_form():
    """One weight per direction: the pair's sim is sqrt((1-wa)(1-wb)) cos(signed) +
    sqrt(wa wb) cos(maps), so equal weights give the shared-weight form and the objective
    indexes the weights by the sampled directions."""
    from noiseclr.discovery.config import DiscoveryConfig
    from noiseclr.discovery.step import objective
    from noiseclr.errors import ConfigError

    torch.manual_seed(2)
    d = torch.randn(3, 4, 4, 5, 5)
    w = torch.tensor([0.0, 1.0, 0.25, 1.0])
    f = delta_features(d, energy=w)
    signed, maps = delta_features(d, energy=0.0), delta_features(d, energy=1.0)
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0)  # noqa: E731
    for (a, s), (b, t) in (((0, 0), (1, 0)), ((0, 0), (0, 1)), ((2, 1), (1, 3)), ((1, 2), (1, 3))):
        plain = (1 - w[s]).sqrt() * (1 - w[t]).sqrt() * cos(signed[a, s], signed[b, t]) + (
            w[s] * w[t]
        ).sqrt() * cos(maps[a, s], maps[b, t])
        assert torch.allclose(f[a, s] @ f[b, t], plain, atol=1e-5)
    assert torch.equal(delta_features(d, energy=torch.zeros(4)), delta_features(d))  # all signed: the paper
    same = delta_features(d, energy=torch.full((4,), 0.25))  # equal weights: the shared form
    assert torch.allclose(same, delta_features(d, energy=0.25), atol=1e-6)
    # the objective takes direction k's weight for whichever slot k was sampled into
    cfg = DiscoveryConfig.of(k=6, negatives=3, delta_energy=[0, 0, 0, 1, 1, 1])
    dirs = torch.tensor([4, 0, 5, 1])
    as_sampled = delta_features(d, energy=torch.tensor([1.0, 0, 1, 0]))
    expect = objective(DiscoveryConfig.of(k=6, negatives=3), as_sampled)
    assert torch.allclose(objective(cfg, d, dirs), expect)
    for bad in ([0, 1], [0, 0, 0, 1, 1, 2]):
        with pytest.raises((ConfigError, ValueError), match="delta_energy"):
            DiscoveryConfig.of(k=6, negatives=3, delta_energy=bad)
