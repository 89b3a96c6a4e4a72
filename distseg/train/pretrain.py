"""`distseg pretrain`: pixel embeddings from grouping shards with a Ray Train TorchTrainer.

Runs are named by `cfg.name` under `<workdir>/ray_results`; rerunning with the same name resumes from
the last checkpoint (Ray Train restores automatically) and continues the same MLflow run. The final
checkpoint is copied to `<workdir>/checkpoints/<name>/` (model.pt, config.yaml, meta.json, loss.pt), the path
`distseg evaluate --checkpoint` takes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from distseg.config import Config
from distseg.train.ingest import build_dataset, count_rows, repeats_per_epoch
from distseg.train.loop import train_loop_per_worker


@dataclass
class PretrainResult:
    checkpoint: Path
    run_id: str
    metrics: dict
    shards: str


def synthetic_shards(cfg: Config) -> str:
    """Mine the built-in synthetic scenes (written once as PNGs) into shards; return the shards folder."""
    import cv2

    from distseg.data import open_dataset
    from distseg.mine import mine

    workdir = Path(cfg.workdir).resolve()
    images, shards = workdir / "synthetic" / "images", workdir / "synthetic" / "mined"
    dataset = open_dataset("synthetic", num_images=cfg.data.num_images, image_size=cfg.data.image_size, seed=cfg.seed)
    images.mkdir(parents=True, exist_ok=True)
    for image_id in dataset.ids():
        path = images / f"{image_id.replace('/', '_')}.png"
        if not path.exists() and not cv2.imwrite(str(path), dataset[image_id].image[:, :, ::-1]):
            raise OSError(f"could not write {path}")
    mine_cfg = cfg.model_copy(deep=True)
    if cfg.pretrain.prior not in mine_cfg.mine.priors:
        mine_cfg.mine.priors = [*mine_cfg.mine.priors, cfg.pretrain.prior]
    summary = mine(mine_cfg, str(images), str(shards))
    print(f"mined {summary.mined} synthetic images, {summary.errors} errors -> {shards}")
    return str(shards)


def _run_id_file(storage: Path, name: str) -> Path:
    return storage / name / "mlflow_run_id"


def pretrain(cfg: Config, memory_batches: int = 8) -> PretrainResult:
    """Train `cfg.pretrain.method` on the shards in `cfg.pretrain.data` (resumes a run of the same name)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from distseg.cluster import init_ray
    from distseg.tracking import start_run

    if cfg.model.init_from:
        from distseg.models import create_model

        # absolute for the workers, and checked here so a wrong path fails before Ray or mining starts
        cfg = cfg.model_copy(deep=True)
        cfg.model.init_from = str(Path(cfg.model.init_from).resolve())
        create_model(cfg.model)
    pcfg = cfg.pretrain
    workdir = Path(cfg.workdir).resolve()
    ray_cfg = cfg.ray.model_copy()
    if ray_cfg.num_cpus is None and not (ray_cfg.address or os.environ.get("RAY_ADDRESS")):
        # a local cluster needs room for the ingest tasks beside the training workers
        ray_cfg.num_cpus = max(os.cpu_count() or 1, pcfg.num_workers * pcfg.cpus_per_worker + 1)
    init_ray(ray_cfg)
    shards = pcfg.data or synthetic_shards(cfg)
    if "://" not in shards:
        shards = str(Path(shards).resolve())
    cfg = cfg.model_copy(deep=True)
    cfg.pretrain.data = shards
    rows = count_rows(shards)
    repeats = repeats_per_epoch(rows, cfg.pretrain, pcfg.num_workers)
    context = ray.data.DataContext.get_current()
    progress, context.enable_progress_bars = context.enable_progress_bars, False  # per-step bars would flood the log
    dataset = build_dataset(shards, cfg.pretrain, repeats)

    storage = workdir / "ray_results"
    id_file = _run_id_file(storage, cfg.name)
    previous = id_file.read_text().strip() if id_file.is_file() else None
    tags = {"stage": "pretrain", "method": pcfg.method, "shards": shards, "shard_rows": rows}
    with start_run(cfg, run_name=cfg.name, tags=tags, run_id=previous) as tracker:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(tracker.run_id)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "run_id": tracker.run_id,
                "tracking_uri": tracker.uri,
                "memory_batches": memory_batches,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=pcfg.num_workers,
                use_gpu=pcfg.use_gpu,
                resources_per_worker={"CPU": pcfg.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=str(storage),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=pcfg.num_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=pcfg.max_failures),
            ),
            datasets={"train": dataset},
        )
        try:
            result = trainer.fit()
        finally:
            context.enable_progress_bars = progress
        if result.checkpoint is None:
            raise RuntimeError(f"pretraining run {cfg.name} ended without a checkpoint")
        final = workdir / "checkpoints" / cfg.name
        if final.exists():
            shutil.rmtree(final)
        with result.checkpoint.as_directory() as d:
            final.mkdir(parents=True)
            for path in Path(d).iterdir():  # all but the optimizer state: what evaluation needs
                if path.name != "optimizer.pt":
                    shutil.copy2(path, final / path.name)
        meta = json.loads((final / "meta.json").read_text())
        tracker.set_tags({"checkpoint": str(final)})
    return PretrainResult(checkpoint=final, run_id=tracker.run_id, metrics=meta.get("metrics", {}), shards=shards)

