"""Batched noise evaluation: every (image, direction) pair plus the unconditional pass at once.

The official code calls the UNet once per direction (22 calls a step at its settings); here the
text encoder runs once for all sampled directions plus the empty prompt, and the UNet runs once
on the stacked (image x prompt) batch, split into chunks only when a row budget asks for it.
"""

from __future__ import annotations

import torch
from torch import nn

from noiseclr.discovery.bank import encode_directions


def unet_rows(
    unet: nn.Module,
    x_t: torch.Tensor,  # (B, C, h, w) noised latents
    t: torch.Tensor,  # (B,) timesteps
    context: torch.Tensor,  # (P, L, H) hidden states of P prompts
    max_rows: int | None = None,
) -> torch.Tensor:
    """eps for every image under every prompt: (B, P, C, h, w), in ceil(B*P / max_rows) calls."""
    n_img, n_prompt = x_t.shape[0], context.shape[0]
    x = x_t.repeat_interleave(n_prompt, dim=0)  # row r = image r // P under prompt r % P
    ts = t.repeat_interleave(n_prompt, dim=0)
    ctx = context.repeat(n_img, 1, 1)
    rows = x.shape[0]
    step = rows if not max_rows else max(1, max_rows)
    eps = [unet(x[s : s + step], ts[s : s + step], ctx[s : s + step]).sample for s in range(0, rows, step)]
    return torch.cat(eps).view(n_img, n_prompt, *x_t.shape[1:])


def direction_deltas(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    directions: torch.Tensor,  # (S, D) sampled directions (a slice of the trainable bank)
    x_t: torch.Tensor,  # (B, C, h, w)
    t: torch.Tensor,  # (B,)
    max_rows: int | None = None,
) -> torch.Tensor:
    """delta_k^n = eps(x_t^n, d_k) - eps(x_t^n, empty) for all n, k: (B, S, C, h, w).

    One text-encoder call for S + 1 prompts and one UNet pass over B * (S + 1) rows.
    """
    context = encode_directions(text_encoder, tokenizer, directions)  # (S + 1, L, H), last = empty
    eps = unet_rows(unet, x_t, t, context.to(x_t.dtype), max_rows)
    return eps[:, :-1] - eps[:, -1:]


def direction_deltas_sequential(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    directions: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The official code's shape of work: one text-encoder and one UNet call per direction
    (plus one for the empty prompt). Same result as `direction_deltas`; kept as the baseline
    of the benchmark and as a check of the batched path."""
    uncond_ctx = encode_directions(text_encoder, tokenizer, directions[:0])  # just the empty prompt
    uncond = unet(x_t, t, uncond_ctx.expand(x_t.shape[0], -1, -1).to(x_t.dtype)).sample
    deltas = []
    for k in range(directions.shape[0]):
        ctx = encode_directions(text_encoder, tokenizer, directions[k : k + 1])[:1]
        eps = unet(x_t, t, ctx.expand(x_t.shape[0], -1, -1).to(x_t.dtype)).sample
        deltas.append(eps - uncond)
    return torch.stack(deltas, dim=1)
