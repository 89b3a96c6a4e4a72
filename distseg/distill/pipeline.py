"""`distseg distill run`: MaskDistill parts 1 and 2 end to end, resumable stage by stage.

    <root>/masks          mined vit_masks (part 1; mining is resumable image by image)
    <root>/masks_k<K>     the clustered version (pseudo classes)
    <workdir>/checkpoints/<name>-maskrcnn     Mask R-CNN on the clustered masks (Ray Train resumes by name)
    <root>/confident      the confident pseudo label maps (distill.confident.threshold)
    <workdir>/checkpoints/<name>-segment      DeepLab-v3 on them with hard pixel mining
    <root>/summary.json   seconds per stage and every score

A stage whose output is complete (a finished version's _manifest.json, an exported checkpoint at its
last step) is skipped on a rerun, so an interrupted run picks up where it stopped. With `ablation`,
the paper's Table 1 rows are scored too: (a) the clustered initial masks, (b) every Mask R-CNN
prediction (threshold 0, the overlap rule kept: <root>/predictions), (c) the segmentation model and
(d) the same model trained without hard pixel mining (hard_fraction = 1, run `<name>-plain`).
Rows (a) and (b) score the mined images' own label maps against their ground truth, which is known
for the synthetic scenes and for a labelled `evaluate.dataset` whose images were mined.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from distseg.config import Config


def _done_version(uri: Path) -> bool:
    return (uri / "_manifest.json").is_file()


def _done_checkpoint(folder: Path, steps: int) -> bool:
    from distseg.checkpoint import read_meta

    return (folder / "model.pt").is_file() and int(read_meta(folder).get("step") or 0) >= steps


def ground_truth(cfg: Config, uri: str, shape: tuple[int, int], lookup: dict | None) -> np.ndarray | None:
    """The semantic labels of a mined image (by its source uri), at the stored image's size, or None."""
    import cv2

    from distseg.distill.evaluate import synthetic_instances

    labels = None
    if synthetic_instances(uri, cfg.data.image_size, cfg.seed, shape) is not None:
        import re

        from distseg.data.synthetic import make_scene

        found = re.search(r"synthetic_(\w+?)_(\d+)\.png$", uri)
        labels = make_scene(int(found.group(2)), cfg.data.image_size, seed=cfg.seed, split=found.group(1)).labels
    elif lookup is not None and str(Path(uri).resolve()) in lookup:
        labels = lookup[str(Path(uri).resolve())]()
    if labels is None:
        return None
    if labels.shape != shape:
        labels = cv2.resize(labels.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST)
    return labels.astype(np.int64)


def label_lookup(cfg: Config) -> tuple[dict | None, list[str]]:
    """evaluate.dataset's images by absolute file path -> a function giving their (remapped) labels."""
    from distseg.eval.evaluate import class_space, open_eval_dataset

    if cfg.evaluate.dataset == "synthetic":
        from distseg.data.synthetic import CLASS_NAMES

        return None, list(CLASS_NAMES)
    dataset = open_eval_dataset(cfg, "all")
    names, remap = class_space(dataset)
    files = getattr(dataset, "image_files", None)
    if files is None:
        return None, names
    return {str(Path(p).resolve()): (lambda i=i: remap(dataset[i].labels)) for i, p in files().items()}, names


def score_version(cfg: Config, version: str, column: str) -> dict:
    """Hungarian-matched mIoU of a shard version's per-image label maps against ground truth: `vit_masks`
    (the clustered masks painted most confident first) or `confident` (the stored label maps)."""
    import pyarrow.parquet as pq

    from distseg.distill.aggregate import label_map
    from distseg.distill.segment import matched_miou
    from distseg.distill.trainer import read_version
    from distseg.shards import decode_record

    manifest, paths = read_version(version)
    lookup, names = label_lookup(cfg)
    preds, truths, missing = [], [], 0
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            record = decode_record(row, [column])
            shape = record.image.shape[:2]
            truth = ground_truth(cfg, record.uri, shape, lookup)
            if truth is None:
                missing += 1
                continue
            out = record.priors.get(column)
            if column == "confident":
                pred = out.regions.astype(np.int64)
            else:
                masks = sorted(out.masks if out else [], key=lambda m: -m.score)
                pred = label_map(masks, *shape).astype(np.int64)
            preds.append(pred)
            truths.append(truth)
    if not preds:
        raise ValueError(
            f"{version}: no mined image has known ground truth (evaluate.dataset={cfg.evaluate.dataset!r})"
        )
    classes = int(manifest.get("cluster", {}).get("clusters", 0)) + 1
    scores = matched_miou(preds, truths, max(classes, max(int(p.max()) for p in preds) + 1), names)
    return {**scores, "images": len(preds), "without_truth": missing}


def run_pipeline(cfg: Config, root: str, input_uri: str | None = None, ablation: bool = False) -> dict:
    """Every stage of MaskDistill into `root` (see the module docstring); returns summary.json's dict."""
    import math

    from distseg.checkpoint import read_meta
    from distseg.distill.confident import confident_stage
    from distseg.distill.maskrcnn import train_maskrcnn
    from distseg.distill.segment import evaluate_segmenter, train_segmenter
    from distseg.distill.stage import distill_masks

    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"seconds": {}, "scores": {}}

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        summary["seconds"][stage] = round(time.perf_counter() - t0, 1)
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
        return result

    k = cfg.priors.vit_masks.clusters
    masks, clustered = out / "masks", out / f"masks_k{k}"
    if not _done_version(clustered):
        if clustered.exists():
            raise FileExistsError(f"{clustered} exists without a _manifest.json (an interrupted clustering): delete it")
        timed("masks", distill_masks, cfg, str(masks), input_uri, str(clustered))
    if ablation and "a_initial_masks" not in summary["scores"]:
        summary["scores"]["a_initial_masks"] = score_version(cfg, str(clustered), "vit_masks")

    workdir = Path(cfg.workdir).resolve() / "checkpoints"
    maskrcnn = workdir / f"{cfg.name}-maskrcnn"
    if not _done_checkpoint(maskrcnn, cfg.distill.maskrcnn.steps):
        maskrcnn = timed("maskrcnn", train_maskrcnn, cfg, str(clustered)).checkpoint

    confident = out / "confident"
    if not _done_version(confident):
        timed("confident", confident_stage, cfg, str(maskrcnn), str(clustered), str(confident))
    if ablation:
        predictions = out / "predictions"
        if not _done_version(predictions):
            every = cfg.model_copy(deep=True)
            every.distill.confident.threshold = 0.0
            timed("predictions", confident_stage, every, str(maskrcnn), str(clustered), str(predictions))
        summary["scores"]["b_maskrcnn_predictions"] = score_version(cfg, str(predictions), "confident")
        summary["scores"]["confident_maps"] = score_version(cfg, str(confident), "confident")

    images = json.loads((confident / "_manifest.json").read_text())
    images = sum(int(s["rows"]) for s in images["shards"])
    runs = [("c_segment", cfg)]
    if ablation:
        plain = cfg.model_copy(deep=True)
        plain.name = f"{cfg.name}-plain"
        plain.distill.segment.hard_fraction = 1.0
        runs.append(("d_without_hard_pixels", plain))
    for row, run_cfg in runs:
        scfg = run_cfg.distill.segment
        steps = max(1, math.ceil(scfg.epochs * images / (scfg.batch_size * scfg.num_workers)))
        checkpoint = workdir / f"{run_cfg.name}-segment"
        if not _done_checkpoint(checkpoint, steps):
            checkpoint = timed(f"segment{'' if run_cfg is cfg else '_plain'}", train_segmenter, run_cfg, str(confident))
            checkpoint = checkpoint.checkpoint
        if row not in summary["scores"]:
            result = timed(f"evaluate_{row}", evaluate_segmenter, run_cfg, checkpoint, run_cfg is cfg)
            summary["scores"][row] = result
        summary[f"checkpoint_{row}"] = str(checkpoint)
        summary[f"checkpoint_{row}_step"] = read_meta(checkpoint).get("step")
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    return summary
