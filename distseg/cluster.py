"""Ray start-up: one helper so every stage runs unchanged on a laptop or a cluster.

No address and no $RAY_ADDRESS -> an embedded local cluster; `ray job submit` sets $RAY_ADDRESS, which
`ray.init` then joins. Usage stats are off and logs quiet.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from distseg.config import RayConfig


def verbose() -> bool:
    """$DISTSEG_VERBOSE=1: Ray's own worker and raylet logs on the console too (they always go to its log folder)."""
    return os.environ.get("DISTSEG_VERBOSE", "0") not in ("", "0", "false")


def quiet_logs() -> None:
    """Unless `verbose()`: Ray Data's per-dataset progress log and MLflow's database set-up lines stay off
    the console (the stages print their own progress; warnings and errors still show)."""
    if not verbose():
        # Ray Data re-applies its logging config for each dataset, so its console level is set in that
        # config (here, before ray.data is imported; re-applied if it already was), not on the logger
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).parent / "core" / "ray_data_logging.yaml"))
        if "ray.data" in sys.modules:
            from ray.data._internal.logging import configure_logging

            configure_logging()
        for name in ("ray.train", "ray.tune", "mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # advice about Ray's own switches, not about the run: that Ray Data's progress bars are off (the
        # stages print their own) and that a local cluster turned token auth on (the safe default)
        for name in ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup"):
            logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(cfg: RayConfig | None = None, **kwargs) -> None:
    """Initialise Ray once per process (a no-op when it already is).

    The console is for people: unless `verbose()`, the workers' and raylets' output stays in Ray's log
    folder (printed once here) and each stage shows its own progress; a failure in a worker still
    reaches the driver as the exception it raised, with its traceback."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    quiet_logs()
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    options: dict = dict(logging_level=logging.WARNING, log_to_driver=verbose())
    if not address:  # these only apply to a cluster this process starts
        options.update(num_cpus=cfg.num_cpus, include_dashboard=False)
        # Ray Data reserves CPUs through a cluster-wide coordinator and renews the request every ~10 s; a
        # dataset whose executor is torn down with its actor (a Train run that ends, a Tune trial that ASHA
        # stops) leaves its reservation until it expires, 180 s by default, and the next run's ingest waits
        # for it ("Cluster resources are not enough ... may hang forever"). 30 s keeps renewals safe.
        os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")
    options.update(kwargs)
    # "local": always a cluster of this process's own, never one a `ray start` left running on the machine
    # (a plain ray.init() joins that one); to join a running cluster, set ray.address or $RAY_ADDRESS
    context = ray.init(address=address or "local", **options)
    if not options["log_to_driver"]:
        logs = getattr(context, "address_info", {}).get("session_dir")
        where = f"{logs}/logs" if logs else "the Ray session's logs folder"
        print(f"Ray: workers' logs in {where} (DISTSEG_VERBOSE=1 shows them here)", flush=True)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
