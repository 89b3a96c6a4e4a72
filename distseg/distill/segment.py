"""`distseg distill segment`: DeepLab-v3 on the confident pseudo label maps with hard pixel mining
(MaskDistill Sec. 3.3, Sec. 4.1, Appendix A.3), and its evaluation.

    shards (a `distill confident` version: column `confident`, regions = label map)
    -> Ray Train (distseg.distill.trainer): random scale + rotation ("ScaleNRotate"), flips, square
       crops, SGD, the top-`hard_fraction` cross entropy (distseg.distill.losses), the first
       `frozen_stages` ResNet stages frozen -> <workdir>/checkpoints/<name>-segment/
    evaluate_segmenter(cfg, checkpoint): predictions on evaluate.dataset's eval split, clusters matched
       to classes by the Hungarian algorithm -> mIoU; and the frozen features (ASPP output) through the
       existing protocols (evaluate.protocols). Both logged to MLflow, nested under the training run.

The network comes from the `SEGMENTATION_MODELS` registry (`backend`: torchvision). Departures:
- resnet50 / resnet101 are dilated to output stride 8 (torchvision's and the paper's DeepLab-v3).
  resnet18 / resnet34 (the CPU demo) cannot dilate (torchvision's BasicBlock refuses), so their stem's
  max-pool is skipped instead: output stride 16.
- "the first two ResNet blocks frozen" is read as detectron2's FREEZE_AT=2: stage 1 = the stem (conv1,
  bn1), stage 2 = res2 (layer1). BatchNorm layers stay in training mode (MaskContrast's
  freeze_batchnorm: none).
- the CRF (`crf: true`) refines test predictions only, with pydensecrf when it is installed; without
  it the predictions are used as they are and the run says so (it is an optional extra in the paper).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from distseg.config import Config
from distseg.core.constants import IMAGENET_MEAN, IMAGENET_STD
from distseg.core.registry import Registry
from distseg.distill.config import SegmentConfig
from distseg.distill.trainer import FitResult, Task, fit, read_version, rows_with
from distseg.eval.features import register_features

IGNORE = 255
COLUMN = "confident"
# name -> factory(tcfg: SegmentConfig, num_classes: int, load: bool) -> a module whose forward(x)
# returns {"out": logits (B, C, H, W)} and which has `.backbone` and `.classifier` (torchvision's DeepLabV3)
SEGMENTATION_MODELS: Registry = Registry("segmentation backend")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@SEGMENTATION_MODELS.register("torchvision")
def torchvision_deeplab(tcfg: SegmentConfig, num_classes: int, load: bool = True) -> torch.nn.Module:
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    if tcfg.backbone in ("resnet50", "resnet101"):
        resnet = torchvision.models.get_model(
            tcfg.backbone, weights=None, replace_stride_with_dilation=[False, True, True]
        )
    elif tcfg.backbone in ("resnet18", "resnet34"):
        resnet = torchvision.models.get_model(tcfg.backbone, weights=None)
        resnet.maxpool = torch.nn.Identity()  # output stride 16 (see the module docstring)
    else:
        raise ValueError(
            f"distill.segment.backbone: {tcfg.backbone!r} is not one of resnet18, resnet34, resnet50, resnet101"
        )
    if load:
        from distseg.distill.trainer import load_trunk

        load_trunk(resnet, tcfg, "distill.segment")
    stages = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    for names in stages[: tcfg.frozen_stages]:
        for name in names:
            getattr(resnet, name).requires_grad_(False)
    backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    return DeepLabV3(backbone, DeepLabHead(resnet.fc.in_features, num_classes))


def build_model(cfg: Config, num_classes: int, load: bool = True) -> torch.nn.Module:
    tcfg = cfg.distill.segment
    return SEGMENTATION_MODELS.build(tcfg.backend, tcfg, num_classes, load=load)


def normalise(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) ImageNet-normalised float."""
    x = torch.from_numpy(np.array(images, np.float32)).permute(0, 3, 1, 2).div_(255)  # a copy: inputs may be read-only
    return (x - MEAN) / STD


def scale_rotate_crop(
    image: np.ndarray, labels: np.ndarray, tcfg: SegmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One square training crop: random scale and rotation about a random centre, a flip; pixels from
    outside the image are black in the image and IGNORE in the labels."""
    h, w = labels.shape
    scale = rng.uniform(*tcfg.scale_range)
    angle = rng.uniform(-tcfg.rotate, tcfg.rotate)
    half = tcfg.crop / 2 / scale  # the crop's half side in source pixels
    cx = w / 2 + rng.uniform(-1, 1) * max(0.0, w / 2 - half)
    cy = h / 2 + rng.uniform(-1, 1) * max(0.0, h / 2 - half)
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    matrix[:, 2] += (tcfg.crop / 2 - cx, tcfg.crop / 2 - cy)
    size = (tcfg.crop, tcfg.crop)
    img = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    lab = cv2.warpAffine(labels, matrix, size, flags=cv2.INTER_NEAREST, borderValue=IGNORE)
    if tcfg.flip and rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def make_task(cfg: Config, rows: list[dict], num_classes: int, rank: int) -> Task:
    """DeepLab's part of the shared loop: crops of the pseudo-labelled images, the hard-pixel loss."""
    from distseg.distill.losses import hard_pixel_cross_entropy
    from distseg.shards import decode_image, decode_png

    tcfg = cfg.distill.segment
    rows = rows_with(rows, COLUMN, "regions", rank)
    model = build_model(cfg, num_classes)

    def batch(rng: np.random.Generator):
        crops = [
            scale_rotate_crop(decode_image(row["image"]), decode_png(row[COLUMN]["regions"]), tcfg, rng)
            for row in (rows[int(i)] for i in rng.integers(len(rows), size=tcfg.batch_size))
        ]
        return normalise(np.stack([c[0] for c in crops])), torch.from_numpy(np.stack([c[1] for c in crops])).long()

    def losses(net, inputs):
        device = next(net.parameters()).device
        images, target = inputs
        logits = net(images.to(device))["out"]
        return {"loss": hard_pixel_cross_entropy(logits, target.to(device), tcfg.hard_fraction, IGNORE)}

    return Task(model, batch, losses)


def train_segmenter(cfg: Config, data_uri: str) -> FitResult:
    """DeepLab-v3 on the pseudo label maps at `data_uri` (a `distseg distill confident` output).

    `epochs` and `milestones` (in epochs) become steps: ceil(epochs x images / (batch x workers))."""
    import math

    manifest, _ = read_version(data_uri)
    entry = manifest.get(COLUMN)
    if not entry:
        raise ValueError(f"{data_uri}: not a `distseg distill confident` output (its manifest has no {COLUMN!r} entry)")
    tcfg = cfg.distill.segment
    SEGMENTATION_MODELS.get(tcfg.backend)  # an unknown backend fails before Ray starts
    images = sum(int(s["rows"]) for s in manifest["shards"])
    per_epoch = images / (tcfg.batch_size * tcfg.num_workers)
    steps = max(1, math.ceil(tcfg.epochs * per_epoch))
    milestones = [math.ceil(m * per_epoch) for m in tcfg.milestones]
    return fit(
        cfg,
        "segment",
        "distseg.distill.segment:make_task",
        data_uri,
        ["image_id", "image", COLUMN],
        int(entry["classes"]),
        steps,
        milestones,
        tags={"backbone": tcfg.backbone, "hard_fraction": tcfg.hard_fraction},
    )


def load_segmenter(checkpoint: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Config]:
    """A trained segmentation model in eval mode, and its config."""
    from distseg.distill.trainer import read_checkpoint

    cfg, state = read_checkpoint(checkpoint, "segmentation")
    head = [k for k in state if k.startswith("classifier.") and k.endswith(".weight")]
    num_classes = int(state[max(head, key=lambda k: int(k.split(".")[1]))].shape[0])
    model = build_model(cfg, num_classes, load=False)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def crf_refine(image: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
    """Dense-CRF labels from (C, H, W) probabilities, or None when pydensecrf is not installed."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        return None
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    return np.argmax(np.array(crf.inference(10)).reshape(c, h, w), axis=0)


@torch.no_grad()
def segment_image(model: torch.nn.Module, image: np.ndarray, crf: bool = False) -> np.ndarray:
    """(H, W) predicted class ids at the image's own resolution (the paper tests at full resolution)."""
    device = next(model.parameters()).device
    logits = model(normalise(image[None]).to(device))["out"]
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    if crf:
        refined = crf_refine(image, logits.softmax(0).cpu().numpy().astype(np.float32))
        if refined is not None:
            return refined.astype(np.int64)
    return logits.argmax(0).cpu().numpy()


class SegmenterFeatures:
    """Frozen features of a trained segmentation model: its head's last hidden layer (before the
    1x1 classifier), at the backbone's output stride, for the evaluation protocols."""

    def __init__(self, checkpoint: str, image_size: int | None = 320, device: str = "cpu"):
        from distseg.eval.features import resize_longer

        model, _ = load_segmenter(checkpoint, device)
        self.backbone, self.hidden = model.backbone, torch.nn.Sequential(*list(model.classifier)[:-1])
        self.image_size, self.device, self.resize = image_size, device, resize_longer

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = normalise(self.resize(image, self.image_size)[None]).to(self.device)
        return self.hidden(self.backbone(x)["out"])[0].float().cpu().numpy()


@register_features("distill_segment", gpu=True, needs_checkpoint=True)
def _segmenter_features(checkpoint: str, image_size: int | None = 320, device: str = "cpu", **_):
    return SegmenterFeatures(checkpoint, image_size, device)


def matched_miou(
    predictions: list[np.ndarray], labels: list[np.ndarray], num_pred: int, class_names: list[str]
) -> dict:
    """Hungarian matching of predicted classes to ground-truth classes over the whole split, then mIoU
    (and, for over-clustering, the majority-vote mapping's mIoU beside it). Pixels of an unmatched
    prediction count as wrong (a false negative of their true class); IGNORE pixels are not scored."""
    from distseg.eval.metrics import contingency, hungarian_match, majority_vote_match

    num_classes = len(class_names)
    counts = sum(contingency(p, t, num_pred, num_classes, ignore_index=IGNORE) for p, t in zip(predictions, labels))
    out = {}
    for name, mapping in (("hungarian", hungarian_match(counts)), ("majority", majority_vote_match(counts))):
        column = np.where(mapping < 0, num_classes, mapping)  # unmatched -> an extra, always-wrong column
        matched = np.zeros((num_classes, num_classes + 1), np.int64)
        np.add.at(matched.T, column, counts.T)
        tp = np.diag(matched[:, :num_classes]).astype(np.float64)
        union = matched.sum(1) + matched[:, :num_classes].sum(0) - tp
        present = matched.sum(1) > 0  # classes absent from the split's labels are not averaged
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
        out[name] = {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / max(1, matched.sum())),
            "iou": {n: round(float(v), 4) for n, v, keep in zip(class_names, iou, present) if keep},
            "mapping": mapping.tolist(),
        }
    return out


def evaluate_segmenter(cfg: Config, checkpoint: str | Path, protocols: bool = True) -> dict:
    """Score a segmentation checkpoint on cfg.evaluate.dataset: matched mIoU of its predictions, and (with
    `protocols`) its frozen features through cfg.evaluate.protocols. Logged to MLflow under the
    checkpoint's training run. Returns {"predictions": {...}, "protocols": {name: metrics}}."""
    from distseg.checkpoint import read_meta
    from distseg.eval.evaluate import load_split
    from distseg.tracking import start_run

    t0 = time.perf_counter()
    ecfg = cfg.evaluate
    evals, class_names = load_split(cfg, ecfg.eval_split)
    model, model_cfg = load_segmenter(checkpoint)
    num_pred = int(model.classifier[-1].out_channels)
    crf = model_cfg.distill.segment.crf or cfg.distill.segment.crf
    if crf and crf_refine(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 2), 0.5, np.float32)) is None:
        warnings.warn(
            "distill.segment.crf: pydensecrf is not installed; predictions are scored without the CRF", stacklevel=2
        )
        crf = False
    predictions = [segment_image(model, image, crf) for image in evals.images]
    scores = matched_miou(predictions, evals.labels, num_pred, class_names)
    results = {
        "predictions": {**scores, "crf": crf, "images": len(evals.ids), "dataset": ecfg.dataset},
        "protocols": {},
    }
    parent = read_meta(checkpoint).get("mlflow_run_id")
    tags = {"stage": "distill.evaluate", "checkpoint": str(checkpoint), "dataset": ecfg.dataset}
    with start_run(cfg, run_name=f"{cfg.name}-segment-eval", parent_run_id=parent, tags=tags, log_config=False) as t:
        t.log_metrics(
            {
                "hungarian_miou": scores["hungarian"]["miou"],
                "majority_miou": scores["majority"]["miou"],
                "pixel_accuracy": scores["hungarian"]["pixel_accuracy"],
            }
        )
        t.log_dict(results["predictions"], "predictions.json")
        if protocols:
            results["protocols"] = _protocols(cfg, str(Path(checkpoint).resolve()), evals, class_names)
            for name, metrics in results["protocols"].items():
                t.log_metrics({f"{name}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
        t.log_metrics({"seconds": time.perf_counter() - t0})
        results["run_id"] = t.run_id
    return results


def _protocols(cfg: Config, checkpoint: str, evals, class_names: list[str]) -> dict:
    """The frozen features through the existing protocols (image protocols only)."""
    from distseg.cluster import init_ray
    from distseg.eval.evaluate import extract_splits, load_split, plan_protocols, run_protocol

    plans = [p for p in plan_protocols(cfg) if not p.info.needs_video and not p.info.needs_concepts]
    train = load_split(cfg, cfg.evaluate.train_split)[0] if any(p.info.needs_train for p in plans) else None
    init_ray(cfg.ray)
    source = {"checkpoint": checkpoint, "image_size": cfg.evaluate.image_size}
    train_feats, eval_feats = extract_splits("distill_segment", source, [train, evals], [__name__])
    out = {}
    for plan in plans:
        res = run_protocol(plan, class_names, cfg.seed, train, train_feats, evals, eval_feats, 0, {})
        out[plan.name] = res.metrics
    return out
