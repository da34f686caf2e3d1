"""Banks put together: several runs' directions in one bank, or some directions of one."""

from __future__ import annotations

from typing import Any

import torch

from noiseclr.bank.record import DirectionBank
from noiseclr.errors import BankError

# Config keys a merged bank keeps where its banks agree: what editing and measuring read.
SHARED_KEYS = (
    "method",
    "t_edit",
    "model",
    "data",
    "world_fixed",
    "storage_options",
    "gallery_prompt",
    "edit_window",
)


def _merged_edit_defaults(banks: list[DirectionBank]) -> dict[str, Any]:
    """Each direction keeps its window; the calibrated scales are kept when every bank was
    calibrated the same way (same protocol keys), else dropped for the next measurement to set."""
    windows = [list(b.window(i)) for b in banks for i in range(len(b))]
    out: dict[str, Any] = {"window": windows[0]}
    if any(w != windows[0] for w in windows):
        out["windows"] = windows
    per_direction = {"window", "windows", "scales"}
    rest = [b.edit_defaults.dump() for b in banks]
    rest = [{k: v for k, v in r.items() if k not in per_direction} for r in rest]
    if all(b.measured for b in banks) and all(r == rest[0] for r in rest):
        out.update(rest[0])
        out["scales"] = [list(s) for b in banks for s in b.edit_defaults.scales]
    return out


def merge_banks(banks: list[DirectionBank], name: str, refs: list[str] | None = None) -> DirectionBank:
    """One bank of every direction of `banks`, in order: several seeds', sweep trials' or
    domains' discoveries on one base model put together. Tokens are renumbered <name-i>;
    each direction keeps its label, window and (where the banks agree on how) calibrated
    scales, and `config["origin"]` says which bank (`refs`: where it was read from, as banks of
    several runs often share a name) and token it was. The oracle-free scores
    are not carried: distinctness and rank are relative to the rest of a bank, so the merged
    bank is measured again (`noiseclr merge` does, and drops dead and duplicate directions)."""
    if len(banks) < 2:
        raise BankError(f"merging needs at least two banks, got {len(banks)}")
    first = banks[0]
    for b in banks[1:]:
        if b.method != first.method:
            raise BankError(
                f"bank {b.name!r} holds {b.method} directions, bank {first.name!r} {first.method}"
            )
        if b.base_model.get("fingerprint") != first.base_model.get("fingerprint"):
            raise BankError(
                f"bank {b.name!r} was learnt on base model {b.base_model.get('source')!r} "
                f"(fingerprint {b.base_model.get('fingerprint')}), bank {first.name!r} on "
                f"{first.base_model.get('source')!r} ({first.base_model.get('fingerprint')})"
            )
        if b.directions.shape[1] != first.directions.shape[1]:
            raise BankError(
                f"bank {b.name!r} has {b.directions.shape[1]}-dim directions, {first.name!r} "
                f"{first.directions.shape[1]}-dim"
            )
        if b.config.get("t_edit") != first.config.get("t_edit"):  # pullback: where x_t is moved
            t_b, t_first = b.config.get("t_edit"), first.config.get("t_edit")
            raise BankError(f"bank {b.name!r} edits at t {t_b}, bank {first.name!r} at t {t_first}")

    def same(key: str) -> bool:
        return all(b.config.get(key) == first.config.get(key) for b in banks)

    refs = refs or [None] * len(banks)
    if len(refs) != len(banks):
        raise BankError(f"{len(refs)} references for {len(banks)} banks")

    def own(b: DirectionBank, ref: str | None) -> list[dict]:
        return [{"bank": b.name, "token": t} | ({"ref": ref} if ref else {}) for t in b.tokens]

    origin = [o for b, ref in zip(banks, refs, strict=True) for o in b.config.get("origin") or own(b, ref)]
    labels_in_order = [b.labels.get(t) for b in banks for t in b.tokens]
    merged = DirectionBank(
        directions=torch.cat([b.directions.detach().float().cpu() for b in banks]),
        base_model=dict(first.base_model),
        name=name,
        config={
            **{k: first.config[k] for k in SHARED_KEYS if k in first.config and same(k)},
            "name": name,
            "k": len(origin),
            "origin": origin,
            "sources": [  # how each was trained
                {"name": b.name, "ref": ref, "config": b.config} for b, ref in zip(banks, refs, strict=True)
            ],
        },
        metrics={"data": first.metrics.get("data"), "merged_from": [b.name for b in banks]},
        edit_defaults=_merged_edit_defaults(banks),
    )
    merged.labels = {t: dict(lab) for t, lab in zip(merged.tokens, labels_in_order, strict=True) if lab}
    return merged


def subset(bank: DirectionBank, keep: list[int]) -> DirectionBank:
    """A new bank of directions `keep` of `bank` (in that order), tokens renumbered <name-j>;
    labels, windows, scales and `config["origin"]` follow their directions; scores are dropped
    (the caller measures or stores the subset's own)."""
    if not keep or any(not 0 <= k < len(bank) for k in keep) or len(set(keep)) != len(keep):
        raise BankError(f"keep {keep}: distinct indices of 0..{len(bank) - 1}, at least one")
    origin = bank.config.get("origin") or [{"bank": bank.name, "token": t} for t in bank.tokens]
    defaults = bank.edit_defaults.dump()
    for key in ("scales", "windows"):
        if key in defaults:
            defaults[key] = [defaults[key][k] for k in keep]
    out = DirectionBank(
        directions=bank.directions[keep].clone(),
        base_model=dict(bank.base_model),
        name=bank.name,
        config={**bank.config, "k": len(keep), "origin": [origin[k] for k in keep]},
        metrics={k: v for k, v in bank.metrics.items() if k != "evaluation"},  # of the whole bank
        edit_defaults=defaults,
    )
    out.labels = {
        out.tokens[j]: dict(bank.labels[bank.tokens[k]])
        for j, k in enumerate(keep)
        if bank.tokens[k] in bank.labels
    }
    return out
