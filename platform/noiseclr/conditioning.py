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
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

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
        self._current: ContextVar[torch.Tensor | None] = ContextVar("noiseclr_directions", default=None)

    def __getstate__(self) -> dict:  # a ContextVar neither pickles nor deep-copies
        state = self.__dict__.copy()
        state.pop("_current", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._current = ContextVar("noiseclr_directions", default=None)

    @property
    def vocab_size(self) -> int:
        """The table's rows now: a token added later (diffusers' load_textual_inversion resizes
        the table in place) is a token, not a direction."""
        return int(self.weight.shape[0])

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


@dataclass(frozen=True)
class TextEncoders:
    """The text side of a pipeline. SD 1.x/2.x: one CLIP encoder; its last hidden states are the
    UNet's context. SDXL: two encoders; a direction is a pair (its first `widths[0]` entries are
    a token embedding of the first encoder, the rest of the second), their penultimate states are
    concatenated, and the UNet also takes the second encoder's pooled output and the image's
    size ids (`added_cond_kwargs`), which ride in the context as one extra row (`pack`), so
    every caller stacks, indexes and repeats SDXL contexts as it does SD's."""

    encoders: tuple[nn.Module, ...]
    tokenizers: tuple
    time_ids: tuple[int, ...] = ()  # SDXL: (H, W, crop top, crop left, H, W) of the generated image
    zeros_for_empty: bool = False  # SDXL's force_zeros_for_empty_prompt: "" is all zeros

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    @property
    def widths(self) -> tuple[int, ...]:
        """Each encoder's token-embedding width; a direction is their sum wide."""
        return tuple(int(e.get_input_embeddings().embedding_dim) for e in self.encoders)


def text_encoders(pipe) -> TextEncoders:
    """The pipeline's text side (SD's encoder, or SDXL's two and its added conditioning)."""
    second = getattr(pipe, "text_encoder_2", None)
    if second is None:
        return TextEncoders((pipe.text_encoder,), (pipe.tokenizer,))
    if pipe.text_encoder is None:
        raise ValueError("an SDXL pipeline without its first text encoder (a refiner) has no directions")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return TextEncoders(
        (pipe.text_encoder, second),
        (pipe.tokenizer, pipe.tokenizer_2),
        (side, side, 0, 0, side, side),
        bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
    )


def as_encoders(text_encoder, tokenizer=None) -> TextEncoders:
    """`text_encoder` itself when it is a TextEncoders, else SD's one encoder with `tokenizer`."""
    if isinstance(text_encoder, TextEncoders):
        return text_encoder
    return TextEncoders((text_encoder,), (tokenizer,))


def pack(states: torch.Tensor, pooled: torch.Tensor, time_ids: tuple[int, ...]) -> torch.Tensor:
    """SDXL conditioning as one tensor: (P, L, H) states plus a row [pooled, time ids, 0...]."""
    n, _, width = states.shape
    if pooled.shape[1] + len(time_ids) > width:
        raise ValueError(f"pooled width {pooled.shape[1]} + {len(time_ids)} ids do not fit a row of {width}")
    extra = states.new_zeros(n, 1, width)
    extra[:, 0, : pooled.shape[1]] = pooled.to(states.dtype)
    extra[:, 0, pooled.shape[1] : pooled.shape[1] + len(time_ids)] = torch.tensor(
        time_ids, dtype=states.dtype
    )
    return torch.cat([states, extra], dim=1)


def unpack(unet: nn.Module, context: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Context rows as the UNet takes them: SD's as they are (no added conditioning); SDXL's
    states, and their packed row as `added_cond_kwargs` (text_embeds, time_ids)."""
    config = unet.config
    if getattr(config, "addition_embed_type", None) != "text_time":
        return context, None
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    extra = context[:, -1]
    return context[:, :-1], {"text_embeds": extra[:, :pooled], "time_ids": extra[:, pooled : pooled + 6]}


def unet_eps(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """eps of the UNet for rows (x, t, context): SD's call, or SDXL's with its packed row
    unpacked into `added_cond_kwargs` (text_embeds, time_ids)."""
    states, added = unpack(unet, context)
    if added is None:
        return unet(x, t, states).sample
    return unet(x, t, states, added_cond_kwargs=added).sample


def encode_ids(enc: TextEncoders, ids: list[torch.Tensor], empty: torch.Tensor | None = None) -> torch.Tensor:
    """Context rows for token ids (one (P, L) tensor per encoder). SD: the encoder's last hidden
    states. SDXL: both encoders' penultimate states side by side, packed with the second's
    pooled output and the size ids, as StableDiffusionXLPipeline.encode_prompt builds them;
    rows where `empty` is true are zeros when the model says "" is zeros."""
    if not enc.sdxl:
        return enc.encoders[0](ids[0])[0]
    states, pooled = [], None
    for encoder, rows in zip(enc.encoders, ids, strict=True):
        out = encoder(rows, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
    context = torch.cat(states, dim=-1)
    if enc.zeros_for_empty and empty is not None and bool(empty.any()):
        keep = (~empty).to(context.dtype)
        context, pooled = context * keep[:, None, None], pooled * keep[:, None]
    return pack(context, pooled, enc.time_ids)


def encode_prompts(enc: TextEncoders, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Context rows for text prompts: (P, L(+1), H)."""
    ids = [
        tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids.to(device)
        for tok in enc.tokenizers
    ]  # fmt: skip
    empty = torch.tensor([p == "" for p in prompts], device=device)
    return encode_ids(enc, ids, empty)


def encode_directions(text_encoder, tokenizer, directions: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states for every direction prompt plus the empty prompt.

    directions: (M, D) -> (M + 1, L, H); row M is the empty prompt. One call per encoder.
    `text_encoder`: SD's encoder (with its tokenizer), or `text_encoders(pipe)` for any
    pipeline (the tokenizer is then unused), SDXL's pairs included.
    """
    enc = as_encoders(text_encoder, tokenizer)
    n, device = directions.shape[0], directions.device
    parts = [directions]
    if enc.sdxl:  # a pair: the first encoder's embedding, then the second's
        if n and directions.shape[1] != sum(enc.widths):
            raise ValueError(
                f"directions {directions.shape[1]} wide; this SDXL model's are {sum(enc.widths)}"
            )
        if n:
            parts = list(directions.split(list(enc.widths), dim=1))
        else:  # the empty prompt alone: empty tables of each encoder's width
            parts = [directions.new_zeros(0, w) for w in enc.widths]
    ids = [prompt_ids(tok, e, n, device) for e, tok in zip(enc.encoders, enc.tokenizers, strict=True)]
    empty = torch.arange(n + 1, device=device) == n
    with ExitStack() as stack:
        for encoder, part in zip(enc.encoders, parts, strict=True):
            stack.enter_context(directions_in(encoder, part))
        return encode_ids(enc, ids, empty)


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
    eps = [
        unet_eps(unet, x[s : s + step], t[s : s + step], context[s : s + step]) for s in range(0, rows, step)
    ]
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
