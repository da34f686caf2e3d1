"""The pullback method (Park et al., "Unsupervised Discovery of Semantic Latent Directions in
Diffusion Models", seed 004) as a second discoverer.

At a timestep t, the UNet's mid-block output h ("h-space") is a function of x_t. Directions
in x_t that move h the most are the top right-singular vectors of J = dh/dx_t: found by
subspace (power) iteration on J^T J with one jvp and one vjp per vector (torch.func), never
forming J. Local directions of many samples are aggregated into global ones as the top
eigenvectors of sum_s V_s S_s^2 V_s^T. Editing adds gamma * v to x_t at that timestep and
denoises on. Saved in the bank format with config.method = "pullback".
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from noiseclr.bank import DirectionBank
from noiseclr.conditioning import encode_directions, text_encoders
from noiseclr.models.base import DiffusionModel, scheduler_like


@contextmanager
def h_space(unet: nn.Module):
    """Make `unet(...).sample` return the mid-block output (the up path is skipped)."""
    saved = (unet.up_blocks, unet.conv_norm_out, unet.conv_act, unet.conv_out)
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out, unet.conv_act, unet.conv_out = nn.Identity(), nn.Identity(), nn.Identity()
    try:
        yield
    finally:
        unet.up_blocks, unet.conv_norm_out, unet.conv_act, unet.conv_out = saved


def local_directions(
    model: DiffusionModel, x_t: torch.Tensor, t: int, k: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k right-singular vectors (k, n) and singular values (k,) of dh/dx_t at one x_t (1, C, h, w)."""
    pipe = model.pipe
    unet = pipe.unet
    empty = encode_directions(text_encoders(pipe), None, torch.zeros(0, 1, device=model.device)).detach()
    ts = torch.tensor([t], device=model.device)
    n = x_t[0].numel()

    def h(x_flat: torch.Tensor) -> torch.Tensor:
        return unet(x_flat.view_as(x_t), ts, empty.to(x_t.dtype)).sample.flatten()

    x = x_t.flatten().detach()
    v = torch.linalg.qr(torch.randn(n, k, generator=generator).to(x))[0]  # (n, k)
    # forward-mode AD needs the composite (math) attention kernel
    with h_space(unet), sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        _, vjp_fn = torch.func.vjp(h, x)
        for _ in range(iters):
            jv = torch.stack([torch.func.jvp(h, (x,), (v[:, i],))[1] for i in range(k)], 1)  # J V
            jtjv = torch.stack([vjp_fn(jv[:, i])[0] for i in range(k)], 1)  # J^T J V
            v, _ = torch.linalg.qr(jtjv)
        sigma = torch.stack([torch.func.jvp(h, (x,), (v[:, i],))[1].norm() for i in range(k)])
    order = sigma.argsort(descending=True)
    return v[:, order].T.detach(), sigma[order].detach()


def discover_pullback(
    model: DiffusionModel,
    latents: torch.Tensor,  # (N, C, h, w) x_0 latents of the domain
    k: int = 8,
    t_edit: int = 700,
    iters: int = 4,
    seed: int = 0,
    name: str = "pullback",
    progress: bool = True,
) -> DirectionBank:
    """Global directions: aggregate the local top-k subspaces of N noised samples."""
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(seed)
    sched = scheduler_like(DDPMScheduler, model.pipe.scheduler.config)
    n = latents[0].numel()
    gram = torch.zeros(n, n, dtype=torch.float64)
    sigmas = []
    for x0 in tqdm(latents, desc="pullback", disable=not progress):
        noise = torch.randn(x0.shape, generator=gen)
        x_t = sched.add_noise(x0[None].float(), noise[None], torch.tensor([t_edit])).to(model.device)
        v, s = local_directions(model, x_t, t_edit, k, iters, gen)
        gram += (v.T.double().cpu() * s.double().cpu() ** 2) @ v.double().cpu()
        sigmas.append(s.cpu())
    evals, evecs = torch.linalg.eigh(gram)
    top = evecs[:, evals.argsort(descending=True)[:k]].T.float()  # (k, n), unit norm
    return DirectionBank(
        directions=top.contiguous(),
        base_model={"source": model.source, "fingerprint": model.fingerprint, "hidden_size": n},
        name=name,
        config={
            "method": "pullback",
            "k": k,
            "t_edit": t_edit,
            "iters": iters,
            "seed": seed,
            "latent_shape": list(latents.shape[1:]),
            "n_samples": len(latents),
        },
        metrics={"mean_top_singular_value": float(torch.stack(sigmas)[:, 0].mean())},
    )
