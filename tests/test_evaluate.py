"""`distseg evaluate` end to end: checkpoint + baselines, several protocols and seeds, MLflow runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from distseg.cli import app
from distseg.config import load_config, to_yaml
from distseg.methods import create_loss
from distseg.models import create_model
from distseg.tracking import start_run, tracking_uri


@pytest.fixture(autouse=True)
def _ray_down():
    """evaluate() as a library call leaves the Ray it started up (the CLI shuts it down): a later module
    that starts its own (test_ingest's ray.init) failed with "called ray.init twice" when run after these."""
    yield
    from distseg.cluster import shutdown_ray

    shutdown_ray()


SMALL = [
    "data.num_images=4",
    "data.image_size=48",
    "model.head_channels=8",
    "model.embed_dim=8",
    "evaluate.image_size=null",
]


def make_checkpoint(folder: Path, workdir: Path, method: str = "hiergroup") -> tuple[Path, str]:
    """A checkpoint folder as `pretrain` writes it, with a real pretraining run as MLflow parent."""
    cfg = load_config("demo", [f"workdir={workdir}", *SMALL, f"pretrain.method={method}"])
    with start_run(cfg, run_name="pretrain") as tracker:
        run_id = tracker.run_id
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(create_model(cfg.model).state_dict(), folder / "model.pt")
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "meta.json").write_text(json.dumps({"step": 1, "mlflow_run_id": run_id}))
    if method == "concepts":
        loss = create_loss("concepts", dim=cfg.model.embed_dim, num_concepts=6)
        torch.save(loss.state_dict(), folder / "loss.pt")
    if method == "maskcontrast":
        loss = create_loss("maskcontrast", dim=cfg.model.embed_dim, feature_dim=2 * cfg.model.head_channels)
        torch.save(loss.state_dict(), folder / "loss.pt")
    return folder, run_id


PROTOCOLS = ("dataset_kmeans", "knn", "retrieval", "linear")


def test_evaluate_checkpoint_and_baseline_with_seeds(tmp_path):
    ckpt, parent = make_checkpoint(tmp_path / "ckpt", tmp_path)
    out = tmp_path / "eval"
    with pytest.warns(FutureWarning, match="'kmeans' is now called 'dataset_kmeans'"):
        result = CliRunner().invoke(
            app,
            [
                "evaluate",
                "--checkpoint",
                str(ckpt),
                "--data",
                "synthetic",
                "--protocols",
                "kmeans,knn,retrieval,linear",  # kmeans: the old name of dataset_kmeans, still accepted
                "--seeds",
                "2",
                "--baseline",
                "rgbxy",
                "--out",
                str(out),
                "evaluate.protocol_args={linear: {epochs: 3}}",
            ],
        )
    assert result.exit_code == 0, result.output
    lines = [line.split("\r")[-1].strip() for line in result.output.strip().splitlines()]  # drop progress bars
    assert lines[-1] == f"wrote {out}/metrics.json"
    # the protocols, then the position diagnostic (on by default): r2, cos_gap, what the labels alone read
    assert [line.split(":")[0] for line in lines[-9:-1]] == [*PROTOCOLS, *["position"] * 4]
    assert "checkpoint" in lines[-9] and "rgbxy" in lines[-9] and "+-" in lines[-9]
    assert lines[-5].startswith("position: r2 checkpoint ") and "rgbxy" in lines[-5] and "+-" not in lines[-5]
    assert lines[-4].startswith("position: cos_gap checkpoint ")
    assert lines[-3].startswith("position: cos_gap_rel checkpoint ")
    number = r"-?\d\.\d{3}"
    assert re.fullmatch(
        rf"position: labels alone \(reference\) label_r2 {number}, label_cos_gap {number}, "
        rf"label_cos_gap_rel {number}",
        lines[-2],
    )

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocols"] == list(PROTOCOLS) and metrics["diagnostics"] == ["position"]
    assert set(metrics["sources"]) == {"checkpoint", "rgbxy"}
    for source in ("checkpoint", "rgbxy"):
        m = metrics["sources"][source]["metrics"]
        for protocol in PROTOCOLS:
            entry = m[f"{protocol}/miou"]
            assert len(entry["values"]) == 2 and 0 <= entry["mean"] <= 1 and entry["std"] >= 0
        assert len(m["position/r2"]["values"]) == 1  # not stochastic
        assert {"position/r2_y", "position/r2_x", "position/r2_border", "position/cos_gap"} <= set(m)
    # the labels' reference is a property of the data: the same for every source
    references = {s["metrics"]["position/label_cos_gap"]["mean"] for s in metrics["sources"].values()}
    assert len(references) == 1
    # rgbxy holds x and y: its position leak is plain
    assert metrics["sources"]["rgbxy"]["metrics"]["position/r2"]["mean"] > 0.4
    assert (out / "pca_checkpoint.png").is_file()

    client = MlflowClient(tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("distseg-demo").experiment_id])
    evals = {r.info.run_name: r for r in runs if r.data.tags.get("stage") == "evaluate"}
    assert set(evals) == {f"eval-{p}-{s}" for p in (*PROTOCOLS, "position") for s in ("checkpoint", "rgbxy")}
    kmeans = evals["eval-dataset_kmeans-checkpoint"]
    assert kmeans.data.tags["mlflow.parentRunId"] == parent
    assert kmeans.data.tags["diagnostic"] == "false"
    assert {"dataset_kmeans/miou", "dataset_kmeans/pixel_acc", "dataset_kmeans/miou_std"} <= set(kmeans.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(kmeans.info.run_id)}
    assert {
        "dataset_kmeans_per_class_iou.json",
        "dataset_kmeans_confusion.png",
        "dataset_kmeans_examples.png",
        "embedding_pca.png",
    } <= artifacts
    position = evals["eval-position-checkpoint"]
    assert position.data.tags["diagnostic"] == "true" and position.data.tags["mlflow.parentRunId"] == parent
    assert {"position/r2", "position/cos_gap", "position/cos_same"} <= set(position.data.metrics)


def test_purity_needs_a_concepts_checkpoint(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tmp_path, method="concepts")
    cfg = load_config(
        str(ckpt / "config.yaml"), ["evaluate.protocols=[purity]", "evaluate.num_examples=0", "evaluate.diagnostics=[]"]
    )
    from distseg.eval.evaluate import EvaluationError, evaluate

    result = evaluate(cfg, str(ckpt), tmp_path / "eval")
    purity = result["sources"]["checkpoint"]["metrics"]["purity/purity"]["mean"]
    assert 0 < purity <= 1
    (ckpt / "loss.pt").unlink()
    with pytest.raises(EvaluationError, match="loss.pt"):
        evaluate(cfg, str(ckpt), tmp_path / "eval2")


def test_object_kmeans_gives_every_source_the_checkpoints_object_masks(tmp_path):
    """MaskContrast's k-means: the masks come from the maskcontrast checkpoint's saliency head, and
    the baselines are scored under the same masks (the same share of pixels called object)."""
    from distseg.eval.evaluate import EvaluationError, evaluate
    from distseg.eval.features import create_features

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tmp_path, method="maskcontrast")
    cfg = load_config(
        str(ckpt / "config.yaml"),
        [
            "evaluate.protocols=[object_kmeans]",
            "evaluate.num_examples=0",
            "evaluate.diagnostics=[]",
            "evaluate.baselines=[rgbxy]",
        ],
    )
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    sal = create_features("saliency", checkpoint=str(ckpt), image_size=None)(image)
    assert sal.shape == (1, 12, 10) and 0 < sal.min() and sal.max() < 1  # sigmoid on the 1/4 grid
    result = evaluate(cfg, str(ckpt), tmp_path / "eval")
    share = {s: m["metrics"]["object_kmeans/object_share"]["mean"] for s, m in result["sources"].items()}
    assert set(share) == {"checkpoint", "rgbxy"} and share["checkpoint"] == share["rgbxy"]
    for metrics in (m["metrics"] for m in result["sources"].values()):
        assert 0 <= metrics["object_kmeans/miou"]["mean"] <= 1
    # a checkpoint without a saliency head is refused before any work, naming the file
    plain, _ = make_checkpoint(tmp_path / "plain", tmp_path)
    with pytest.raises(EvaluationError, match=r"object_kmeans: .*loss.pt is missing"):
        evaluate(cfg, str(plain), tmp_path / "eval2")
    with pytest.raises(EvaluationError, match="needs --checkpoint"):
        evaluate(cfg, None, tmp_path / "eval3")
    # masks_from: the maskcontrast run's masks for another checkpoint, here the untrained hiergroup one
    borrowed = cfg.model_copy(deep=True)
    borrowed.evaluate.protocol_args = {"object_kmeans": {"masks_from": str(ckpt)}}
    result = evaluate(borrowed, str(plain), tmp_path / "eval4")
    assert result["sources"]["checkpoint"]["metrics"]["object_kmeans/object_share"]["mean"] == share["rgbxy"]


def test_bad_requests_are_named(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "none"), "--data", "synthetic"])
    assert result.exit_code == 1 and "no model.pt" in result.output
    result = runner.invoke(
        app, ["evaluate", "--baseline", "rgbxy", "--protocols", "dataset_kmeans,bogus", f"workdir={tmp_path}"]
    )
    assert result.exit_code == 1 and "bogus" in result.output
    for flag in ("--dataset", "--data"):  # --data: the old name, still accepted
        result = runner.invoke(app, ["evaluate", "--baseline", "rgbxy", flag, "bsds", f"workdir={tmp_path}"])
        assert result.exit_code == 1 and "edges eval" in result.output


def test_davis_protocol_on_real_frames(tmp_path, davis_root):
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--baseline",
            "rgbxy",
            "--data",
            "davis",
            "--protocols",
            "davis",
            "--out",
            str(out),
            f"workdir={tmp_path}",
            f"evaluate.root={davis_root}",
            "evaluate.davis_max_frames=4",
            "evaluate.davis_image_size=160",
        ],
    )
    assert result.exit_code == 0, result.output
    # strip: a cleared progress bar leaves a carriage return at the end
    assert result.output.strip().splitlines()[-2].split("\r")[-1].strip().startswith("davis: JF_mean rgbxy ")
    results = json.loads((out / "metrics.json").read_text())
    assert results["diagnostics"] == []  # video protocols only: no image splits for the position check
    assert results["image_size"] == 160  # evaluate.davis_image_size, not evaluate.image_size (320)
    m = results["sources"]["rgbxy"]["metrics"]
    assert m["davis/num_sequences"]["mean"] == 4
    assert 0 < m["davis/JF_mean"]["mean"] <= 1


def test_the_random_baseline_is_untrained_even_when_the_config_starts_from_a_checkpoint(tmp_path):
    """maskcontrast_msrc and concepts_msrc set model.init_from: the random baseline must not load it."""
    from distseg.eval.features import create_features

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tmp_path)
    cfg = load_config(str(ckpt / "config.yaml"))
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    trained = create_features("checkpoint", checkpoint=str(ckpt), image_size=None)(image)
    with_init = cfg.model.model_copy(update={"init_from": str(ckpt)})
    random_init = create_features("random", model_cfg=with_init, image_size=None, seed=3)(image)
    random_plain = create_features("random", model_cfg=cfg.model, image_size=None, seed=3)(image)
    np.testing.assert_array_equal(random_init, random_plain)
    assert np.abs(random_init - trained).max() > 1e-3


def test_a_failing_baseline_keeps_the_checkpoints_numbers(tmp_path):
    """metrics.json is written after each source: a baseline that fails in the workers (here one
    registered in the driver only) leaves the checkpoint's numbers on disk."""
    from distseg.eval.evaluate import evaluate
    from distseg.eval.features import FEATURES

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tmp_path)
    cfg = load_config(
        str(ckpt / "config.yaml"),
        [
            "evaluate.protocols=[dataset_kmeans]",
            "evaluate.diagnostics=[]",
            "evaluate.num_examples=0",
            "evaluate.baselines=[driver_only]",
        ],
    )
    FEATURES.register("driver_only", lambda **_: None)
    try:
        with pytest.raises(Exception, match="driver_only"):
            evaluate(cfg, str(ckpt), tmp_path / "eval")
    finally:
        FEATURES.unregister("driver_only")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(saved["sources"]) == ["checkpoint"]
    assert 0 < saved["sources"]["checkpoint"]["metrics"]["dataset_kmeans/miou"]["mean"] <= 1
