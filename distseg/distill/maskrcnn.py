"""`distseg distill train`: distil the clustered masks into Mask R-CNN (MaskDistill Sec. 3.2, App. A.1).

    shards (a clustered version: masks[].label = cluster id + 1) -> Ray Train (distseg.distill.trainer)
    -> <workdir>/checkpoints/<name>-maskrcnn/ (model.pt, config.yaml, meta.json)

Each mask is one training instance: its class is its cluster (K + 1 classes with background), its
box the mask's bounding box, its mask the mask. Multi-scale training as the paper: torchvision's
transform draws each image's short side from `min_sizes` while training and uses `test_size` at
inference; linear warm-up and step decay (distill.trainer.learning_rate); random horizontal flips.

The network comes from the `INSTANCE_MODELS` registry (`backend`); `torchvision` is the one here.
Departures, with reasons:
- the paper's ResNet-50-C4 (detectron2) becomes torchvision's ResNet-FPN Mask R-CNN: detectron2 does
  not install here and torchvision has no C4 head. A detectron2 backend registers under another name.
- the backbone starts from a local weights file (e.g. MoCo's, the paper's init), a distseg checkpoint's
  ResNet trunk, or random init. Initialised backbones use frozen BatchNorm (torchvision's and
  detectron2's default); a random-init one uses ordinary BatchNorm, since frozen statistics of a random
  network would never normalise anything.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as coco_mask

from distseg.config import Config
from distseg.core.constants import IMAGENET_MEAN, IMAGENET_STD
from distseg.core.registry import Registry
from distseg.distill.config import MaskRCNNConfig
from distseg.distill.trainer import FitResult, Task, fit, pseudo_classes, read_version, rows_with

# name -> factory(tcfg: MaskRCNNConfig, num_classes: int) -> a torchvision-style instance model:
# train mode `model(images, targets) -> {loss terms}`, eval mode `model(images) -> [{boxes, labels, scores, masks}]`
INSTANCE_MODELS: Registry = Registry("instance segmentation backend")
PRIOR = "vit_masks"  # the shard column holding the clustered masks


@INSTANCE_MODELS.register("torchvision")
def torchvision_maskrcnn(tcfg: MaskRCNNConfig, num_classes: int, load: bool = True) -> torch.nn.Module:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    initialised = bool(tcfg.weights or tcfg.checkpoint)
    backbone = resnet_fpn_backbone(
        backbone_name=tcfg.backbone,
        weights=None,
        norm_layer=FrozenBatchNorm2d if initialised else torch.nn.BatchNorm2d,
        trainable_layers=tcfg.trainable_layers,
    )
    if initialised and load:
        from distseg.distill.trainer import load_trunk

        trainable = {n: p.requires_grad for n, p in backbone.body.named_parameters()}
        load_trunk(backbone.body, tcfg, "distill.maskrcnn")
        for n, p in backbone.body.named_parameters():
            p.requires_grad_(trainable[n])
    return MaskRCNN(
        backbone,
        num_classes=num_classes,
        min_size=tuple(tcfg.min_sizes),
        max_size=tcfg.max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        box_detections_per_img=tcfg.detections,
    )


def build_model(cfg: Config, num_classes: int, load: bool = True) -> torch.nn.Module:
    """The backend's network; `load=False` skips reading the backbone's init (a checkpoint follows)."""
    tcfg = cfg.distill.maskrcnn
    return INSTANCE_MODELS.build(tcfg.backend, tcfg, num_classes, load=load)


def instance_target(masks: list[dict], height: int, width: int, flip: bool) -> dict[str, torch.Tensor]:
    """Shard masks (rle, score, label) -> a torchvision target: boxes (x0, y0, x1, y1), labels, masks."""
    from distseg.shards import decode_masks

    decoded = [m for m in decode_masks(masks, height, width) if m.mask.any()]
    binary = np.stack([m.mask for m in decoded]).astype(np.uint8) if decoded else np.zeros((0, height, width), np.uint8)
    if flip:
        binary = np.ascontiguousarray(binary[:, :, ::-1])
    boxes = np.zeros((len(binary), 4), np.float32)
    for i, m in enumerate(binary):
        x, y, w, h = coco_mask.toBbox(coco_mask.encode(np.asfortranarray(m)))
        boxes[i] = (x, y, x + w, y + h)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.tensor([m.label for m in decoded], dtype=torch.int64),
        "masks": torch.from_numpy(binary),
    }


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float in [0, 1] (the model's transform normalises)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)


def make_task(cfg: Config, rows: list[dict], num_classes: int, rank: int) -> Task:
    """Mask R-CNN's part of the shared loop: the rows with at least one mask, flips, the four losses."""
    from distseg.shards import decode_image

    tcfg = cfg.distill.maskrcnn
    rows = rows_with(rows, PRIOR, "masks", rank)
    model = build_model(cfg, num_classes)

    def batch(rng: np.random.Generator):
        images, targets = [], []
        for i in rng.integers(len(rows), size=tcfg.batch_size):
            row = rows[int(i)]
            flip = tcfg.flip and rng.random() < 0.5
            image = decode_image(row["image"])
            images.append(to_tensor(image[:, ::-1] if flip else image))
            targets.append(instance_target(row[PRIOR]["masks"], int(row["height"]), int(row["width"]), flip))
        return images, targets

    def losses(net, inputs):
        device = next(net.parameters()).device
        images, targets = inputs
        terms = net([x.to(device) for x in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
        return {"loss": sum(terms.values()), **terms}

    return Task(model, batch, losses)


def train_maskrcnn(cfg: Config, data_uri: str) -> FitResult:
    """Mask R-CNN on the clustered masks at `data_uri` (a `distseg distill cluster` output)."""
    manifest, _ = read_version(data_uri)
    num_classes = pseudo_classes(manifest, data_uri)
    INSTANCE_MODELS.get(cfg.distill.maskrcnn.backend)  # an unknown backend fails before Ray starts
    tcfg = cfg.distill.maskrcnn
    return fit(
        cfg,
        "maskrcnn",
        "distseg.distill.maskrcnn:make_task",
        data_uri,
        ["image_id", "height", "width", "image", PRIOR],
        num_classes,
        tcfg.steps,
        list(tcfg.milestones),
        tags={"backend": tcfg.backend, "backbone": tcfg.backbone},
    )


def load_maskrcnn(checkpoint: str, device: str = "cpu") -> tuple[torch.nn.Module, Config]:
    """A trained Mask R-CNN in eval mode at its test scale, and its config."""
    from distseg.distill.trainer import read_checkpoint

    cfg, state = read_checkpoint(checkpoint, "Mask R-CNN")
    num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    model = build_model(cfg, num_classes, load=False)  # the checkpoint holds every weight
    model.load_state_dict(state)
    model.transform.min_size = (cfg.distill.maskrcnn.test_size,)
    return model.to(device).eval(), cfg


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray, mask_threshold: float = 0.5) -> list:
    """One image -> its predicted instances as `Mask`s (bool mask, score, label = cluster id + 1)."""
    from distseg.grouping.types import Mask

    device = next(model.parameters()).device
    out = model([to_tensor(image).to(device)])[0]
    masks = (out["masks"][:, 0] >= mask_threshold).cpu().numpy()
    scores, labels = out["scores"].cpu().numpy(), out["labels"].cpu().numpy()
    return [Mask(mask=m, score=float(s), label=int(c)) for m, s, c in zip(masks, scores, labels)]
