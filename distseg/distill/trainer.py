"""What the two distillation networks (Mask R-CNN, DeepLab-v3) share: one Ray Train loop on the
shared engine (distseg.train.engine: resume, checkpoints, MLflow), SGD with warm-up and step decay,
the backbone's initialisation, and reading a shard version's rows.

A stage module supplies a `Task` factory, named in the loop config as "module:function" (the loop
must be a plain function Ray can ship, and a task must be built inside the worker):

    task = make_task(cfg, rows, num_classes, rank)   # rows: this worker's shard rows (dicts)
    task.model                                      # the nn.Module trained (and saved as model.pt)
    task.batch(rng) -> inputs                       # one batch for this worker (a numpy Generator)
    task.losses(model, inputs) -> {"loss": ..., <terms>}

Each worker holds its share of the rows (row i goes to worker i mod world) in memory, still encoded,
and draws batches with a generator seeded by (seed, rank, step): a resumed run draws what the
uninterrupted run would have. This is a simplification against pretraining's Ray Data streaming
ingest, sized for the pseudo-labelled sets MaskDistill trains on (PASCAL's 10k images are ~1 GB of
JPEG bytes); a larger set would go through `spec.datasets` the same way pretraining does.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from distseg.config import Config
from distseg.distill.config import DistillTrainConfig
from distseg.storage import absolute
from distseg.train.engine import TrainerSpec, WorkerSession, build_trainer, unwrap, worker_config


@dataclass
class Task:
    model: torch.nn.Module
    batch: Callable[[np.random.Generator], Any]
    losses: Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]


@dataclass
class FitResult:
    checkpoint: Path  # the exported copy: model.pt (weights_only), config.yaml, meta.json
    metrics: dict
    run_id: str
    seconds: float


def read_version(data_uri: str) -> tuple[dict, list[str]]:
    """A finished shard version's manifest and its shard paths (absolute: workers run elsewhere)."""
    from distseg.distill.cluster import read_manifest

    manifest = read_manifest(data_uri)
    base = data_uri.rstrip("/") if "://" in data_uri else str(Path(data_uri).resolve())
    paths = [f"{base}/{s['path']}" for s in manifest.get("shards", [])]
    if not paths:
        raise ValueError(f"{data_uri}: the manifest lists no shards")
    return manifest, paths


def pseudo_classes(manifest: dict, data_uri: str) -> int:
    """K + 1: the clusters of `distseg distill cluster` plus background (0)."""
    cluster = manifest.get("cluster")
    if not cluster:
        raise ValueError(
            f"{data_uri}: not a clustered shard version (its manifest has no 'cluster' entry); "
            "run `distseg distill cluster` (or `distill masks`) first and give its output"
        )
    return int(cluster["clusters"]) + 1


def read_rows(paths: list[str], columns: list[str], rank: int = 0, world: int = 1) -> list[dict]:
    """Rows rank, rank + world, ... of the shards, in manifest order."""
    from distseg.mining.listing import resolve_uri

    rows = []
    for path in paths:
        fs, local = resolve_uri(path)
        rows += pq.read_table(local, filesystem=fs, columns=columns).to_pylist()
    return rows[rank::world]


def read_checkpoint(checkpoint: str | Path, what: str) -> tuple[Config, dict]:
    """(config, model state_dict) of an exported checkpoint; a missing file fails naming it."""
    from distseg.checkpoint import CONFIG, MODEL
    from distseg.config import load_config

    folder = Path(checkpoint)
    for name in (MODEL, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{what} checkpoint {folder}: {name} is missing")
    return load_config(folder / CONFIG), torch.load(folder / MODEL, map_location="cpu", weights_only=True)


def rows_with(rows: list[dict], column: str, field: str, rank: int) -> list[dict]:
    """The rows whose `column` cell has a non-empty `field`; none is an error naming the worker."""
    kept = [r for r in rows if (r.get(column) or {}).get(field)]
    if not kept:
        raise ValueError(f"worker {rank}: none of its shard rows has {column}.{field} to train on")
    return kept


def learning_rate(step: int, tcfg: DistillTrainConfig, milestones: list[int]) -> float:
    """lr x warm-up (linear from warmup_factor) x gamma^(milestones passed); a plain float."""
    lr = tcfg.lr * tcfg.gamma ** sum(step >= m for m in milestones)
    if step < tcfg.warmup_steps:
        alpha = step / tcfg.warmup_steps
        lr *= tcfg.warmup_factor * (1 - alpha) + alpha
    return float(lr)


def load_trunk(trunk: torch.nn.Module, tcfg: DistillTrainConfig, where: str) -> int:
    """Load `tcfg.weights` (a torchvision-ResNet state_dict, optionally under "state_dict") or the
    ResNet trunk of a distseg checkpoint (`tcfg.checkpoint`) into `trunk` (conv1, bn1, layer1..). Returns
    the number of tensors loaded; a file that fits nothing of the trunk fails naming it."""
    if tcfg.weights:
        path = Path(tcfg.weights)
        if not path.is_file():
            raise FileNotFoundError(f"{where}.weights: {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        source = str(path)
    elif tcfg.checkpoint:
        from distseg.checkpoint import CONFIG, MODEL
        from distseg.config import load_config

        folder = Path(tcfg.checkpoint)
        if not (folder / MODEL).is_file():
            raise FileNotFoundError(f"{where}.checkpoint: {folder} has no model.pt (a distseg checkpoint)")
        backbone = load_config(folder / CONFIG).model.backbone
        if backbone != tcfg.backbone:
            raise ValueError(
                f"{where}.checkpoint: {folder} has a {backbone!r} backbone, not {where}.backbone={tcfg.backbone!r}"
            )
        full = torch.load(folder / MODEL, map_location="cpu", weights_only=True)
        prefix = "backbone.body."
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        source = str(folder)
    else:
        return 0
    own = trunk.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ValueError(f"{where}: {source} holds no tensor of a torchvision {tcfg.backbone} trunk")
    trunk.load_state_dict(fitting, strict=False)
    return len(fitting)


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker loop of both distillation stages (see the module docstring)."""
    import ray.train.torch

    stage = loop_config["stage"]
    session = WorkerSession(loop_config, threads=loop_config["threads"])
    cfg = session.cfg
    tcfg: DistillTrainConfig = getattr(cfg.distill, stage)
    module, name = loop_config["task"].split(":")
    rows = read_rows(loop_config["paths"], loop_config["columns"], session.rank, session.world)
    if not rows:
        raise ValueError(f"worker {session.rank}: no training rows (fewer images than {session.world} workers)")
    task: Task = getattr(importlib.import_module(module), name)(cfg, rows, loop_config["num_classes"], session.rank)
    model = ray.train.torch.prepare_model(task.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    total, milestones = loop_config["steps"], loop_config["milestones"]
    start = session.restore(model=unwrap(model), optimizer=optimizer).get("step", 0)
    model.train()
    t_last, sums, count = time.perf_counter(), {}, 0
    for step in range(start, total):
        rng = np.random.default_rng([cfg.seed, session.rank, step])
        inputs = task.batch(rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, tcfg, milestones)
        terms = task.losses(model, inputs)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        done = step + 1
        report, checkpoint = session.due(done, tcfg.log_every, tcfg.checkpoint_every, total)
        if not report:
            continue
        elapsed = time.perf_counter() - t_last
        metrics = {k: v / count for k, v in sums.items()}
        metrics.update(
            lr=float(optimizer.param_groups[0]["lr"]),
            images_per_s=count * tcfg.batch_size * session.world / max(elapsed, 1e-9),
        )
        t_last, sums, count = time.perf_counter(), {}, 0

        def states() -> dict:
            return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}

        session.report(done, metrics, states=states if checkpoint else None)


def fit(
    cfg: Config,
    stage: str,
    task: str,
    data_uri: str,
    columns: list[str],
    num_classes: int,
    steps: int,
    milestones: list[int],
    tags: dict | None = None,
) -> FitResult:
    """Train `cfg.distill.<stage>` with Ray Train under the run name `<cfg.name>-<stage>` (rerunning it
    resumes from its last checkpoint), logged to one MLflow run; export the last checkpoint to
    `<workdir>/checkpoints/<cfg.name>-<stage>`."""
    from distseg.checkpoint import export_checkpoint, read_meta
    from distseg.cluster import init_ray
    from distseg.tracking import start_run
    from distseg.train.engine import cluster_cpus

    t0 = time.perf_counter()
    tcfg: DistillTrainConfig = getattr(cfg.distill, stage)
    _, paths = read_version(data_uri)
    cfg = cfg.model_copy(deep=True)
    section = getattr(cfg.distill, stage)
    section.weights, section.checkpoint = absolute(tcfg.weights), absolute(tcfg.checkpoint)
    cluster_cpus(cfg.ray, tcfg.num_workers * tcfg.cpus_per_worker)
    init_ray(cfg.ray)
    workdir = Path(cfg.workdir).resolve()
    name = f"{cfg.name}-{stage}"
    run_tags = {"stage": f"distill.{stage}", "shards": data_uri, "classes": num_classes, **(tags or {})}
    id_file = str(workdir / "ray_results" / name / "mlflow_run_id")  # a rerun resumes: the same MLflow run
    with start_run(cfg, run_name=name, tags=run_tags, id_file=id_file) as tracker:
        spec = TrainerSpec(
            name=name,
            storage=workdir / "ray_results",
            num_workers=tcfg.num_workers,
            cpus_per_worker=tcfg.cpus_per_worker,
            use_gpu=tcfg.use_gpu,
            max_failures=tcfg.max_failures,
            num_to_keep=tcfg.num_to_keep,
        )
        loop_config = worker_config(
            cfg,
            tracker.run_id,
            tracker.uri,
            stage=stage,
            task=task,
            paths=paths,
            columns=columns,
            num_classes=num_classes,
            steps=steps,
            milestones=milestones,
            threads=tcfg.cpus_per_worker,
        )
        result = build_trainer(train_loop, loop_config, spec).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"{name}: Ray Train finished without a checkpoint ({result.error})")
        with result.checkpoint.as_directory() as folder:
            exported = export_checkpoint(folder, workdir / "checkpoints" / name)
        metrics = read_meta(exported).get("metrics", {})
        seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": seconds})
        tracker.log_artifact(exported / "meta.json")
    return FitResult(exported, metrics, tracker.run_id, seconds)
