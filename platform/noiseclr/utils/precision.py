"""Precision names -> torch dtypes. Apart from noiseclr.models.base, which brings diffusers:
the modules a Ray Train controller imports (noiseclr.discovery.step) need this, not diffusers."""

from __future__ import annotations

import torch

from noiseclr.errors import ModelLoadError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str) -> torch.dtype:
    """ "fp32" | "bf16" | "fp16" -> the torch dtype."""
    if precision not in DTYPES:
        raise ModelLoadError(f"precision {precision!r} is not one of {sorted(DTYPES)}")
    return DTYPES[precision]
