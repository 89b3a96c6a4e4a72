"""Benchmark pretraining throughput: Ray Data streaming ingest vs the same loop fed from in-memory
tensors (the ingest overhead), with 1 and 2 workers, and the peak memory of a worker.

    python jobs/benchmark_training.py --shards outputs/msrc/mined --steps 60 --workers 1,2
    ray job submit --working-dir . -- python jobs/benchmark_training.py --shards s3://bucket/shards --gpu

Each row is a fresh run (own name, own workdir): the first `--warmup` reported intervals are
dropped, the rest averaged. `memory` caches the first `pretrain.memory_batches` (8) batches of the
same pipeline in the worker and cycles them, so both modes run exactly the same model, loss and batch
shapes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from distseg.cluster import shutdown_ray
from distseg.config import load_config
from distseg.train.pretrain import pretrain


def history(cfg, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    from distseg.tracking import tracking_uri

    rows = MlflowClient(tracking_uri(cfg.workdir, cfg.tracking.uri)).get_metric_history(run_id, key)
    return [m.value for m in sorted(rows, key=lambda m: m.step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="hiergroup_msrc", help="config name or YAML path")
    parser.add_argument(
        "--shards", default=None, help="mining output folder (default: mine the config's synthetic set)"
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument(
        "--warmup", type=int, default=1, help="reported intervals to drop (pipeline start, first allocations)"
    )
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (AMP, channels_last)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/training"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (e.g. pretrain.crop=160)")
    args = parser.parse_args()

    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for ingest in ("memory", "ray_data"):
            name = f"bench-{ingest}-{workers}w-{int(time.time())}"
            overrides = [
                f"name={name}",
                f"workdir={args.out / name}",
                f"pretrain.steps={args.steps}",
                f"pretrain.ingest={ingest}",
                f"pretrain.num_workers={workers}",
                f"pretrain.cpus_per_worker={args.cpus_per_worker}",
                f"pretrain.use_gpu={str(args.gpu).lower()}",
                "pretrain.log_every=10",
                f"pretrain.checkpoint_every={args.steps}",
                *([f"pretrain.shards={Path(args.shards).resolve()}"] if args.shards else []),
                *args.overrides,
            ]
            cfg = load_config(args.config, overrides)
            result = pretrain(cfg)
            shutdown_ray()
            speed = history(cfg, result.run_id, "images_per_s")[args.warmup :]
            rss = history(cfg, result.run_id, "peak_rss_mb")
            rows.append(
                {
                    "workers": workers,
                    "ingest": ingest,
                    "images_per_s": float(np.mean(speed)),
                    "images_per_s_std": float(np.std(speed)),
                    "peak_rss_mb": max(rss) if rss else None,
                }
            )
            print(f"{ingest:>8} x{workers}: {rows[-1]['images_per_s']:.2f} images/s")

    print(
        f"\npretraining throughput ({args.config}, {args.steps} steps, "
        f"{args.cpus_per_worker} CPU/worker{', GPU' if args.gpu else ''})"
    )
    print(f"{'workers':>7} {'ingest':>9} {'images/s':>9} {'+-':>6} {'% of memory':>11} {'peak RSS MB':>11}")
    for row in rows:
        base = next(r for r in rows if r["workers"] == row["workers"] and r["ingest"] == "memory")["images_per_s"]
        row["fraction_of_memory"] = row["images_per_s"] / base
        print(
            f"{row['workers']:>7} {row['ingest']:>9} {row['images_per_s']:>9.2f} {row['images_per_s_std']:>6.2f} "
            f"{100 * row['fraction_of_memory']:>10.1f}% {row['peak_rss_mb'] or 0:>11.0f}"
        )
    one = {r["ingest"]: r["images_per_s"] for r in rows if r["workers"] == 1}
    two = {r["ingest"]: r["images_per_s"] for r in rows if r["workers"] == 2}
    if one and two:
        print(f"scaling 1 -> 2 workers (ray_data): {two['ray_data'] / one['ray_data']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
