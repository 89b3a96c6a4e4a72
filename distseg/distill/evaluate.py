"""Evaluation of the mask proposals themselves: class-agnostic mask AP against instance ground truth
(pycocotools' COCOeval, one category, as MaskDistill's Table 6f scores its initial masks).

    ap = mask_ap(predictions, ground_truth)   # {"AP": ..., "AP50": ..., "AP75": ...} in [0, 1]
    result = evaluate_masks(cfg, "outputs/mined", dataset="davis")   # every stored mask prior
    result.scores["vit_masks"]  # {"AP", "AP50", "AP75", "masks_per_image", "area", "best_iou", "stored"}

predictions: {image_id: [(mask H x W bool, score), ...]}; ground_truth: {image_id: instance map
(H x W int, 0 = no instance)}. Images with no prediction count (their instances are all missed).

`evaluate_masks` scores the mask priors of a `distseg mine` output (`distseg distill ap`): the ground
truth is the `instances` of a registered dataset (distseg.data: synthetic, davis, coco:PATH, ...),
found again for each mined record by `InstanceTruth` and resized to the stored image (nearest
neighbour). A prior stored in the shards is scored from its stored masks; one that is not is run on
the stored images.

Caveat (DAVIS-2016): it annotates one object per frame, so a proposal on another, unannotated object
counts as a false positive and lowers the precision. AP on DAVIS is a lower bound of the proposals'
quality; what it is for is comparing proposal kinds (vit_masks against saliency and
felzenszwalb_masks) on the same frames with the same number of masks. Beside AP each prior gets
`best_iou`, the mean over ground-truth instances of the best IoU any of its masks reaches (the average
best overlap of the object-proposal literature): extra masks do not lower it, so it is not biased by
unannotated objects, and it says whether a low AP comes from missing the object or from mis-ranking;
and `area`, the mean mask area as a share of the image.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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


def best_overlaps(predictions: list[tuple[np.ndarray, float]], instances: np.ndarray) -> list[float]:
    """For each instance of an instance map (0 = none), the best IoU any predicted mask reaches (0: none)."""
    best = []
    for k in np.unique(instances[instances > 0]):
        target = instances == k
        ious = [(mask & target).sum() / max(1, (mask | target).sum()) for mask, _ in predictions]
        best.append(float(max(ious, default=0.0)))
    return best


class InstanceTruth:
    """The instance maps of mined images, from a registered dataset opened by its source name.

    A mined record is found again as a dataset sample by its file (the record's uri against the
    dataset's `image_files()`: how `distseg mine --input SOURCE`, a folder or a glob of the dataset's
    files are all matched), else by its image_id, else by its file name against the ids with '/' as '_'
    (how distill.stage.synthetic_images names the synthetic scenes it writes, which have no files)."""

    def __init__(self, source: str, split: str = "all", root: str | None = None, **options) -> None:
        from distseg.data import open_dataset

        self.source, self.split = source, split
        self.dataset = open_dataset(source, root=root, split=split, **options)
        self._keys: dict[str, str] = {}
        for image_id in self.dataset.ids():
            self._keys[image_id.replace("/", "_")] = image_id
            self._keys[image_id] = image_id
        files = getattr(self.dataset, "image_files", None)
        if files is not None:
            self._keys |= {str(Path(path).resolve()): image_id for image_id, path in files().items()}

    def sample_id(self, image_id: str, uri: str) -> str | None:
        """The dataset id of a mined record (None: not an image of this dataset and split)."""
        local = uri.removeprefix("file://")
        keys = ([] if "://" in local else [str(Path(local).resolve())]) + [image_id, PurePosixPath(local).stem]
        return next((self._keys[k] for k in keys if k in self._keys), None)

    def instances(self, image_id: str, uri: str, shape: tuple[int, int]) -> np.ndarray:
        """The record's instance map (0 = none) at the stored image's `shape` (nearest neighbour)."""
        import cv2

        found = self.sample_id(image_id, uri)
        if found is None:
            raise ValueError(
                f"{uri} (mined as {image_id!r}) is not an image of {self.source} split {self.split!r}: "
                "name the dataset the shards were mined from (--dataset) and its split (--split)"
            )
        instances = self.dataset[found].instances
        if instances is None:
            raise ValueError(
                f"{uri} ({self.source} image {found!r}) has no instance ground truth: class-agnostic mask AP "
                f"needs a dataset with instance masks ({', '.join(INSTANCE_SOURCES)})"
            )
        if instances.shape != tuple(shape):  # mining resized the image (mine.max_side, a prior's short side)
            instances = cv2.resize(instances.astype(np.int32), shape[::-1], interpolation=cv2.INTER_NEAREST)
        return instances


INSTANCE_SOURCES = ("synthetic", "davis", "coco:PATH")  # the readers whose samples carry `instances`


@dataclass
class MaskAPResult:
    """evaluate_masks: {prior: {"AP", "AP50", "AP75", "masks_per_image", "area", "best_iou", "stored"}}
    over `images` images (see the module docstring)."""

    scores: dict[str, dict]
    dataset: str
    split: str
    images: int


def truth_source(cfg, manifest: dict, dataset: str | None, split: str | None) -> tuple[str, str]:
    """The dataset (and split) whose instances score a mined output: `dataset`, else the data source
    the shards were mined from (`distseg mine --input davis`), else evaluate.dataset. The split defaults
    to "all" (every image of a dataset with files is found by its file); the synthetic scenes, which
    have no files, to data.split, the split that `distill masks` writes."""
    from distseg.data import DATASETS, is_source

    mined = str(manifest.get("input", ""))
    if dataset is None:
        dataset = mined if mined and is_source(mined) else cfg.evaluate.dataset
    if split is None:
        name = dataset.partition(":")[0]
        split = cfg.data.split if name in DATASETS and DATASETS.meta(name).get("builtin") else "all"
    return dataset, split


def evaluate_masks(
    cfg, data_uri: str, dataset: str | None = None, priors=None, split: str | None = None, progress: bool = False
) -> MaskAPResult:
    """Class-agnostic mask AP of mask priors on a `distseg mine` output against `dataset`'s instances.

    priors: mask priors (default: every mask prior stored in the shards); a prior that is not stored is
    run on the stored images with cfg's settings (a baseline). dataset / split: see truth_source.
    progress: a progress bar over the images (the CLI's)."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from distseg.distill.cluster import read_manifest
    from distseg.grouping.priors import PRIORS, create_prior, prior_yields
    from distseg.mining.listing import resolve_uri
    from distseg.shards import decode_record

    manifest = read_manifest(data_uri)
    stored = [p for p in manifest.get("priors", []) if p in PRIORS and prior_yields(p) == "masks"]
    names = list(priors) if priors else stored
    if not names:
        raise ValueError(f"{data_uri}: no mask prior in the shards (priors {manifest.get('priors')}): name some")
    mask_priors = sorted(p for p in PRIORS if prior_yields(p) == "masks")
    bad = [p for p in names if p not in mask_priors]
    if bad:
        raise ValueError(f"{bad}: not mask priors (the mask priors: {', '.join(mask_priors)})")
    source, split = truth_source(cfg, manifest, dataset, split)
    root = cfg.evaluate.root if source == cfg.evaluate.dataset else None
    options = {"num_images": cfg.data.num_images, "image_size": cfg.data.image_size, "seed": cfg.seed}
    truth = InstanceTruth(source, split, root, **options)  # readers drop the options that are not theirs
    run = {name: create_prior(name, cfg) for name in names if name not in stored}
    predictions: dict[str, dict] = {name: {} for name in names}
    ground_truth = {}
    fs, root_path = resolve_uri(data_uri)
    total = sum(int(entry.get("rows", 0)) for entry in manifest["shards"]) or None
    with tqdm(total=total, desc="mask AP", unit="img", disable=not progress) as bar:
        for entry in manifest["shards"]:
            for row in pq.read_table(f"{root_path}/{entry['path']}", filesystem=fs).to_pylist():
                record = decode_record(row, [n for n in names if n in stored])
                shape = record.image.shape[:2]
                ground_truth[record.image_id] = truth.instances(record.image_id, record.uri, shape)
                for name in names:
                    out = run[name](record.image) if name in run else record.priors.get(name)
                    predictions[name][record.image_id] = [(m.mask, m.score) for m in (out.masks if out else [])]
                bar.update(1)
    if not ground_truth:
        raise ValueError(f"{data_uri}: the shards hold no images")
    scores = {}
    for name, preds in predictions.items():
        areas = [float(mask.mean()) for p in preds.values() for mask, _ in p]
        best = [iou for image_id, p in preds.items() for iou in best_overlaps(p, ground_truth[image_id])]
        scores[name] = {
            **mask_ap(preds, ground_truth),
            "masks_per_image": len(areas) / len(ground_truth),
            "area": float(np.mean(areas)) if areas else 0.0,
            "best_iou": float(np.mean(best)) if best else 0.0,
            "stored": name not in run,
        }
    return MaskAPResult(scores, source, split, len(ground_truth))


def log_mask_ap(cfg, data_uri: str, result: MaskAPResult) -> str:
    """MLflow (tag stage=distill.ap): <prior>_AP / _AP50 / _AP75 / _masks_per_image and mask_ap.json."""
    from distseg.tracking import start_run

    tags = {"stage": "distill.ap", "shards": data_uri, "dataset": result.dataset, "split": result.split}
    with start_run(cfg, run_name=f"{cfg.name}-distill-ap", tags=tags) as tracker:
        metrics = {"images": result.images}
        for name, score in result.scores.items():
            metrics |= {f"{name}_{k}": float(v) for k, v in score.items() if k != "stored"}
        tracker.log_metrics(metrics)
        tracker.log_dict({"images": result.images, "dataset": result.dataset, "scores": result.scores}, "mask_ap.json")
        return tracker.run_id
