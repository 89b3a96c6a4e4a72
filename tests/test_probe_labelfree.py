"""The label-free in-loop probe (`pretrain.probe_protocol=prior_agreement`, distseg/train/probe.py):
the score on hand-made embeddings, the probe on real images of a folder with real Parquet shards
(images the shards hold are dropped), and the settings refused before Ray starts."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from distseg.config import load_config
from distseg.train.probe import (
    PriorAgreementProbe,
    ProbeError,
    _position,
    build_probe,
    check_probe,
    held_out_files,
    prior_agreement,
)

REPO = Path(__file__).resolve().parents[1]
LABELFREE = ["pretrain.probe_every=5", "pretrain.probe_protocol=prior_agreement"]


def regions_map(h: int = 48, w: int = 64) -> np.ndarray:
    """Five concentric rings: regions no cut of the image plane into convex cells (what k-means of
    pixel position gives) can follow."""
    ys, xs = np.mgrid[:h, :w]
    return np.minimum((np.hypot(ys - h / 2 + 0.5, xs - w / 2 + 0.5) / 7).astype(np.int64), 4)


def test_clusters_equal_to_the_regions_score_one_constant_noise_and_position_near_chance():
    regions = regions_map()
    onehot = np.eye(5, dtype=np.float32)[regions].transpose(2, 0, 1)  # constant on each region
    assert prior_agreement(onehot, regions) == pytest.approx(1.0)
    # the same at the network's 1/4 grid: the upsampled clusters lose the thin rings' borders
    quarter = np.eye(5, dtype=np.float32)[regions[2::4, 2::4]].transpose(2, 0, 1)
    assert 0.6 < prior_agreement(quarter, regions) < 1.0
    assert prior_agreement(np.ones((8, 48, 64), np.float32), regions) == 0.0  # one cluster
    for seed in range(3):
        noise = np.random.default_rng(seed).standard_normal((8, 12, 16)).astype(np.float32)
        assert abs(prior_agreement(noise, regions)) < 0.05
    assert abs(prior_agreement(_position(regions.shape), regions)) < 0.1  # x, y only: 0.054


def write_scenes(folder: Path, n: int, seed: int = 7) -> list[Path]:
    """Real synthetic scenes (the demo's generator, another seed and split than training) as PNGs."""
    from distseg.data import open_dataset

    dataset = open_dataset("synthetic", split="val", num_images=n, image_size=64, seed=seed)
    folder.mkdir(parents=True)
    paths = []
    for image_id in dataset.ids():
        paths.append(folder / f"{image_id.rsplit('/', 1)[-1]}.png")
        cv2.imwrite(str(paths[-1]), dataset[image_id].image[:, :, ::-1])
    return paths


def write_shards(root: Path, paths: list[Path], cfg) -> None:
    """Real grouping shards (ucm column) holding `paths`, as `distseg mine` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distseg.data.imageio import read_image
    from distseg.grouping.priors import create_prior
    from distseg.shards import GroupingRecord, encode_record, shard_schema

    prior = create_prior("ucm", cfg)
    rows = []
    for path in paths:
        image = read_image(path)
        rows.append(encode_record(GroupingRecord(path.stem, str(path), image, {"ucm": prior(image)}), "png"))
    (root / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=shard_schema(["ucm"])), root / "shards" / "part-0.parquet")


def test_label_free_probe_runs_on_held_out_folder_images(tmp_path):
    from distseg.models import create_model

    paths = write_scenes(tmp_path / "images", 6)
    small = ["mine.max_side=64", "hierarchy.max_regions=12", "model.head_channels=16", "model.embed_dim=8"]
    cfg = load_config("demo", [*small, *LABELFREE, "pretrain.probe_images=3", "pretrain.probe_data=images"])
    cfg.pretrain.probe_data = f"folder:{tmp_path / 'images'}"
    cfg.pretrain.shards = str(tmp_path / "mined")
    write_shards(tmp_path / "mined", paths[:2], cfg)  # the training holds the first two images
    cfg = check_probe(cfg)
    files, dropped = held_out_files(cfg)
    assert dropped == 2 and list(files) == ["00002", "00003", "00004"]
    probe = build_probe(cfg)
    assert isinstance(probe, PriorAgreementProbe) and probe.data.ids == ["00002", "00003", "00004"]
    assert all(r.shape == (64, 64) and len(np.unique(r)) >= 2 for r in probe.data.regions)
    metrics = probe(create_model(cfg.model))
    assert math.isfinite(metrics["probe_score"]) and -1.0 <= metrics["probe_score"] <= 1.0
    assert metrics["probe_score"] == metrics["probe/ari"]
    assert 0.0 < metrics["probe/ari_position"] < 1.0 and 2 <= metrics["probe/regions"] <= 12
    # the score of an embedding equal to the prior: 1 at full resolution, whatever the network
    assert probe.score([np.eye(13, dtype=np.float32)[r].transpose(2, 0, 1) for r in probe.data.regions]) == 1.0

    write_shards(tmp_path / "all", paths, cfg)  # every probe image is a training image: refused
    cfg.pretrain.shards = str(tmp_path / "all")
    with pytest.raises(ProbeError, match=r"pretrain.probe_data=.*0 of its 6 images are not in the training shards"):
        held_out_files(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (LABELFREE, "needs pretrain.probe_data"),
        ([*LABELFREE, "pretrain.probe_data=synthetic"], "pretrain.probe_data='synthetic': the label-free probe"),
        ([*LABELFREE, "pretrain.probe_data=s3://bucket/x"], "pretrain.probe_data='s3://bucket/x'"),
        (
            [*LABELFREE, "pretrain.probe_data=folder:x", "pretrain.prior=saliency", "pretrain.method=maskcontrast"],
            "pretrain.prior='saliency' yields masks",
        ),
        (["pretrain.probe_every=5", "pretrain.probe_data=folder:x"], "pretrain.probe_data='folder:x' is for the"),
        (["pretrain.probe_every=5", "pretrain.probe_segments=8"], "pretrain.probe_segments=8 is for the"),
    ],
)
def test_bad_label_free_settings_name_the_key(overrides, message):
    with pytest.raises(ProbeError, match="pretrain.probe_"):
        check_probe(load_config("demo", overrides))
    with pytest.raises(ProbeError) as info:
        check_probe(load_config("demo", overrides))
    assert message in str(info.value)


def test_probe_data_path_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = check_probe(load_config("demo", [*LABELFREE, "pretrain.probe_data=pics"]))
    assert cfg.pretrain.probe_data == f"folder:{tmp_path / 'pics'}"


def test_shipped_label_free_space_passes_the_probe_check():
    from distseg.tune import load_space

    space = load_space(REPO / "tune_spaces" / "hiergroup_labelfree.yaml")
    cfg = check_probe(load_config(space.config, space.overrides))
    assert cfg.pretrain.probe_protocol == "prior_agreement" and cfg.pretrain.prior == "ucm"
    assert cfg.pretrain.probe_data == f"folder:{Path('../shared/data/bsds500/images/train').resolve()}"


def test_grouping_sweep_with_the_label_free_probe_is_refused_before_ray(tmp_path):
    import ray

    from distseg.tune import SpaceError, sweep

    with pytest.raises(SpaceError, match="not be comparable across trials"):
        sweep(
            REPO / "tune_spaces" / "grouping.yaml",
            overrides=[f"workdir={tmp_path}", "pretrain.probe_protocol=prior_agreement", "pretrain.probe_data=x"],
        )
    assert not ray.is_initialized()
