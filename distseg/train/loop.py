"""The Ray Train worker loop of `distseg pretrain`: generic, it names no method.

Each step: the worker's batch becomes `Views` (both augmented views normalised, segment maps, d_T,
image ids), the method (distseg.methods) turns them into loss terms, one backward and optimizer
step follow, then the method's `after_step` (e.g. a momentum-encoder update). Loss parameters (the
concepts dictionary) are not inside DDP: their gradients are averaged across workers by hand.
Checkpoints follow distseg.checkpoint's contract: model.pt, optimizer.pt, loss.pt and the method's
extra state (key_encoder.pt) with config.yaml and meta.json; reports go through the shared engine.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from distseg.checkpoint import CheckpointMismatch
from distseg.config import PretrainConfig
from distseg.core.constants import IMAGENET_MEAN, IMAGENET_STD
from distseg.methods import Method, Views, create_method
from distseg.train.engine import WorkerSession, resume_refused, use_deterministic
from distseg.train.probe import build_probe

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


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


def make_optimizer(params, cfg: PretrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def to_views(batch: dict, device: torch.device, channels_last: bool = False) -> Views:
    """The ingest batch (distseg.train.ingest) on the device as the methods' `Views`."""
    images = torch.cat([batch["view1"], batch["view2"]]).to(device, non_blocking=True).float().div_(255)
    images = (images - MEAN.to(device)) / STD.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    ids = batch.get("image_index")
    coords = {k: batch[k].to(device) for k in ("coord1", "coord2") if k in batch}
    return Views(
        images=images,
        seg1=batch["seg1"].to(device).long(),
        seg2=batch["seg2"].to(device).long(),
        dist=batch["dist"].to(device).float(),
        image_ids=ids.to(device).long() if ids is not None else None,
        **coords,
    )


def build_step(
    cfg, device: torch.device, wrap: Callable[[torch.nn.Module, torch.nn.Module], None] | None = None
) -> tuple[Method, torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """(method, network, loss, optimizer) on one device, as each worker of train_loop_per_worker builds
    them: what a run's checkpoint is restored into. `wrap(net, loss)` (the worker's `SameStart`: DDP,
    rank 0's weights and loss state on every rank) runs once both exist and before the method's `setup`,
    so what setup derives from them (MaskContrast's key encoder) is the same on every rank."""
    method = create_method(cfg)
    net = method.build_model().to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    loss_fn = method.build_loss().to(device)
    if wrap is not None:
        wrap(net, loss_fn)
    method.setup(net, loss_fn, device)
    params = list(net.parameters()) + [p for p in loss_fn.parameters() if p.requires_grad]
    return method, net, loss_fn, make_optimizer(params, cfg.pretrain)


class SameStart:
    """build_step's `wrap` for a worker of `world`: `prepare` the network (Ray Train's prepare_model:
    DDP, whose constructor copies rank 0's weights to every rank) into `.model`, and copy rank 0's loss
    parameters and buffers (the concepts dictionary, MaskContrast's queue) to every rank. Each rank
    seeds its RNG with seed + rank, and the loss's gradients are averaged by hand outside DDP: without
    this copy each rank would train its own dictionary from its own random start."""

    def __init__(self, prepare: Callable[[torch.nn.Module], torch.nn.Module], world: int):
        self.prepare, self.world = prepare, world
        self.model: torch.nn.Module | None = None

    def __call__(self, net: torch.nn.Module, loss_fn: torch.nn.Module) -> None:
        self.model = self.prepare(net)
        if self.world > 1:
            for tensor in [*loss_fn.parameters(), *loss_fn.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)


def check_resumable(cfg, checkpoint: str | Path) -> None:
    """Load `checkpoint` (a local folder) into the network, loss, optimizer and method state that `cfg`
    builds, on the CPU, as a worker resuming from it will: CheckpointMismatch if any does not fit. The
    network is built without its init files (`model.weights`, `model.init_from`): the checkpoint replaces
    those weights, and they need not be readable where this runs."""
    from distseg.checkpoint import restore_checkpoint

    cfg = cfg.model_copy(deep=True)
    cfg.model.weights = cfg.model.init_from = None
    with torch.random.fork_rng(devices=[]):  # building the network draws random weights: leave the caller's RNG
        step = build_step(cfg, torch.device("cpu"))
    restore_step(lambda **objects: restore_checkpoint(checkpoint, "cpu", **objects), *step, source=str(checkpoint))


def restore_step(
    restore, method: Method, net, loss_fn, optimizer, source: str, refuse: Callable[[Exception], str] | None = None
) -> dict:
    """Load a checkpoint into what build_step built: network, optimizer, loss and the method's extra
    state. `restore(optional=..., **objects)` reads it (restore_checkpoint bound to a folder, or
    WorkerSession.restore); returns its meta.json ({} when there is none). Extra state the method
    cannot take raises CheckpointMismatch naming `source`, as a misfit of the others does; `refuse(err)`,
    when given, writes that message instead (the worker's: engine.resume_refused, which says what to do).

    The optimizer's state (moments, momentum buffers) comes from the checkpoint, its hyperparameters
    (weight decay, betas) from the config that resumes, as the learning rate does at every step:
    torch's load_state_dict would otherwise keep the saved ones and silently ignore a changed
    `pretrain.weight_decay`."""
    extra = method.extra_state()
    holders = {name: _StateHolder() for name in extra}
    meta = restore(optional=tuple(extra), model=net, optimizer=optimizer, loss=loss_fn, **holders)
    for group in optimizer.param_groups:
        group.update({k: v for k, v in optimizer.defaults.items() if k in group})
    try:
        method.load_extra_state({name: h.state for name, h in holders.items() if h.state is not None})
    except (RuntimeError, ValueError, KeyError) as err:
        found = CheckpointMismatch(f"checkpoint {source}: {str(err).strip()}".splitlines()[0])
        raise (CheckpointMismatch(refuse(found)) if refuse else found) from None
    return meta


class LocalStep:
    """One process, one device, no Ray: the loop's step (views -> method -> GradScaler -> optimizer ->
    `after_step`) for jobs/benchmark_device.py and jobs/pretrain_local.py."""

    def __init__(self, cfg, device: torch.device, amp: bool):
        torch.manual_seed(cfg.seed)
        use_deterministic(cfg.pretrain.deterministic, device)
        self.cfg, self.device, self.amp = cfg, device, amp
        self.method, self.net, self.loss_fn, self.optimizer = build_step(cfg, device)
        self.scaler = torch.amp.GradScaler(enabled=amp and device.type == "cuda")

    def __call__(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        views = to_views(batch, self.device, self.device.type == "cuda")
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr_at(step, self.cfg.pretrain))
        terms = self.method.forward(self.net, views, amp=self.amp)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step()
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in terms.items()}


def _batches(cfg: PretrainConfig, world: int, memory_batches: int = 0, seed: int = 0):
    """Endless (epoch, batch) from the worker's dataset shard; with `memory_batches`, the first N
    batches are cached and cycled (the in-memory baseline of jobs/benchmark_training.py). The dataset
    covers the rest of the run (ingest.passes_needed, one pass to spare); should a worker's shard run dry
    before the last step, it is read again (`epoch` counts those readings)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    cache = [] if memory_batches else None
    epoch = 0
    while True:
        seen = 0
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(seed * 7919 + epoch) if cfg.shuffle_buffer else None,
        )
        for batch in batches:
            seen += 1
            if cache is not None:
                cache.append(batch)
                if len(cache) >= memory_batches:
                    break
                continue
            yield epoch, batch
        if seen == 0:
            raise RuntimeError(
                f"a worker got no full batch: the shards hold too few usable images for batch_size={cfg.batch_size} "
                f"x {world} workers (images without segments for prior {cfg.prior!r} are skipped)"
            )
        if cache is not None:
            while True:
                for batch in cache:
                    yield epoch, batch
        epoch += 1


def _average_loss_grads(params: list[torch.nn.Parameter], world: int) -> None:
    for p in params:
        if p.grad is None:  # every rank must join each all_reduce, with or without a gradient
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train.torch

    cfg_data = loop_config["config"]
    pcfg = PretrainConfig.model_validate(cfg_data["pretrain"])
    session = WorkerSession(loop_config, threads=pcfg.cpus_per_worker, deterministic=pcfg.deterministic)
    cfg, device = session.cfg, session.device
    if session.rank == 0 and loop_config.get("placement_group_file"):
        record_placement_group(loop_config["placement_group_file"])

    start = SameStart(ray.train.torch.prepare_model, session.world)
    method, net, loss_fn, optimizer = build_step(cfg, device, start)
    model = start.model  # DDP (more than one worker) over the same parameters the optimizer holds
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(enabled=session.on_gpu)

    meta = restore_step(
        session.restore, method, net, loss_fn, optimizer, source=f"of run {cfg.name!r}",
        refuse=lambda err: resume_refused(cfg.name, session.resumed_from, err),
    )  # fmt: skip
    step, epoch = meta.get("step", 0), meta.get("epoch") or 0
    if step >= pcfg.steps and meta.get("metrics"):
        # restored at its end (a Tune trial whose training ended just before its sweep was killed): the loop
        # trains nothing, so report the last checkpoint's metrics once, to Ray Train only (MLflow has them);
        # Tune needs a result with its metric from every trial it runs, or the resumed sweep fails
        session.report(step, {k: v for k, v in meta["metrics"].items() if k != "step"}, epoch=epoch, log=False)

    probe = build_probe(cfg) if pcfg.probe_every and session.rank == 0 else None
    probed: dict[str, float] = {}  # the last probe's metrics, carried into every report (Tune needs them in each)

    sums: dict[str, float] = defaultdict(float)
    count, t_last = 0, time.perf_counter()
    memory = pcfg.memory_batches if pcfg.ingest == "memory" else 0
    batches = _batches(pcfg, session.world, memory, seed=cfg.seed * 1000 + session.rank)
    while step < pcfg.steps:
        epoch, batch = next(batches)
        if "pass" in batch and len(batch["pass"]):  # passes over the shards: the dataset covers the whole run
            epoch = int(batch["pass"].min())
        views = to_views(batch, device, session.on_gpu)
        lr = float(lr_at(step, pcfg))  # a plain float: optimizer state loads with weights_only
        for group in optimizer.param_groups:
            group["lr"] = lr
        terms = method.forward(model, views, amp=session.on_gpu)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        if session.world > 1 and loss_params:
            _average_loss_grads(loss_params, session.world)
        scaler.step(optimizer)
        scaler.update()
        method.after_step()
        for name, value in terms.items():
            sums[name] += float(value.detach())
        count += 1
        step += 1

        report, checkpoint = session.due(step, pcfg.log_every, pcfg.checkpoint_every, pcfg.steps)
        probe_due = bool(pcfg.probe_every) and (step % pcfg.probe_every == 0 or step == pcfg.steps)
        if not (report or probe_due):
            continue
        elapsed = time.perf_counter() - t_last
        metrics = {k: v / count for k, v in sums.items()}
        metrics.update(epoch=epoch, lr=lr, images_per_s=count * pcfg.batch_size * session.world / max(elapsed, 1e-9))
        if not all(np.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {metrics}")
        if probe is not None and (probe_due or not probed):
            probed = probe(net, device)
        metrics.update(probed)
        sums.clear()
        count, t_last = 0, time.perf_counter()

        def states() -> dict:
            return {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "loss": loss_fn.state_dict(),
                **method.extra_state(),
            }

        session.report(step, metrics, states=states if checkpoint else None, epoch=epoch)


def record_placement_group(path: str) -> None:
    """Write the id of the worker group's placement group to `path`, so whoever ends this run from the
    outside (a Tune trial stopped by ASHA: its actor is killed, and the Train controller with it, before
    the controller removes the group) can remove the group. Ray Train's own PlacementGroupCleaner does
    that only where the state API answers (a cluster with a dashboard, alone on its machine)."""
    import ray

    group = ray.util.get_current_placement_group()
    if group is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(group.id.hex())


class _StateHolder:
    """Receives a state_dict from restore_checkpoint (for state the method loads itself)."""

    state: dict | None = None

    def load_state_dict(self, state: dict) -> None:
        self.state = state
