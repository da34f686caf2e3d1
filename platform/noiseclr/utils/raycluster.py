"""Joining Ray: one rule for every entry point that starts or joins a cluster.

A command run as a Ray job (`noiseclr submit`, a KubeRay RayJob) finds the cluster in
$RAY_ADDRESS and must join it as it is: Ray refuses resource options (`num_cpus`...) when
joining. Run by hand with no address, the command starts a local Ray sized by `local`.
"""

from __future__ import annotations

import os


def init_ray(address: str | None = None, runtime_env: dict | None = None, **local) -> None:
    """ray.init unless already initialised: join `address` or $RAY_ADDRESS, else start locally
    with the `local` options (num_cpus, include_dashboard...)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    options = {"log_to_driver": local.pop("log_to_driver", True)}
    if runtime_env:
        options["runtime_env"] = runtime_env
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(**options, **local)
