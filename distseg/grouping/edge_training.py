"""`distseg edges train`: the learned edge network on BSDS500 with Ray Train.

Each worker holds the (small) training set in memory and draws augmented crops (random scale, 90°
rotations, flips, small-angle rotation) from it; the consensus map (mean of the annotators' boundary
maps) is transformed with the image. Checkpoints follow the DESIGN.md contract (model.pt, config.yaml,
meta.json) and are all kept, so ODS can be plotted against training time afterwards. Rerunning with
the same name and workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from distseg.config import Config, EdgeTrainConfig, to_yaml
from distseg.grouping.edgenet import MEAN, STD, EdgeNet, edge_loss, export_weights


def load_training_set(root: str | Path, splits: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, consensus) pairs: consensus = fraction of annotators marking each pixel a boundary."""
    from distseg.data.bsds import BSDS500

    pairs = []
    for split in splits:
        for sample in BSDS500(root, split=split):
            boundaries = np.stack([b.astype(np.float32) > 0 for b in sample.meta["boundaries"]])
            pairs.append((sample.image, boundaries.mean(0).astype(np.float32)))
    if not pairs:
        raise ValueError(f"no BSDS500 training images under {root} for splits {splits}")
    return pairs


def random_crop(
    image: np.ndarray, consensus: np.ndarray, crop: int, scale_range: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (image, consensus) crop; the label map follows every geometric change."""
    scale = rng.uniform(*scale_range)
    angle = rng.choice([0, 90, 180, 270]) + rng.uniform(-15, 15)
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    # keep the whole rotated image in view, then crop inside it
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    out_w, out_h = int(height * sin + width * cos), int(height * cos + width * sin)
    matrix[0, 2] += out_w / 2 - width / 2
    matrix[1, 2] += out_h / 2 - height / 2
    img = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # bilinear warping spreads a 1-px boundary over ~2 px; rescale so a unanimous boundary stays ~1
    con = cv2.warpAffine(consensus, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    con = np.clip(con * 2.0, 0, 1)
    if out_h < crop or out_w < crop:
        pad_h, pad_w = max(0, crop - out_h), max(0, crop - out_w)
        img = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT)
        con = cv2.copyMakeBorder(con, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT)
        out_h, out_w = img.shape[:2]
    y = rng.integers(0, out_h - crop + 1)
    x = rng.integers(0, out_w - crop + 1)
    img, con = img[y : y + crop, x : x + crop], con[y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        img, con = img[:, ::-1], con[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(con)


def make_batch(pairs, cfg: EdgeTrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    crops = [random_crop(*pairs[rng.integers(len(pairs))], cfg.crop, cfg.scale_range, rng) for _ in range(cfg.batch_size)]
    images = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2).float().div_(255)
    images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    consensus = torch.from_numpy(np.stack([c[1] for c in crops]))[:, None]
    return images, consensus


def _save_checkpoint(directory: Path, model: EdgeNet, optimizer, step: int, cfg: Config, metrics: dict) -> None:
    torch.save(model.state_dict(), directory / "model.pt")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "config.yaml").write_text(to_yaml(cfg))
    meta = {"step": step, "epoch": None, "metrics": metrics, "git_sha": os.environ.get("DISTSEG_GIT_SHA"), "time": time.time()}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from distseg.config import build_config
    from distseg.tracking import Tracker

    cfg = build_config(loop_config["config"])
    tcfg = cfg.edge_train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(tcfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"

    model = ray.train.torch.prepare_model(EdgeNet(tcfg.width))
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    schedule = lambda step: 0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(step, tcfg.steps) / tcfg.steps))  # noqa: E731
    scaler = torch.amp.GradScaler(enabled=use_amp)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.load_state_dict(torch.load(Path(d) / "model.pt", weights_only=True))
            optimizer.load_state_dict(torch.load(Path(d) / "optimizer.pt", weights_only=True))
            start = json.loads((Path(d) / "meta.json").read_text())["step"]

    pairs = load_training_set(tcfg.data, tcfg.splits)
    tracker = Tracker.attach(loop_config["run_id"], loop_config["tracking_uri"]) if rank == 0 and loop_config.get("run_id") else None
    t_last, losses = time.perf_counter(), []
    for step in range(start, tcfg.steps):
        rng = np.random.default_rng([cfg.seed, rank, step])  # deterministic and resumable
        images, consensus = make_batch(pairs, tcfg, rng)
        images, consensus = images.to(device), consensus.to(device)
        for group in optimizer.param_groups:
            group["lr"] = float(tcfg.lr * schedule(step))  # a plain float: checkpoints load with weights_only
        with torch.autocast(device.type, enabled=use_amp):
            loss = edge_loss(model(images), consensus, tcfg.consensus_threshold)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())

        done = step + 1
        if done % tcfg.log_every and done % tcfg.checkpoint_every and done != tcfg.steps:
            continue
        elapsed = time.perf_counter() - t_last
        metrics = {
            "step": done,
            "loss": float(np.mean(losses)),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "crops_per_s": len(losses) * tcfg.batch_size * world / max(elapsed, 1e-9),
        }
        t_last, losses = time.perf_counter(), []
        if tracker:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
        if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    _save_checkpoint(Path(tmp), model.module if hasattr(model, "module") else model, optimizer, done, cfg, metrics)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)


def train_edges(cfg: Config) -> Path:
    """Train the edge network per cfg.edge_train; returns the exported weights file."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from distseg.cluster import init_ray
    from distseg.tracking import start_run

    tcfg = cfg.edge_train
    if not Path(tcfg.data).is_dir():
        raise FileNotFoundError(f"edge_train.data: BSDS500 root not found: {tcfg.data} (pass --data PATH)")
    workdir = Path(cfg.workdir).resolve()
    # Ray Train workers run in their own working directory: hand them absolute paths
    cfg = cfg.model_copy(deep=True)
    cfg.edge_train.data = str(Path(tcfg.data).resolve())
    init_ray(cfg.ray)
    with start_run(cfg, run_name=f"{cfg.name}-train", tags={"stage": "edges.train"}) as tracker:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "run_id": tracker.run_id, "tracking_uri": tracker.uri},
            scaling_config=ray.train.ScalingConfig(
                num_workers=tcfg.num_workers,
                use_gpu=tcfg.use_gpu,
                resources_per_worker={"CPU": tcfg.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=str(workdir / "ray_results"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
                failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            ),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            model = EdgeNet(tcfg.width)
            model.load_state_dict(torch.load(Path(d) / "model.pt", weights_only=True))
        weights = export_weights(model, workdir / "edgenet.pt")
        tracker.log_artifact(weights)
    return weights
