"""`distseg tune`: space files checked before Ray starts, the concurrency plan, and the demo sweep on a
real local Ray cluster with a real sqlite MLflow (ASHA stops trials; one child run per trial; nothing
of a stopped trial is left on the cluster; best_config.yaml reproduces the winner)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from distseg.cluster import shutdown_ray
from distseg.config import load_config
from distseg.tune import SpaceError, SweepError, load_space, plan_concurrency, sweep
from distseg.tune.space import check_against_config

REPO = Path(__file__).resolve().parents[1]


def write_space(tmp_path: Path, **changes) -> Path:
    space = yaml.safe_load((REPO / "tune_spaces" / "demo.yaml").read_text())
    space.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "tune_spaces").glob("*.yaml")))
def test_shipped_spaces_are_valid(name):
    space = load_space(REPO / "tune_spaces" / f"{name}.yaml")
    cfg = load_config(space.config, space.overrides)
    check_against_config(space, cfg.model_dump(mode="json"), name)
    assert cfg.pretrain.probe_every > 0 and space.metric == "probe_score"
    method = cfg.pretrain.method
    grouping = [k for k in space.params if k.startswith(("mine.", "hierarchy.", "priors."))]
    assert any(k.startswith(f"losses.{method}.") for k in space.params) or grouping or name == "demo"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"losses.hiergroup.sigmap": {"uniform": [0.1, 1.0]}}, "'sigmap' is not a key of losses.hiergroup"),
        ({"pretrain.lr": {"normal": [0.1, 1.0]}}, "params.pretrain.lr: unknown domain 'normal'"),
        ({"pretrain.lr": {"loguniform": [0.0, 1.0]}}, "params.pretrain.lr: loguniform needs a positive lower bound"),
        ({"pretrain.lr": {"uniform": [1.0, 0.1]}}, "params.pretrain.lr: uniform needs lower < upper"),
        ({"pretrain.steps": {"randint": [1.5, 9]}}, "params.pretrain.steps: randint takes integers"),
        ({"pretrain.optimizer": {"choice": ["adam", "lbfgs"]}}, "params.pretrain.optimizer = 'lbfgs'"),
        ({"losses.hiergroup.cns": {"grid": [0, -1]}}, "params.losses.hiergroup.cns = -1"),
    ],
)
def test_bad_space_is_refused_before_ray_starts(tmp_path, params, message):
    import ray

    path = write_space(tmp_path, params=params)
    with pytest.raises(SpaceError, match="search space") as info:
        sweep(path, overrides=[f"workdir={tmp_path}"])
    assert message in str(info.value)
    assert not ray.is_initialized()


def test_probe_metric_needs_the_probe(tmp_path):
    path = write_space(tmp_path)
    with pytest.raises(SpaceError, match="pretrain.probe_every is 0"):
        sweep(path, overrides=[f"workdir={tmp_path}", "pretrain.probe_every=0"])


def test_plan_concurrency():
    cfg = load_config("demo", ["pretrain.num_workers=2", "pretrain.cpus_per_worker=3"])
    assert plan_concurrency(cfg, {"CPU": 21.1}) == 3  # 2 x 3 + 1 ingest + 0.01 trial = 7.01 per trial
    assert plan_concurrency(cfg, {"CPU": 21}) == 2
    assert plan_concurrency(cfg, {"CPU": 22}, requested=2) == 2
    gpu = load_config("demo", ["pretrain.num_workers=2", "pretrain.use_gpu=true", "pretrain.cpus_per_worker=1"])
    assert plan_concurrency(gpu, {"CPU": 64, "GPU": 4}) == 2  # GPUs bound it: 2 per trial
    with pytest.raises(SweepError, match="one trial needs 7.01 CPU .* the cluster has 4"):
        plan_concurrency(cfg, {"CPU": 4})
    with pytest.raises(SweepError, match="one trial needs 2 GPU"):
        plan_concurrency(gpu, {"CPU": 64})


@pytest.fixture
def _ray_down():
    yield
    shutdown_ray()


# the demo space at test size: 64-px scenes, 16 steps, a probe every 4 (ASHA rungs at 4 and 8)
SMALL = [
    "data.num_images=12",
    "data.image_size=64",
    "mine.max_side=64",
    "hierarchy.max_regions=12",
    "pretrain.crop=48",
    "pretrain.crop_scale=[0.5,1.0]",
    "pretrain.batch_size=4",
    "pretrain.steps=16",
    "pretrain.probe_every=4",
    "pretrain.probe_images=8",
    "pretrain.log_every=4",
    "pretrain.checkpoint_every=8",
    "model.head_channels=16",
    "model.embed_dim=8",
    # 5 logical CPUs: two trials of 2.01 at once (their start-up and probe waits overlap on 2 cores)
    "ray.num_cpus=5",
    "mine.num_actors=1",  # not a pool of 5 (one per logical CPU), each loading torch and the edge network
]


def test_demo_sweep(tmp_path, _ray_down, capsys):
    import ray
    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri

    space = write_space(tmp_path, scheduler={"name": "asha", "grace_period": 4, "reduction_factor": 2})
    result = sweep(space, overrides=[f"workdir={tmp_path}", *SMALL])
    rows = result.rows
    assert len(rows) == 4 and all(r.status != "FAILED" for r in rows)
    assert any(r.stopped_early for r in rows), [(r.trial, r.steps) for r in rows]
    assert result.steps_run < result.steps_full == 4 * 16
    assert result.best.metric == max(r.metric for r in rows)
    assert all(0.0 <= r.metric <= 1.0 for r in rows)
    # the console: a line per probe (a long trial shows progress), a line per finished trial
    out = capsys.readouterr().out
    probes = re.findall(r"^\[tune\] (\w+) step (\d+)/16: probe_score=(\d\.\d{4}) \(\d+s\)$", out, re.M)
    assert {t for t, _, _ in probes} == {r.trial for r in rows}, out
    assert len(re.findall(r"^\[tune\] trial \w+ (finished|stopped early) at step", out, re.M)) == 4, out

    # nothing of the trials is left on the cluster: no live actor but Ray's own, no placement group
    # (a stopped trial's Train actors share its fate, and die a moment after fit() returns: up to 10 s)
    for _ in range(100):
        alive = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
        left = [a for a in alive if "Train" in a["ActorClassName"] or "Trainable" in a["ActorClassName"]]
        if not left:
            break
        time.sleep(0.1)
    assert not left, left
    pgs = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not pgs, pgs

    client = MlflowClient(tracking_uri(tmp_path))
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["stage"] == "tune" and parent.data.tags["best_trial"] == result.best.trial
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r.trial for r in rows)
    for child in children:
        row = next(r for r in rows if r.trial == child.data.tags["trial_id"])
        assert float(child.data.params["losses.hiergroup.sigma_p"]) == pytest.approx(
            row.params["losses.hiergroup.sigma_p"]
        )
        # the MLflow curve may run a report past Tune's last result: a stopped trial's actor ends a moment later
        curve = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "probe_score")}
        assert max(curve) >= row.steps and curve[row.steps] == pytest.approx(row.metric)
        assert child.info.status == ("KILLED" if row.stopped_early else "FINISHED")
        assert (child.data.tags.get("best") == "true") == (row is result.best)

    best = load_config(result.best_config)
    assert best.losses.hiergroup.sigma_p == pytest.approx(result.best.params["losses.hiergroup.sigma_p"])
    assert best.pretrain.lr == result.best.params["pretrain.lr"] and best.pretrain.steps == 16
    summary = json.loads((result.best_config.parent / "summary.json").read_text())
    assert summary["trial"] == [r.trial for r in rows]

    with pytest.raises(SweepError, match="pass --resume"):
        sweep(space, overrides=[f"workdir={tmp_path}", *SMALL])


def test_the_summary_waits_for_the_actors_the_trials_started(_ray_down):
    """A trial's actors that outlive fit() are waited for (their last MLflow write would land after the
    summary's): those started before the sweep are not."""
    import threading

    import ray

    from distseg.tune.sweep import wait_for_trial_actors

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    actor = ray.remote(num_cpus=0)(type("Trial", (), {"ping": lambda self: 1}))
    before = actor.remote()  # e.g. a monitor of the driver's own
    ray.get(before.ping.remote())
    time.sleep(1.5)
    since = time.time()
    trial = actor.remote()
    detached = actor.options(name="stats", lifetime="detached").remote()  # as Ray Data's stats actor
    ray.get([trial.ping.remote(), detached.ping.remote()])
    t0 = time.time()
    assert wait_for_trial_actors(since, timeout=1.0) == 1 and time.time() - t0 >= 1.0
    threading.Timer(1.0, ray.kill, [trial]).start()
    assert wait_for_trial_actors(since, timeout=60) == 0  # the earlier actor, still alive, is not waited for
    assert ray.get([before.ping.remote(), detached.ping.remote()]) == [1, 1]
    ray.kill(detached)


def test_correlation_job_takes_the_last_checkpoint_among_rays_files(tmp_path):
    """A Train V2 run folder holds `checkpoint_manager_snapshot.json` beside its checkpoint folders
    (the MSRC sweep's did): jobs/tune_probe_correlation.py must pick the folder of the highest step."""
    from jobs.tune_probe_correlation import latest_checkpoint

    for name, step in [("checkpoint_2026-12-01_00-35-58", 200), ("checkpoint_2026-12-01_00-39-26", 600)] + [
        ("checkpoint_2026-12-01_00-37-44", 400)
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_2026-12-01_00-39-26"
    assert latest_checkpoint(tmp_path / "checkpoint_2026-12-01_00-39-26") is None


def test_probe_scores_a_network_on_train_split_images_only():
    from distseg.models import create_model
    from distseg.train.probe import Probe, check_probe

    cfg = check_probe(load_config("demo", ["pretrain.probe_every=5", "pretrain.probe_images=6", "data.num_images=8"]))
    probe = Probe(cfg)
    assert len(probe.evals.ids) == 6 and probe.train is None and probe.headline == "dataset_kmeans/miou"
    metrics = probe(create_model(cfg.model))
    assert 0.0 < metrics["probe_score"] <= 1.0 and metrics["probe_score"] == metrics["probe/miou"]
    linear = Probe(check_probe(load_config("demo", ["pretrain.probe_every=5", "pretrain.probe_protocol=linear"])))
    assert len(linear.train.ids) == len(linear.evals.ids) == 12  # the 24 probe images, split in halves
    assert not set(linear.train.ids) & set(linear.evals.ids)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pretrain.probe_protocol=kmeanz"], "is not a protocol"),
        (["pretrain.probe_protocol=davis"], "needs video, a concept dictionary or a saliency head"),
        (["pretrain.probe_protocol=object_kmeans"], "needs video, a concept dictionary or a saliency head"),
        (["evaluate.dataset=bsds"], "needs labels"),
    ],
)
def test_bad_probe_settings_fail_before_training(overrides, message, tmp_path):
    """check_probe refuses them; `distseg pretrain` prints the one-line error and exits 1, Ray not started."""
    import ray
    from typer.testing import CliRunner

    from distseg.cli import app
    from distseg.train.probe import ProbeError, check_probe

    with pytest.raises(ProbeError, match=message):
        check_probe(load_config("demo", ["pretrain.probe_every=5", *overrides]))
    result = CliRunner().invoke(app, ["pretrain", f"workdir={tmp_path}", "pretrain.probe_every=5", *overrides])
    assert result.exit_code == 1 and result.output.startswith("error: pretrain.") and not ray.is_initialized()
    assert message.split(" ")[0] in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_sigkill_of_the_sweep_driver_then_resume_finishes_every_trial_once(tmp_path):
    """The sweep driver (and the Ray cluster it started) killed once the first trial is done; `--resume`
    runs the others to their end (or ASHA's stop) and leaves the finished one alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri

    space = write_space(tmp_path, scheduler={"name": "asha", "grace_period": 4, "reduction_factor": 2})
    args = [sys.executable, "-m", "distseg.cli", "tune", "--space", str(space), f"workdir={tmp_path}", *SMALL]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 900
    for line in proc.stdout:  # "[tune] trial ... finished ..." after the first trial ends
        if "[tune] trial" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train = tmp_path / "ray_results" / "tune_space" / "train"
    first = {run.name: sorted(p.name for p in run.glob("checkpoint_*")) for run in train.iterdir()}
    assert first, "the kill should land after the first trial"

    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("best probe_score=")
    summary = json.loads((tmp_path / "tune" / "tune_space" / "summary.json").read_text())
    errors = [p.read_text()[-1500:] for p in (tmp_path / "ray_results" / "tune_space").glob("*/error.txt")]
    assert len(summary["trial"]) == 4 and "FAILED" not in summary["status"], errors
    client = MlflowClient(tracking_uri(tmp_path))
    children = client.search_runs(
        [client.get_experiment_by_name("distseg-demo").experiment_id], filter_string="tags.stage = 'tune_trial'"
    )
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(summary["trial"])  # one run per trial
    finished_before = [name for name, ckpts in first.items() if len(ckpts) == 2]  # 16 steps, a checkpoint every 8
    for name in finished_before:  # not rerun: no new checkpoint
        assert sorted(p.name for p in (train / name).glob("checkpoint_*")) == first[name]


def test_a_grouping_space_takes_images_not_shards(tmp_path):
    path = write_space(tmp_path, params={"hierarchy.max_regions": {"grid": [4, 12]}})
    with pytest.raises(SpaceError, match="each trial mines its own shards"):
        sweep(path, shards=str(tmp_path / "shards"), overrides=[f"workdir={tmp_path}"])
    plain = write_space(tmp_path)
    with pytest.raises(SpaceError, match="--images is for spaces that sweep grouping"):
        sweep(plain, images=str(tmp_path), overrides=[f"workdir={tmp_path}"])


@pytest.mark.slow
def test_a_grouping_sweep_mines_each_trials_shards(tmp_path, _ray_down):
    import pyarrow.parquet as pq

    grid = {"hierarchy.max_regions": {"grid": [3, 12]}}
    space = write_space(tmp_path, scheduler={"name": "fifo"}, num_samples=1, params=grid)
    small = [o for o in SMALL if not o.startswith("hierarchy.")] + ["pretrain.steps=4", "pretrain.probe_every=4"]
    result = sweep(space, overrides=[f"workdir={tmp_path}", *small])
    assert sorted(r.params["hierarchy.max_regions"] for r in result.rows) == [3, 12]
    for row in result.rows:
        shards = tmp_path / "ray_results" / "tune_space" / "train" / f"tune_space_{row.trial}" / "mined" / "shards"
        tables = [pq.read_table(f, columns=["ucm"]).column("ucm").combine_chunks() for f in shards.glob("*.parquet")]
        regions = [n for t in tables for n in t.field("num_regions").to_pylist()]
        assert len(regions) == 12 and max(regions) <= row.params["hierarchy.max_regions"]
    # the trials mined the synthetic scenes written as PNGs; the sweep itself mined nothing
    assert len(list((tmp_path / "synthetic" / "images").glob("*.png"))) == 12
    assert not (tmp_path / "synthetic" / "mined").exists()
