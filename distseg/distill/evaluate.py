"""Evaluation of the mask proposals themselves: class-agnostic mask AP against instance ground truth
(pycocotools' COCOeval, one category, as MaskDistill's Table 6f scores its initial masks).

    ap = mask_ap(predictions, ground_truth)   # {"AP": ..., "AP50": ..., "AP75": ...} in [0, 1]

predictions: {image_id: [(mask H x W bool, score), ...]}; ground_truth: {image_id: instance map
(H x W int, 0 = no instance)}. Images with no prediction count (their instances are all missed).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as coco_mask


def mask_ap(predictions: dict[str, list[tuple[np.ndarray, float]]], ground_truth: dict[str, np.ndarray]) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    missing = sorted(set(predictions) - set(ground_truth))
    if missing:
        raise ValueError(f"predictions for {len(missing)} images without ground truth, e.g. {missing[:3]}")
    images, annotations, results = [], [], []
    numbers = {image_id: n for n, image_id in enumerate(sorted(ground_truth), start=1)}
    for image_id, instances in ground_truth.items():
        h, w = instances.shape
        images.append({"id": numbers[image_id], "height": h, "width": w})
        for k in np.unique(instances[instances > 0]):
            rle = coco_mask.encode(np.asfortranarray((instances == k).astype(np.uint8)))
            area, box = float(coco_mask.area(rle)), coco_mask.toBbox(rle).tolist()
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": numbers[image_id],
                    "category_id": 1,
                    "segmentation": rle,
                    "area": area,
                    "bbox": box,
                    "iscrowd": 0,
                }  # fmt: skip
            )
        for mask, score in predictions.get(image_id, []):
            if mask.shape != (h, w):
                raise ValueError(f"{image_id}: a predicted mask of shape {mask.shape} for a {h}x{w} image")
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append(
                {"image_id": numbers[image_id], "category_id": 1, "segmentation": rle, "score": float(score)}
            )
    if not annotations:
        raise ValueError("the ground truth holds no instances")
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(0.0, float(v)) for v in evaluator.stats[:3]]  # -1 means "no such objects"
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}


def synthetic_instances(uri: str, image_size: int, seed: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The instance map of a synthetic scene written as `synthetic_<split>_<index>.png` (None otherwise)."""
    import re

    import cv2

    from distseg.data.synthetic import make_scene

    found = re.search(r"synthetic_(\w+?)_(\d+)\.png$", uri)
    if not found:
        return None
    instances = make_scene(int(found.group(2)), image_size, seed=seed, split=found.group(1)).instances
    if instances.shape != shape:  # mining resized the image (mine.max_side)
        instances = cv2.resize(instances, shape[::-1], interpolation=cv2.INTER_NEAREST)
    return instances


def evaluate_synthetic_masks(cfg, data_uri: str, prior: str = "vit_masks", baselines=("saliency",)) -> dict:
    """Class-agnostic mask AP of the mined `prior` masks on synthetic scenes, and of baseline mask
    priors run on the same stored images. {name: {"AP", "AP50", "AP75"}}."""
    import pyarrow.parquet as pq

    from distseg.distill.cluster import read_manifest
    from distseg.grouping.priors import create_prior
    from distseg.mining.listing import resolve_uri
    from distseg.shards import decode_record

    manifest = read_manifest(data_uri)
    fs, root = resolve_uri(data_uri)
    others = {name: create_prior(name, cfg) for name in baselines}
    predictions: dict[str, dict] = {prior: {}, **{name: {} for name in others}}
    truth = {}
    for entry in manifest["shards"]:
        for row in pq.read_table(f"{root}/{entry['path']}", filesystem=fs).to_pylist():
            record = decode_record(row, [prior])
            instances = synthetic_instances(record.uri, cfg.data.image_size, cfg.seed, record.image.shape[:2])
            if instances is None:
                raise ValueError(f"{record.uri}: not a synthetic scene; instance ground truth is known only for those")
            truth[record.image_id] = instances
            out = record.priors.get(prior)
            predictions[prior][record.image_id] = [(m.mask, m.score) for m in (out.masks if out else [])]
            for name, make in others.items():
                predictions[name][record.image_id] = [(m.mask, m.score) for m in make(record.image).masks]
    return {name: mask_ap(preds, truth) for name, preds in predictions.items()}
