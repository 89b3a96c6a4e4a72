import sys

import numpy as np
from mlflow.tracking import MlflowClient

from distseg.config import load_config
from distseg.tracking import PARENT_TAG, start_run, tracking_uri


def test_mlflow_round_trip_on_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", [f"workdir={tmp_path}", "tracking.experiment=roundtrip"])
    with start_run(cfg, run_name="parent") as parent:
        parent.log_metrics({"loss": 1.5}, step=0)
        parent.log_metrics({"loss": 0.5, "eval": {"miou": 0.25}}, step=10)
        parent.log_table({"class": ["a", "b"], "iou": [0.1, 0.9]}, "per_class_iou.json")
        parent.log_image(np.zeros((8, 8, 3), np.uint8), "example.png")
    with start_run(cfg, run_name="child", parent_run_id=parent.run_id, log_config=False) as child:
        child.log_metrics({"knn_miou": 0.4})

    uri = tracking_uri(tmp_path)
    assert uri.startswith("sqlite:///") and (tmp_path / "mlflow.db").exists()
    client = MlflowClient(uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.source"] == "synthetic"
    assert run.data.params["hierarchy.max_regions"] == "24"
    assert run.data.metrics["loss"] == 0.5 and run.data.metrics["eval.miou"] == 0.25
    history = client.get_metric_history(parent.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (10, 0.5)]
    artifacts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"per_class_iou.json", "example.png", "config.json"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()
    assert client.get_run(child.run_id).data.tags[PARENT_TAG] == parent.run_id


def test_failed_block_marks_run_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", [f"workdir={tmp_path}"])
    try:
        with start_run(cfg) as tracker:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert MlflowClient(tracking_uri(tmp_path)).get_run(tracker.run_id).info.status == "FAILED"


def test_a_rerun_after_a_crash_continues_the_run_its_id_file_names(tmp_path, monkeypatch):
    """Resumable stages (pretrain, edges train, the distill trainers) keep one MLflow run across reruns."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", [f"workdir={tmp_path}"])
    id_file = str(tmp_path / "ray_results" / "edges" / "mlflow_run_id")
    client = MlflowClient(tracking_uri(tmp_path))
    try:
        with start_run(cfg, run_name="edges-train", id_file=id_file) as first:
            first.log_metrics({"loss": 2.0}, step=1)
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert client.get_run(first.run_id).info.status == "FAILED"
    with start_run(cfg, run_name="edges-train", id_file=id_file) as again:
        again.log_metrics({"loss": 1.0}, step=2)
    assert again.run_id == first.run_id and (tmp_path / "ray_results/edges/mlflow_run_id").read_text() == first.run_id
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(first.run_id, "loss")] == [2.0, 1.0]
    with start_run(cfg, run_name="other") as other:  # without the file, a new run
        pass
    assert other.run_id != first.run_id


def test_env_uri_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking_uri(tmp_path / "w") == f"sqlite:///{tmp_path}/other.db"


def test_runs_record_provenance_and_experiments_open_as_model_training(tmp_path, monkeypatch):
    import json
    import subprocess

    import ray
    import torch

    from distseg.checkpoint import config_hash_of
    from distseg.tracking import experiment_url

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "_manifest.json").write_text(json.dumps({"rows": 3}))
    cfg = load_config("demo", [f"workdir={tmp_path}", "seed=7", f"pretrain.shards={shards}"])
    with start_run(cfg, run_name="traced") as tracker:
        pass
    client = MlflowClient(tracking_uri(tmp_path))
    tags = client.get_run(tracker.run_id).data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["git_sha"] == (head or "unknown") and tags["git_dirty"] in ("true", "false", "unknown")
    assert tags["config_hash"] == config_hash_of(cfg) and tags["seed"] == "7"
    assert tags["version.torch"] == torch.__version__ and tags["version.ray"] == ray.__version__
    assert len(tags["shards_manifest_sha256"]) == 16
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment_url(cfg) == f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"


def test_pretrain_progress_line_reads_what_rank_0_logged(tmp_path, monkeypatch):
    import json

    from distseg.train.pretrain import TrainProgress

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", [f"workdir={tmp_path}"])
    with start_run(cfg) as tracker:
        progress = TrainProgress(tracker.uri, tracker.run_id, total=200, run_dir=tmp_path / "run")
        assert progress.line() is None  # nothing logged yet: no line
        tracker.log_metrics({"loss": 2.5, "images_per_s": 12.0}, step=10)
        tracker.log_metrics({"loss": 2.25, "images_per_s": 14.5}, step=50)
        (tmp_path / "run" / "checkpoint_a").mkdir(parents=True)
        (tmp_path / "run" / "checkpoint_a" / "meta.json").write_text(json.dumps({"step": 50}))
        line = progress.line()
        assert line.startswith("pretrain: step 50/200 (25%), loss 2.2500, 14.5 img/s, ETA ")
        assert line.endswith("checkpoint @ 50")
        assert progress.line() is None  # the same step is not shown twice


def test_the_ui_command_names_the_mlflow_beside_this_python(tmp_path, monkeypatch):
    """`make demo` does not activate .venv, so a bare `mlflow` would not be found: the printed command
    names the one installed beside the interpreter, relative to the working directory when below it."""
    from distseg.tracking import mlflow_executable, ui_command

    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "mlflow").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.chdir(tmp_path)
    assert mlflow_executable() == "venv/bin/mlflow"
    cfg = load_config("demo", [f"workdir={tmp_path / 'w'}"])
    assert ui_command(cfg).startswith("venv/bin/mlflow ui --backend-store-uri sqlite:///")
    elsewhere = tmp_path / "other"  # an interpreter outside the working directory: its absolute path
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert mlflow_executable() == str(bindir / "mlflow")
    (bindir / "mlflow").unlink()
    assert mlflow_executable() == "mlflow"
