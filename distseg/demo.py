"""`make demo`: the pipeline end to end on built-in synthetic data, logged to MLflow.

Stage so far: generate the synthetic set, picture it, log a run. Later stages (mine -> pretrain ->
evaluate) extend `run_demo` as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distseg.config import Config
from distseg.data import open_dataset
from distseg.tracking import start_run, ui_command
from distseg.viz import color_labels, contact_sheet


def run_demo(cfg: Config) -> dict:
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = open_dataset(
        cfg.data.source,
        root=cfg.data.root,
        split=cfg.data.split,
        num_images=cfg.data.num_images,
        image_size=cfg.data.image_size,
        seed=cfg.seed,
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
        run_id = tracker.run_id
    (workdir / "demo_summary.json").write_text(json.dumps({"run_id": run_id, **metrics}, indent=2))

    print(f"generated {len(samples)} synthetic scenes ({dataset.num_classes} classes) in {metrics['generate_seconds']:.1f} s")
    print(f"outputs: {workdir}/ (demo_summary.json); MLflow run {run_id} in experiment '{cfg.tracking.experiment}'")
    print(f"open the MLflow UI: {ui_command(cfg)}  ->  http://127.0.0.1:5000")
    return {"run_id": run_id, **metrics}
