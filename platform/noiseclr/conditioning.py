"""Directions as UNet conditioning: the one place discovery, editing, pullback and evaluation
turn (M, D) direction vectors into text-encoder states and noise differences.

A direction d_k is a token embedding in the text encoder's input space (textual inversion
style); the UNet sees it through the frozen text encoder as the one-token prompt "<d_k>".
`DirectionEmbedding` extends the encoder's own token table (installed once through
`get_input_embeddings` / `set_input_embeddings`, the stable API on transformers 4 and 5; CLIP's
text model takes no `inputs_embeds`) and maps ids past the vocabulary to the rows made current by
`directions_in` in the calling thread, so the only trainable tensor is the (K, D) direction
matrix, every other weight stays bit-identical, concurrent callers never see each other's rows,
and several banks compose by stacking their rows.

Noise differences are batched: the official code calls the UNet once per direction (22 calls a
step at its settings); here the text encoder runs once for all sampled directions plus the
empty prompt, and the UNet runs once on the stacked (image x prompt) batch, split into chunks
only when a row budget asks for it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn


class DirectionEmbedding(nn.Embedding):
    """The encoder's token table, extended: ids >= vocab_size read rows of the directions that
    `directions_in` made current in the calling thread / task.

    Installed once per text encoder and left in place: it holds the very same weight Parameter
    (state dicts, `save_pretrained` and `num_embeddings` are unchanged) and, with no directions
    current, is the plain table. The directions live in a ContextVar, so an edit batch, a
    thumbnail render and an upload's inversion running in separate threads on one replica each
    read their own table; swapping the module per call, as before, let one thread's restore land
    inside another's encode (a wrong image or an IndexError).
    """

    def __init__(self, base: nn.Embedding):
        super().__init__(
            base.num_embeddings,
            base.embedding_dim,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
            _weight=base.weight,
        )
        self.weight = base.weight  # the encoder's own Parameter, not a copy
        self.vocab_size = base.num_embeddings
        self._current: ContextVar[torch.Tensor | None] = ContextVar("noiseclr_directions", default=None)

    def __getstate__(self) -> dict:  # a ContextVar neither pickles nor deep-copies
        state = self.__dict__.copy()
        state.pop("_current", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._current = ContextVar("noiseclr_directions", default=None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_dir = input_ids >= self.vocab_size
        base = super().forward(input_ids.clamp(max=self.vocab_size - 1))
        if not is_dir.any():
            return base
        directions = self._current.get()
        n_rows = 0 if directions is None else directions.shape[0]
        if int(input_ids.max()) - self.vocab_size >= n_rows:
            raise IndexError(f"direction id {int(input_ids.max()) - self.vocab_size} of a {n_rows}-row table")
        dirs = directions.to(base.dtype)[(input_ids - self.vocab_size).clamp(min=0)]
        return torch.where(is_dir[..., None], dirs, base)


_INSTALL = threading.Lock()


def direction_table(text_encoder: nn.Module) -> DirectionEmbedding:
    """The encoder's `DirectionEmbedding`, installed on first use (once, under a lock)."""
    with _INSTALL:
        table = text_encoder.get_input_embeddings()
        if not isinstance(table, DirectionEmbedding):
            table = DirectionEmbedding(table)
            text_encoder.set_input_embeddings(table)
        return table


@contextmanager
def directions_in(text_encoder: nn.Module, directions: torch.Tensor):
    """Let `text_encoder` read `directions` for ids >= its vocabulary, in this thread/task only."""
    table = direction_table(text_encoder)
    token = table._current.set(directions)
    try:
        yield
    finally:
        table._current.reset(token)


def prompt_ids(tokenizer, text_encoder, n_directions: int, device: torch.device) -> torch.Tensor:
    """Input ids (n_directions + 1, L): row k is the prompt "<d_k>", the last row is "" (empty).

    Built directly as [BOS, vocab + k, EOS, PAD...], the same ids a tokenizer that had the
    tokens added would produce, so no tokenizer has to be changed.
    """
    length = tokenizer.model_max_length
    empty = tokenizer(
        "", padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    vocab = text_encoder.get_input_embeddings().num_embeddings
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n_directions, length), pad, dtype=torch.long)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1] = vocab + torch.arange(n_directions)
    ids[:, 2] = tokenizer.eos_token_id
    return torch.cat([ids, empty]).to(device)


def encode_directions(text_encoder: nn.Module, tokenizer, directions: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states for every direction prompt plus the empty prompt.

    directions: (M, D) -> (M + 1, L, H); row M is the empty prompt. One encoder call.
    """
    ids = prompt_ids(tokenizer, text_encoder, directions.shape[0], directions.device)
    with directions_in(text_encoder, directions):
        return text_encoder(ids)[0]


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
    return unet_pairs(unet, x, ts, ctx, max_rows).view(n_img, n_prompt, *x_t.shape[1:])


def unet_pairs(
    unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, max_rows: int | None = None
) -> torch.Tensor:
    """eps of row r = (x[r], t[r], context[r]): (R, C, h, w), in ceil(R / max_rows) UNet calls."""
    rows = x.shape[0]
    step = rows if not max_rows else max(1, max_rows)
    eps = [unet(x[s : s + step], t[s : s + step], context[s : s + step]).sample for s in range(0, rows, step)]
    return torch.cat(eps)


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
