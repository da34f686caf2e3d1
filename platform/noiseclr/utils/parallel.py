"""Independent per-direction work (calibrating and editing one direction) spread over the CPU's
cores as threads.

A measurement's UNet batches are small (a few images x 2 scales), and on a CPU torch splits such
small ops over its intra-op threads poorly: on 2 cores one 2-thread stream runs the embedded
model at about 115-155 images/s where two 1-thread streams together run 190-215
(docs/benchmarks.md). Torch ops release the GIL, so plain threads, each running whole directions
with fewer intra-op threads, use the cores without the start-up and copies of processes.

Each direction's computation is the same whatever thread runs it, so the results equal a
sequential run at the same intra-op thread count, in order. On CUDA, or with one thread, it is
a plain loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

MAX_STREAMS = 4  # beyond this the GIL (diffusers' Python between ops) is what the threads wait on


def streams(device: torch.device | str, n_items: int, most: int = MAX_STREAMS) -> int:
    """How many concurrent streams: one per torch thread, at most `most`, on CPU only."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), n_items, most))


def map_ordered(
    fn: Callable[[T], R],
    items: Iterable[T],
    device: torch.device | str,
    desc: str | None = None,
    progress: bool = True,
    most: int = MAX_STREAMS,
) -> list[R]:
    """[fn(item) for item in items], on `streams` threads that share torch's threads (each
    pool thread sets its own count). fn must not mutate shared state; the first item's
    exception, in order, is raised and the items not started are dropped."""
    items = list(items)
    n = streams(device, len(items), most)
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
    if n == 1:
        out = []
        for item in items:
            out.append(fn(item))
            bar.update()
        bar.close()
        return out
    per_stream = max(1, torch.get_num_threads() // n)  # torch's thread count is per thread
    with ThreadPoolExecutor(n, "noiseclr-direction", torch.set_num_threads, (per_stream,)) as pool:
        futures = [pool.submit(fn, item) for item in items]
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
