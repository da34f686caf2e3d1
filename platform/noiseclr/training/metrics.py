"""Ray metrics of a distributed discovery run, for Prometheus and dashboards/discovery.json.

Recorded by the Ray Train workers through `ray.util.metrics` (the Ray Data decode stage's are
`data/ray_input.DataMetrics`);
each node's Ray metrics agent exports them (names gain Ray's `ray_` prefix). Tags: `run` (the
job's name) and, where workers differ, `rank`. The single-process path logs to MLflow only.
"""

from __future__ import annotations

import psutil  # a Ray dependency
import torch

STEP_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]


class DiscoveryMetrics:
    """One worker's training metrics: loss, pairs/s, step time, images, memory."""

    def __init__(self, run: str, rank: int, device: torch.device) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"run": run, "rank": str(rank)}
        self.device, self.process = device, psutil.Process()
        keys = ("run", "rank")
        self.loss = Gauge("noiseclr_discovery_loss", "NoiseCLR loss of the last step", tag_keys=keys)
        self.pairs = Gauge(
            "noiseclr_discovery_pairs_per_s",
            "Image x direction pairs per second (global batch)",
            tag_keys=keys,
        )
        self.step_seconds = Histogram(
            "noiseclr_discovery_step_seconds", "Wall time of one optimizer step (s)", STEP_BOUNDARIES, keys
        )
        self.steps = Counter("noiseclr_discovery_steps", "Optimizer steps this worker did", tag_keys=keys)
        # The run's position: after a restart from a checkpoint the counter above starts again.
        self.step = Gauge("noiseclr_discovery_step", "The run's current optimizer step", tag_keys=keys)
        self.images = Counter("noiseclr_discovery_images", "Images this worker trained on", tag_keys=keys)
        self.memory = Gauge(
            "noiseclr_discovery_memory_bytes",
            "Worker memory: peak GPU allocation (kind=gpu_allocated) or host RSS (kind=host_rss)",
            tag_keys=(*keys, "kind"),
        )

    def record_step(self, step: int, loss: float, pairs_per_s: float, seconds: float, images: int) -> None:
        self.step.set(step, tags=self.tags)
        self.loss.set(loss, tags=self.tags)
        self.pairs.set(pairs_per_s, tags=self.tags)
        self.step_seconds.observe(seconds, tags=self.tags)
        self.steps.inc(1, tags=self.tags)
        self.images.inc(images, tags=self.tags)
        if self.device.type == "cuda":
            self.memory.set(
                torch.cuda.max_memory_allocated(self.device), tags={**self.tags, "kind": "gpu_allocated"}
            )
        self.memory.set(self.process.memory_info().rss, tags={**self.tags, "kind": "host_rss"})
