"""The one place that talks to MLflow.

Default store: `sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts`;
`MLFLOW_TRACKING_URI` (or `tracking.uri` in the config) overrides. A `Tracker` wraps one run by id,
so it can be re-attached in a Ray worker (`Tracker.attach(run_id, uri)`) and only rank 0 logs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from distseg.config import Config, flatten

PARENT_TAG = "mlflow.parentRunId"
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value's length
_BATCH_MAX = 100  # MLflow's limit on params per log_batch call


def tracking_uri(workdir: str | Path, configured: str | None = None) -> str:
    """Resolved tracking URI: config, then $MLFLOW_TRACKING_URI, then sqlite in the workdir."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = Path(workdir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_root(workdir: str | Path) -> str:
    path = Path(workdir).resolve() / "mlartifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    from distseg.cluster import quiet_logs

    quiet_logs()  # after mlflow's import, which sets its own loggers to INFO
    return MlflowClient(tracking_uri=uri)


class Tracker:
    """Logs params, metrics, tables and pictures to one MLflow run."""

    def __init__(self, run_id: str, uri: str):
        self.run_id = run_id
        self.uri = uri
        self.client = _client(uri)

    @classmethod
    def attach(cls, run_id: str, uri: str) -> Tracker:
        return cls(run_id, uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_VALUE_MAX]) for k, v in flatten(dict(params)).items()]
        for i in range(0, len(items), _BATCH_MAX):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH_MAX])

    def log_config(self, cfg: Config) -> None:
        self.log_params(cfg.model_dump(mode="json"))
        self.log_dict(cfg.model_dump(mode="json"), "config.json")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step or 0))
            for k, v in flatten(dict(metrics)).items()
            if v is not None and np.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_table(self, table: Mapping[str, list] | Any, artifact_file: str) -> None:
        """A table (dict of columns or a pandas DataFrame) as a JSON artifact MLflow's UI shows."""
        self.client.log_table(self.run_id, data=table, artifact_file=artifact_file)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, np.ascontiguousarray(image), artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file=artifact_file)

    def log_dict(self, data: Mapping, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, json.loads(json.dumps(data, default=str)), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


# MLflow 3 opens an experiment on a GenAI traces overview unless it is tagged as model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(uri: str, name: str, workdir: str | Path) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # an experiment from before the tag
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    location = artifact_root(workdir) if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def provenance(cfg: Config) -> dict[str, str]:
    """What a run needs to be traced and reproduced: code (git commit, dirty tree), the resolved
    config's hash, the seed, the shards' manifest hash (pretraining), and the library versions."""
    import hashlib
    import subprocess

    import ray
    import torch

    import distseg
    from distseg.checkpoint import config_hash_of, git_sha

    tags = {
        "git_sha": git_sha() or "unknown",
        "config_hash": config_hash_of(cfg),
        "seed": str(cfg.seed),
        "version.distseg": getattr(distseg, "__version__", "unknown"),
        "version.torch": torch.__version__,
        "version.ray": ray.__version__,
    }
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        tags["git_dirty"] = str(bool(out.stdout.strip())).lower() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git_dirty"] = "unknown"
    data = getattr(cfg.pretrain, "shards", None)
    manifest = Path(data) / "_manifest.json" if data and "://" not in str(data) else None
    if manifest is not None and manifest.is_file():
        tags["shards_manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    return tags


def experiment_url(cfg: Config, host: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of this config's experiment runs (with `ui_command` serving it)."""
    uri = tracking_uri(cfg.workdir, cfg.tracking.uri)
    exp = _client(uri).get_experiment_by_name(cfg.tracking.experiment)
    return f"{host}/#/experiments/{exp.experiment_id}/runs" if exp is not None else host


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


@contextmanager
def start_run(
    cfg: Config,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    log_config: bool = True,
    run_id: str | None = None,
    id_file: str | None = None,
) -> Iterator[Tracker]:
    """Open an MLflow run for a stage; it ends FINISHED, or FAILED if the block raises.

    With `run_id` of a run in this store, that run is reopened (a resumed job keeps one run). With
    `id_file` (a path or URI beside the stage's checkpoints), the run it names is reopened and a new
    run's id is written there first: rerunning a resumable stage after a crash continues its run."""
    from distseg import storage

    if id_file and not run_id:
        run_id = (storage.read_text(id_file) or "").strip() or None
    uri = tracking_uri(cfg.workdir, cfg.tracking.uri)
    exp_id = get_or_create_experiment(uri, cfg.tracking.experiment, cfg.workdir)
    run_tags = {**provenance(cfg), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    client = _client(uri)
    if run_id and _run_exists(client, run_id):
        client.update_run(run_id, status="RUNNING")
        tracker = Tracker(run_id, uri)
        tracker.set_tags(run_tags)
        log_config = False  # params are immutable in MLflow and were logged when the run began
    else:
        run = client.create_run(exp_id, tags=run_tags, run_name=run_name or cfg.name)
        tracker = Tracker(run.info.run_id, uri)
    if id_file:
        storage.write_text(id_file, tracker.run_id)
    if log_config:
        tracker.log_config(cfg)
    try:
        yield tracker
    except BaseException:
        client.set_terminated(tracker.run_id, status="FAILED")
        raise
    client.set_terminated(tracker.run_id, status="FINISHED")


def ui_command(cfg: Config) -> str:
    """The command that opens the MLflow UI for this config's store, bound to 127.0.0.1.

    The `mlflow` is the one installed beside this Python (`.venv/bin/mlflow` after `make demo`, which
    does not activate the virtual environment), relative to the working directory when it is below it."""
    uri = tracking_uri(cfg.workdir, cfg.tracking.uri)
    return f"{mlflow_executable()} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1"


def mlflow_executable() -> str:
    """`mlflow` beside the running interpreter if it is there (relative to the working directory when
    below it), else plain `mlflow` from PATH."""
    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        return "mlflow"
    try:
        return str(Path(".") / exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)
