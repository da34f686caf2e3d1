"""Ray Data input: image files on any fsspec storage -> decoded pixels -> VAE latents, streamed.

    read_binary_files (fsspec filesystem wrapped for pyarrow)
      -> decode / resize / crop / normalise (corrupt files dropped, counted by an actor)
      -> VAE encode in an actor pool (one GPU each when there are GPUs)
      -> rows {"index", "latent"} that Ray Train workers take with get_dataset_shard

Nothing here materialises the data set; every stage streams. `memory://` works only where the
reading process is the one that wrote it (Ray tasks run in other processes): use file://, s3://
(s3fs) or gs:// (gcsfs) with Ray.
"""

from __future__ import annotations

import contextlib
import logging
import uuid

import fsspec
import numpy as np
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from noiseclr.data.images import IMAGE_SUFFIXES, decode_image
from noiseclr.errors import DataError, StorageError
from noiseclr.utils.configfile import resolve_env

log = logging.getLogger(__name__)
FILES_PER_READ_TASK = 32


@ray.remote(num_cpus=0)
class Counter:
    """Counts corrupt files across decode tasks (fire-and-forget adds, one read at the end).

    Distinct files: after a worker restart the data is read again, and a file is counted once.
    Started on the driver's node (`start_counter`), whose loss ends the run anyway: on a worker
    node it would die with that node and take the run's counts with it."""

    def __init__(self) -> None:
        self.bad: dict[str, str] = {}  # path -> "path: error", first seen first

    def add(self, lines: list[str]) -> None:
        for line in lines:
            self.bad.setdefault(line.rsplit(": ", 1)[0], line)

    def get(self) -> dict:
        return {"corrupt": len(self.bad), "examples": list(self.bad.values())[:20]}


def start_counter():
    """The corrupt-file counter, pinned to this (the driver's) node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Counter.options(scheduling_strategy=here).remote()


def pyarrow_filesystem(uri: str, storage_options: dict | None = None) -> tuple[PyFileSystem, str]:
    """pyarrow view of the fsspec filesystem behind `uri` (what Ray Data and Ray Train take),
    and the path inside it, scheme stripped."""
    fs, root = fsspec.core.url_to_fs(uri, **resolve_env(storage_options or {}))
    return PyFileSystem(FSSpecHandler(fs)), root


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[PyFileSystem, str, list[str]]:
    """pyarrow view of the fsspec filesystem behind `uri`, the root path, and the image paths."""
    pa_fs, root = pyarrow_filesystem(uri, storage_options)
    fs = pa_fs.handler.fs
    try:
        found = fs.exists(root)
    except Exception as err:  # refused credentials, an unreachable endpoint: the cause, in one line
        raise DataError(f"image folder {uri!r} cannot be read ({_first_line(err)})") from None
    if not found:
        raise DataError(f"image folder {uri!r} does not exist")
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {uri!r}")
    return pa_fs, root, paths


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def probe_storage(uri: str, storage_options: dict | None = None) -> None:
    """Write and remove a marker where a run's checkpoints go, before any worker starts: a missing
    bucket, refused credentials or a read-only path is one line naming the URI, instead of a
    failed first checkpoint after the workers have trained."""
    fs, root = fsspec.core.url_to_fs(uri, **resolve_env(storage_options or {}))
    marker = f"{root.rstrip('/')}/.noiseclr-write-probe-{uuid.uuid4().hex}"  # jobs may start together
    try:
        if "file" in fs.protocol:  # object stores have no folders to make (s3fs would make a bucket)
            fs.makedirs(root, exist_ok=True)
        fs.pipe(marker, b"ok")
        with contextlib.suppress(FileNotFoundError):
            fs.rm(marker)
    except Exception as err:
        raise StorageError(
            f"storage.path {uri!r} cannot be written ({_first_line(err)}); check the bucket, the "
            "credentials in storage.options and the permissions"
        ) from None


class DataMetrics:
    """Files the Ray Data decode stage read and dropped (corrupt, truncated, not images)."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Counter

        self.tags = {"run": run}
        self.decoded = Counter("noiseclr_data_files_decoded", "Image files decoded", tag_keys=("run",))
        self.dropped = Counter(
            "noiseclr_data_files_dropped", "Image files dropped as unreadable", tag_keys=("run",)
        )

    def record(self, decoded: int, dropped: int) -> None:
        if decoded:
            self.decoded.inc(decoded, tags=self.tags)
        if dropped:
            self.dropped.inc(dropped, tags=self.tags)


class Decode:
    """bytes -> (3, H, W) float32 in [-1, 1]; rows that do not decode are dropped and counted."""

    def __init__(self, resolution: int, index_of: dict[str, int], counter, run: str = "bank") -> None:
        self.resolution, self.index_of, self.counter = resolution, index_of, counter
        self.metrics = DataMetrics(run)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, index, bad = [], [], []
        for data, path in zip(batch["bytes"], batch["path"], strict=True):
            try:
                img = decode_image(bytes(data), self.resolution)
            except Exception as err:  # corrupt / truncated / not an image: counted, never fatal
                bad.append(f"{path}: {type(err).__name__}")
                continue
            pixels.append(img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
            index.append(self.index_of[path])
        if bad:
            self.counter.add.remote(bad)
        self.metrics.record(len(index), len(bad))
        shape = (0, 3, self.resolution, self.resolution)
        return {
            "index": np.asarray(index, dtype=np.int64),
            "pixels": np.stack(pixels) if pixels else np.zeros(shape, np.float32),
        }


class VaeEncode:
    """Actor-pool stage: loads the base model's VAE once per actor, encodes batches to latents."""

    def __init__(self, model: str) -> None:
        from noiseclr.models.base import load_model

        self.vae = load_model(model, device="auto").pixel_vae

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from noiseclr.data.images import encode_latents

        if len(batch["index"]) == 0:
            return {"index": batch["index"], "latent": np.zeros((0, 1), np.float32)}
        latents = encode_latents(self.vae, torch.from_numpy(batch["pixels"]))
        return {"index": batch["index"], "latent": latents.cpu().numpy()}


def latent_dataset(
    uri: str,
    model: str,
    resolution: int,
    storage_options: dict | None = None,
    encoders: int = 1,
    batch_size: int = 16,
    limit: int | None = None,
    run: str = "bank",
    gpu: bool | None = None,
):
    """The streaming latent dataset and the corrupt-file counter actor; `run` tags the metrics,
    `gpu` says whether the VAE encoders take a GPU (default: when this process sees one)."""
    pa_fs, _, paths = filesystem(uri, storage_options)
    paths = paths[:limit] if limit else paths
    index_of = {p: i for i, p in enumerate(paths)}
    counter = start_counter()
    # Read tasks of a bounded number of files: left to itself Ray Data sizes them by bytes (a
    # 128 MiB block), so a domain of small images becomes a few tasks of thousands of files
    # each, and the first batch waits for a whole task: time to first step grew with N.
    blocks = max(1, -(-len(paths) // FILES_PER_READ_TASK))
    ds = ray.data.read_binary_files(paths, filesystem=pa_fs, include_paths=True, override_num_blocks=blocks)
    ds = ds.map_batches(
        Decode,
        fn_constructor_kwargs={
            "resolution": resolution,
            "index_of": index_of,
            "counter": counter,
            "run": run,
        },
        batch_size=batch_size,
        concurrency=1,
        num_cpus=0.25,
    )
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    # Fractional CPUs on CPU-only machines: the decode and encode actors must fit beside the
    # training workers or the read tasks starve (2 workers + these in 4 logical CPUs).
    ds = ds.map_batches(
        VaeEncode,
        fn_constructor_kwargs={"model": model},
        batch_size=batch_size,
        concurrency=encoders,
        num_gpus=1 if gpu else 0,
        num_cpus=1 if gpu else 0.5,
    )
    return ds, counter, len(paths)
