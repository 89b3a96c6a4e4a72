"""`distseg edges eval`: an edge detector and its OWT-UCM on BSDS500, scored by the BSDS benchmark.

Images are spread over the Ray cluster (one task per chunk of images); each task returns per-image
benchmark counts, which reduce exactly as the official `collect_eval_*` does. Each image's UCM is
written as a 16-bit PNG (value = boundary strength x 65535) so the run can be re-scored or inspected.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from distseg.config import Config
from distseg.eval.bsds import (
    RegionImageCounts,
    collect_boundary_scores,
    collect_region_scores,
    evaluate_boundaries_image,
    evaluate_regions_image,
)


@dataclass
class ImageResult:
    image_id: str
    edge_seconds: float
    hierarchy_seconds: float
    edge_counts: np.ndarray | None  # thinned edge map alone
    ucm_counts: np.ndarray
    region_counts: RegionImageCounts | None


def evaluate_images(
    cfg_dict: dict, items: list[tuple[str, str, str]], out_dir: str, thresholds: int, regions: bool, edges_alone: bool
) -> list[ImageResult]:
    """Run detector + hierarchy + benchmark on (image_id, image_path, gt_path) items."""
    import torch

    from distseg.config import build_config
    from distseg.data.bsds import load_ground_truth
    from distseg.data.imageio import read_image
    from distseg.grouping.edges import edge_detector_from_config
    from distseg.grouping.hierarchy import build_hierarchy

    torch.set_num_threads(1)
    cfg = build_config(cfg_dict)
    detector = edge_detector_from_config(cfg.edges)
    results = []
    for image_id, image_path, gt_path in items:
        image = read_image(image_path)
        segs, bdrys = load_ground_truth(gt_path)
        t0 = time.perf_counter()
        edges = detector(image)
        t1 = time.perf_counter()
        hierarchy = build_hierarchy(edges, cfg.hierarchy.max_regions)
        t2 = time.perf_counter()
        cv2.imwrite(str(Path(out_dir) / f"{image_id}.png"), np.round(hierarchy.ucm * 65535).astype(np.uint16))
        results.append(
            ImageResult(
                image_id=image_id,
                edge_seconds=t1 - t0,
                hierarchy_seconds=t2 - t1,
                edge_counts=evaluate_boundaries_image(edges.thinned(), bdrys, thresholds) if edges_alone else None,
                ucm_counts=evaluate_boundaries_image(hierarchy.ucm2, bdrys, thresholds),
                region_counts=evaluate_regions_image(hierarchy.ucm2, segs, thresholds) if regions else None,
            )
        )
    return results


def evaluate_grouping(
    cfg: Config,
    root: str | Path,
    split: str = "test",
    out_dir: str | Path = "outputs/edges/eval",
    limit: int | None = None,
    thresholds: int = 99,
    regions: bool = True,
    edges_alone: bool = True,
    chunk: int = 4,
) -> dict:
    """Benchmark cfg.edges (+ the hierarchy) on a BSDS split; writes UCM PNGs and metrics.json."""
    import ray

    from distseg.cluster import init_ray
    from distseg.data.bsds import BSDS500

    dataset = BSDS500(root, split=split, limit=limit)
    items = [(i, str(dataset.image_path(i)), str(dataset.ground_truth_path(i))) for i in dataset.ids()]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    cfg_dict = cfg.model_dump(mode="json")
    if cfg_dict["edges"]["weights"]:
        cfg_dict["edges"]["weights"] = str(Path(cfg_dict["edges"]["weights"]).resolve())
    task = ray.remote(num_cpus=1)(evaluate_images)
    pending = [
        task.remote(cfg_dict, items[i : i + chunk], str(out), thresholds, regions, edges_alone)
        for i in range(0, len(items), chunk)
    ]
    results: list[ImageResult] = []
    with tqdm(total=len(items), desc=f"edges eval ({cfg.edges.detector}, {split})", unit="img") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            batch = ray.get(done[0])
            results.extend(batch)
            bar.update(len(batch))
    results.sort(key=lambda r: r.image_id)
    metrics = summarize(results, cfg, split)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _log_run(cfg, metrics, split, out)
    return metrics


def _log_run(cfg: Config, metrics: dict, split: str, out: Path) -> None:
    """One MLflow run per benchmark (tag stage=edges.eval): every number and metrics.json."""
    from distseg.config import flatten
    from distseg.tracking import start_run

    tags = {"stage": "edges.eval", "detector": cfg.edges.detector, "split": split}
    with start_run(cfg, run_name=f"{cfg.name}-edges-eval-{split}", tags=tags) as tracker:
        tracker.log_metrics({k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))})
        tracker.log_artifact(out / "metrics.json")


def summarize(results: list[ImageResult], cfg: Config, split: str) -> dict:
    def boundary(counts):
        s = collect_boundary_scores(counts)
        return {k: float(s[k]) for k in ("ods_f", "ods_r", "ods_p", "ois_f", "ois_r", "ois_p", "ap", "best_threshold")}

    metrics: dict = {
        "detector": cfg.edges.detector,
        "weights": cfg.edges.weights,
        "max_regions": cfg.hierarchy.max_regions,
        "split": split,
        "num_images": len(results),
        "edge_seconds_per_image": float(np.mean([r.edge_seconds for r in results])),
        "hierarchy_seconds_per_image": float(np.mean([r.hierarchy_seconds for r in results])),
        "ucm": boundary([r.ucm_counts for r in results]),
    }
    if results and results[0].edge_counts is not None:
        metrics["edges"] = boundary([r.edge_counts for r in results])
    if results and results[0].region_counts is not None:
        region = collect_region_scores([r.region_counts for r in results])
        metrics["ucm"].update(
            {
                k: float(region[k])
                for k in ("covering_ods", "covering_ois", "covering_best", "pri_ods", "pri_ois", "voi_ods", "voi_ois")
            }
        )
    return metrics
