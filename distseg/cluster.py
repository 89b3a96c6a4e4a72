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


MIN_ITEMS_PER_ACTOR = 8


def pool_size(
    configured: int | None, num_items: int, per_actor: int = MIN_ITEMS_PER_ACTOR, cpus: int | None = None
) -> int:
    """Actors of a Ray Data pool over `num_items` items: `configured` where set; otherwise one per
    available CPU of the cluster (`cpus`, default Ray's count), but no more than one per `per_actor`
    items. Each actor of mining or distillation loads torch and its models (about 6-8 CPU-s and 0.7 GB,
    measured for mining's edge network), what mining spends on ~10 images: a 12-image job on a cluster of
    5 logical CPUs ran 5 actors, 4 of them for two or three images each."""
    if configured:
        return configured
    if cpus is None:
        import ray

        cpus = int(ray.available_resources().get("CPU", 1))
    return max(1, min(cpus, -(-num_items // per_actor)))


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --- What a training run needs, and whether the cluster can give it ----------------------------------

INGEST_CPU = 1  # the ingest's Ray Data read / decode / augment tasks, beside the training workers


class ResourceError(RuntimeError):
    """A training plan the cluster cannot run; the message names the settings to change."""


def training_resources(pcfg) -> dict[str, float]:
    """What one pretraining run asks of the cluster (`distseg pretrain`, and each `distseg tune` trial):

    CPU = num_workers * cpus_per_worker + INGEST_CPU      GPU = num_workers if use_gpu else 0
    """
    return {
        "CPU": pcfg.num_workers * pcfg.cpus_per_worker + INGEST_CPU,
        "GPU": pcfg.num_workers if pcfg.use_gpu else 0,
    }


def resources_why(pcfg) -> dict[str, str]:
    """Where each amount of `training_resources` comes from, in config keys (for error messages)."""
    return {
        "CPU": f"pretrain.num_workers={pcfg.num_workers} x cpus_per_worker={pcfg.cpus_per_worker} "
        f"+ {INGEST_CPU} for the ingest",
        "GPU": f"pretrain.num_workers={pcfg.num_workers} x 1 (use_gpu)",
    }


LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # what `ray up` writes on the head (--autoscaling-config)


def autoscaled_types() -> tuple[list[tuple[dict[str, float], int]], str]:
    """(resources, max count) of every node type an autoscaler may start, and where that was read: the
    cluster config the autoscaler reports to the GCS (autoscaler v2, KubeRay; the source Ray Train's own
    pre-start check reads, `ray._private.state`), else the cluster launcher's bootstrap config on the head
    (autoscaler v1; `ray job submit` runs the driver on the head). ([], "") on a fixed cluster."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        groups = [({k: float(v) for k, v in g.resources.items()}, g.max_count) for g in config.node_group_configs]
        return groups, "the autoscaler's node types"
    path = Path(LAUNCHER_CONFIG).expanduser()
    if path.is_file():
        import yaml

        types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
        groups = [
            ({k: float(v) for k, v in (t.get("resources") or {}).items()}, int(t.get("max_workers", 0)))
            for t in types.values()
        ]
        return groups, f"the node types of {LAUNCHER_CONFIG}"
    return [], ""


def cluster_nodes() -> tuple[list[dict[str, float]], str]:
    """Per-node resources the cluster can give, and where that came from: the alive nodes, plus on an
    autoscaling cluster every node the autoscaler may add (`autoscaled_types`, each type's max count).
    That is an upper bound: whether a cloud has the machines is only known when they start, which
    `TrainerSpec.start_attempts` bounds."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    source = f"{len(nodes)} alive node(s)"
    groups, where = autoscaled_types()
    if groups:
        added = 0
        for resources, count in groups:
            count = count if count >= 0 else 64  # -1: unbounded; 64 copies answer any plan distseg makes
            nodes += [resources] * count
            added += count
        source += f" + up to {added} autoscaled node(s) of {len(groups)} type(s) from {where}"
    return nodes, source


def plan_fits(nodes: list[dict[str, float]], num_workers: int, worker: dict[str, float], ingest_cpu: float) -> bool:
    """Whether `num_workers` bundles of `worker` resources fit on `nodes` (each bundle on one node, first
    fit, as Ray places a placement group's bundles) with `ingest_cpu` CPUs left over somewhere."""
    free = [dict(n) for n in nodes]
    for _ in range(num_workers):
        for node in free:
            if all(node.get(k, 0.0) >= v for k, v in worker.items() if v > 0):
                for k, v in worker.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return sum(n.get("CPU", 0.0) for n in free) >= ingest_cpu


def fit_training(cfg, nodes: list[dict[str, float]] | None = None, source: str = ""):
    """The config with a training plan the cluster can run: unchanged when it fits; else, with
    `pretrain.fit_cluster`, `cpus_per_worker` lowered until it does (threads only: the batch, the
    workers and the maths stay as configured); else ResourceError naming the settings to change.

    Ray must be up (`nodes` default: `cluster_nodes()`). Without this a plan that takes every CPU
    starves its own ingest and waits forever ("Cluster resources are not enough to run any task")."""
    if nodes is None:
        nodes, source = cluster_nodes()
    pcfg = cfg.pretrain

    def fits(cpus: int) -> bool:
        worker = {"CPU": float(cpus), "GPU": 1.0 if pcfg.use_gpu else 0.0}
        return plan_fits(nodes, pcfg.num_workers, worker, INGEST_CPU)

    if fits(pcfg.cpus_per_worker):
        return cfg
    if pcfg.fit_cluster:
        for cpus in range(pcfg.cpus_per_worker - 1, 0, -1):
            if fits(cpus):
                print(
                    f"pretrain: the cluster ({source}) cannot give {pcfg.num_workers} worker(s) x "
                    f"{pcfg.cpus_per_worker} CPU + {INGEST_CPU} for the ingest; running with "
                    f"pretrain.cpus_per_worker={cpus} (set pretrain.fit_cluster=false to stop instead)",
                    flush=True,
                )
                cfg = cfg.model_copy(deep=True)
                cfg.pretrain.cpus_per_worker = cpus
                return cfg
    need, why = training_resources(pcfg), resources_why(pcfg)
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    asked = ", ".join(f"{need[k]:g} {k} ({why[k]})" for k in need if need[k] > 0)
    raise ResourceError(
        f"pretraining needs {asked}, each worker's share on one node; the cluster ({source}) can give "
        f"CPU {have['CPU']:g}, GPU {have['GPU']:g} in all, at most CPU {largest.get('CPU', 0):g}, "
        f"GPU {largest.get('GPU', 0):g} on one node. Lower pretrain.num_workers or pretrain.cpus_per_worker"
        + (", set pretrain.use_gpu=false" if pcfg.use_gpu else "")
        + ", or give the cluster more (ray start --num-cpus=N, more or larger worker nodes, a higher max_workers)"
    )
