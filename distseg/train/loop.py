"""The Ray Train worker loop of `distseg pretrain`.

Each step: both views of the worker's batch go through the network in one forward pass (so DDP sees
one forward per backward), the segment maps are resized (nearest) to the embedding resolution, and
the configured loss is applied. Loss parameters (the concepts dictionary) are not inside DDP: their
gradients are averaged across workers by hand. A loss with `uses_key_encoder` gets the embeddings of
an EMA copy of the network. Checkpoints follow the DESIGN.md contract; everything needed to resume
(optimizer, loss state, key encoder) is saved beside `model.pt`.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distseg.config import Config, PretrainConfig, to_yaml

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class CheckpointMismatch(RuntimeError):
    """A run's last checkpoint does not fit the network, loss or optimizer being resumed."""


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """The learning rate after `step` optimizer steps (warm-up, then the configured schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(step, cfg.steps) / cfg.steps
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** sum(t >= m for m in cfg.step_milestones)
    if cfg.schedule == "poly":
        return cfg.lr * (1 - t) ** cfg.poly_power
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + np.cos(np.pi * t))
    return cfg.lr


def build_loss(cfg: Config) -> torch.nn.Module:
    from distseg.losses import create_loss

    method = cfg.pretrain.method
    kwargs = getattr(cfg.losses, method).model_dump() if hasattr(cfg.losses, method) else {}
    if method in ("concepts", "maskcontrast"):
        kwargs["dim"] = cfg.model.embed_dim
    return create_loss(method, **kwargs)


def make_optimizer(params, cfg: PretrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def to_views(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, ...]:
    """Normalised (2B, 3, S, S) images (view 1 then view 2) and the two (B, S, S) segment maps."""
    images = torch.cat([batch["view1"], batch["view2"]]).to(device, non_blocking=True).float().div_(255)
    images = (images - MEAN.to(device)) / STD.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["seg1"].to(device).long(), batch["seg2"].to(device).long(), batch["dist"].to(device).float()


def resize_segments(seg: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(seg[:, None].float(), size=size, mode="nearest")[:, 0].long()


def save_checkpoint(folder: Path, state: dict, cfg: Config, step: int, metrics: dict, run_id: str | None) -> None:
    torch.save(state["model"], folder / "model.pt")
    torch.save(state["optimizer"], folder / "optimizer.pt")
    torch.save(state["loss"], folder / "loss.pt")
    if state.get("key_encoder") is not None:
        torch.save(state["key_encoder"], folder / "key_encoder.pt")
    (folder / "config.yaml").write_text(to_yaml(cfg))
    meta = {
        "step": step,
        "epoch": state.get("epoch"),
        "metrics": metrics,
        "git_sha": os.environ.get("DISTSEG_GIT_SHA"),
        "mlflow_run_id": run_id,
        "time": time.time(),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _batches(loop_config: dict, cfg: PretrainConfig, world: int):
    """Endless batches from the worker's dataset shard (or from a cache of them: the memory baseline)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    cache = [] if cfg.ingest == "memory" else None
    epoch = 0
    while True:
        seen = 0
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, local_shuffle_buffer_size=cfg.shuffle_buffer or None
        )
        for batch in batches:
            seen += 1
            if cache is not None:
                cache.append(batch)
                if len(cache) >= loop_config.get("memory_batches", 8):
                    break
                continue
            yield epoch, batch
        if seen == 0:
            raise RuntimeError(
                f"a worker got no full batch: the shards hold too few usable images for batch_size={cfg.batch_size} "
                f"x {world} workers (images without segments for prior {cfg.prior!r} are skipped)"
            )
        if cache is not None:
            while True:  # in-memory baseline: cycle the cached tensors forever
                for batch in cache:
                    yield epoch, batch
        epoch += 1


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from distseg.config import build_config
    from distseg.models import create_model
    from distseg.tracking import Tracker

    cfg = build_config(loop_config["config"])
    pcfg = cfg.pretrain
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(pcfg.cpus_per_worker)
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    net = create_model(cfg.model)
    if on_gpu:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)
    loss_fn = build_loss(cfg).to(device)
    key_encoder = None
    if getattr(loss_fn, "uses_key_encoder", False):
        # train mode (batch statistics) as MoCo's key encoder: in eval mode its BN would use running
        # statistics that lag far behind the query's (EMA of an EMA) and put the keys on another scale
        key_encoder = copy.deepcopy(net).to(device).train()
        for p in key_encoder.parameters():
            p.requires_grad_(False)
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    optimizer = make_optimizer(list(model.parameters()) + loss_params, pcfg)
    scaler = torch.amp.GradScaler(enabled=on_gpu)

    start, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            d = Path(d)
            try:
                net.load_state_dict(torch.load(d / "model.pt", map_location=device, weights_only=True))
                optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
                loss_fn.load_state_dict(torch.load(d / "loss.pt", map_location=device, weights_only=True))
                if key_encoder is not None and (d / "key_encoder.pt").is_file():
                    key_encoder.load_state_dict(torch.load(d / "key_encoder.pt", map_location=device, weights_only=True))
            except (RuntimeError, ValueError, KeyError) as err:
                raise CheckpointMismatch(
                    f"run {cfg.name!r} cannot resume from {checkpoint.path}: it was saved by a different model, loss "
                    f"or optimizer than this config and code build ({str(err).splitlines()[0]}). Start a new run "
                    f"with another name=..., or delete that run's folder to start it over."
                ) from None
            meta = json.loads((d / "meta.json").read_text())
            start, epoch = meta["step"], meta.get("epoch") or 0

    run_id = loop_config.get("run_id")
    tracker = Tracker.attach(run_id, loop_config["tracking_uri"]) if rank == 0 and run_id else None
    sums: dict[str, float] = defaultdict(float)
    count, t_last = 0, time.perf_counter()
    batches = _batches(loop_config, pcfg, world)
    step = start
    while step < pcfg.steps:
        epoch, batch = next(batches)
        images, seg1, seg2, dist = to_views(batch, device, on_gpu)
        lr = float(lr_at(step, pcfg))  # a plain float: optimizer state loads with weights_only
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, enabled=on_gpu):
            emb = model(images)
        emb = emb.float()
        emb1, emb2 = emb.chunk(2)
        size = tuple(emb.shape[-2:])
        seg1, seg2 = resize_segments(seg1, size), resize_segments(seg2, size)
        keys = {}
        if key_encoder is not None:
            with torch.no_grad(), torch.autocast(device.type, enabled=on_gpu):
                k1, k2 = key_encoder(images).float().chunk(2)
            keys = {"key1": k1, "key2": k2}
        terms = loss_fn(emb1, emb2, seg1, seg2, dist=dist, **keys)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        if world > 1 and loss_params:
            for p in loss_params:
                if p.grad is None:  # every rank must join each all_reduce, with or without a gradient
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)
        scaler.step(optimizer)
        scaler.update()
        if key_encoder is not None:
            with torch.no_grad():
                m = float(loss_fn.momentum)
                for pk, pq in zip(key_encoder.state_dict().values(), net.state_dict().values()):
                    if pk.dtype.is_floating_point:
                        pk.mul_(m).add_(pq.detach(), alpha=1 - m)
                    else:
                        pk.copy_(pq)
        for name, value in terms.items():
            sums[name] += float(value.detach())
        count += 1
        step += 1

        report = step % pcfg.log_every == 0 or step % pcfg.checkpoint_every == 0 or step == pcfg.steps
        if not report:
            continue
        elapsed = time.perf_counter() - t_last
        metrics = {k: v / count for k, v in sums.items()}
        metrics.update(step=step, epoch=epoch, lr=lr, images_per_s=count * pcfg.batch_size * world / max(elapsed, 1e-9),
                       peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
        if not all(np.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {metrics}")
        sums.clear()
        count, t_last = 0, time.perf_counter()
        if tracker:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if step % pcfg.checkpoint_every == 0 or step == pcfg.steps:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    state = {
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "loss": loss_fn.state_dict(),
                        "key_encoder": key_encoder.state_dict() if key_encoder is not None else None,
                        "epoch": epoch,
                    }
                    save_checkpoint(Path(tmp), state, cfg, step, metrics, run_id)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
