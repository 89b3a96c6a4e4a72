"""MaskDistill part 2: the hard-pixel loss, the confident-mask aggregation, the Mask R-CNN and DeepLab
stages through Ray Train, the confident-masks stage on Ray Data, and the pipeline end to end.

Real parts throughout: torchvision's Mask R-CNN and DeepLab-v3 (random init: no pretrained weights
exist here and nothing is downloaded), a real in-process Ray cluster, real Parquet shards, a real
sqlite MLflow store in tmp_path. The loss and the aggregation run on hand-made batches whose answers
are worked out in the tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distseg.distill.aggregate import confident_masks, label_map
from distseg.distill.losses import hard_pixel_count, hard_pixel_cross_entropy
from distseg.grouping.types import Mask

# ---------------------------------------------------------------- the hard-pixel loss


def test_hard_pixel_loss_averages_exactly_the_top_k_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :] = 255  # 5 ignored pixels
    target[1, 2, 1:3] = 255  # 2 more: 40 - 7 = 33 labelled
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    labelled = per_pixel[target != 255]
    assert labelled.numel() == 33
    k = hard_pixel_count(33, 0.2)
    assert k == 6  # floor(0.2 * 33)
    expected = labelled.sort(descending=True).values[:6].mean()
    loss = hard_pixel_cross_entropy(logits, target, fraction=0.2)
    assert torch.allclose(loss, expected)
    # ignored pixels are never candidates: give them huge losses and the result does not move
    spiked = logits.detach().clone()
    spiked[0, :, 0, :] = torch.tensor([-50.0, 50.0, -50.0])[:, None]
    assert torch.allclose(hard_pixel_cross_entropy(spiked, target, 0.2), expected.detach(), atol=1e-6)
    # only the chosen pixels get a gradient
    loss.backward()
    touched = (logits.grad.abs().sum(1) > 0).sum().item()
    assert touched == 6
    # fraction 1 is the plain mean cross entropy over labelled pixels
    plain = F.cross_entropy(logits.detach(), target, ignore_index=255)
    assert torch.allclose(hard_pixel_cross_entropy(logits.detach(), target, 1.0), plain)


def test_hard_pixel_loss_small_and_empty_batches():
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.full((1, 2, 2), 255)
    target[0, 0, 0] = 1
    assert hard_pixel_count(1, 0.2) == 1  # at least one pixel
    assert hard_pixel_cross_entropy(logits, target).item() == pytest.approx(np.log(2))
    empty = hard_pixel_cross_entropy(logits.requires_grad_(), torch.full((1, 2, 2), 255))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="fraction"):
        hard_pixel_count(10, 0.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        hard_pixel_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- confident masks


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_confident_masks_threshold_keeps_the_confident_ones():
    a = Mask(box(8, 8, 0, 4, 0, 4), 0.95, 3)
    b = Mask(box(8, 8, 4, 8, 4, 8), 0.91, 5)
    c = Mask(box(8, 8, 0, 4, 4, 8), 0.89, 7)  # below 0.9: out
    kept = confident_masks([c, b, a], threshold=0.9)
    assert [m.label for m in kept] == [3, 5]  # most confident first
    labels = label_map(kept, 8, 8)
    assert (labels[:4, :4] == 3).all() and (labels[4:, 4:] == 5).all()
    assert (labels[:4, 4:] == 0).all() and (labels[4:, :4] == 0).all()
    assert np.bincount(labels.ravel(), minlength=8).tolist() == [32, 0, 0, 16, 0, 16, 0, 0]


def test_confident_masks_fall_back_to_the_most_confident_one():
    a = Mask(box(6, 6, 0, 3, 0, 3), 0.5, 2)
    b = Mask(box(6, 6, 3, 6, 3, 6), 0.7, 4)
    kept = confident_masks([a, b], threshold=0.9)
    assert [(m.label, m.score) for m in kept] == [(4, 0.7)]
    assert confident_masks([], 0.9) == []
    # an empty mask is never a fallback
    assert confident_masks([Mask(np.zeros((6, 6), bool), 0.99, 1)], 0.9) == []


def test_confident_masks_overlap_keeps_the_more_confident():
    big = Mask(box(10, 10, 0, 10, 0, 6), 0.93, 1)
    over = Mask(box(10, 10, 0, 10, 5, 10), 0.97, 2)  # shares column 5 (10 of its 50 pixels) with big
    far = Mask(box(10, 10, 0, 2, 8, 10), 0.92, 3)  # inside `over`: dropped
    kept = confident_masks([big, over, far], threshold=0.9)
    assert [m.label for m in kept] == [2]  # any shared pixel drops the less confident mask
    # with max_overlap 0.2, `big` (10 of 60 pixels shared = 0.167) stays and paints only its free pixels
    kept = confident_masks([big, over, far], threshold=0.9, max_overlap=0.2)
    assert [m.label for m in kept] == [2, 1]
    labels = label_map(kept, 10, 10)
    assert (labels[:, 5:] == 2).all() and (labels[:, :5] == 1).all()
    with pytest.raises(ValueError, match="1..255"):
        label_map([Mask(box(2, 2, 0, 1, 0, 1), 1.0, 256)], 2, 2)


# ---------------------------------------------------------------- pieces of the training stages


def test_learning_rate_warms_up_then_steps_down():
    from distseg.distill.config import MaskRCNNConfig
    from distseg.distill.trainer import learning_rate

    tcfg = MaskRCNNConfig(lr=0.02, warmup_steps=100, warmup_factor=0.001, gamma=0.1)
    milestones = [18000, 22000]
    assert learning_rate(0, tcfg, milestones) == pytest.approx(0.02 * 0.001)
    assert learning_rate(50, tcfg, milestones) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert learning_rate(100, tcfg, milestones) == pytest.approx(0.02)
    assert learning_rate(17999, tcfg, milestones) == pytest.approx(0.02)
    assert learning_rate(18000, tcfg, milestones) == pytest.approx(0.002)
    assert learning_rate(22000, tcfg, milestones) == pytest.approx(0.0002)


def test_paper_defaults():
    """The paper's numbers (Sec. 4.1, App. A) are the defaults of the distill.* section."""
    from distseg.config import load_config

    d = load_config("maskdistill").distill
    assert d.confident.threshold == 0.9 and d.confident.max_overlap == 0.0
    assert d.segment.hard_fraction == 0.2 and d.segment.frozen_stages == 2
    assert d.segment.backbone == "resnet50" and d.maskrcnn.backbone == "resnet50"
    assert d.maskrcnn.min_sizes[0] == 480 and d.maskrcnn.min_sizes[-1] == 800 and d.maskrcnn.test_size == 800
    assert d.maskrcnn.trainable_layers == 3 and d.maskrcnn.warmup_steps == 100


def test_scale_rotate_crop_keeps_labels_and_marks_the_outside():
    from distseg.distill.config import SegmentConfig
    from distseg.distill.segment import IGNORE, scale_rotate_crop

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    labels = np.tile(np.arange(60, dtype=np.uint8), (40, 1))  # each column its own label
    same = SegmentConfig(crop=40, scale_range=(1.0, 1.0), rotate=0.0, flip=False)
    img, lab = scale_rotate_crop(image, labels, same, rng)
    assert img.shape == (40, 40, 3) and lab.shape == (40, 40)
    # a 40-px window of a 60-px-wide image at scale 1: whole consecutive columns, all rows
    x0 = int(lab[0, 0])
    assert (lab == np.arange(x0, x0 + 40)[None]).all() and 0 <= x0 <= 20
    labels = np.where(labels >= 30, 3, 0).astype(np.uint8)
    small = SegmentConfig(crop=48, scale_range=(0.5, 0.5), rotate=5.0)
    _, lab = scale_rotate_crop(image, labels, small, rng)
    assert set(np.unique(lab)) <= {0, 3, IGNORE} and (lab == IGNORE).sum() > 0  # 30x20 px of image in a 48x48 crop


def test_matched_miou_counts_unmatched_clusters_as_wrong():
    from distseg.distill.segment import matched_miou

    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[2, 2, 0, 0], [2, 1, 0, 0]])  # cluster 2 = class 0, cluster 0 = class 1, cluster 1 extra
    scores = matched_miou([pred], [truth], 3, ["background", "object"])
    h = scores["hungarian"]
    assert h["mapping"] == [1, -1, 0]
    assert h["iou"] == {"background": 0.75, "object": 1.0}  # the ignored pixel is not scored
    assert h["miou"] == pytest.approx(0.875) and h["pixel_accuracy"] == pytest.approx(6 / 7)
    assert scores["majority"]["miou"] == pytest.approx(1.0)  # the extra cluster joins its majority class


def test_add_column_appends_the_label_maps_and_names_them(tmp_path):
    import pyarrow as pa

    from distseg.distill.confident import add_column
    from distseg.shards import decode_record, encode_png

    root = write_version(tmp_path / "v", 2, size=32)
    import pyarrow.parquet as pq

    table = pq.read_table(root / "shards" / "part-0.parquet")
    ids = table.column("image_id").to_pylist()
    maps = {i: np.full((32, 32), n + 1, np.uint8) for n, i in enumerate(ids)}
    cells = {
        i: {"regions": encode_png(m), "num_regions": 5, "region_dist": None, "ucm": None, "masks": []}
        for i, m in maps.items()
    }
    out = add_column(table, cells)
    assert out.column_names[-1] == "confident" and out.schema.metadata == table.schema.metadata
    for row, i in zip(out.to_pylist(), ids):
        assert row["prior"] == ["vit_masks", "confident"]
        assert (decode_record(row).priors["confident"].regions == maps[i]).all()
    with pytest.raises(ValueError, match="no confident result for 1 images"):
        add_column(table, {ids[0]: cells[ids[0]]})
    assert isinstance(out, pa.Table)


def test_stages_refuse_the_wrong_shard_version_before_ray(tmp_path):
    import json

    from distseg.config import load_config
    from distseg.distill.maskrcnn import train_maskrcnn
    from distseg.distill.segment import train_segmenter

    root = write_version(tmp_path / "v", 2, size=32)
    cfg = load_config("maskdistill_demo", [f"workdir={tmp_path}"])
    with pytest.raises(ValueError, match="not a `distseg distill confident` output"):
        train_segmenter(cfg, str(root))
    manifest = json.loads((root / "_manifest.json").read_text())
    del manifest["cluster"]
    (root / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a clustered shard version"):
        train_maskrcnn(cfg, str(root))
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        train_maskrcnn(cfg, str(tmp_path / "nothing"))


def test_backbone_from_a_distseg_checkpoint_and_from_a_weights_file(tmp_path):
    from distseg.checkpoint import save_checkpoint
    from distseg.config import load_config
    from distseg.distill.maskrcnn import build_model as build_maskrcnn
    from distseg.distill.segment import build_model as build_deeplab
    from distseg.models import create_model

    torch.manual_seed(0)
    cfg = load_config("demo", ["model.backbone=resnet18"])
    net = create_model(cfg.model)
    save_checkpoint(tmp_path / "ckpt", cfg=cfg, step=1, model=net.state_dict())
    trunk = net.backbone.body.state_dict()
    key = "layer2.0.conv1.weight"
    mrcnn = build_maskrcnn(
        load_config("demo", ["distill.maskrcnn.backbone=resnet18", f"distill.maskrcnn.checkpoint={tmp_path / 'ckpt'}"]),
        5,
    )
    assert torch.equal(mrcnn.backbone.body.state_dict()[key], trunk[key])
    assert not mrcnn.backbone.body.layer1[0].conv1.weight.requires_grad  # trainable_layers=3: res2 frozen
    assert mrcnn.backbone.body.layer2[0].conv1.weight.requires_grad
    torch.save({"state_dict": trunk}, tmp_path / "trunk.pth")
    deeplab = build_deeplab(
        load_config("demo", ["distill.segment.backbone=resnet18", f"distill.segment.weights={tmp_path / 'trunk.pth'}"]),
        5,
    )
    assert torch.equal(deeplab.backbone.state_dict()[key], trunk[key])
    assert (
        not deeplab.backbone.layer1[0].conv1.weight.requires_grad
        and deeplab.backbone.layer2[0].conv1.weight.requires_grad
    )
    with pytest.raises(ValueError, match="has a 'resnet18' backbone, not distill.maskrcnn.backbone='resnet50'"):
        build_maskrcnn(load_config("demo", [f"distill.maskrcnn.checkpoint={tmp_path / 'ckpt'}"]), 5)
    with pytest.raises(FileNotFoundError, match="distill.segment.weights"):
        build_deeplab(load_config("demo", ["distill.segment.weights=missing.pth"]), 5)


# ---------------------------------------------------------------- the stages through Ray


def write_version(root, count: int, size: int = 64):
    """A clustered shard version (as `distseg distill cluster` writes) from synthetic scenes: each
    ground-truth instance is a mask whose label is its class + 1 (a perfect clustering)."""
    import json
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from distseg.data.synthetic import make_scene
    from distseg.grouping.types import PriorOutput
    from distseg.shards import GroupingRecord, encode_record, shard_schema

    root = Path(root)
    (root / "shards").mkdir(parents=True)
    rows = []
    for i in range(count):
        s = make_scene(i, size, 0, "train")
        masks = [
            Mask(s.instances == k, 1.0, int(np.bincount(s.labels[s.instances == k]).argmax()))
            for k in np.unique(s.instances[s.instances > 0])
        ]
        record = GroupingRecord(s.id, f"synthetic_train_{i}.png", s.image, {"vit_masks": PriorOutput(masks=masks)})
        rows.append(encode_record(record, "png"))
    pq.write_table(pa.Table.from_pylist(rows, schema=shard_schema(["vit_masks"])), root / "shards" / "part-0.parquet")
    manifest = {
        "priors": ["vit_masks"],
        "version": 2,
        "shards": [{"path": "shards/part-0.parquet", "rows": count}],
        "cluster": {"clusters": 4},
    }
    (root / "_manifest.json").write_text(json.dumps(manifest))
    return root


TINY = [
    "ray.num_cpus=2",
    "data.image_size=64",
    "evaluate.dataset=synthetic",
    "evaluate.limit=4",
    "evaluate.image_size=64",
    "evaluate.protocols=[linear]",
    "evaluate.diagnostics=[]",
    "distill.maskrcnn.backbone=resnet18",
    "distill.maskrcnn.trainable_layers=5",
    "distill.maskrcnn.steps=2",
    "distill.maskrcnn.batch_size=2",
    "distill.maskrcnn.min_sizes=[56,64]",
    "distill.maskrcnn.test_size=64",
    "distill.maskrcnn.max_size=96",
    "distill.maskrcnn.warmup_steps=1",
    "distill.maskrcnn.milestones=[1]",
    "distill.maskrcnn.lr=0.005",
    "distill.maskrcnn.log_every=1",
    "distill.segment.backbone=resnet18",
    "distill.segment.batch_size=2",
    "distill.segment.crop=64",
    "distill.segment.epochs=1",
    "distill.segment.milestones=[0.5]",
    "distill.segment.log_every=1",
    "distill.segment.checkpoint_every=1",
    "distill.segment.num_to_keep=null",
]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def run_ids(workdir, stage: str) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")
    return runs


@pytest.mark.slow  # three Ray Train runs and a Ray Data pass: ~4 min on the shared 2-core machine
def test_maskrcnn_confident_segment_through_ray(tmp_path, ray_cluster):
    import json

    import pyarrow.parquet as pq

    from distseg.config import load_config
    from distseg.distill.confident import confident_stage
    from distseg.distill.maskrcnn import load_maskrcnn, train_maskrcnn
    from distseg.distill.segment import evaluate_segmenter, load_segmenter, train_segmenter
    from distseg.shards import decode_record

    data = write_version(tmp_path / "masks_k4", 4)
    cfg = load_config("maskdistill_demo", [f"workdir={tmp_path / 'work'}", "name=t", *TINY])

    # (2) Mask R-CNN, 2 steps through Ray Train
    fitted = train_maskrcnn(cfg, str(data))
    state = torch.load(fitted.checkpoint / "model.pt", weights_only=True)
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5  # K = 4 clusters + background
    meta = json.loads((fitted.checkpoint / "meta.json").read_text())
    assert meta["step"] == 2 and not (fitted.checkpoint / "optimizer.pt").exists()
    for key in ("loss", "loss_classifier", "loss_mask", "loss_objectness", "lr"):
        assert np.isfinite(fitted.metrics[key]), key
    print(f"maskrcnn: {fitted.seconds:.1f} s, loss {fitted.metrics['loss']:.3f}")
    [run] = run_ids(tmp_path / "work", "distill.maskrcnn")
    assert run.data.metrics["loss_mask"] > 0 and run.info.run_id == fitted.run_id
    model, _ = load_maskrcnn(str(fitted.checkpoint))
    assert model.transform.min_size == (64,)

    # (3) confident masks over the dataset with Ray Data; threshold 0 keeps every prediction but the
    # overlap rule still applies (a random-init network's scores are all far below 0.9)
    cfg.distill.confident.threshold = 0.0
    summary = confident_stage(cfg, str(fitted.checkpoint), str(data), str(tmp_path / "confident"))
    print(f"confident: {summary}")
    assert summary.images == 4 and summary.classes == 5 and summary.predictions >= summary.masks >= 4
    manifest = json.loads((tmp_path / "confident" / "_manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["parent"]["version"] == 2 and manifest["confident"]["classes"] == 5
    parent = pq.read_table(data / "shards" / "part-0.parquet")
    assert "confident" not in parent.column_names  # the parent is never rewritten
    for row in pq.read_table(tmp_path / "confident" / "shards" / "part-0.parquet").to_pylist():
        out = decode_record(row).priors["confident"]
        assert out.regions.shape == (64, 64) and out.regions.max() <= 4
        assert len(out.masks) >= 1  # never empty: at worst the most confident prediction
        covered = np.sum([m.mask for m in out.masks], axis=0)
        assert covered.max() == 1  # max_overlap 0: the kept masks are disjoint
    with pytest.raises(FileExistsError):
        confident_stage(cfg, str(fitted.checkpoint), str(data), str(tmp_path / "confident"))

    # (4) DeepLab-v3 with the hard-pixel loss: 1 epoch of 4 images at batch 2 = 2 steps
    seg = train_segmenter(cfg, str(tmp_path / "confident"))
    assert json.loads((seg.checkpoint / "meta.json").read_text())["step"] == 2
    state = torch.load(seg.checkpoint / "model.pt", weights_only=True)
    assert state["classifier.4.weight"].shape[0] == 5
    print(f"segment: {seg.seconds:.1f} s, loss {seg.metrics['loss']:.3f}")
    # resume: 2 epochs under the same name continue from step 2, not from scratch
    cfg.distill.segment.epochs = 2
    again = train_segmenter(cfg, str(tmp_path / "confident"))
    history = sorted(p.name for p in (tmp_path / "work" / "ray_results" / "t-segment").glob("checkpoint_2*"))
    assert json.loads((again.checkpoint / "meta.json").read_text())["step"] == 4 and len(history) == 4
    assert again.run_id == seg.run_id  # the resumed training continues its MLflow run
    load_segmenter(again.checkpoint)

    # (6) evaluation: matched mIoU of the predictions, frozen features through the linear protocol
    cfg.distill.segment.crf = True  # pydensecrf is not installed here: scored without it, with a warning
    with pytest.warns(UserWarning, match="pydensecrf is not installed"):
        scores = evaluate_segmenter(cfg, again.checkpoint)
    pred = scores["predictions"]
    print(f"evaluation: hungarian mIoU {pred['hungarian']['miou']:.3f}, linear {scores['protocols']['linear']}")
    assert 0 <= pred["hungarian"]["miou"] <= 1 and pred["crf"] is False
    # majority voting takes each cluster's best class, so it is right on at least as many pixels
    assert pred["hungarian"]["pixel_accuracy"] <= pred["majority"]["pixel_accuracy"] + 1e-12
    assert 0 <= scores["protocols"]["linear"]["linear/miou"] <= 1
    [run] = run_ids(tmp_path / "work", "distill.evaluate")
    assert run.data.metrics["hungarian_miou"] == pytest.approx(pred["hungarian"]["miou"])
    assert run.data.tags["mlflow.parentRunId"] == again.run_id or run.data.tags.get("distseg.parent") is not None


@pytest.mark.slow  # parts 1 and 2 end to end, five Ray Train runs: ~8 min on the shared 2-core machine
def test_demo_pipeline_end_to_end_and_resume(tmp_path, ray_cluster):
    """`distill run` on the maskdistill_demo config, shrunk: bootstrap ViT, masks, clusters, Mask R-CNN,
    confident masks, DeepLab-v3 with and without hard pixel mining, every Table 1 row scored; then a
    rerun finds every stage done and trains nothing."""
    import json
    import time

    from distseg.config import load_config
    from distseg.distill.pipeline import run_pipeline

    cfg = load_config(
        "maskdistill_demo",
        [
            f"workdir={tmp_path / 'work'}",
            "data.num_images=8",
            "mine.max_side=64",
            "priors.vit_masks.short_side=64",
            "priors.vit_masks.clusters=4",
            "pretrain.steps=4",
            "pretrain.batch_size=4",
            "pretrain.crop=64",
            "pretrain.checkpoint_every=4",
            "pretrain.cpus_per_worker=1",  # the other of the fixture's 2 CPUs runs the ingest
            *TINY,
        ],
    )
    root = tmp_path / "run"
    summary = run_pipeline(cfg, str(root), ablation=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "scores"}, indent=1))
    for row in ("a_initial_masks", "b_maskrcnn_predictions", "c_segment", "d_without_hard_pixels"):
        scores = summary["scores"][row]
        scores = scores.get("predictions", scores)
        print(row, round(scores["hungarian"]["miou"], 4), round(scores["majority"]["miou"], 4))
        assert 0 <= scores["hungarian"]["miou"] <= 1 and 0 <= scores["majority"]["miou"] <= 1
        assert scores["hungarian"]["pixel_accuracy"] <= scores["majority"]["pixel_accuracy"] + 1e-12
    assert summary["scores"]["a_initial_masks"]["images"] == 8
    assert set(summary["seconds"]) >= {"masks", "maskrcnn", "confident", "predictions", "segment", "segment_plain"}
    assert json.loads((root / "confident" / "_manifest.json").read_text())["version"] == 3
    t0 = time.perf_counter()
    again = run_pipeline(cfg, str(root), ablation=True)
    assert again["seconds"] == summary["seconds"] and time.perf_counter() - t0 < 60  # nothing reran
