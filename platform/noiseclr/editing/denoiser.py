"""The one guided denoiser every edit runs through: the direction terms of the noise prediction.

    eps~ = CFG(eps) + sum_i lambda_i * [t in window_i] * (eps(x_t, d_i) - eps(x_t, empty))

A caller (the editing sampler's own loop, or diffusers' `StableDiffusionPipeline.__call__`
through `EditingHook`) puts the rows its guidance needs into a UNet batch; `DirectionTerms.plan`
names the rows the edits active at t add to that same batch (each active (trajectory, direction)
pair, plus eps(x_t, empty) where the caller's batch does not hold it already), so a step is still
one batched UNet call however many requests and directions share it; `DirectionTerms.delta`
turns the batch's output into the edit term of each trajectory, added to whatever guidance the
caller applies. Nothing here knows a scheduler: the loop around it is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from noiseclr.conditioning import encode_directions, unpack


@dataclass(frozen=True)
class Plan:
    """The rows one step's edits add to a UNet batch of `callers` rows."""

    callers: int
    source: torch.Tensor  # (E,) caller row each added row takes x_t (and added conditions) from
    context: torch.Tensor  # (E, L, H) text-encoder states of each added row
    pair_traj: torch.Tensor  # (P,) trajectory of each active (trajectory, edit) pair
    pair_edit: torch.Tensor  # (P,) its edit column
    pair_row: torch.Tensor  # (P,) its row in the whole batch (callers + added)
    empty_row: torch.Tensor  # (N,) row holding eps(x_t, empty) of each trajectory (-1: no edit at t)


class DirectionTerms:
    """M edits (direction vector, window) on N trajectories with per-trajectory scales (N, M)."""

    def __init__(self, contexts: torch.Tensor, windows: torch.Tensor, scales: torch.Tensor):
        # contexts (M + 1, L, H): rows 0..M-1 the one-token prompts <d_i>, row M the empty prompt
        if (
            scales.ndim != 2
            or scales.shape[1] != windows.shape[0]
            or contexts.shape[0] != windows.shape[0] + 1
        ):
            raise ValueError(
                f"scales must be (trajectories, {windows.shape[0]} edits), got {tuple(scales.shape)}"
            )
        if not torch.isfinite(scales).all():
            raise ValueError("edit scales must be finite numbers")
        self.contexts, self.windows, self.scales = contexts, windows.to(contexts.device), scales.float()

    @classmethod
    def encode(
        cls, text_encoder: nn.Module, tokenizer, edits: list, scales: torch.Tensor, device: torch.device | str
    ) -> DirectionTerms:
        """Edits (`sampler.Edit`s) through the text encoder on `device` (or `text_encoders(pipe)`,
        tokenizer unused): one call per encoder."""
        m = len(edits)
        vectors = (
            torch.stack([e.vector for e in edits]).to(device) if edits else torch.zeros(0, 1, device=device)
        )
        contexts = encode_directions(text_encoder, tokenizer, vectors)
        windows = torch.tensor([[e.t_low, e.t_high] for e in edits], dtype=torch.float32).reshape(m, 2)
        return cls(contexts, windows, scales.to(contexts.device))

    @property
    def empty(self) -> torch.Tensor:
        """(1, L, H): the empty prompt's states."""
        return self.contexts[-1:]

    def active(self, t: torch.Tensor | float) -> torch.Tensor:
        """(N, M): which edits act on which trajectory at timestep t."""
        t = float(t)
        inside = (self.windows[:, 0] <= t) & (t <= self.windows[:, 1])
        return (self.scales != 0) & inside.to(self.scales.device)[None]

    def plan(
        self, t: torch.Tensor | float, source: torch.Tensor, empty_row: torch.Tensor, callers: int
    ) -> Plan | None:
        """The rows to add at t to a batch of `callers` rows, or None when no edit acts at t.

        source (N,): the caller row each trajectory's added rows copy x_t and conditions from.
        empty_row (N,): the caller row that already holds eps(x_t, empty) of each trajectory, or
        -1 where none does (then one is added for each trajectory an edit acts on).
        """
        on = self.active(t)
        traj, edit = on.nonzero(as_tuple=True)
        if len(traj) == 0:
            return None
        device = source.device
        traj, edit = traj.to(device), edit.to(device)
        needs = torch.zeros(len(source), dtype=torch.bool, device=device)
        needs[traj] = True
        missing = (needs & (empty_row < 0)).nonzero(as_tuple=True)[0]
        rows = empty_row.clone()
        rows[missing] = callers + len(traj) + torch.arange(len(missing), device=device)
        rows[~needs] = -1
        ctx = self.contexts.to(device)
        return Plan(
            callers=callers,
            source=torch.cat([source[traj], source[missing]]),
            context=torch.cat([ctx[edit.to(ctx.device)], ctx[-1:].expand(len(missing), -1, -1)]),
            pair_traj=traj,
            pair_edit=edit,
            pair_row=callers + torch.arange(len(traj), device=device),
            empty_row=rows,
        )

    def delta(self, plan: Plan | None, eps: torch.Tensor) -> torch.Tensor | float:
        """sum_i lambda_i (eps(x_t, d_i) - eps(x_t, empty)) per trajectory, (N, C, h, w) in
        float32, from the whole batch's output (callers' rows first); 0.0 with no plan."""
        if plan is None:
            return 0.0
        eps = eps.float()
        n = len(plan.empty_row)
        out = torch.zeros(n, *eps.shape[1:], device=eps.device)
        weight = self.scales.to(eps.device)[plan.pair_traj, plan.pair_edit].view(-1, *[1] * (eps.dim() - 1))
        diff = eps[plan.pair_row] - eps[plan.empty_row[plan.pair_traj]]
        return out.index_add_(0, plan.pair_traj, weight * diff)


def take_rows(value: Any, index: torch.Tensor, rows: int) -> Any:
    """`value` (a UNet input: tensor, list, tuple or dict of them) at batch rows `index`; tensors
    that are not batched over `rows` rows (a shared timestep) are passed as they are."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim and value.shape[0] == rows else None
    if isinstance(value, dict):
        return {k: take_rows(v, index, rows) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(take_rows(v, index, rows) for v in value)
    return value


def extend_rows(value: Any, added: Any) -> Any:
    """`value` with `added` (from `take_rows`) appended along the batch."""
    if isinstance(value, torch.Tensor):
        return value if added is None else torch.cat([value, added.to(value.device, value.dtype)])
    if isinstance(value, dict):
        return {k: extend_rows(v, added[k]) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(extend_rows(v, a) for v, a in zip(value, added, strict=True))
    return value


@dataclass
class _Call:
    """One pipeline call's edits as the hook sees them."""

    unet: nn.Module
    terms: DirectionTerms
    trajectories: int
    uncond_empty: bool  # under CFG, the unconditional rows are the empty prompt (no negative one)
    text_empty: bool  # the text rows are the empty prompt (prompt "", no embeddings given)
    # Under CFG, added rows copy the text rows' x_t and added conditions instead of the
    # unconditional rows' (SDXL with negative size ids: the edit acts at the image's sizes).
    from_text: bool = False
    plan: Plan | None = None


_CURRENT: ContextVar[_Call | None] = ContextVar("noiseclr_pipeline_edits", default=None)


class EditingHook:
    """Direction terms inside a diffusers pipeline's own denoising loop.

    Installed once on a UNet (forward pre-hook and hook), it does nothing unless `editing` made
    edits current in the calling thread. Then each UNet call of the pipeline's loop (its rows:
    B trajectories, or 2B under classifier-free guidance, unconditional first) gets the rows of
    the edits active at t appended, in the same call; the output keeps the pipeline's rows, each
    plus its trajectory's edit term. The pipeline's guidance then gives
    uncond + g (text - uncond) + sum_i lambda_i (eps_i - eps_empty): the edit term is added to
    both halves, so guidance rescaling, callbacks and the scheduler all see the edited noise.
    """

    @classmethod
    def install(cls, unet: nn.Module) -> None:
        if not getattr(unet, "_noiseclr_hooked", False):
            unet.register_forward_pre_hook(cls._before, with_kwargs=True)
            unet.register_forward_hook(cls._after, with_kwargs=True)
            unet._noiseclr_hooked = True

    @staticmethod
    def editing(
        unet: nn.Module,
        terms: DirectionTerms,
        trajectories: int,
        uncond_empty: bool,
        text_empty: bool,
        from_text: bool = False,
    ) -> Callable[[], None]:
        """Make edits current on `unet` in this thread; returns the function that ends them."""
        token = _CURRENT.set(_Call(unet, terms, trajectories, uncond_empty, text_empty, from_text))
        return lambda: _CURRENT.reset(token)

    @staticmethod
    def _before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = _CURRENT.get()
        if call is None or module is not call.unet:
            return None
        names = ("sample", "timestep", "encoder_hidden_states")
        if len(args) > len(names):
            raise TypeError(
                f"the edit hook takes the UNet's first {len(names)} arguments by position, got {len(args)}"
            )
        given = dict(zip(names, args, strict=False)) | kwargs
        x, t, ctx = given["sample"], given["timestep"], given["encoder_hidden_states"]
        rows, n = x.shape[0], call.trajectories
        if rows not in (n, 2 * n):
            raise RuntimeError(f"the pipeline's UNet batch of {rows} rows is neither {n} nor {2 * n} images")
        # Decided per call: a callback may end CFG part way (diffusers' SDCFGCutoffCallback keeps
        # only the text rows from then on).
        text_half = rows == 2 * n and call.from_text
        empty_here = call.uncond_empty if rows == 2 * n and not text_half else call.text_empty
        # the unconditional half (or the text half), or the only rows
        source = torch.arange(n, device=x.device) + (n if text_half else 0)
        empty = source if empty_here else torch.full_like(source, -1)
        call.plan = plan = call.terms.plan(t.flatten()[0] if torch.is_tensor(t) else t, source, empty, rows)
        if plan is None:
            return None
        index = plan.source
        given["sample"] = torch.cat([x, x[index]])
        if torch.is_tensor(t) and t.ndim and t.shape[0] == rows:
            given["timestep"] = torch.cat([t, t[index]])
        # SDXL: an added row's pooled text embedding is its direction's (packed in its context);
        # its size ids, like any other added condition, are its caller row's.
        states, own = unpack(module, plan.context.to(ctx.device, ctx.dtype))
        given["encoder_hidden_states"] = torch.cat([ctx, states])
        for key in ("timestep_cond", "added_cond_kwargs"):
            if given.get(key) is not None:
                added = take_rows(given[key], index, rows)
                if key == "added_cond_kwargs" and own is not None:
                    added = {**added, "text_embeds": own["text_embeds"]}
                given[key] = extend_rows(given[key], added)
        return (), given

    @staticmethod
    def _after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = _CURRENT.get()
        if call is None or module is not call.unet or call.plan is None:
            return None
        plan, call.plan = call.plan, None
        eps = output[0] if isinstance(output, tuple) else output.sample
        delta = call.terms.delta(plan, eps)
        halves = plan.callers // call.trajectories
        edited = (eps[: plan.callers].float() + delta.repeat(halves, *[1] * (eps.dim() - 1))).to(eps.dtype)
        if isinstance(output, tuple):
            return (edited, *output[1:])
        output.sample = edited
        return output
