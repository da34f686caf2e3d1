"""A discovery's starting directions, at the scale of the token table they live beside."""

from __future__ import annotations

import torch
from torch import nn

from noiseclr.errors import BankError


def vocab_norm(text_encoder: nn.Module) -> torch.Tensor:
    """The token table's mean row norm: the scale of the embeddings the encoder was trained on."""
    return text_encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean().cpu()


def init_directions(
    text_encoder: nn.Module,
    k: int,
    generator: torch.Generator,
    tokenizer=None,
    init_tokens: list[str] | None = None,
    from_vocab: bool = False,
) -> torch.Tensor:
    """(K, D) initial directions: random with the mean norm of the token table, copies of
    given tokens' embeddings (cycled if fewer than K), or (`from_vocab`) copies of K distinct
    rows of the table drawn from `generator`, the tokenizer's special tokens left out."""
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    if init_tokens:
        if tokenizer is None:
            raise ValueError("init_tokens needs the tokenizer")
        rows = []
        for tok in init_tokens:
            ids = tokenizer(tok, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise BankError(
                    f"init token {tok!r} is not a single token of this tokenizer ({len(ids)} tokens)"
                )
            rows.append(table[ids[0]])
        return torch.stack([rows[i % len(rows)] for i in range(k)]).clone()
    if from_vocab:
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        order = torch.randperm(len(table), generator=generator)
        ids = [int(i) for i in order if int(i) not in special][:k]
        if len(ids) < k:
            raise BankError(f"init: vocab needs {k} tokens, the table has {len(ids)} that are not special")
        return table[ids].clone()
    vectors = torch.randn(k, table.shape[1], generator=generator)
    return vectors / vectors.norm(dim=1, keepdim=True) * vocab_norm(text_encoder)
