"""Ray start-up: one helper so every stage runs unchanged on a laptop or a cluster.

No address and no $RAY_ADDRESS -> an embedded local cluster; `ray job submit` sets $RAY_ADDRESS, which
`ray.init` then joins. Usage stats are off and logs quiet.
"""

from __future__ import annotations

import logging
import os

from distseg.config import RayConfig


def init_ray(cfg: RayConfig | None = None, **kwargs) -> None:
    """Initialise Ray once per process (a no-op when it already is)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    options: dict = dict(logging_level=logging.WARNING)
    if not address:  # these only apply to a cluster this process starts
        options.update(num_cpus=cfg.num_cpus, include_dashboard=False)
        # Ray Data reserves CPUs through a cluster-wide coordinator and renews the request every ~10 s; a
        # dataset whose executor is torn down with its actor (a Train run that ends, a Tune trial that ASHA
        # stops) leaves its reservation until it expires, 180 s by default, and the next run's ingest waits
        # for it ("Cluster resources are not enough ... may hang forever"). 30 s keeps renewals safe.
        os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")
    options.update(kwargs)
    ray.init(address=address, **options)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
