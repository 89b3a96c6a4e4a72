"""The one Ray Train harness every training stage uses (pretraining, edge training, Tune trials).

Driver side: `build_trainer(loop, loop_config, spec)` returns a `TorchTrainer` named `spec.name` under
`spec.storage` (rerunning the same name resumes: Ray Train restores the last checkpoint). A caller fits
it itself (`trainer.fit()`), or a Ray Tune trial wraps the same construction.

Worker side: `WorkerSession(loop_config, threads)` gives rank, world size, device, the MLflow tracker
(rank 0), resume (`restore`), the report cadence (`due`) and `report`, which saves a checkpoint
folder (distseg.checkpoint's contract) on rank 0 and hands it to Ray Train.

    def loop(loop_config):
        session = WorkerSession(loop_config, threads=cfg.pretrain.cpus_per_worker)
        start = session.restore(model=net, optimizer=opt).get("step", 0)
        for step in range(start, total):
            ...
            if session.due(step + 1, log_every, checkpoint_every, total):
                session.report(step + 1, metrics, states=lambda: {"model": net.state_dict(), ...})
"""

from __future__ import annotations

import os
import resource
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distseg.checkpoint import CheckpointMismatch, git_sha, restore_checkpoint, save_checkpoint
from distseg.config import Config, build_config


@dataclass
class TrainerSpec:
    """How a training run is placed on the cluster and where its checkpoints go."""

    name: str
    storage: str | Path  # a path or a pyarrow filesystem URI (s3://, gs://, file://)
    num_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 0
    num_to_keep: int | None = None
    datasets: dict[str, Any] = field(default_factory=dict)
    # Ray Train retries a worker group that cannot start (60 s each, $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
    # without limit by default: a run asking for more than the cluster has would wait forever. After this
    # many failed starts the run fails, saying so (raise it, or the timeout, on a slowly autoscaling cluster).
    start_attempts: int = 5


def worker_config(cfg: Config, run_id: str | None = None, tracking_uri: str | None = None, **extra: Any) -> dict:
    """The `train_loop_config` every distseg loop takes: the config as plain data, the MLflow run and
    the driver's git sha (workers may run where there is no checkout)."""
    return {
        "config": cfg.model_dump(mode="json"),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "git_sha": git_sha(),
        **extra,
    }


def build_trainer(loop: Callable[[dict], None], loop_config: dict, spec: TrainerSpec, callbacks: list | None = None):
    """A TorchTrainer for `loop`; the same (storage, name) resumes from its last checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=str(spec.storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.num_to_keep),
            failure_config=ray.train.FailureConfig(
                max_failures=spec.max_failures, controller_failure_limit=spec.start_attempts
            ),
            callbacks=callbacks,
        ),
        datasets=spec.datasets or None,
    )


def use_deterministic(flag: bool | None, device: torch.device) -> bool:
    """Switch torch's deterministic algorithms on or off for this process (`flag` None: on for CPU, off for
    CUDA); returns the setting.

    Why it matters on CPU: the backward of an advanced-index gather (`emb[idx]`, as every loss pools or
    samples pixels) is `index_put_(accumulate=True)`, whose multithreaded kernel adds the gradients in
    thread order, so two runs with the same seed drift apart from the first step (measured: the demo's
    loss after 20 steps 2.7187 against 2.7222, and kNN of one seed's checkpoint 0.257-0.308 over reruns).
    The deterministic kernel costs nothing measurable on CPU (0.49 s per demo step either way, 2 threads).
    On CUDA it also needs cuBLAS's fixed workspace (`CUBLAS_WORKSPACE_CONFIG`, set here when absent)
    and some kernels (the bilinear upsampling's backward) have no deterministic version: torch warns
    instead of failing (`warn_only`, on CPU too: a reproducibility aid must not stop a run).

    Every Ray Train loop gets it through `WorkerSession` (pretraining from `pretrain.deterministic`;
    edge training and MaskDistill with the default), the one-device jobs through `LocalStep`."""
    on = device.type != "cuda" if flag is None else bool(flag)
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)
    return on


def resume_refused(name: str, path: str, err: Exception) -> str:
    """The message of a run that cannot resume from its checkpoint `path` (the driver's check before any
    worker starts, and each worker's own when it restores)."""
    return (
        f"run {name!r} cannot resume from {path}: it was saved by a different model, loss or optimizer than "
        f"this config and code build ({str(err).split(': ', 1)[-1]}). Start a new run with another name=..., "
        "or delete that run's folder to start it over."
    )


class WorkerSession:
    """Per-worker context of a distseg Ray Train loop (see the module docstring)."""

    def __init__(self, loop_config: dict, threads: int = 1, seed: int | None = None, deterministic: bool | None = None):
        import ray.train
        import ray.train.torch

        from distseg.tracking import Tracker

        self.loop_config = loop_config
        self.cfg: Config = build_config(loop_config["config"])
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(threads)
        torch.manual_seed((self.cfg.seed if seed is None else seed) + self.rank)
        self.device: torch.device = ray.train.torch.get_device()
        self.on_gpu = self.device.type == "cuda"
        self.deterministic = use_deterministic(deterministic, self.device)
        self.run_id = loop_config.get("run_id")
        self.resumed_from: str | None = None  # the checkpoint `restore` loaded
        uri = loop_config.get("tracking_uri")
        self.tracker = Tracker.attach(self.run_id, uri) if self.rank == 0 and self.run_id and uri else None

    def restore(self, optional: tuple[str, ...] = (), **objects: Any) -> dict:
        """Load the run's last checkpoint into `objects` (name -> object with load_state_dict).

        Returns its meta.json ({} on a fresh start); rank 0 logs the step it resumed at as the MLflow
        metric `resumed_at_step`. A checkpoint saved by another model, loss or optimizer raises
        CheckpointMismatch saying how to start over."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return {}
        self.resumed_from = checkpoint.path
        with checkpoint.as_directory() as folder:
            try:
                meta = restore_checkpoint(folder, self.device, optional=optional, **objects)
            except CheckpointMismatch as err:
                raise CheckpointMismatch(resume_refused(self.cfg.name, checkpoint.path, err)) from None
        if self.tracker and "step" in meta:  # where a restarted worker group (or a rerun) picked up
            self.tracker.log_metrics({"resumed_at_step": meta["step"]}, step=meta["step"])
        return meta

    @staticmethod
    def due(step: int, log_every: int, checkpoint_every: int, total: int) -> tuple[bool, bool]:
        """(report now, checkpoint now) after `step` steps."""
        checkpoint = step % checkpoint_every == 0 or step == total
        return checkpoint or step % log_every == 0, checkpoint

    def report(
        self,
        step: int,
        metrics: dict,
        states: Callable[[], dict] | None = None,
        epoch: int | None = None,
        log: bool = True,
    ) -> None:
        """Log `metrics` to MLflow (rank 0; not with log=False) and Ray Train; with `states`, also save a
        checkpoint.

        `states()` is called on rank 0 only and returns name -> state_dict (model first)."""
        import ray.train

        metrics = {**metrics, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.tracker and log:
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
        metrics = {"step": step, **metrics}
        if states is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                sha = self.loop_config.get("git_sha")
                save_checkpoint(
                    tmp, cfg=self.cfg, step=step, metrics=metrics, epoch=epoch, run_id=self.run_id, sha=sha, **states()
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (what checkpoints hold)."""
    return model.module if hasattr(model, "module") else model


def cluster_cpus(cfg_ray, needed: int) -> None:
    """A local cluster needs room for ingest tasks beside the training workers (sets ray.num_cpus)."""
    if cfg_ray.num_cpus is None and not (cfg_ray.address or os.environ.get("RAY_ADDRESS")):
        cfg_ray.num_cpus = max(os.cpu_count() or 1, needed)
