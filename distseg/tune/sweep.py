"""`distseg tune`: a Ray Tune sweep whose trials are `distseg pretrain` runs, stopped early by ASHA.

    result = sweep("tune_spaces/demo.yaml")          # or: distseg tune --space tune_spaces/demo.yaml

Shape (Ray Train V2 with Tune): each trial is a Tune *function trainable* that builds the very
TorchTrainer `distseg pretrain` builds (`distseg.train.pretrain.build_trainer`), names its Train run
after the trial (`<sweep>_<trial id>`, so a resumed trial resumes its Train run from the last
checkpoint) and passes Ray's `TuneReportCallback`, which forwards every training report (with the
in-loop probe's `probe_score`, distseg.train.probe) to Tune. ASHA compares trials on the space's
metric at rungs counted in optimizer steps (`time_attr="step"`, `max_t=pretrain.steps`).

The trial function itself holds almost nothing (`{"CPU": 0.01}`): its Train worker group reserves
its own placement group when the trial starts it, and the ingest's tasks take what is left. Tune
cannot see either, so distseg runs at most `plan_concurrency()` trials at once:

    per trial:  CPU = num_workers * cpus_per_worker + 1 (the ingest's read / map tasks) + 0.01 (the trial)
                GPU = num_workers if pretrain.use_gpu else 0
    concurrent = min(floor(cluster CPU / trial CPU), floor(cluster GPU / trial GPU) if GPU > 0)

A trial that needs more than the whole cluster fails before the sweep starts (Train's worker-group
start would otherwise wait forever).

MLflow: one parent run per sweep (created by the driver before any trial starts), one child run per
trial (params = the trial's full config, metric curves from the training workers), the best trial
tagged `best=true`, the summary table logged as `summary.json` and `best_config.yaml` beside it. The
tracking URI is an absolute sqlite path (trials run in other working directories).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distseg.cluster import verbose
from distseg.config import Config, apply_overrides, build_config, load_config, to_yaml
from distseg.tune.space import SearchSpace, SpaceError, check_against_config, load_space, to_tune

TRIAL_CPU = 0.01  # the trial function only drives its Train run; Ray refuses an empty request
MINING_KEYS = ("mine.", "hierarchy.", "priors.", "edges.")  # a space sweeping these mines shards per trial
GROUP_FILE = "placement_group"  # in each trial's Train run folder: its worker group's placement group id
STATE_FILE = "distseg_sweep.json"  # in the Tune experiment folder: the parent run, space and config


class SweepError(RuntimeError):
    """A sweep that cannot run as asked (resources, resume without a previous sweep)."""


@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    metric: float | None
    steps: int
    stopped_early: bool
    status: str
    run_id: str | None


@dataclass
class SweepResult:
    name: str
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow
    best_config: Path
    parent_run_id: str
    steps_run: int  # trial-steps actually trained
    steps_full: int  # trial-steps had every trial run to the end


def trial_resources(cfg: Config) -> dict[str, float]:
    """One pretraining run's resources (`distseg.cluster.training_resources`) + the trial function's."""
    from distseg.cluster import training_resources

    need = training_resources(cfg.pretrain)
    return {**need, "CPU": need["CPU"] + TRIAL_CPU}


def plan_concurrency(cfg: Config, cluster: dict[str, float], requested: int | None = None) -> int:
    """How many trials run at once (see the module docstring); SweepError when not even one fits."""
    from distseg.cluster import resources_why

    need = trial_resources(cfg)
    why = resources_why(cfg.pretrain)
    why["CPU"] += f" + {TRIAL_CPU} for the trial"
    fits = []
    for kind, amount in need.items():
        if amount <= 0:
            continue
        have = cluster.get(kind, 0.0)
        if have < amount:
            raise SweepError(
                f"one trial needs {amount:g} {kind} ({why[kind]}), the cluster has {have:g}: "
                "lower pretrain.num_workers / cpus_per_worker, or add nodes"
            )
        fits.append(math.floor(have / amount))
    fit = min(fits) if fits else 1
    return max(1, min(fit, requested) if requested else fit)


def _trial(tune_config: dict, base: dict, sweep_info: dict) -> None:
    """One Tune trial: the trial's config, its MLflow child run, and the pretraining TorchTrainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distseg.tracking import start_run
    from distseg.train.pretrain import build_trainer

    context = tune.get_context()
    trial_id = context.get_trial_id()
    params = tune_config["params"]
    cfg = build_config(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in params.items()]), f"trial {trial_id}")
    cfg.name = f"{sweep_info['name']}_{trial_id}"
    storage = Path(sweep_info["train_storage"])
    if sweep_info.get("images"):  # the space sweeps grouping settings: this trial's own shards (resumable)
        from distseg.mining import mine

        shards = storage / cfg.name / "mined"
        if cfg.pretrain.prior not in cfg.mine.priors:
            cfg.mine.priors = [*cfg.mine.priors, cfg.pretrain.prior]
        mine(cfg, sweep_info["images"], str(shards), progress=False)
        cfg.pretrain.shards = str(shards)
    tags = {"stage": "tune_trial", "trial_id": trial_id, "sweep": sweep_info["name"], "method": cfg.pretrain.method}
    tags.update({f"param.{k}": v for k, v in params.items()})
    id_file = str(storage / cfg.name / "mlflow_run_id")  # a restored trial continues its run
    with start_run(cfg, run_name=trial_id, parent_run_id=sweep_info["parent_run_id"], tags=tags, id_file=id_file) as t:
        trainer = build_trainer(
            cfg,
            t.run_id,
            t.uri,
            name=cfg.name,
            storage=storage,
            callbacks=[TuneReportCallback()],
            loop_extra={"placement_group_file": str(storage / cfg.name / GROUP_FILE)},
        )
        trainer.fit()


def remove_worker_group(folder: Path) -> bool:
    """Remove the placement group a trial's Train worker group left behind, if any (True if removed).

    A trial that Tune stops (ASHA, or at max_t) has its actor killed, and its Train controller with it,
    before the controller removes its worker group's placement group; Ray Train's PlacementGroupCleaner
    cannot see that without the state API, and the group would hold its CPUs for the rest of the sweep.
    The training loop wrote the group's id to `<Train run folder>/placement_group`."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = folder / GROUP_FILE
    if not path.is_file():
        return False
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(path.read_text().strip())))
    if placement_group_table(group).get("state", "REMOVED") == "REMOVED":
        return False
    try:
        remove_placement_group(group)
    except (ValueError, ray.exceptions.RaySystemError):  # removed meanwhile
        return False
    return True


class _Progress:
    """A Tune callback printing one line per finished trial and a running count (the sweep's display);
    it also removes what a finished trial's Train run left on the cluster (`remove_worker_group`)."""

    def __new__(cls, metric: str, mode: str, total: int, max_t: int, train_storage: Path, sweep_name: str):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(self):
                self.done = self.stopped = self.failed = 0
                self.best: float | None = None
                self.last: dict[str, dict] = {}
                self.t0 = time.monotonic()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                self.last[trial.trial_id] = result
                if result.get(metric) is not None:  # a line per probe, so a long trial shows progress
                    print(
                        f"[tune] {trial.trial_id} step {int(result.get('step', 0))}/{max_t}: "
                        f"{metric}={result[metric]:.4f} ({time.monotonic() - self.t0:.0f}s)",
                        flush=True,
                    )

            def _finish(self, trial, failed: bool) -> None:
                remove_worker_group(train_storage / f"{sweep_name}_{trial.trial_id}")
                result = self.last.get(trial.trial_id, {})
                value, step = result.get(metric), int(result.get("step", 0))
                self.done += 1
                self.failed += failed
                early = not failed and step < max_t
                self.stopped += early
                if value is not None and not failed:
                    better = self.best is None or (value > self.best if mode == "max" else value < self.best)
                    self.best = value if better else self.best
                state = "FAILED" if failed else ("stopped early" if early else "finished")
                shown = "-" if value is None else f"{value:.4f}"
                best = "-" if self.best is None else f"{self.best:.4f}"
                print(
                    f"[tune] trial {trial.trial_id} {state} at step {step}: {metric}={shown} | "
                    f"{self.done}/{total} done ({self.stopped} stopped early, {self.failed} failed), "
                    f"best {best}, {time.monotonic() - self.t0:.0f}s",
                    flush=True,
                )

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._finish(trial, failed=False)

            def on_trial_error(self, iteration, trials, trial, **info):
                self._finish(trial, failed=True)

        return Progress()


def _grid_size(space: SearchSpace) -> int:
    n = 1
    for domain in space.params.values():
        kind, args = next(iter(domain.items()))
        if kind == "grid":
            n *= len(args)
    return n


def sweep(
    space_path: str | Path,
    config: str | None = None,
    shards: str | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    name: str | None = None,
    images: str | None = None,
) -> SweepResult:
    """Run (or, with `resume`, finish) a sweep; returns the summary with the best trial. `shards` sets
    `pretrain.shards` (the CLI's --shards).

    A space that sweeps grouping settings (`mine.*`, `hierarchy.*`, `priors.*`, `edges.*`) mines each
    trial's own shards first, from `images` (a folder; default: the config's synthetic scenes)."""
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from distseg.tracking import start_run
    from distseg.train.pretrain import prepare

    space = load_space(space_path)
    source = config or space.config
    base_cfg = load_config(source, [*space.overrides, *(overrides or [])])
    if shards:
        base_cfg.pretrain.shards = shards
    metric = space.metric
    if (metric == "probe_score" or metric.startswith("probe/")) and not base_cfg.pretrain.probe_every:
        raise SpaceError(
            f"search space {space_path}: metric {metric!r} comes from the in-loop probe, but pretrain.probe_every "
            "is 0: set it in the space's overrides (e.g. pretrain.probe_every=50)"
        )
    check_against_config(space, base_cfg.model_dump(mode="json"), str(space_path))
    sweep_name = name or f"tune_{Path(space_path).stem}"
    mines = [k for k in space.params if k.startswith(MINING_KEYS)]
    if mines and shards:
        raise SpaceError(
            f"search space {space_path} sweeps grouping settings ({', '.join(mines)}): each trial mines its own "
            "shards, so pass the images (--images DIR, or nothing for the synthetic scenes), not --shards SHARDS"
        )
    if mines and base_cfg.pretrain.probe_protocol == "prior_agreement":
        raise SpaceError(
            f"search space {space_path} sweeps grouping settings ({', '.join(mines)}) but ranks trials with "
            "pretrain.probe_protocol=prior_agreement, the agreement with each trial's own prior: the scores "
            "would not be comparable across trials (use a labelled probe protocol)"
        )
    if images and not mines:
        raise SpaceError(f"--images is for spaces that sweep grouping ({', '.join(MINING_KEYS)}*); pass --shards")
    # Ray up (room for the trial drivers); shards mined once here, or by each trial when it sweeps grouping
    cfg = prepare(base_cfg, extra_cpus=1, need_shards=not mines)
    if mines:  # the trials mine these images: the given folder, else the synthetic scenes written as PNGs
        from distseg.data.synthetic import write_scenes

        images = (
            str(Path(images).resolve())
            if images
            else write_scenes(cfg, Path(cfg.workdir).resolve() / "synthetic" / "images")
        )
    workdir = Path(cfg.workdir).resolve()
    experiment = workdir / "ray_results" / sweep_name
    state_file = experiment / STATE_FILE
    if resume and not tune.Tuner.can_restore(str(experiment)):
        raise SweepError(f"--resume: no sweep to resume at {experiment} (run it once without --resume)")
    if not resume and experiment.exists():
        raise SweepError(f"sweep {sweep_name!r} exists at {experiment}: pass --resume to finish it, or --name NEW")

    cluster = ray.cluster_resources()
    concurrency = plan_concurrency(cfg, cluster, space.max_concurrent_trials)
    max_t = cfg.pretrain.steps
    total = space.num_samples * _grid_size(space)
    base = cfg.model_dump(mode="json")
    previous = json.loads(state_file.read_text())["parent_run_id"] if resume and state_file.is_file() else None
    print(
        f"[tune] {sweep_name}: {total} trials of {cfg.pretrain.steps} steps, {concurrency} at a time "
        f"(one trial: {trial_resources(cfg)}; cluster: CPU {cluster.get('CPU', 0):g}, GPU {cluster.get('GPU', 0):g}), "
        f"metric {metric} ({space.mode})",
        flush=True,
    )
    tags = {"stage": "tune", "space": str(space_path), "method": cfg.pretrain.method, "trials": total}
    with start_run(cfg, run_name=sweep_name, tags=tags, run_id=previous) as parent:
        parent.log_dict(space.model_dump(mode="json"), "space.json")
        info = {
            "name": sweep_name,
            "parent_run_id": parent.run_id,
            "train_storage": str(experiment / "train"),
            "images": images if mines else None,
        }
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base, sweep_info=info), {"CPU": TRIAL_CPU})
        callbacks = [_Progress(metric, space.mode, total, max_t, experiment / "train", sweep_name)]
        if resume:
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
        else:
            scheduler = None
            if space.scheduler.name == "asha":
                scheduler = tune.schedulers.ASHAScheduler(
                    time_attr="step",
                    max_t=max_t,
                    grace_period=space.scheduler.grace_period or cfg.pretrain.probe_every or max_t,
                    reduction_factor=space.scheduler.reduction_factor,
                )
            tuner = tune.Tuner(
                trainable,
                param_space={"params": {k: to_tune(d) for k, d in space.params.items()}},
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=space.mode,
                    num_samples=space.num_samples,
                    # the same seed, the same trials; at most `concurrency` at once (Tune ignores
                    # max_concurrent_trials next to a search-algorithm instance)
                    search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency),
                    scheduler=scheduler,
                ),
                run_config=tune.RunConfig(
                    name=sweep_name, storage_path=str(workdir / "ray_results"), callbacks=callbacks, verbose=0
                ),
            )
        experiment.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"parent_run_id": parent.run_id, "space": str(space_path)}))
        if not verbose():
            # Tune's new console output prints its configuration box and TensorBoard hint even at
            # verbose=0; the legacy reporter at verbose=0 prints nothing (the sweep has its own lines)
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        began = time.time()
        grid = tuner.fit()
        wait_for_trial_actors(began)
        result = summarize(grid, space, cfg, sweep_name, parent, base)
    return result


def wait_for_trial_actors(since: float, timeout: float = 30.0) -> int:
    """Wait until the (not detached) actors this job created since `since` (the trials, their Train
    controllers and workers) have ended; returns how many were still alive at the timeout.

    Tune ends a trial that ASHA stops, also at max_t on its last result, while its function may still be
    inside `start_run`; its `except` then marks the trial's MLflow run FAILED a moment after fit() returned.
    `summarize` sets each trial's final status, so it must come after that (test_demo_sweep met the race:
    a finished trial's run FAILED). Reads Ray's actor table (a developer API); without it, no wait."""
    import ray

    try:
        from ray._private.state import actors

        job = ray.get_runtime_context().get_job_id()

        def alive() -> int:
            return sum(
                a["State"] in ("ALIVE", "PENDING_CREATION", "RESTARTING")
                and a["JobID"] == job
                and not a["IsDetached"]  # Ray Data's stats and autoscaling actors live on, detached
                and a["StartTime"] >= since * 1000 - 1000
                for a in actors().values()
            )

        deadline = time.time() + timeout
        while (left := alive()) and time.time() < deadline:
            time.sleep(0.2)
        return left
    except Exception:  # Ray's internals moved: summarize at once, as before
        return 0


def summarize(grid, space: SearchSpace, cfg: Config, sweep_name: str, parent, base: dict) -> SweepResult:
    """The summary table, the child runs' final status and tags, best_config.yaml; logged to the parent."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.uri)
    children = {
        r.data.tags.get("trial_id"): r.info.run_id
        for r in client.search_runs(
            [client.get_run(parent.run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
        )
    }
    max_t = cfg.pretrain.steps
    rows: list[TrialRow] = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        steps = int(metrics.get("step", 0))
        failed = result.error is not None
        row = TrialRow(
            trial=trial_id,
            params=dict((result.config or {}).get("params", {})),
            metric=None if failed or space.metric not in metrics else float(metrics[space.metric]),
            steps=steps,
            stopped_early=not failed and steps < max_t,
            status="FAILED" if failed else ("STOPPED" if steps < max_t else "FINISHED"),
            run_id=children.get(trial_id),
        )
        rows.append(row)
        if row.run_id:  # a stopped trial's process was ended by Tune before its run could close
            client.set_tag(row.run_id, "stopped_early", str(row.stopped_early).lower())
            status = "FAILED" if failed else ("KILLED" if row.stopped_early else "FINISHED")
            client.set_terminated(row.run_id, status=status)
    scored = [r for r in rows if r.metric is not None]
    if not scored:
        raise SweepError(f"sweep {sweep_name}: no trial reported {space.metric!r} (see the trials' errors above)")
    best = (max if space.mode == "max" else min)(scored, key=lambda r: r.metric)
    if best.run_id:
        client.set_tag(best.run_id, "best", "true")
    out = Path(cfg.workdir).resolve() / "tune" / sweep_name
    out.mkdir(parents=True, exist_ok=True)
    best_cfg = build_config(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in best.params.items()]))
    best_cfg.name = f"{sweep_name}_best"
    best_path = out / "best_config.yaml"
    best_path.write_text(
        f"# best trial {best.trial} of sweep {sweep_name}: {space.metric}={best.metric:.4f} at step {best.steps}\n"
        f"# reproduce: distseg pretrain --config {best_path.name}\n" + to_yaml(best_cfg)
    )
    table = {
        "trial": [r.trial for r in rows],
        **{k: [r.params.get(k) for r in rows] for k in space.params},
        space.metric: [r.metric for r in rows],
        "steps": [r.steps for r in rows],
        "stopped_early": [r.stopped_early for r in rows],
        "status": [r.status for r in rows],
    }
    steps_run = sum(r.steps for r in rows)
    parent.log_table(table, "summary.json")
    parent.log_artifact(best_path)
    parent.log_metrics({f"best_{space.metric.replace('/', '_')}": best.metric, "trial_steps_run": steps_run})
    parent.set_tags({"best_trial": best.trial, "best_config": str(best_path)})
    (out / "summary.json").write_text(json.dumps(table, indent=1, default=str))
    return SweepResult(
        name=sweep_name,
        metric=space.metric,
        mode=space.mode,
        rows=rows,
        best=best,
        best_config=best_path,
        parent_run_id=parent.run_id,
        steps_run=steps_run,
        steps_full=len(rows) * max_t,
    )


def print_summary(result: SweepResult) -> None:
    """The summary table (rich), the compute ASHA saved, then the one last line."""
    from rich.console import Console
    from rich.table import Table

    keys = list(result.rows[0].params) if result.rows else []
    table = Table(title=f"sweep {result.name}")
    for col in ["trial", *keys, result.metric, "steps", "stopped early", "status"]:
        table.add_column(col)
    for r in result.rows:
        values = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.params.get(k) for k in keys)]
        metric = "-" if r.metric is None else f"{r.metric:.4f}"
        mark = " *" if r is result.best else ""
        table.add_row(r.trial + mark, *values, metric, str(r.steps), "yes" if r.stopped_early else "no", r.status)
    Console().print(table)
    saved = 1 - result.steps_run / max(result.steps_full, 1)
    print(f"trial-steps run {result.steps_run} of {result.steps_full} ({saved:.0%} saved by early stopping)")
    print(f"best {result.metric}={result.best.metric:.4f} trial={result.best.trial} config={result.best_config}")
