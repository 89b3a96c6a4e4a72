"""MaskDistill part 1: ViT affinities, mask proposals (the `vit_masks` prior), and the clustering stage.

Real parts throughout: timm ViTs, real images (BSDS500 / MSRC-v2 from ../shared/data, skipped when
absent), a real in-process Ray cluster, real Parquet shards and faiss. No pretrained weights exist on
this machine (and nothing is downloaded), so the "user's weights file" is a randomly initialised
vit_tiny saved with a fixed seed: the tests check the mechanics and the numbers of the method, not
the masks' quality. The purity test clusters the synthetic scenes' ground-truth instance masks (see
its docstring for why).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as coco_mask

from distseg.distill.affinity import AFFINITY_SOURCES, Affinity, AffinitySource, affinities_from_qkv, vit_source
from distseg.distill.masks import grow_mask, mask_box, propose_masks, select_proposals, source_component
from distseg.models.vit import create_vit

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTSEG_DATA_ROOT", REPO.parent / "shared" / "data"))
TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A local ViT weights file, as a user would give DINO's (random init: no pretrained weights here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(create_vit(TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def real_images(count: int = 4) -> list[np.ndarray]:
    photos = sorted((SHARED_DATA / "msrc_v2" / "images").glob("*.png"))[:count]
    photos += sorted((SHARED_DATA / "bsds500" / "images" / "test").glob("*.jpg"))[:count]
    if not photos:
        pytest.skip(f"no real images under {SHARED_DATA} (MSRC-v2 / BSDS500 absent)")
    return [np.ascontiguousarray(cv2.imread(str(p), cv2.IMREAD_COLOR)[:, :, ::-1]) for p in photos]


def config(weights: Path, *extra: str):
    from distseg.config import load_config

    return load_config(
        "maskdistill_demo",
        [
            f"priors.vit_masks.weights={weights}",
            "priors.vit_masks.source=vit",
            f"priors.vit_masks.model={TINY}",
            "priors.vit_masks.features=cls",
            "mine.priors=[vit_masks]",
            "mine.num_actors=1",  # one torch actor: this 2-core test machine is shared
            *extra,
        ],
    )


# ---------------------------------------------------------------- affinities on hand-made tokens


def test_affinities_from_qkv_known_answer():
    """2 heads of width 1, tokens [CLS], p1, p2: A_ij = mean_h q_i^h k_j^h, worked out by hand."""
    q = np.array([[1, 3], [2, 0], [0, 1]], np.float32)  # rows: tokens; columns: heads
    k = np.array([[0, 0], [1, 1], [-1, 3]], np.float32)
    qkv = torch.from_numpy(np.concatenate([q, k, np.zeros_like(q)], 1))  # (N, 3 * C), C = heads * 1
    aff = affinities_from_qkv(qkv, num_heads=2, num_prefix=1, affinity="qk")
    assert np.allclose(aff.a_cls, [2.0, 4.0])  # (1*1 + 3*1) / 2, (1*-1 + 3*3) / 2
    assert np.allclose(aff.A, [[1.0, -1.0], [0.5, 1.5]])  # not symmetric: queries against keys
    # kk (the default, the reference code): patch keys (1, 1), (-1, 3): [[(1+1)/2, (-1+3)/2], [., (1+9)/2]]
    kk = affinities_from_qkv(qkv, num_heads=2, num_prefix=1)
    assert np.allclose(kk.A, [[1.0, 1.0], [1.0, 5.0]]) and np.allclose(kk.a_cls, aff.a_cls)
    # kk_centered: per-head mean patch key (0, 2) -> centred keys (1, -1), (-1, 1)
    centred = affinities_from_qkv(qkv, num_heads=2, num_prefix=1, affinity="kk_centered")
    assert np.allclose(centred.A, [[1.0, -1.0], [-1.0, 1.0]])
    with pytest.raises(ValueError, match="priors.vit_masks.affinity: 'vq'"):
        affinities_from_qkv(qkv, num_heads=2, affinity="vq")
    # [CLS] softmax attention (scale 1/sqrt(1)): head 0 logits (0, 1, -1), head 1 (0, 3, 9); patches only
    h0, h1 = np.exp([0, 1, -1]) / np.exp([0, 1, -1]).sum(), np.exp([0, 3, 9]) / np.exp([0, 3, 9]).sum()
    expected = ((h0 + h1) / 2)[1:]
    assert np.allclose(aff.cls_attention, expected / expected.sum(), atol=1e-6)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        affinities_from_qkv(qkv, num_heads=2, num_prefix=0)
    with pytest.raises(ValueError, match="3 \\* heads"):
        affinities_from_qkv(qkv[:, :5], num_heads=2)


def offset_tokens(shift: float) -> torch.Tensor:
    """qkv of 1 head, width 2: [CLS] + a 2 x 2 grid whose top row {0, 1} is one object (keys (1, 0)) and
    bottom row the background (keys (-1, 0)); every key (the [CLS] key too) is shifted by (0, shift)."""
    q = np.array([[1, 0], [1, 1], [1, 1], [-1, 1], [-1, 1]], np.float32)
    k = np.array([[0, 0], [1, 0], [1, 0], [-1, 0], [-1, 0]], np.float32) + np.array([0, shift], np.float32)
    return torch.from_numpy(np.concatenate([q, k, np.zeros_like(q)], 1))


@pytest.mark.parametrize("affinity", ["qk", "kk", "kk_centered"])
def test_a_shared_key_offset_moves_qk_and_kk_but_not_the_attention_or_kk_centered(affinity):
    """Adding one vector c to every key adds q_i . c to row i of the logits: the softmax attention and
    A_cls's ranking do not move, but q_i . k_j does (here by +3 on every entry, so the q . k mask grows
    over the whole grid) and so does k_i . k_j (by c . (k_i + k_j) + |c|^2); centred keys do not."""
    masks = {}
    for shift in (0.0, 3.0):
        aff = affinities_from_qkv(offset_tokens(shift), num_heads=1, affinity=affinity)
        aff.grid = (2, 2)
        assert np.allclose(aff.cls_attention, [0.5, 0.5, 0.0, 0.0], atol=0.2)  # [CLS] attends the object
        masks[shift] = propose_masks(aff, top_k=0.5, max_masks=1)[0].mask.tolist()
        assert select_proposals(aff.a_cls, 0.5).tolist() == [0, 1]
    base = affinities_from_qkv(offset_tokens(0.0), num_heads=1, affinity=affinity)
    moved = affinities_from_qkv(offset_tokens(3.0), num_heads=1, affinity=affinity)
    assert np.allclose(base.cls_attention, moved.cls_attention, atol=1e-6)  # the attention ignores c
    assert masks[0.0] == [[True, True], [False, False]]  # without the offset every rule finds the object
    if affinity == "kk_centered":
        assert np.allclose(base.A, moved.A, atol=1e-5) and masks[3.0] == masks[0.0]
    else:
        assert masks[3.0] == [[True, True], [True, True]]  # the offset makes every affinity positive


def test_source_component_keeps_the_connected_part_holding_the_source():
    """The reference code's last step: of the grown mask, only the source's 4-connected component."""
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 1], [1, 0, 1, 0]], bool).ravel()
    assert source_component(mask, (3, 4), 0).reshape(3, 4).astype(int).tolist() == [
        [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]
    ]  # fmt: skip
    assert source_component(mask, (3, 4), 7).reshape(3, 4)[:, 3].tolist() == [True, True, False]  # no diagonals
    A = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], np.float32)  # a 1 x 3 grid: patches 0 and 2 alike
    aff = Affinity(np.array([0.9, 0.1, 0.5], np.float32), A, np.full(3, 1 / 3, np.float32), (1, 3))
    assert propose_masks(aff, top_k=1.0, max_masks=1, component=False)[0].mask.tolist() == [[True, False, True]]
    assert propose_masks(aff, top_k=1.0, max_masks=1)[0].mask.tolist() == [[True, False, False]]


def test_top_k_proposals_and_source():
    a_cls = np.array([0.1, 0.9, 0.5, 0.3, 0.7])
    assert select_proposals(a_cls, 0.4).tolist() == [1, 4]  # ceil(0.4 * 5) = 2 patches, largest first
    assert select_proposals(a_cls, 1.0).tolist() == [1, 4, 2, 3, 0]
    assert select_proposals(a_cls, 0.01).tolist() == [1]  # at least the source
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="top_k"):
            select_proposals(a_cls, bad)


def two_objects() -> Affinity:
    """A 2 x 2 grid: patches {0, 1} one object, {2, 3} another (positive within, negative across)."""
    A = np.array([[2, 1, -1, -2], [1, 2, -2, -1], [-1, -2, 2, 1], [-2, -1, 1, 2]], np.float32)
    attention = np.array([0.4, 0.1, 0.3, 0.2], np.float32)
    return Affinity(a_cls=np.array([0.9, 0.1, 0.8, 0.2], np.float32), A=A, cls_attention=attention, grid=(2, 2))


def test_grow_mask_from_the_source_through_A():
    aff = two_objects()
    mask, seeds = grow_mask(aff.A, 0, np.array([0, 2]))
    assert seeds.tolist() == [0]  # A[0, 2] < 0: patch 2 is not similar to the source
    assert mask.tolist() == [True, True, False, False]  # sum_{p in S'} A[q, p] > 0
    mask, seeds = grow_mask(aff.A, 0, np.array([0, 1, 2]))
    assert sorted(seeds.tolist()) == [0, 1] and mask.tolist() == [True, True, False, False]
    negative = -np.eye(3, dtype=np.float32)  # even when nothing is similar, the source is in its mask
    mask, seeds = grow_mask(negative, 1, np.array([1]))
    assert mask.tolist() == [False, True, False] and seeds.tolist() == [1]


def test_propose_masks_finds_both_objects_and_scores_them():
    masks = propose_masks(two_objects(), top_k=0.5, max_masks=3)
    assert [m.source for m in masks] == [0, 2]  # top-1 first, then the best uncovered proposal
    assert masks[0].mask.tolist() == [[True, True], [False, False]]
    assert masks[1].mask.tolist() == [[False, False], [True, True]]
    assert [round(m.score, 6) for m in masks] == [0.5, 0.5]  # share of [CLS] attention
    assert len(propose_masks(two_objects(), top_k=0.5, max_masks=1)) == 1  # the paper's single mask
    everything = two_objects()
    everything.A = np.abs(everything.A)  # one object: the first mask covers all, no second candidate
    assert len(propose_masks(everything, top_k=1.0, max_masks=3)) == 1
    with pytest.raises(ValueError, match="2x2 grid"):
        propose_masks(Affinity(np.zeros(3), np.zeros((3, 3)), np.zeros(3), (2, 2)))


def test_vit_hook_matches_timm_attention():
    """The hooked qkv gives timm's own [CLS] attention (read from the unfused path) and P = h * w tokens."""
    torch.manual_seed(0)
    vit = create_vit(TINY)
    source = AffinitySource(vit, "test", short_side=None)
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), np.uint8)
    captured = {}
    attn = vit.blocks[-1].attn
    attn.fused_attn = False  # so the softmax attention passes through attn_drop, where we can read it
    attn.attn_drop.register_forward_hook(lambda m, i, out: captured.update(attn=out.detach()))
    aff = source.affinities(image)
    assert aff.grid == (3, 5) and aff.a_cls.shape == (15,) and aff.A.shape == (15, 15)
    timm_cls = captured["attn"][0, :, 0, 1:].mean(0).numpy()
    assert np.allclose(aff.cls_attention, timm_cls / timm_cls.sum(), atol=1e-5)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="priors.vit_masks.weights"):
        AFFINITY_SOURCES.build("vit", model=TINY, weights=None)
    missing = tmp_path / "dino_vits16.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        vit_source(model=TINY, weights=str(missing))
    import timm

    with pytest.raises(ValueError, match="no self-attention"):
        AffinitySource(timm.create_model("resnet10t", pretrained=False), "timm:resnet10t")
    source = AffinitySource(create_vit(TINY), "test", short_side=32)
    with pytest.raises(ValueError, match="1x1 pixels"):
        source.affinities(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="priors.vit_masks.checkpoint: .*model.pt is missing"):
        AFFINITY_SOURCES.build("checkpoint", checkpoint=str(tmp_path))


def test_checkpoint_source_reads_a_distseg_vit_checkpoint(tmp_path):
    """A distseg checkpoint (vit_tiny backbone) is an affinity source: its ViT's affinities and its
    pixel embedding pooled per mask; a ResNet checkpoint is refused by name."""
    from distseg.checkpoint import save_checkpoint
    from distseg.config import load_config
    from distseg.models import create_model

    torch.manual_seed(0)
    cfg = load_config("maskdistill_demo", ["model.head_channels=16", "model.embed_dim=8"])
    net = create_model(cfg.model)
    save_checkpoint(tmp_path / "vit", cfg=cfg, step=1, model=net.state_dict())
    source = AFFINITY_SOURCES.build("checkpoint", checkpoint=str(tmp_path / "vit"), short_side=64)
    image = np.random.default_rng(1).integers(0, 255, (64, 96, 3), np.uint8)
    aff = source.affinities(image)
    assert aff.grid == (4, 6) and aff.A.shape == (24, 24)
    assert torch.equal(source.vit.blocks[0].attn.qkv.weight, net.backbone.vit.blocks[0].attn.qkv.weight)
    masks = [np.zeros((64, 96), bool), np.ones((64, 96), bool)]
    masks[0][:32, :48] = True
    emb = source.pooled(image, masks, "embedding")
    assert emb.shape == (2, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert source.pooled(image, masks, "cls").shape == (2, 192)
    resnet = load_config("demo", ["model.head_channels=16"])
    save_checkpoint(tmp_path / "resnet", cfg=resnet, step=1, model=create_model(resnet.model).state_dict())
    with pytest.raises(ValueError, match="backbone 'resnet18', which has no attention"):
        AFFINITY_SOURCES.build("checkpoint", checkpoint=str(tmp_path / "resnet"))


# ---------------------------------------------------------------- the vit_masks prior on real images


@pytest.fixture
def one_torch_thread():
    """One torch thread for a timing, then the suite's count again (later tests would inherit it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vit_masks_prior_on_real_images(weights, one_torch_thread):
    """Masks of the image's shape, >= 1 per image, RLE round trip exact, boxes inside the image."""
    import time

    from distseg.grouping.priors import create_prior
    from distseg.shards import decode_masks, encode_masks

    prior = create_prior("vit_masks", config(weights, "priors.vit_masks.short_side=96"))
    counts, seconds = [], []
    for image in real_images(2):
        t0 = time.perf_counter()
        out = prior(image)
        seconds.append(time.perf_counter() - t0)
        h, w = image.shape[:2]
        assert out.regions is None and 1 <= len(out.masks) <= 3
        counts.append(len(out.masks))
        encoded = encode_masks(out.masks)
        decoded = decode_masks(encoded, h, w)
        for m, d, e in zip(out.masks, decoded, encoded):
            assert m.mask.shape == (h, w) and m.mask.dtype == bool and m.mask.any()
            assert np.array_equal(m.mask, d.mask) and d.label == 1 and 0 <= d.score <= 1
            x, y, bw, bh = coco_mask.toBbox({"size": [h, w], "counts": e["rle"]})  # the box from the RLE
            x0, y0, x1, y1 = mask_box(m.mask)
            assert (x, y, x + bw, y + bh) == (x0, y0, x1, y1)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    print(f"masks per image {np.mean(counts):.2f}; {np.mean(seconds):.3f} s per image on one core (short side 96)")


def test_the_affinity_setting_reaches_the_prior(weights):
    """priors.vit_masks.affinity picks A on a real image: kk (default) is symmetric, qk is not, and
    kk_centered has zero row sums (centred keys); a bad value is refused naming the key."""
    from distseg.grouping.priors import create_prior

    image = real_images(1)[0]
    found = {}
    for affinity in ("kk", "qk", "kk_centered"):
        extra = () if affinity == "kk" else (f"priors.vit_masks.affinity={affinity}",)
        prior = create_prior("vit_masks", config(weights, "priors.vit_masks.short_side=64", *extra))
        assert prior.source.affinity == affinity
        found[affinity] = prior.source.affinities(image)
    kk, qk, centred = found["kk"].A, found["qk"].A, found["kk_centered"].A
    assert np.allclose(kk, kk.T, rtol=1e-4, atol=1e-4) and not np.allclose(qk, qk.T, rtol=1e-2, atol=1e-2)
    assert np.allclose(centred.sum(1), 0, atol=1e-3 * np.abs(centred).max() * len(centred))
    assert np.allclose(found["kk"].a_cls, found["qk"].a_cls)  # A_cls is q_cls . k whatever A is
    with pytest.raises(Exception, match="priors.vit_masks.affinity"):
        config(weights, "priors.vit_masks.affinity=vq")


# ---------------------------------------------------------------- mining + clustering (Ray stages)


def write_scenes(folder: Path, count: int, size: int = 64) -> None:
    from distseg.data.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"scene_{i:03d}.png"), make_scene(i, size, seed=0).image[:, :, ::-1])
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((1, 1, 3), np.uint8))


@pytest.mark.slow  # Ray + torch actors: 2-3 min on the shared 2-core machine
def test_mine_then_cluster_into_a_new_version(weights, tmp_path, ray_cluster):
    """vit_masks mined by the real mining stage; a 1x1 image becomes an errors row naming the reason;
    the clustering writes version 2 beside version 1, which stays byte for byte as it was."""
    from distseg.distill.cluster import cluster_masks, read_manifest
    from distseg.mining import mine
    from distseg.shards import decode_record

    write_scenes(tmp_path / "images", 8)
    cfg = config(weights, f"workdir={tmp_path}", "priors.vit_masks.short_side=64", "priors.vit_masks.clusters=3")
    summary = mine(cfg, str(tmp_path / "images"), str(tmp_path / "masks"), progress=False, track=False)
    assert summary.mined == 8 and summary.errors == 1
    errors = pq.read_table(tmp_path / "masks" / "errors").to_pylist()
    assert errors[0]["stage"] == "prior:vit_masks" and "1x1 pixels" in errors[0]["message"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "masks" / "shards").glob("*.parquet")}

    out = cluster_masks(cfg, str(tmp_path / "masks"), track=True)
    assert out.output == str(tmp_path / "masks") + "_k3" and out.images == 8 and out.clusters == 3
    assert out.masks >= 8 and sum(out.sizes) == out.masks and out.run_id
    assert {p.name: p.read_bytes() for p in (tmp_path / "masks" / "shards").glob("*.parquet")} == before
    manifest = read_manifest(out.output)
    assert manifest["version"] == 2 and manifest["parent"]["path"] == str(tmp_path / "masks")
    assert manifest["rows"] == 8 and manifest["cluster"]["masks"] == out.masks
    assert np.load(Path(out.output) / "centroids.npy").shape == (3, 192)
    labels = []
    for path in sorted((Path(out.output) / "shards").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            labels += [m.label for m in decode_record(row, ["vit_masks"]).priors["vit_masks"].masks]
    assert len(labels) == out.masks and set(labels) <= {1, 2, 3} and len(set(labels)) >= 2
    assert (Path(out.output) / "errors").is_dir()
    with pytest.raises(FileExistsError, match="_k3 exists"):
        cluster_masks(cfg, str(tmp_path / "masks"), track=False)


@pytest.mark.slow  # Ray + torch actors: 2-3 min on the shared 2-core machine
def test_clustering_recovers_synthetic_classes(weights, tmp_path, ray_cluster):
    """Purity of the clusters against the synthetic shape classes, well above chance.

    What is tested is the clustering stage (masked images -> output [CLS] token -> faiss k-means over
    the whole set), so the masks are the scenes' ground-truth instances written as a vit_masks shard:
    with random ViT weights the proposals are not objects, and a purity over them would measure the
    missing DINO weights, not this stage. Even a random ViT's [CLS] token of a masked image carries the
    colour and texture that tell the synthetic classes apart (measured: purity 0.70 at K = 4 on 24
    scenes against 0.30 for the largest class)."""
    import pyarrow as pa

    from distseg.data.synthetic import make_scene
    from distseg.distill.cluster import cluster_masks
    from distseg.grouping.types import Mask, PriorOutput
    from distseg.shards import GroupingRecord, encode_record, shard_schema

    rows, truth = [], {}
    for i in range(24):
        scene = make_scene(i, 64, seed=0)
        masks = []
        for k in np.unique(scene.instances)[1:]:
            m = scene.instances == k
            if m.sum() >= 30:
                masks.append(Mask(mask=m, score=1.0, label=1))
                truth[(scene.id, len(masks) - 1)] = int(np.bincount(scene.labels[m]).argmax())
        record = GroupingRecord(scene.id, f"synthetic:{i}", scene.image, {"vit_masks": PriorOutput(masks=masks)})
        rows.append(encode_record(record, "png"))
    cfg = config(weights, f"workdir={tmp_path}", "priors.vit_masks.short_side=64", "priors.vit_masks.clusters=4")
    (tmp_path / "gt" / "shards").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=shard_schema(["vit_masks"])), tmp_path / "gt/shards/part-0.parquet"
    )
    manifest = {"priors": ["vit_masks"], "rows": 24, "shards": [{"path": "shards/part-0.parquet", "rows": 24}]}
    (tmp_path / "gt" / "_manifest.json").write_text(json.dumps(manifest))

    out = cluster_masks(cfg, str(tmp_path / "gt"), track=False)
    table = pq.read_table(Path(out.output) / "shards" / "part-0.parquet").to_pylist()
    pairs = [(truth[(r["image_id"], i)], m["label"]) for r in table for i, m in enumerate(r["vit_masks"]["masks"])]
    classes, clusters = np.array(pairs).T
    purity = sum(np.bincount(classes[clusters == c]).max() for c in np.unique(clusters)) / len(pairs)
    chance = np.bincount(classes).max() / len(pairs)
    print(f"purity {purity:.3f} over {len(pairs)} masks, chance {chance:.3f}")
    assert len(pairs) == len(truth) and purity >= 0.55 and purity >= 1.7 * chance


# ---------------------------------------------------------------- evaluation of the masks


def test_class_agnostic_mask_ap_known_answers():
    from distseg.distill.evaluate import mask_ap

    instances = np.zeros((40, 40), np.int32)
    instances[2:18, 2:18], instances[22:38, 22:38] = 1, 2
    perfect = {"a": [(instances == 1, 0.9), (instances == 2, 0.8)]}
    assert mask_ap(perfect, {"a": instances})["AP"] == pytest.approx(1.0)
    half = {"a": [(instances == 1, 0.9)]}  # one of two objects found: recall 0.5 at every threshold
    assert mask_ap(half, {"a": instances})["AP50"] == pytest.approx(0.5, abs=0.01)
    wrong = np.zeros((40, 40), bool)
    wrong[20:22, 0:40] = True
    assert mask_ap({"a": [(wrong, 1.0)]}, {"a": instances}) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with pytest.raises(ValueError, match="without ground truth"):
        mask_ap({"b": []}, {"a": instances})
    from distseg.distill.evaluate import best_overlaps

    shifted = np.roll(instances == 2, 4, axis=1)  # 16 x 12 overlap of two 16 x 16 squares: IoU 192 / 320
    assert best_overlaps(half["a"] + [(shifted, 0.5)], instances) == [1.0, pytest.approx(0.6)]
    assert best_overlaps([], instances) == [0.0, 0.0]


def write_mined(root: Path, records: list, priors: list[str], input_uri: str = "") -> str:
    """`records` (GroupingRecords) as one real Parquet shard with a manifest, as `distseg mine` writes them."""
    import pyarrow as pa

    from distseg.shards import encode_record, shard_schema

    rows = [encode_record(record, "png") for record in records]
    (root / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=shard_schema(priors)), root / "shards/p.parquet")
    manifest = {"input": input_uri, "priors": priors, "rows": len(rows), "shards": [{"path": "shards/p.parquet"}]}
    (root / "_manifest.json").write_text(json.dumps(manifest))
    return str(root)


def instance_masks(instances: np.ndarray) -> list:
    from distseg.grouping.types import Mask

    return [Mask(instances == k, 1.0) for k in np.unique(instances)[1:]]


def synthetic_shards(root: Path, count: int = 4, size: int = 64) -> str:
    """Synthetic scenes whose stored vit_masks are their ground-truth instances and whose stored
    felzenszwalb_masks are empty; files named as distill.stage.synthetic_images writes them."""
    from distseg.data.synthetic import make_scene
    from distseg.grouping.types import PriorOutput
    from distseg.shards import GroupingRecord

    records = []
    for i in range(count):
        scene = make_scene(i, size, seed=0, split="train")
        priors = {"vit_masks": PriorOutput(masks=instance_masks(scene.instances)), "felzenszwalb_masks": PriorOutput()}
        uri = f"file:///images/synthetic_train_{i:05d}.png"
        records.append(GroupingRecord(f"id{i}", uri, scene.image, priors))
    return write_mined(root, records, ["vit_masks", "felzenszwalb_masks"])


def test_synthetic_mask_ap_of_oracle_masks_is_one_and_saliency_is_scored(tmp_path):
    """The shard -> scene -> instances path: ground-truth instances stored as vit_masks score AP 1;
    the saliency baseline, not in the shards, is run on the same stored images and scored on the same
    ground truth."""
    from distseg.config import load_config
    from distseg.distill.evaluate import evaluate_masks

    cfg = load_config("maskdistill_demo", ["data.image_size=64", "seed=0"])
    result = evaluate_masks(cfg, synthetic_shards(tmp_path), "synthetic", ["vit_masks", "saliency"], split="train")
    ap = result.scores
    assert ap["vit_masks"]["AP"] == pytest.approx(1.0) and ap["vit_masks"]["stored"]
    assert 0 <= ap["saliency"]["AP"] < 0.9 and not ap["saliency"]["stored"]
    assert ap["saliency"]["masks_per_image"] <= 1  # one foreground mask per image
    assert (result.dataset, result.split, result.images) == ("synthetic", "train", 4)


def test_mask_ap_scores_every_stored_mask_prior_from_its_stored_masks(tmp_path):
    """Default priors = the stored mask priors: perfect stored masks give 1.0 at every threshold, the
    stored (empty) felzenszwalb_masks give 0.0 -- it is read, not recomputed (which would find regions).
    The dataset defaults to evaluate.dataset (synthetic in maskdistill_demo), its split to data.split."""
    from distseg.config import load_config
    from distseg.data.synthetic import make_scene
    from distseg.distill.evaluate import evaluate_masks

    cfg = load_config("maskdistill_demo", ["data.image_size=64", "seed=0"])
    assert cfg.evaluate.dataset == "synthetic"
    result = evaluate_masks(cfg, synthetic_shards(tmp_path))
    assert list(result.scores) == ["vit_masks", "felzenszwalb_masks"] and result.split == "train"
    perfect, empty = result.scores["vit_masks"], result.scores["felzenszwalb_masks"]
    assert (perfect["AP"], perfect["AP50"], perfect["AP75"]) == pytest.approx((1.0, 1.0, 1.0))
    objects = sum(len(np.unique(make_scene(i, 64, seed=0).instances)) - 1 for i in range(4))
    assert perfect["masks_per_image"] == pytest.approx(objects / 4)
    assert perfect["best_iou"] == pytest.approx(1.0)
    assert (empty["AP"], empty["AP50"], empty["AP75"], empty["masks_per_image"]) == (0.0, 0.0, 0.0, 0.0)
    assert (empty["area"], empty["best_iou"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="not mask priors"):
        evaluate_masks(cfg, str(tmp_path), priors=["ucm"])


DAVIS = SHARED_DATA / "davis2016"


def davis_frames(count: int = 3) -> list[Path]:
    frames = sorted((DAVIS / "JPEGImages" / "480p" / "blackswan").glob("*.jpg"))[:count]
    if len(frames) < count:
        pytest.skip(f"DAVIS-2016 absent under {DAVIS} (../shared/data/davis2016, or $DISTSEG_DATA_ROOT)")
    return frames


def test_davis_records_are_scored_against_their_annotation(tmp_path):
    """Real DAVIS frames, stored at half size under ids that are not DAVIS's: each record is found by
    its file through the registry's davis reader, its annotation resized to the stored image; a mask
    equal to the (resized) annotation scores AP50 1, the inverted mask 0, a mask of a different frame's
    annotation less. The dataset defaults to the one the manifest names as mined (`--input davis`).
    Then the CLI verb prints the table and logs it to MLflow."""
    from typer.testing import CliRunner

    from distseg.cli import app
    from distseg.config import load_config
    from distseg.data.imageio import read_image, read_label_png
    from distseg.distill.evaluate import evaluate_masks
    from distseg.grouping.types import Mask, PriorOutput
    from distseg.shards import GroupingRecord

    records = []
    frames = davis_frames(3)
    for n, frame in enumerate(frames):
        image = read_image(frame)
        half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
        annotation = read_label_png(DAVIS / "Annotations" / "480p" / "blackswan" / f"{frame.stem}.png") >= 128
        truth = cv2.resize(annotation.astype(np.uint8), half.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
        other = read_label_png(DAVIS / "Annotations" / "480p" / "blackswan" / "00040.png") >= 128
        other = cv2.resize(other.astype(np.uint8), half.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
        priors = {
            "vit_masks": PriorOutput(masks=[Mask(truth, 0.9)]),
            "saliency": PriorOutput(masks=[Mask(~truth, 0.9)]),
            "felzenszwalb_masks": PriorOutput(masks=[Mask(other, 0.9)]),
        }
        records.append(GroupingRecord(f"frame{n}", str(frame.resolve()), half, priors))
    data = write_mined(tmp_path / "mined", records, ["vit_masks", "saliency", "felzenszwalb_masks"], "davis")
    cfg = load_config("maskdistill", [f"workdir={tmp_path}"])
    assert cfg.evaluate.dataset != "davis"
    result = evaluate_masks(cfg, data)  # the dataset: the source the manifest says was mined
    assert (result.images, result.dataset, result.split) == (3, "davis", "all")
    assert result.scores["vit_masks"]["AP50"] == pytest.approx(1.0)
    assert result.scores["vit_masks"]["AP"] > 0.9  # nearest-neighbour resizing of the same mask: IoU ~ 1
    assert result.scores["vit_masks"]["best_iou"] > 0.9
    assert result.scores["saliency"]["AP50"] == 0.0 and result.scores["saliency"]["best_iou"] == 0.0  # disjoint
    assert result.scores["saliency"]["area"] > 0.5 > result.scores["vit_masks"]["area"]  # a swan, and not it
    assert result.scores["felzenszwalb_masks"]["AP"] < result.scores["vit_masks"]["AP"]

    args = ["distill", "ap", "--config", "maskdistill", "--shards", data, "--dataset", "davis"]
    out = CliRunner().invoke(app, [*args, "--priors", "vit_masks,saliency", f"workdir={tmp_path}"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "class-agnostic mask AP on 3 images of davis (split all):" in out.output
    assert re.search(r"mask AP: (100%\S* )?3(/3)? ?img", out.output), out.output  # the progress bar, 3 images
    row = next(line for line in lines if line.startswith("vit_masks")).split()
    vit = result.scores["vit_masks"]
    columns = ["masks_per_image", "area", "AP", "AP50", "AP75", "best_iou"]  # the printed order
    assert row[1:] == [f"{vit[k]:.2f}" if k == "masks_per_image" else f"{vit[k]:.3f}" for k in columns]
    assert row[1] == "1.00" and row[4] == "1.000"  # one mask per frame; AP50
    assert not any(line.startswith("felzenszwalb_masks") for line in lines)
    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri

    client = MlflowClient(tracking_uri(tmp_path))
    run = client.get_run(re.search(r"^MLflow run (\w+)$", out.output, re.M).group(1))
    assert run.data.tags["stage"] == "distill.ap" and run.data.metrics["vit_masks_AP50"] == pytest.approx(1.0)


def test_mask_ap_names_the_image_when_the_dataset_has_no_instances(tmp_path):
    """MSRC-like data (a labelled folder: classes, no instances) cannot score class-agnostic mask AP:
    the error names the mined image and the dataset; an image of no split of the dataset is named too."""
    from data_layouts import make_labeled, scene

    from distseg.config import load_config
    from distseg.distill.evaluate import evaluate_masks
    from distseg.grouping.types import PriorOutput
    from distseg.shards import GroupingRecord

    ids = make_labeled(tmp_path / "msrc_like", n=2)
    path = (tmp_path / "msrc_like" / "images" / f"{ids[1]}.png").resolve()
    record = GroupingRecord(ids[1], str(path), scene(1)[0], {"saliency": PriorOutput(masks=[])})
    data = write_mined(tmp_path / "mined", [record], ["saliency"])
    cfg = load_config("maskdistill_demo")
    with pytest.raises(ValueError, match=f"{ids[1]}.*has no instance ground truth.*davis"):
        evaluate_masks(cfg, data, f"labeled:{tmp_path / 'msrc_like'}")
    stranger = GroupingRecord("elsewhere", "/nowhere/else.png", scene(1)[0], {"saliency": PriorOutput(masks=[])})
    data = write_mined(tmp_path / "mined2", [stranger], ["saliency"])
    with pytest.raises(ValueError, match="/nowhere/else.png .* is not an image of labeled"):
        evaluate_masks(cfg, data, f"labeled:{tmp_path / 'msrc_like'}")


def test_kmeans_recovers_separated_groups_and_leaves_the_input():
    from distseg.distill.cluster import kmeans

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 8)) + 10 * np.eye(8)[i] for i in range(3)]).astype(np.float32)
    before = x.copy()
    assign, centroids, _ = kmeans(x, 3, 20, 2, seed=0)
    assert np.array_equal(x, before) and centroids.shape == (3, 8)
    assert [len(set(assign[i * 30 : (i + 1) * 30])) for i in range(3)] == [1, 1, 1]
    assert len(set(assign)) == 3
    with pytest.raises(ValueError, match="clusters=5 exceeds the 4 masks"):
        kmeans(x[:4], 5, 5, 1, seed=0)


def test_cli_refuses_a_missing_weights_file_before_starting_ray(tmp_path):
    from typer.testing import CliRunner

    from distseg.cli import app

    missing = tmp_path / "dino.pth"
    args = ["distill", "masks", "--config", "maskdistill", "--data", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, f"priors.vit_masks.weights={missing}", f"workdir={tmp_path}"])
    text = " ".join(result.output.split())  # rich wraps the message to the terminal width
    assert result.exit_code == 1 and f"priors.vit_masks.weights {missing} does not exist" in text
    assert not (tmp_path / "out").exists()
