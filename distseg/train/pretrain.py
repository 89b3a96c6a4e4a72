"""`distseg pretrain`: pixel embeddings from grouping shards with a Ray Train TorchTrainer.

Three steps, each callable on its own so a Ray Tune trial can wrap the same code:

    cfg = prepare(cfg)                        # validate, start/attach Ray, shards (mine synthetic if none)
    trainer = build_trainer(cfg, run_id, uri) # the dataset and the TorchTrainer (distseg.train.engine)
    result = trainer.fit()                    # -> export(result, cfg): the checkpoint evaluation reads

`pretrain(cfg)` runs them inside one MLflow run. Runs are named by `cfg.name` under
`pretrain.storage_path` (default `<workdir>/ray_results`; any pyarrow filesystem URI: s3://, gs://,
file://, what a multi-node cluster needs); rerunning with the same name resumes from the last checkpoint (Ray Train
restores automatically) and continues the same MLflow run. The final checkpoint is copied to
`<workdir>/checkpoints/<name>/` (model.pt, config.yaml, meta.json, loss.pt, the method's extra state),
the path `distseg evaluate --checkpoint` takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distseg import storage as store
from distseg.checkpoint import export_checkpoint, read_meta
from distseg.config import Config
from distseg.storage import absolute
from distseg.train.engine import TrainerSpec, cluster_cpus, worker_config
from distseg.train.engine import build_trainer as engine_trainer
from distseg.train.ingest import (
    IngestError,
    build_dataset,
    check_prior,
    check_regions,
    count_rows,
    passes_needed,
    shard_files,
)  # fmt: skip
from distseg.train.loop import train_loop_per_worker
from distseg.train.probe import PRIOR_AGREEMENT, check_probe, held_out_files


@dataclass
class PretrainResult:
    checkpoint: Path
    run_id: str
    metrics: dict
    shards: str


def synthetic_shards(cfg: Config) -> str:
    """Mine the built-in synthetic scenes (written once as PNGs) into shards; return the shards folder."""
    from distseg.data.synthetic import write_scenes
    from distseg.mining import mine

    workdir = Path(cfg.workdir).resolve()
    images, shards = workdir / "synthetic" / "images", workdir / "synthetic" / "mined"
    write_scenes(cfg, images)
    mine_cfg = cfg.model_copy(deep=True)
    if cfg.pretrain.prior not in mine_cfg.mine.priors:
        mine_cfg.mine.priors = [*mine_cfg.mine.priors, cfg.pretrain.prior]
    summary = mine(mine_cfg, str(images), str(shards))
    print(f"mined {summary.mined} synthetic images, {summary.errors} errors -> {shards}")
    return str(shards)


def check_config(cfg: Config) -> Config:
    """Checks that need no cluster: the method's prior kind, `model.init_from` (loaded once). Returns
    a copy with local paths made absolute for the workers."""
    from distseg.grouping.priors import prior_yields
    from distseg.methods import METHODS

    method = METHODS.get(cfg.pretrain.method)
    if prior_yields(cfg.pretrain.prior) != method.prior_yields:
        raise IngestError(
            f"pretrain.method={method.name} learns from a prior that yields {method.prior_yields}, but "
            f"pretrain.prior={cfg.pretrain.prior} yields {prior_yields(cfg.pretrain.prior)} "
            f"(use pretrain.prior={method.default_prior})"
        )
    cfg = cfg.model_copy(deep=True)
    if cfg.model.init_from:
        from distseg.models import create_model

        cfg.model.init_from = absolute(cfg.model.init_from)
        create_model(cfg.model)  # a wrong path or architecture fails here, before Ray or mining starts
    cfg.pretrain.shards = absolute(cfg.pretrain.shards)
    cfg.pretrain.storage_path = absolute(cfg.pretrain.storage_path)
    return check_probe(cfg)


def run_storage(cfg: Config) -> str:
    """Where Ray Train keeps this config's run folders: `pretrain.storage_path` or <workdir>/ray_results."""
    return cfg.pretrain.storage_path or str(Path(cfg.workdir).resolve() / "ray_results")


def prepare(cfg: Config, extra_cpus: int = 0, need_shards: bool = True) -> Config:
    """Validate, start (or attach to) Ray, check the plan against the cluster, and make sure there are
    shards (with `need_shards`, mining the synthetic scenes when `pretrain.shards` is unset): returns
    the resolved config.

    A local cluster gets at least one run's CPUs (`distseg.cluster.training_resources`) plus
    `extra_cpus`; on a cluster joined by address, `fit_training` fits the plan to what it can give or
    stops with ResourceError naming the settings to change."""
    from distseg.cluster import fit_training, init_ray, training_resources

    cfg = check_config(cfg)
    if cfg.pretrain.shards is not None:  # a folder without shards, or with the wrong prior, fails before Ray starts
        files = shard_files(cfg.pretrain.shards)
        check_prior(files, cfg.pretrain.prior)
        check_regions(files, cfg.pretrain)
    ray_cfg = cfg.ray.model_copy()
    cluster_cpus(ray_cfg, int(training_resources(cfg.pretrain)["CPU"]) + extra_cpus)
    init_ray(ray_cfg)
    cfg = fit_training(cfg)
    if cfg.pretrain.shards is None and need_shards:
        cfg.pretrain.shards = absolute(synthetic_shards(cfg))
        check_regions(shard_files(cfg.pretrain.shards), cfg.pretrain)
    if cfg.pretrain.probe_every and cfg.pretrain.probe_protocol == PRIOR_AGREEMENT:
        held_out_files(cfg)  # too few held-out images fails here, not in the workers
    return cfg


def build_trainer(
    cfg: Config,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    *,
    name: str | None = None,
    storage: str | None = None,
    callbacks: list | None = None,
    loop_extra: dict | None = None,
):
    """The streaming dataset and the TorchTrainer of a prepared config (Ray must be up); `loop_extra`
    goes into the workers' loop config (e.g. `placement_group_file`, see train/loop.py)."""
    import ray.data

    from distseg.train.idle import quiet_when_idle

    pcfg = cfg.pretrain
    rows = count_rows(pcfg.shards)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # per-step bars would flood the log
    # blocks reach the trainer in the order of the (seeded) file list, not in the order their tasks end:
    # with the seeded views (ingest.MakePairs) and shuffle buffer, a 1-worker run is reproducible
    context.execution_options.preserve_order = True
    quiet_when_idle(context)  # the executor otherwise spins while the trainer holds it back (train/idle.py)
    storage = str(storage) if storage else run_storage(cfg)
    # the dataset covers the rest of the run, from the pass a resumed run had reached: each pass draws new
    # views, and a resume reads new passes rather than the first ones again
    done = resumed_step(store.join(storage, name or cfg.name))
    first_pass = done * pcfg.batch_size * pcfg.num_workers // max(rows, 1)
    passes = passes_needed(rows, pcfg, pcfg.num_workers, done)
    dataset = build_dataset(pcfg.shards, pcfg, passes, first_pass, seed=cfg.seed)
    spec = TrainerSpec(
        name=name or cfg.name,
        storage=storage,
        num_workers=pcfg.num_workers,
        cpus_per_worker=pcfg.cpus_per_worker,
        use_gpu=pcfg.use_gpu,
        max_failures=pcfg.max_failures,
        num_to_keep=pcfg.num_to_keep,
        datasets={"train": dataset},
    )
    loop_config = worker_config(cfg, run_id, tracking_uri, **(loop_extra or {}))
    return engine_trainer(train_loop_per_worker, loop_config, spec, callbacks=callbacks)


class TrainProgress:
    """The driver's display of a pretraining run: step / total, loss, images/s, ETA and the last
    checkpoint, read from what rank 0 logs to MLflow (the workers' own output stays in Ray's logs).
    On a terminal one line refreshed in place; otherwise a line at most every `every_s` seconds."""

    def __init__(self, uri: str, run_id: str, total: int, run_dir: str, every_s: float = 30.0, poll_s: float = 3.0):
        import sys
        import threading

        self.uri, self.run_id, self.total, self.run_dir = uri, run_id, total, run_dir
        self.tty = sys.stdout.isatty()
        self.every_s, self.poll_s = (poll_s if self.tty else every_s), poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distseg-train-progress", daemon=True)
        self._last_step = -1

    def __enter__(self) -> TrainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.show(final=True)

    def _run(self) -> None:
        import time

        last = 0.0
        while not self._stop.wait(self.poll_s):
            if time.monotonic() - last >= self.every_s:
                last = time.monotonic()
                self.show()

    def line(self) -> str | None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        loss = client.get_metric_history(self.run_id, "loss")
        if not loss:
            return None
        step, value = loss[-1].step, loss[-1].value
        if step == self._last_step:
            return None
        self._last_step = step
        speed = client.get_metric_history(self.run_id, "images_per_s")
        batch_rate = None
        if len(loss) >= 2 and loss[-1].timestamp > loss[0].timestamp:
            batch_rate = (loss[-1].step - loss[0].step) / ((loss[-1].timestamp - loss[0].timestamp) / 1000)
        eta = f"ETA {max(self.total - step, 0) / batch_rate / 60:.1f} min" if batch_rate else "ETA -"
        checkpoints = checkpoint_steps(self.run_dir)
        last_ckpt = f"checkpoint @ {checkpoints[-1][0]}" if checkpoints else "no checkpoint yet"
        rate = f"{speed[-1].value:.1f} img/s" if speed else "- img/s"
        done = f"step {step}/{self.total} ({step / self.total:.0%})"
        return f"pretrain: {done}, loss {value:.4f}, {rate}, {eta}, {last_ckpt}"

    def show(self, final: bool = False) -> None:
        try:
            text = self.line()
        except Exception:  # the display must never break training (a locked sqlite file, a race)
            return
        if text is None:
            if final and self.tty:
                print(flush=True)
            return
        if self.tty:
            print("\r" + text.ljust(110), end="\n" if final else "", flush=True)
        else:
            print(text, flush=True)


def export(result, cfg: Config) -> Path:
    """Copy the run's final checkpoint (all but the optimizer state) to <workdir>/checkpoints/<name>."""
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining run {cfg.name} ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return export_checkpoint(folder, Path(cfg.workdir).resolve() / "checkpoints" / cfg.name)


def checkpoint_steps(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of each Train checkpoint of a run (local path or URI), by step."""
    found = []
    for folder in store.list_dirs(run_dir):
        meta = store.read_text(store.join(folder, "meta.json")) if "/checkpoint_" in folder else None
        if meta:
            found.append((json.loads(meta).get("step", 0), folder))
    return sorted(found)


def resume_checkpoint(run_dir: str) -> str | None:
    """The checkpoint folder Ray Train resumes a run from: the latest its checkpoint manager recorded in
    `checkpoint_manager_snapshot.json`, which it writes once a checkpoint is complete (a folder left half
    uploaded by a crash is never chosen). None without a snapshot: Ray then starts the run from scratch."""
    text = store.read_text(store.join(run_dir, "checkpoint_manager_snapshot.json"))
    try:
        name = json.loads(text)["latest_checkpoint_result"]["checkpoint_dir_name"] if text else None
    except (ValueError, KeyError, TypeError):  # another Ray's snapshot: leave the check to the workers
        return None
    return store.join(run_dir, name) if name else None


def resumed_step(run_dir: str) -> int:
    """The step a run resumes at: that of `resume_checkpoint`'s meta.json, 0 for a fresh run."""
    location = resume_checkpoint(run_dir)
    meta = store.read_text(store.join(location, "meta.json")) if location else None
    try:
        return int(json.loads(meta).get("step") or 0) if meta else 0
    except (ValueError, TypeError, AttributeError):
        return 0


def refuse_unfit_resume(cfg: Config, run_dir: str) -> None:
    """Before any worker starts: a run resumed by name must be able to load its last checkpoint into the
    model, loss and optimizer this config builds (checked on the driver's CPU, as each worker checks).
    Otherwise each of the 1 + `pretrain.max_failures` worker-group starts would fail the same way, on a
    cloud cluster after its GPU nodes came up. CheckpointMismatch says what to do."""
    import ray.train

    from distseg.checkpoint import CheckpointMismatch
    from distseg.train.engine import resume_refused
    from distseg.train.loop import check_resumable

    location = resume_checkpoint(run_dir)
    if location is None:
        return
    fs, path = store.resolve_uri(location)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
        try:
            check_resumable(cfg, folder)
        except CheckpointMismatch as err:
            raise CheckpointMismatch(resume_refused(cfg.name, location, err)) from None


def pretrain(cfg: Config) -> PretrainResult:
    """Train `cfg.pretrain.method` on the shards in `cfg.pretrain.shards` (resumes a run of the same name)."""
    import ray.data

    from distseg.tracking import start_run

    cfg = prepare(cfg)
    shards = cfg.pretrain.shards
    run_dir = store.join(run_storage(cfg), cfg.name)
    id_file = store.join(run_dir, "mlflow_run_id")
    previous = (store.read_text(id_file) or "").strip() or None
    refuse_unfit_resume(cfg, run_dir)
    tags = {"stage": "pretrain", "method": cfg.pretrain.method, "shards": shards, "shard_rows": count_rows(shards)}
    context = ray.data.DataContext.get_current()
    progress = context.enable_progress_bars
    with start_run(cfg, run_name=cfg.name, tags=tags, run_id=previous, id_file=id_file) as tracker:
        try:
            trainer = build_trainer(cfg, tracker.run_id, tracker.uri)
            print(f"pretrain: {cfg.pretrain.method} for {cfg.pretrain.steps} steps, MLflow run {tracker.run_id}")
            if previous:  # a rerun of a finished run trains nothing: say so, and how to start anew
                print(
                    f"pretrain: resuming run {cfg.name!r} from its last checkpoint in {run_dir} "
                    "(to train from scratch, pass another name=... or remove that folder)"
                )
            with TrainProgress(tracker.uri, tracker.run_id, cfg.pretrain.steps, run_dir):
                result = trainer.fit()
        finally:
            context.enable_progress_bars = progress
        final = export(result, cfg)
        tracker.set_tags({"checkpoint": str(final)})
    return PretrainResult(
        checkpoint=final, run_id=tracker.run_id, metrics=read_meta(final).get("metrics", {}), shards=shards
    )
