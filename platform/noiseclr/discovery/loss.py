"""The NoiseCLR contrastive loss (Dalva & Yanardag, CVPR 2024, eq. 2).

    delta_k^n = eps(x_t^n, d_k) - eps(x_t^n, empty)
    L_j = -log( sum_{a != b} exp(sim(delta_j^a, delta_j^b) / tau)
              / sum_{a, i != j} exp(sim(delta_j^a, delta_i^a) / tau) )

Positives: the anchor direction j on two different images. Negatives: the anchor and another
sampled direction on the same image. `sim` is cosine similarity of the flattened noise
differences. The official code divides each sum by its count; that only adds the constant
log(n_neg / n_pos) to the loss and changes no gradient, so we keep the formula's sums.

Two optional, unsupervised views of a noise difference before `sim` (`delta_features`):
`pool` averages it over pool x pool latent pixels (similarity of where and how the prediction
moves, less of its pixel noise); `center` subtracts, per image, the mean over the sampled
directions (what any direction token does alike is not what tells directions apart).
`energy` mixes in where the prediction moves: each latent pixel's change size (L2 over
channels), centred per image. A shape or size edit changes the same few pixels around the object
on every image, but what it writes there depends on the object's colour and shape. Its signed
difference agrees across images far less (cosine 0.09-0.17 on the embedded model) than a
background edit's (0.64-0.69), so the paper's cosine favours global factors; the change map of
an object edit agrees well (0.47-0.56; docs/discovery-quality.md). Unsupervised: nothing about
objects goes in.
All default to the paper's plain flattened difference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def delta_features(
    deltas: torch.Tensor, pool: int = 1, center: bool = False, energy: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """(B, S, C, H, W) noise differences -> (B, S, F) vectors that `sim` compares.

    With 0 < energy <= 1: the unit signed difference scaled by sqrt(1 - energy), beside the
    unit centred change map scaled by sqrt(energy), so that the cosine of two features is
    (1 - energy) cos(signed) + energy cos(change maps).

    `energy` may also be one weight per sampled direction, (S,): a bank learning both kinds of
    edit. Two directions' features then have cosine sqrt((1 - w_a)(1 - w_b)) cos(signed) +
    sqrt(w_a w_b) cos(change maps): the mixed form above within a group of equal weights, and
    0 between a signed (w = 0) and a change-map (w = 1) direction, whatever they edit.
    """
    x = deltas.float()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    if pool > 1:
        x = F.avg_pool2d(x.flatten(0, 1), pool, ceil_mode=True).unflatten(0, x.shape[:2])
    if not bool(torch.as_tensor(energy).any()):
        return x.flatten(2)
    change = (x.pow(2).sum(dim=2) + 1e-12).sqrt().flatten(2)  # (B, S, H*W)
    change = change - change.mean(dim=2, keepdim=True)
    change = F.normalize(change, dim=-1, eps=1e-12)
    if not isinstance(energy, torch.Tensor):
        parts = [change * math.sqrt(energy)]
        if energy < 1:
            parts.insert(0, F.normalize(x.flatten(2), dim=-1, eps=1e-12) * math.sqrt(1 - energy))
        return torch.cat(parts, dim=-1)
    w = energy.to(x).view(1, -1, 1)
    signed = F.normalize(x.flatten(2), dim=-1, eps=1e-12) * (1 - w).sqrt()
    return torch.cat([signed, change * w.sqrt()], dim=-1)


def _similarities(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """deltas (B images, S directions, ...) -> (across images (S, B, B), across dirs (B, S, S))."""
    z = F.normalize(deltas.flatten(2).float(), dim=-1, eps=1e-12)  # (B, S, F)
    across_images = torch.einsum("asf,bsf->sab", z, z)  # sim(delta_s^a, delta_s^b)
    across_dirs = torch.einsum("aif,ajf->aij", z, z)  # sim(delta_i^a, delta_j^a)
    return across_images, across_dirs


def noiseclr_loss(deltas: torch.Tensor, tau: float = 0.5, anchor: int = 0) -> torch.Tensor:
    """Paper loss for one anchor direction.

    deltas: (B, S, C, H, W) noise differences of B images under S sampled directions;
    direction `anchor` is j, the other S - 1 are its negatives. Needs B >= 2 and S >= 2.
    """
    n_img, n_dir = deltas.shape[:2]
    if n_img < 2:
        raise ValueError(f"NoiseCLR needs at least 2 images per step for positive pairs, got {n_img}")
    if n_dir < 2:
        raise ValueError(f"NoiseCLR needs at least 2 directions per step (anchor + negatives), got {n_dir}")
    across_images, across_dirs = _similarities(deltas)
    off_diag = ~torch.eye(n_img, dtype=torch.bool, device=deltas.device)
    pos = across_images[anchor][off_diag] / tau  # all a != b
    others = torch.arange(n_dir, device=deltas.device) != anchor
    neg = across_dirs[:, anchor, others].reshape(-1) / tau  # all a, i != j
    return torch.logsumexp(neg, 0) - torch.logsumexp(pos, 0)


def symmetric_noiseclr_loss(deltas: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Every sampled direction serves as the anchor in turn (mean of the S paper losses).

    Same UNet work as the paper loss (the deltas are shared), S times the contrastive signal.
    """
    n_img, n_dir = deltas.shape[:2]
    if n_img < 2 or n_dir < 2:
        raise ValueError(f"NoiseCLR needs >= 2 images and >= 2 directions per step, got {n_img} and {n_dir}")
    across_images, across_dirs = _similarities(deltas)
    off_diag = ~torch.eye(n_img, dtype=torch.bool, device=deltas.device)
    pos = across_images[:, off_diag] / tau  # (S, B*(B-1))
    not_self = ~torch.eye(n_dir, dtype=torch.bool, device=deltas.device)
    # neg[j] = sim(delta_j^a, delta_i^a) for all a and i != j
    neg = across_dirs.permute(1, 0, 2)[not_self[:, None, :].expand(n_dir, n_img, n_dir)]
    neg = neg.view(n_dir, n_img * (n_dir - 1)) / tau
    return (torch.logsumexp(neg, 1) - torch.logsumexp(pos, 1)).mean()


def strength_penalty(deltas: torch.Tensor, target: float) -> torch.Tensor:
    """A hinge on each sampled direction's effect size: mean over directions of
    relu(log(target) - log(rms(delta_s))), rms over images and latent elements.

    The contrastive loss sees a noise difference only through its cosine, so a direction whose
    difference is consistent but vanishingly small is as good to it as a strong one (the dead
    directions of docs/discovery-quality.md: 60x weaker, as consistent). The UNet predicts
    unit-variance noise on every latent diffusion model, so `target` is a fraction of the noise
    itself on Stable Diffusion as on the embedded model: no labels, no model constant. Zero for
    directions already at or above the target, so it never pushes strength past it.
    """
    rms = deltas.float().pow(2).mean(dim=(0, *range(2, deltas.ndim))).clamp_min(1e-20).sqrt()  # (S,)
    return torch.relu(math.log(target) - rms.log()).mean()
