"""A discovery's starting directions, at the scale of the token table they live beside."""

from __future__ import annotations

import torch
from torch import nn

from noiseclr.conditioning import as_encoders
from noiseclr.errors import BankError


def vocab_norm(text_encoder: nn.Module) -> torch.Tensor:
    """The token table's mean row norm: the scale of the embeddings the encoder was trained on."""
    return text_encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean().cpu()


def init_directions(
    text_encoder,
    k: int,
    generator: torch.Generator,
    tokenizer=None,
    init_tokens: list[str] | None = None,
    from_vocab: bool = False,
) -> torch.Tensor:
    """(K, D) initial directions: random with the mean norm of the token table, copies of
    given tokens' embeddings (cycled if fewer than K), or (`from_vocab`) copies of K distinct
    rows of the table drawn from `generator`, the tokenizer's special tokens left out.

    `text_encoder`: SD's encoder (with `tokenizer`) or `conditioning.TextEncoders`; for SDXL a
    direction is a pair, each part drawn as for its own encoder (the same tokens in both)."""
    enc = as_encoders(text_encoder, tokenizer)
    tables = [e.get_input_embeddings().weight.detach().float().cpu() for e in enc.encoders]
    if init_tokens:
        parts = []
        for table, tok in zip(tables, enc.tokenizers, strict=True):
            if tok is None:
                raise ValueError("init_tokens needs the tokenizer")
            rows = []
            for token in init_tokens:
                ids = tok(token, add_special_tokens=False).input_ids
                if len(ids) != 1:
                    raise BankError(
                        f"init token {token!r} is not a single token of this tokenizer ({len(ids)} tokens)"
                    )
                rows.append(table[ids[0]])
            parts.append(torch.stack([rows[i % len(rows)] for i in range(k)]))
        return torch.cat(parts, dim=1).clone()
    if from_vocab:
        special = set(getattr(enc.tokenizers[0], "all_special_ids", None) or [])
        size = min(len(t) for t in tables)
        order = torch.randperm(size, generator=generator)
        ids = [int(i) for i in order if int(i) not in special][:k]
        if len(ids) < k:
            raise BankError(f"init: vocab needs {k} tokens, the table has {len(ids)} that are not special")
        return torch.cat([t[ids] for t in tables], dim=1).clone()
    parts = []
    for encoder, table in zip(enc.encoders, tables, strict=True):
        vectors = torch.randn(k, table.shape[1], generator=generator)
        parts.append(vectors / vectors.norm(dim=1, keepdim=True) * vocab_norm(encoder))
    return torch.cat(parts, dim=1)
