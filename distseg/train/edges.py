"""`distseg edges train`: the learned edge network on BSDS500 with Ray Train.

Each worker holds the (small) training set in memory and draws augmented crops (random scale, 90°
rotations, flips, small-angle rotation) from it; the consensus map (mean of the annotators' boundary
maps) is transformed with the image. The Ray Train set-up, resume, report cadence and checkpoints
(distseg.checkpoint's contract: model.pt, optimizer.pt, config.yaml, meta.json) come from the shared
engine (distseg.train.engine), as for pretraining; all checkpoints are kept, so ODS can be plotted
against training time afterwards. Rerunning with the same name and workdir resumes from the last one.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import torch

from distseg.config import Config, EdgeTrainConfig
from distseg.core.constants import IMAGENET_MEAN, IMAGENET_STD
from distseg.grouping.edgenet import EdgeNet, edge_loss, export_weights
from distseg.storage import absolute
from distseg.train.engine import TrainerSpec, WorkerSession, build_trainer, unwrap, worker_config


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
    crops = [
        random_crop(*pairs[rng.integers(len(pairs))], cfg.crop, cfg.scale_range, rng) for _ in range(cfg.batch_size)
    ]
    images = torch.from_numpy(np.stack([c[0] for c in crops])).permute(0, 3, 1, 2).float().div_(255)
    images = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    consensus = torch.from_numpy(np.stack([c[1] for c in crops]))[:, None]
    return images, consensus


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train.torch

    tcfg = EdgeTrainConfig.model_validate(loop_config["config"]["edge_train"])
    session = WorkerSession(loop_config, threads=tcfg.cpus_per_worker)
    cfg, device = session.cfg, session.device

    net = EdgeNet(tcfg.width)
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scaler = torch.amp.GradScaler(enabled=session.on_gpu)
    start = session.restore(model=unwrap(model), optimizer=optimizer).get("step", 0)

    def schedule(step: int) -> float:  # cosine to 1 % of the peak
        return 0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(step, tcfg.steps) / tcfg.steps))

    pairs = load_training_set(tcfg.root, tcfg.splits)
    t_last, losses = time.perf_counter(), []
    for step in range(start, tcfg.steps):
        rng = np.random.default_rng([cfg.seed, session.rank, step])  # deterministic and resumable
        images, consensus = make_batch(pairs, tcfg, rng)
        images, consensus = images.to(device), consensus.to(device)
        for group in optimizer.param_groups:
            group["lr"] = float(tcfg.lr * schedule(step))  # a plain float: checkpoints load with weights_only
        with torch.autocast(device.type, enabled=session.on_gpu):
            loss = edge_loss(model(images), consensus, tcfg.consensus_threshold)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())

        done = step + 1
        report, checkpoint = session.due(done, tcfg.log_every, tcfg.checkpoint_every, tcfg.steps)
        if not report:
            continue
        elapsed = time.perf_counter() - t_last
        metrics = {
            "loss": float(np.mean(losses)),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "crops_per_s": len(losses) * tcfg.batch_size * session.world / max(elapsed, 1e-9),
        }
        t_last, losses = time.perf_counter(), []

        def states() -> dict:
            return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}

        session.report(done, metrics, states=states if checkpoint else None)


def train_edges(cfg: Config) -> Path:
    """Train the edge network per cfg.edge_train; returns the exported weights file."""
    from distseg.checkpoint import load_state
    from distseg.cluster import init_ray
    from distseg.data import default_data_root
    from distseg.tracking import start_run

    root = cfg.edge_train.root or str(default_data_root() / "bsds500")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"edge_train.root: BSDS500 root not found: {root} (pass --root PATH)")
    from distseg.data.bsds import BSDS500

    for split in cfg.edge_train.splits:  # a wrong layout fails here, naming the folder, before Ray starts
        if not BSDS500(root, split=split).ids():
            raise FileNotFoundError(f"edge_train.root: {root} has no BSDS500 {split!r} images")
    workdir = Path(cfg.workdir).resolve()
    cfg = cfg.model_copy(deep=True)
    cfg.edge_train.root = absolute(root)
    tcfg = cfg.edge_train
    init_ray(cfg.ray)
    # a rerun resumes the Ray Train run from its last checkpoint, and its MLflow run with it
    id_file = str(workdir / "ray_results" / cfg.name / "mlflow_run_id")
    with start_run(cfg, run_name=f"{cfg.name}-train", tags={"stage": "edges.train"}, id_file=id_file) as tracker:
        spec = TrainerSpec(
            name=cfg.name,
            storage=workdir / "ray_results",
            num_workers=tcfg.num_workers,
            cpus_per_worker=tcfg.cpus_per_worker,
            use_gpu=tcfg.use_gpu,
            max_failures=tcfg.max_failures,
            num_to_keep=None,
        )
        result = build_trainer(train_loop_per_worker, worker_config(cfg, tracker.run_id, tracker.uri), spec).fit()
        with result.checkpoint.as_directory() as folder:
            model = EdgeNet(tcfg.width)
            model.load_state_dict(load_state(folder, "model"))
        weights = export_weights(model, workdir / "edgenet.pt")
        tracker.log_artifact(weights)
    return weights
