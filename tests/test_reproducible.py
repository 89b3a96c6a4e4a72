"""Reproducibility: the same command with the same seed gives the same numbers on CPU.

Two 1-worker pretraining runs of the same config and seed on the same shards (a real local Ray
cluster, the Ray Data ingest with its seeded views, ordered blocks and seeded shuffle buffer), then
the same evaluation of each checkpoint: the per-step losses, the weights and the mIoU agree bit for
bit.
A third run with another seed must differ, so the comparison can fail. The same runs' console (what a
user sees) holds each stage's progress line and none of Ray's internal chatter."""

from __future__ import annotations

import re

import pytest
import torch
from test_pretrain import TINY as PRETRAIN_TINY  # tests/ is on sys.path, as for data_layouts

from distseg.cluster import shutdown_ray
from distseg.config import load_config

# test_pretrain's tiny synthetic set, at 12 images, 1 worker and 4 steps, plus one quick protocol
TINY = [
    *(
        o
        for o in PRETRAIN_TINY
        if not o.startswith(("data.num_images", "pretrain.num_workers", "ray.num_cpus", "mine."))
    ),
    "data.num_images=12",
    "mine.max_side=64",
    "pretrain.num_workers=1",
    "pretrain.steps=4",
    "ray.num_cpus=2",
    "evaluate.protocols=[dataset_kmeans]",
    "evaluate.diagnostics=[]",
    "evaluate.baselines=[]",
    "evaluate.num_examples=0",
    "evaluate.image_size=64",
]


@pytest.mark.slow
def test_same_seed_same_losses_weights_and_miou(tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from distseg.eval.evaluate import evaluate
    from distseg.tracking import tracking_uri
    from distseg.train.pretrain import pretrain

    runs = {}
    try:
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            extra = [f"pretrain.shards={runs['a']['shards']}"] if runs else []
            cfg = load_config("demo", [f"workdir={tmp_path}", f"name={name}", f"seed={seed}", *TINY, *extra])
            result = pretrain(cfg)
            client = MlflowClient(tracking_uri(cfg.workdir))
            losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
            metrics = evaluate(cfg, str(result.checkpoint), tmp_path / f"eval-{name}")
            miou = metrics["sources"]["checkpoint"]["metrics"]["dataset_kmeans/miou"]["mean"]
            weights = torch.load(result.checkpoint / "model.pt", weights_only=True)
            runs[name] = {"shards": result.shards, "losses": losses, "miou": miou, "weights": weights}
    finally:
        shutdown_ray()
    out, err = capfd.readouterr()
    console = out + err
    for internal in (
        "Token authentication is enabled",
        "Progress bars",
        "Failed to query Ray Train Controller",
        "PYTHON worker processes have been started",
        "(RayTrainWorker",
        "(SplitCoordinator",
        "(raylet)",
        "Execution plan",
        "DeprecationWarning",
    ):
        assert internal not in console, f"Ray's internals on the console: {internal!r}"
    for progress in (
        r"mine: \d+/12 images",
        "mined 12 synthetic images",
        "pretrain: step 4/4",
        r"checkpoint features: +\d+%",
    ):
        assert re.search(progress, console), f"no progress line {progress!r}"
    a, b, c = runs["a"], runs["b"], runs["c"]
    print({k: (v["losses"], v["miou"]) for k, v in runs.items()})
    assert len(a["losses"]) == 4
    # bit for bit: pretrain.deterministic (on for CPU workers) removes the thread-order sums of the losses'
    # pixel gathers, which had left the same seed's runs about 1e-3 apart after a few steps
    assert a["losses"] == b["losses"]
    assert a["miou"] == b["miou"]
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert c["losses"] != pytest.approx(a["losses"], abs=1e-3)  # another seed: another run
