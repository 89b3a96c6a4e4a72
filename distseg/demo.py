"""`make demo`: the pipeline end to end on built-in synthetic data, logged to MLflow.

generate the synthetic scenes -> mine grouping shards -> pretrain (Ray Train) -> evaluate the
checkpoint against the random-init and rgbxy baselines -> print the headline numbers, where the
MLflow runs are and the command that opens the UI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distseg.config import Config
from distseg.data import open_dataset
from distseg.data.synthetic import scene_options
from distseg.tracking import experiment_url, start_run, tracking_uri, ui_command
from distseg.viz import color_labels, contact_sheet


def run_demo(cfg: Config) -> dict:
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = open_dataset(
        cfg.data.source,
        root=cfg.data.root,
        split=cfg.data.split,
        **scene_options(cfg),
    )
    samples = list(tqdm(dataset, total=len(dataset), desc="synthetic scenes", unit="img"))
    counts = np.zeros(dataset.num_classes, np.int64)
    for s in samples:
        counts += np.bincount(s.labels.ravel(), minlength=dataset.num_classes)[: dataset.num_classes]
    fractions = {f"class_fraction.{n}": float(c / counts.sum()) for n, c in zip(dataset.class_names, counts)}

    tiles = [s.image for s in samples[:8]] + [color_labels(s.labels) for s in samples[:8]]
    sheet = contact_sheet(tiles, columns=8)
    metrics = {"num_images": len(samples), "generate_seconds": time.perf_counter() - t0, **fractions}

    with start_run(cfg, run_name=f"{cfg.name}-data") as tracker:
        tracker.log_metrics(metrics)
        tracker.log_image(sheet, "synthetic_examples.png")
        data_run = tracker.run_id
    print(
        f"generated {len(samples)} synthetic scenes ({dataset.num_classes} classes) "
        f"in {metrics['generate_seconds']:.1f} s"
    )

    from distseg.cluster import shutdown_ray
    from distseg.eval.evaluate import evaluate
    from distseg.eval.summary import summary_lines
    from distseg.train.pretrain import pretrain

    t1 = time.perf_counter()
    result = pretrain(cfg)
    shutdown_ray()
    metrics["pretrain_seconds"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    scores = evaluate(cfg, str(result.checkpoint), workdir / "eval")
    metrics["evaluate_seconds"] = time.perf_counter() - t2
    summary = {
        "data_run_id": data_run,
        "pretrain_run_id": result.run_id,
        "checkpoint": str(result.checkpoint),
        **metrics,
        "scores": {s: r["metrics"] for s, r in scores["sources"].items()},
    }
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    print(
        f"demo done in {time.perf_counter() - t0:.0f} s "
        f"(pretrain {metrics['pretrain_seconds']:.0f} s, evaluate {metrics['evaluate_seconds']:.0f} s)"
    )
    for line in summary_lines(scores):
        print(line)
    print(f"checkpoint: {result.checkpoint}; metrics: {workdir / 'eval' / 'metrics.json'}")
    print(
        f"MLflow: experiment '{cfg.tracking.experiment}' in {tracking_uri(cfg.workdir, cfg.tracking.uri)} "
        f"(pretraining run {result.run_id}, evaluations nested under it)"
    )
    print(f"open the MLflow UI: {ui_command(cfg)}  ->  {experiment_url(cfg)}")
    return summary
