"""Other proposals for MaskDistill's "cluster the initial masks" (Table 1 row (a)): `distseg distill
cluster --prior saliency | felzenszwalb_masks`, clustered with the features and settings of
priors.vit_masks, then scored with Hungarian matching.

Real parts: OpenCV's Felzenszwalb segmentation on real MSRC-v2 images (skipped when absent), a real
in-process Ray cluster, real Parquet shards, faiss and MLflow. The affinity source is a randomly
initialised vit_tiny saved as the user's weights file (see test_distill_masks), so the numbers checked
are the mechanics, not the masks' quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_distill_masks import SHARED_DATA, config, weights  # noqa: F401  (weights: the fixture)

from distseg.grouping.priors import largest_regions


def test_largest_regions_known_answer():
    """Regions of 50, 30, 15 and 5 pixels: the largest first, scored by their share of the image;
    min_area drops the 5-pixel one even when more masks are allowed."""
    regions = np.array([0] * 50 + [3] * 30 + [1] * 15 + [2] * 5, np.uint8).reshape(10, 10)
    masks = largest_regions(regions, max_masks=3, min_area=0.0)
    assert [int(m.mask.sum()) for m in masks] == [50, 30, 15]
    assert [m.score for m in masks] == pytest.approx([0.5, 0.3, 0.15]) and {m.label for m in masks} == {1}
    assert np.array_equal(masks[1].mask, regions == 3)
    assert [int(m.mask.sum()) for m in largest_regions(regions, max_masks=10, min_area=0.1)] == [50, 30, 15]
    assert len(largest_regions(regions, max_masks=1, min_area=0.0)) == 1


def test_felzenszwalb_masks_prior_on_real_images():
    import cv2

    from distseg.config import load_config
    from distseg.grouping.priors import create_prior, prior_yields

    photos = sorted((SHARED_DATA / "msrc_v2" / "images").glob("*.png"))[:3]
    if not photos:
        pytest.skip(f"no MSRC-v2 images under {SHARED_DATA}")
    assert prior_yields("felzenszwalb_masks") == "masks"
    cfg = load_config(
        "maskdistill", ["priors.felzenszwalb_masks.max_masks=3", "priors.felzenszwalb_masks.min_area=0.02"]
    )
    prior = create_prior("felzenszwalb_masks", cfg)
    regions = create_prior("felzenszwalb", cfg)
    for photo in photos:
        image = np.ascontiguousarray(cv2.imread(str(photo))[:, :, ::-1])
        masks = prior(image).masks
        assert 1 <= len(masks) <= 3
        assert all(m.mask.shape == image.shape[:2] and m.mask.mean() >= 0.02 for m in masks)
        assert np.sum([m.mask for m in masks], axis=0).max() == 1  # regions: disjoint
        assert [m.score for m in masks] == sorted((m.score for m in masks), reverse=True)
        labels = regions(image).regions  # the same segmentation: each mask is one of its regions
        assert all(len(np.unique(labels[m.mask])) == 1 for m in masks)
    assert prior(np.zeros((1, 1, 3), np.uint8)).masks == []


@pytest.mark.parametrize(
    ("prior", "message"),
    [("nope", "unknown prior 'nope'"), ("felzenszwalb", "'felzenszwalb' yields regions, not masks")],
)
def test_cli_names_a_bad_proposal_prior(tmp_path, prior, message):
    from typer.testing import CliRunner

    from distseg.cli import app

    args = ["distill", "cluster", "--shards", str(tmp_path / "masks"), "--out", str(tmp_path / "out"), "--prior", prior]
    result = CliRunner().invoke(app, [*args, f"workdir={tmp_path}"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "--prior" in text and message in text
    assert "felzenszwalb_masks" in text and "saliency" in text  # the mask priors it could have named
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # one Ray cluster, two clusterings of 8 scenes: about a minute on the shared 2-core machine
def test_cluster_and_score_saliency_and_felzenszwalb_proposals(weights, tmp_path):  # noqa: F811
    """Mine saliency and felzenszwalb_masks on synthetic scenes, cluster each with vit_masks' settings
    into its own version, score row (a) against the scenes' labels and log the mask sheet."""
    from mlflow.tracking import MlflowClient

    from distseg.cluster import shutdown_ray
    from distseg.distill.cluster import cluster_masks, read_manifest
    from distseg.distill.stage import synthetic_images
    from distseg.mining import mine
    from distseg.shards import decode_record
    from distseg.tracking import tracking_uri

    cfg = config(
        weights,
        f"workdir={tmp_path}",
        "data.num_images=8",
        "data.image_size=64",
        "mine.priors=[saliency,felzenszwalb_masks]",
        "priors.vit_masks.short_side=64",
        "priors.vit_masks.clusters=3",
        "ray.num_cpus=2",
    )
    try:
        mined = mine(cfg, synthetic_images(cfg), str(tmp_path / "masks"), progress=False, track=False)
        assert mined.mined == 8 and mined.errors == 0
        before = {p.name: p.read_bytes() for p in (tmp_path / "masks" / "shards").glob("*.parquet")}
        felz = cluster_masks(cfg, str(tmp_path / "masks"), prior="felzenszwalb_masks", score=True, track=True)
        sal = cluster_masks(cfg, str(tmp_path / "masks"), prior="saliency", score=True, track=False)
    finally:
        shutdown_ray()
    assert {p.name: p.read_bytes() for p in (tmp_path / "masks" / "shards").glob("*.parquet")} == before
    for out, prior, most in ((felz, "felzenszwalb_masks", 3), (sal, "saliency", 1)):
        assert out.output == f"{tmp_path / 'masks'}_{prior}_k3" and out.prior == prior and out.clusters == 3
        assert out.images <= 8 and out.images <= out.masks <= most * 8 and sum(out.sizes) == out.masks
        manifest = read_manifest(out.output)
        assert manifest["version"] == 2 and manifest["cluster"]["prior"] == prior
        labels = []
        for path in sorted((Path(out.output) / "shards").glob("*.parquet")):
            for row in pq.read_table(path).to_pylist():
                labels += [m.label for m in decode_record(row, [prior]).priors[prior].masks]
        assert len(labels) == out.masks and set(labels) <= {1, 2, 3} and len(set(labels)) >= 2
        scores = out.scores
        assert scores["images"] == 8 and scores["without_truth"] == 0
        assert 0 < scores["hungarian"]["miou"] <= 1 and 0 < scores["majority"]["miou"] <= 1
    assert felz.masks > sal.masks  # up to three regions per scene against one foreground mask

    client = MlflowClient(tracking_uri(cfg.workdir, cfg.tracking.uri))
    run = client.get_run(felz.run_id)
    assert run.data.tags["prior"] == "felzenszwalb_masks" and run.info.run_name.endswith("-felzenszwalb_masks")
    assert run.data.metrics["a_initial_masks_hungarian"] == pytest.approx(felz.scores["hungarian"]["miou"])
    assert run.data.metrics["masks_per_image"] == pytest.approx(felz.masks / felz.images)
    artifacts = {a.path for a in client.list_artifacts(felz.run_id)}
    assert {"masks_by_cluster.png", "scores.json", "_manifest.json"} <= artifacts
    logged = json.loads(Path(client.download_artifacts(felz.run_id, "scores.json", str(tmp_path))).read_text())
    assert logged["hungarian"]["miou"] == pytest.approx(felz.scores["hungarian"]["miou"])
