"""Independent pieces of UNet work (one direction's calibration and edits, one half of a training
micro-step's images) spread over a CPU's cores as threads.

A measurement's UNet batches are small (a few images x 2 scales), and on a CPU torch splits such
small ops over its intra-op threads poorly: on 2 cores one 2-thread stream runs the embedded
model at about 115-155 images/s where two 1-thread streams together run 190-215
(docs/benchmarks.md). Torch ops release the GIL, so plain threads, each running its piece with
fewer intra-op threads, use the cores without the start-up and copies of processes.

Each piece's computation is the same whatever thread runs it, so the results equal a sequential
run at the same intra-op thread count, in order. On CUDA, with one torch thread, inside a
stream, or with NOISECLR_STREAMS=1 (several jobs sharing one machine), it is a plain loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from noiseclr.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

MAX_STREAMS = 4  # beyond this the GIL (diffusers' Python between ops) is what the threads wait on
PREFIX = "noiseclr-stream"
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # kept: a training step maps twice
_pools_lock = threading.Lock()


def streams(device: torch.device | str, n_items: int, most: int = MAX_STREAMS) -> int:
    """How many concurrent streams: one per torch thread, at most `most` (and NOISECLR_STREAMS),
    on CPU only, and 1 inside a stream (a stream's work does not fan out again)."""
    if torch.device(device).type != "cpu" or threading.current_thread().name.startswith(PREFIX):
        return 1
    raw = os.environ.get("NOISECLR_STREAMS", "").strip()
    if raw and not (raw.isdigit() and int(raw) >= 1):
        raise ConfigError(f"NOISECLR_STREAMS must be a whole number of threads >= 1, got {raw!r}")
    return max(1, min(torch.get_num_threads(), n_items, most, int(raw) if raw else most))


def _pool(n: int, per_stream: int) -> ThreadPoolExecutor:
    """n threads that each run torch on `per_stream` threads (torch's count is per thread)."""
    with _pools_lock:
        if (n, per_stream) not in _pools:
            _pools[n, per_stream] = ThreadPoolExecutor(n, PREFIX, torch.set_num_threads, (per_stream,))
        return _pools[n, per_stream]


def map_ordered(
    fn: Callable[[T], R],
    items: Iterable[T],
    device: torch.device | str,
    desc: str | None = None,
    progress: bool = True,
    most: int = MAX_STREAMS,
) -> list[R]:
    """[fn(item) for item in items], on `streams` threads that share torch's threads. fn must
    not mutate shared state; the first item's exception, in order, is raised and the items
    not started are dropped."""
    items = list(items)
    n = streams(device, len(items), most)
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
    try:
        if n == 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        futures = [_pool(n, max(1, torch.get_num_threads() // n)).submit(fn, item) for item in items]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    finally:
        bar.close()
