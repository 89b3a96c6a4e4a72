import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distseg.grouping.priors import Mask, PriorOutput, relabel
from distseg.shards import (
    META_CONFIG,
    META_VERSION,
    SCHEMA_VERSION,
    GroupingRecord,
    decode_record,
    encode_record,
    shard_schema,
)


def make_record(height=37, width=53, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    regions = (np.arange(height)[:, None] // 10 * 6 + np.arange(width)[None] // 10).astype(np.uint8)
    k = int(regions.max()) + 1
    dist = rng.random((k, k)).astype(np.float32)
    dist = np.maximum(dist, dist.T)
    np.fill_diagonal(dist, 0)
    ucm = np.zeros((height, width), np.float32)
    ucm[::10, :] = 0.5
    ucm[:, ::10] = 1.0
    mask = np.zeros((height, width), bool)
    mask[5:20, 7:30] = True
    return GroupingRecord(
        image_id="a/b",
        uri="file:///x/a/b.png",
        image=image,
        priors={
            "ucm": PriorOutput(regions=regions, region_dist=dist, ucm=ucm),
            "slic": PriorOutput(regions=regions[::-1].copy()),
            "saliency": PriorOutput(masks=[Mask(mask, 0.75, 1), Mask(~mask, 0.25, 2)]),
            "empty_saliency": PriorOutput(masks=[]),
        },
    )


def test_every_column_round_trips_through_parquet(tmp_path):
    record = make_record()
    priors = list(record.priors)
    schema = shard_schema(priors, {"a": 1})
    table = pa.Table.from_pylist([encode_record(record, image_format="png")], schema=schema)
    pq.write_table(table, tmp_path / "s.parquet")
    read = pq.read_table(tmp_path / "s.parquet")
    assert read.schema.metadata[META_VERSION] == str(SCHEMA_VERSION).encode()
    assert len(read.schema.metadata[META_CONFIG]) == 16
    back = decode_record(read.to_pylist()[0])
    assert back.image_id == "a/b" and back.uri == record.uri
    assert np.array_equal(back.image, record.image)  # png: lossless
    u, u0 = back.priors["ucm"], record.priors["ucm"]
    assert np.array_equal(u.regions, u0.regions)
    assert np.array_equal(u.region_dist, u0.region_dist)
    assert np.abs(u.ucm - u0.ucm).max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation
    assert np.array_equal(back.priors["slic"].regions, record.priors["slic"].regions)
    assert back.priors["slic"].region_dist is None and back.priors["slic"].ucm is None
    masks = back.priors["saliency"].masks
    assert [m.label for m in masks] == [1, 2] and masks[0].score == pytest.approx(0.75)
    assert np.array_equal(masks[0].mask, record.priors["saliency"].masks[0].mask)
    assert np.array_equal(masks[1].mask, ~record.priors["saliency"].masks[0].mask)
    assert back.priors["empty_saliency"].masks == []


def test_jpeg_image_is_close():
    record = make_record()
    record.image[:] = 128
    back = decode_record(encode_record(record))
    assert np.abs(back.image.astype(int) - 128).max() <= 2


def test_relabel_consecutive_and_bounded():
    labels = np.array([[7, 7, 3], [3, 100, 7]])
    assert relabel(labels).tolist() == [[0, 0, 1], [1, 2, 0]]
    with pytest.raises(ValueError, match="256 regions"):
        relabel(np.arange(256).reshape(16, 16))


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    """Manifests, shards and centroids go through storage.write_bytes / write_parquet: a write that dies
    midway leaves the file as it was (a temporary name, then a rename), never half of one."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from distseg.storage import write_bytes, write_parquet, write_text

    fs, manifest = pafs.LocalFileSystem(), str(tmp_path / "out" / "_manifest.json")
    write_text(manifest, '{"rows": 4}')
    with pytest.raises(TypeError):
        write_bytes(fs, manifest, object())  # dies while writing
    assert (tmp_path / "out" / "_manifest.json").read_text() == '{"rows": 4}'

    shard = str(tmp_path / "out" / "shards" / "part-0.parquet")
    write_parquet(pa.table({"id": ["a", "b"]}), fs, shard)
    bad = pa.table({"id": pa.array([pa.MonthDayNano([1, 2, 3])], pa.month_day_nano_interval())})
    with pytest.raises(NotImplementedError):  # no Parquet type: fails after the file is opened
        write_parquet(bad, fs, shard)  # (pq.write_table on the shard itself deletes it here)
    assert pq.read_table(shard).column("id").to_pylist() == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir() if not p.name.startswith(".")) == [
        "part-0.parquet"
    ]


def test_region_dist_decodes_to_its_square_matrix_and_refuses_another_length():
    from distseg.shards import decode_region_dist

    d = np.arange(9, dtype=np.float32).reshape(3, 3)
    assert np.array_equal(decode_region_dist(d.ravel().tolist()), d)
    assert decode_region_dist(None) is None
    with pytest.raises(ValueError, match="holds 8 values"):
        decode_region_dist([0.0] * 8)
