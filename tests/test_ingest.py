"""Paired-view ingest: the same geometry for image and segments, shard rows -> batches, clear errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distseg.config import PretrainConfig
from distseg.grouping.priors import Mask, PriorOutput
from distseg.shards import GroupingRecord, encode_record, shard_schema
from distseg.train.ingest import IngestError, MakePairs, PairedViews, check_prior, shard_files

COLORS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [240, 240, 20]], np.uint8)


def quadrant_image(h: int = 64, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Segments 0..3 as quadrants; the image paints segment r in COLORS[r]."""
    seg = np.zeros((h, w), np.int16)
    seg[: h // 2, w // 2 :] = 1
    seg[h // 2 :, : w // 2] = 2
    seg[h // 2 :, w // 2 :] = 3
    return COLORS[seg], seg


def test_paired_views_keep_image_and_segments_aligned():
    torch.manual_seed(0)
    image, seg = quadrant_image()
    views = PairedViews(crop=32, crop_scale=(0.2, 1.0), color_jitter=0.0)
    for _ in range(20):
        v1, s1, c1, v2, s2, c2 = views(image, seg)
        assert v1.shape == (3, 32, 32) and s1.shape == (32, 32) and s1.dtype == np.int16
        for v, s in ((v1, s1), (v2, s2)):
            # the colour of each pixel must be its segment's colour (except on blended boundary pixels)
            err = np.abs(v.transpose(1, 2, 0).astype(int) - COLORS[s].astype(int)).max(-1)
            assert (err < 30).mean() > 0.9
            assert set(np.unique(s)) <= {0, 1, 2, 3}


def test_two_views_differ_but_share_segment_ids():
    torch.manual_seed(1)
    image, seg = quadrant_image()
    v1, s1, c1, v2, s2, c2 = PairedViews(crop=32, crop_scale=(0.1, 0.3), color_jitter=0.4)(image, seg)
    assert not np.array_equal(s1, s2)  # different crops
    assert set(np.unique(s1)) | set(np.unique(s2)) <= {0, 1, 2, 3}


def test_view_coordinates_point_at_each_pixels_source():
    """coord (y, x) of every view pixel is where it came from: the segment there is the pixel's segment,
    and the two views' coordinates agree on the source pixels both show (twins for hiergroup)."""
    torch.manual_seed(2)
    image, seg = quadrant_image(h=40, w=60)
    for _ in range(10):
        v1, s1, c1, v2, s2, c2 = PairedViews(crop=24, crop_scale=(0.2, 1.0), color_jitter=0.0)(image, seg)
        for s, c in ((s1, c1), (s2, c2)):
            assert c.shape == (2, 24, 24) and c.dtype == np.int32
            assert 0 <= c[0].min() and c[0].max() < 40 and 0 <= c[1].min() and c[1].max() < 60
            np.testing.assert_array_equal(seg[c[0], c[1]], s)
        # a flip reverses the x order of a row; a crop keeps it monotone either way
        dx = np.diff(c1[1], axis=1)
        assert (dx >= 0).all() or (dx <= 0).all()


def test_vertical_flip_turns_some_views_upside_down_and_keeps_the_coordinates():
    """pretrain.vertical_flip: rows of a view then run bottom-up in the source about half the time; the
    coordinates still point at each pixel's source. Without it every view's rows run top-down."""
    image, seg = quadrant_image(h=40, w=60)

    def upside_down(views: PairedViews, n: int = 40) -> int:
        flipped = 0
        for _ in range(n):
            v1, s1, c1, *_ = views(image, seg)
            np.testing.assert_array_equal(seg[c1[0], c1[1]], s1)
            dy = np.diff(c1[0], axis=0)
            assert (dy >= 0).all() or (dy <= 0).all()
            flipped += int((dy < 0).any())
        return flipped

    torch.manual_seed(4)
    assert 8 <= upside_down(PairedViews(crop=24, crop_scale=(0.3, 1.0), color_jitter=0.0, vertical_flip=True)) <= 32
    assert upside_down(PairedViews(crop=24, crop_scale=(0.3, 1.0), color_jitter=0.0)) == 0


def _table(records: list[GroupingRecord], priors: list[str]) -> pa.Table:
    return pa.Table.from_pylist([encode_record(r, "png") for r in records], schema=shard_schema(priors))


def test_make_pairs_ucm_rows_pad_region_distances():
    image, seg = quadrant_image()
    dist = np.array([[0, 0.2, 0.6, 0.6], [0.2, 0, 0.6, 0.6], [0.6, 0.6, 0, 0.4], [0.6, 0.6, 0.4, 0]], np.float32)
    record = GroupingRecord("a", "a.png", image, {"ucm": PriorOutput(regions=seg.astype(np.uint8), region_dist=dist)})
    cfg = PretrainConfig(prior="ucm", crop=32, max_regions=8)
    batch = MakePairs(cfg.model_dump(mode="json"))(_table([record, record], ["ucm"]))
    assert batch["view1"].shape == (2, 3, 32, 32) and batch["view1"].dtype == np.uint8
    assert batch["seg2"].shape == (2, 32, 32)
    assert batch["dist"].shape == (2, 8, 8)
    np.testing.assert_allclose(batch["dist"][0, :4, :4], dist)
    assert (batch["dist"][0, 4:, :] == 1).all()


def test_make_pairs_saliency_mask_is_foreground_and_rows_without_mask_are_skipped():
    image, seg = quadrant_image()
    fg = seg == 3
    with_mask = GroupingRecord("a", "a.png", image, {"saliency": PriorOutput(masks=[Mask(fg, 0.9)])})
    without = GroupingRecord("b", "b.png", image, {"saliency": PriorOutput(masks=[])})
    cfg = PretrainConfig(prior="saliency", crop=64, crop_scale=(1.0, 1.0), color_jitter=0.0)
    batch = MakePairs(cfg.model_dump(mode="json"))(_table([with_mask, without], ["saliency"]))
    assert batch["seg1"].shape[0] == 1  # the image with no salient object is dropped
    assert set(np.unique(batch["seg1"])) == {0, 1}
    assert 0.15 < batch["seg1"].mean() < 0.35  # one quadrant is foreground


def test_views_depend_on_the_seed_pass_and_image_only():
    """Reproducible ingest: a row's two views are a function of (run seed, pass, image id), not of the
    task, the batch it shares or the process's RNG state."""
    image, seg = quadrant_image()
    dist = np.array([[0, 0.2, 0.6, 0.6], [0.2, 0, 0.6, 0.6], [0.6, 0.6, 0, 0.4], [0.6, 0.6, 0.4, 0]], np.float32)
    prior = {"ucm": PriorOutput(regions=seg.astype(np.uint8), region_dist=dist)}
    a, b = (GroupingRecord(i, f"{i}.png", image, prior) for i in ("a", "b"))
    cfg = PretrainConfig(prior="ucm", crop=32, max_regions=8).model_dump(mode="json")

    def views(records, seed=0, pass_index=0):
        table = _table(records, ["ucm"])
        table = table.append_column("pass", pa.array([pass_index] * table.num_rows, pa.int32()))
        return MakePairs(cfg, seed)(table)

    both = views([a, b])
    torch.manual_seed(123)  # the process's RNG state does not matter
    alone = views([b])
    for key in ("view1", "view2", "coord1", "coord2", "seg1"):
        np.testing.assert_array_equal(both[key][1], alone[key][0])
    assert not np.array_equal(both["coord1"][0], both["coord1"][1])  # two images, two draws
    assert not np.array_equal(views([b], pass_index=1)["coord1"][0], alone["coord1"][0])  # next pass: new views
    assert not np.array_equal(views([b], seed=1)["coord1"][0], alone["coord1"][0])  # another seed: new views


def test_repeats_come_back_only_after_every_other_image(tmp_path):
    """build_dataset on a real local Ray: with 3 views per image from 2 shard files of 6 images, an
    image's next view comes at least a whole shard file later (the files of a pass may arrive in any
    order), so neither a batch nor a queue of the last few batches holds the same image twice."""
    import ray

    from distseg.train.ingest import build_dataset

    colours = np.array([[20 * i, 250 - 20 * i, (67 * i) % 250] for i in range(12)], np.uint8)
    regions = np.zeros((32, 32), np.uint8)
    regions[:, 16:] = 1
    dist = np.array([[0, 0.5], [0.5, 0]], np.float32)
    for part in range(2):
        records = [
            GroupingRecord(
                f"img{i}",
                f"img{i}.png",
                np.broadcast_to(colours[i], (32, 32, 3)).copy(),
                {"ucm": PriorOutput(regions=regions, region_dist=dist)},
            )
            for i in range(6 * part, 6 * part + 6)
        ]
        pq.write_table(_table(records, ["ucm"]), tmp_path / f"part-{part}.parquet")
    cfg = PretrainConfig(prior="ucm", crop=32, crop_scale=(1.0, 1.0), color_jitter=0.0, max_regions=4, batch_size=4)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        batches = list(build_dataset(tmp_path, cfg, passes=3).iter_batches(batch_size=None))
        resumed = list(build_dataset(tmp_path, cfg, passes=1, first_pass=2).iter_batches(batch_size=None))
    finally:
        ray.shutdown()
    views = [b["view1"] for b in batches]
    passes = np.concatenate([b["pass"] for b in batches])
    assert passes.tolist() == sorted(passes.tolist()) == [0] * 12 + [1] * 12 + [2] * 12  # one pass after another

    # each pass draws its own views, and a dataset that starts at pass 2 (a resumed run) draws pass 2's
    def by_image(rows: list[dict], which: int) -> dict[int, np.ndarray]:
        return {int(i): v for b in rows for i, v, p in zip(b["image_index"], b["coord1"], b["pass"]) if p == which}

    first, second, third = (by_image(batches, p) for p in range(3))
    assert len(first) == 12 and sum(not np.array_equal(first[i], second[i]) for i in first) >= 3  # flips differ
    again = by_image(resumed, 2)
    assert again.keys() == third.keys() and all(np.array_equal(again[i], third[i]) for i in third)
    means = np.concatenate(views).mean(axis=(2, 3))
    order = [int(np.abs(colours.astype(int) - m).sum(1).argmin()) for m in means]
    assert sorted(order) == sorted(list(range(12)) * 3)
    gaps = [j - i for i in range(len(order)) for j in range(i + 1, len(order)) if order[i] == order[j]]
    assert min(gaps) >= 6, str(order)


def test_the_dataset_covers_the_run_and_a_resume_reads_new_passes():
    """ingest.passes_needed / pass_order: the passes a run streams cover every step still to train (one
    pass to spare), so views are never drawn twice under one pass index; a pass's file order depends on
    (seed, pass) alone, so a run resumed at pass p reads the files as the uninterrupted run would."""
    from distseg.train.ingest import pass_order, passes_needed

    cfg = PretrainConfig(steps=1200, batch_size=8)
    assert passes_needed(445, cfg, 1) == 23  # ceil(1200 * 8 / 445) + 1
    assert passes_needed(445, cfg, 2, done_steps=900) == 12  # 300 more steps of 2 workers: ceil(4800 / 445) + 1
    assert passes_needed(100_000, cfg, 1) == 2
    files = [f"part-{i}.parquet" for i in range(5)]
    full = pass_order(files, seed=3, first_pass=0, passes=4)
    assert [p for p, _ in full] == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert all(sorted(f for q, f in full if q == p) == files for p in range(4))
    assert pass_order(files, seed=3, first_pass=2, passes=2) == full[10:]
    assert len({tuple(f for q, f in full if q == p) for p in range(4)}) > 1  # each pass its own order
    assert pass_order(files, seed=4, first_pass=0, passes=4) != full


def test_too_many_regions_is_a_clear_error():
    image, seg = quadrant_image()
    record = GroupingRecord(
        "big",
        "big.png",
        image,
        {"ucm": PriorOutput(regions=seg.astype(np.uint8), region_dist=np.zeros((4, 4), np.float32))},
    )
    cfg = PretrainConfig(prior="ucm", crop=32, max_regions=2)
    with pytest.raises(IngestError, match="big: 4 regions > pretrain.max_regions=2"):
        MakePairs(cfg.model_dump(mode="json"))(_table([record], ["ucm"]))


def test_more_regions_than_max_regions_is_refused_before_training(tmp_path):
    """ingest.check_regions (run by `distseg pretrain` before Ray starts): a ucm prior with more regions
    than pretrain.max_regions, or a superpixel prior whose ids hiergroup would look up in d_T beyond it,
    names the shard, the image and the setting; methods that use no d_T take superpixels as they are.
    Through the CLI: exit 1, the message, and no Ray cluster started."""
    import ray
    from typer.testing import CliRunner

    from distseg.cli import app
    from distseg.train.ingest import check_regions

    image, seg = quadrant_image()
    dist = np.full((4, 4), 0.5, np.float32)
    ucm = GroupingRecord("big", "big.png", image, {"ucm": PriorOutput(regions=seg.astype(np.uint8), region_dist=dist)})
    slic = GroupingRecord("sp", "sp.png", image, {"slic": PriorOutput(regions=seg.astype(np.uint8))})
    for name, record, prior in (("ucm", ucm, "ucm"), ("slic", slic, "slic")):
        (tmp_path / name).mkdir()
        pq.write_table(_table([record], [prior]), tmp_path / name / "part-0.parquet")
    ucm_files, slic_files = shard_files(tmp_path / "ucm"), shard_files(tmp_path / "slic")
    with pytest.raises(IngestError, match="part-0.parquet, image big: prior 'ucm' has 4 regions, .*max_regions=4 or"):
        check_regions(ucm_files, PretrainConfig(prior="ucm", max_regions=3))
    check_regions(ucm_files, PretrainConfig(prior="ucm", max_regions=4))
    with pytest.raises(IngestError, match="image sp: prior 'slic' has 4 regions"):
        check_regions(slic_files, PretrainConfig(method="hiergroup", prior="slic", max_regions=2))
    check_regions(slic_files, PretrainConfig(method="concepts", prior="slic", max_regions=2))

    result = CliRunner().invoke(
        app, ["pretrain", "--shards", str(tmp_path / "ucm"), f"workdir={tmp_path}", "pretrain.max_regions=3"]
    )
    assert result.exit_code == 1, result.output
    assert "image big: prior 'ucm' has 4 regions, more than pretrain.max_regions=3" in result.output
    assert not ray.is_initialized()


def test_missing_shards_and_missing_prior_are_named(tmp_path):
    with pytest.raises(IngestError, match="no Parquet shards"):
        shard_files(tmp_path)
    image, seg = quadrant_image()
    record = GroupingRecord("a", "a.png", image, {"slic": PriorOutput(regions=seg.astype(np.uint8))})
    (tmp_path / "shards").mkdir()
    pq.write_table(_table([record], ["slic"]), tmp_path / "shards" / "part-0.parquet")
    files = shard_files(tmp_path)
    assert len(files) == 1
    with pytest.raises(IngestError, match="no column for prior 'ucm' \\(it has: slic\\)"):
        check_prior(files, "ucm")


def test_blur_softens_the_views_and_leaves_segments_and_coordinates_alone():
    """pretrain.blur (SimCLR's Gaussian blur, He et al.'s augmentations): with p = 1 the views' images
    lose high-frequency energy (sigma is drawn in [0.1, 2], so on average over draws), while segments
    and coordinates are the same draws as without it."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)  # noise: all high frequencies
    seg = np.repeat(np.arange(4), 30)[None].repeat(80, 0)

    def energy(v: np.ndarray) -> float:
        return float(np.abs(np.diff(v.astype(float), axis=-1)).mean())

    def draws(blur: float, n: int = 12):
        torch.manual_seed(7)
        views = PairedViews(crop=64, crop_scale=(0.5, 1.0), color_jitter=0.0, blur=blur)
        return [views(image, seg) for _ in range(n)]

    sharp, blurred = draws(0.0), draws(1.0)
    for i in (1, 2):  # the first view's segments and coordinates: the same crop, untouched by the blur
        np.testing.assert_array_equal(sharp[0][i], blurred[0][i])
    for d in blurred:  # (later crops differ: the blur draws from the same generator) still aligned
        for s, c in ((d[1], d[2]), (d[4], d[5])):
            np.testing.assert_array_equal(seg[c[0], c[1]], s)
    e_sharp = np.mean([energy(d[0]) for d in sharp])
    e_blur = [energy(d[0]) for d in blurred]
    assert np.mean(e_blur) < 0.7 * e_sharp, (e_sharp, e_blur)
    assert max(e_blur) > 0.8 * e_sharp  # a sigma near 0.1 barely blurs: the strength is drawn


def test_a_shard_files_rows_are_read_in_image_id_order_whatever_order_mining_wrote(tmp_path):
    """Mining writes rows as its actors finish, so two minings of the same images differ in row order;
    the read sorts them, so the seeded shuffle makes the same batches from either."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distseg.train.ingest import _read_files

    ids = ["img_3", "img_0", "img_2", "img_1"]
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"image_id": ids, "height": [1, 2, 3, 4]}), path)
    table = _read_files(pa.table({"path": [str(path)], "pass": [2]}), columns=["image_id", "height"])
    assert table.column("image_id").to_pylist() == ["img_0", "img_1", "img_2", "img_3"]
    assert table.column("height").to_pylist() == [2, 4, 3, 1]  # whole rows move together
    assert table.column("pass").to_pylist() == [2, 2, 2, 2]
