"""Benchmark `distseg mine` on BSDS500 images: images/s and seconds per image per core with 1 and 2
CPU workers (scaling efficiency), peak memory per worker, and the bytes per image of each shard column.

    python jobs/benchmark_mining.py --limit 40 --workers 1,2 --priors ucm
    ray job submit --working-dir . -- python jobs/benchmark_mining.py --limit 200

For each worker count, the same images are mined by a real `mine()` run into a fresh folder, on a fresh
embedded Ray cluster with that many CPUs and one MineWorker actor per CPU (with RAY_ADDRESS set, on
that cluster with that many actors). Three times are reported:

  wall        the mine() call: actor start-up (imports, model load), mining, writing, manifest
  processing  first image started -> last image finished, over all workers (no start-up): images/s
              and s/img/core = processing * workers / images come from it
  busy        the workers' own time inside their batches, summed, per image
  pool img/s  each worker's images / (its last image end - its first image start), summed over workers

Speedup and efficiency compare the processing images/s with those of the first worker count.

Targets (the issue): throughput 1 -> 2 workers >= 1.8x; <= 0.5 s per 481x321 image per core end to
end with the ucm prior; ucm columns (regions + region_dist + ucm) <= 60 KB per image in the shards.
On a machine shared with other work the scaling numbers are noisy: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from distseg.cluster import init_ray, shutdown_ray
from distseg.config import load_config
from distseg.data.bsds import BSDS500
from distseg.mining import SHARDS, mine

REPO = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP = 1.8
TARGET_S_PER_IMAGE_CORE = 0.5
TARGET_UCM_BYTES = 60_000
PRIOR_FIELDS = ("regions", "num_regions", "region_dist", "ucm", "masks")
WORKER_KEYS = ("pid", "images", "busy_seconds", "init_seconds", "first_begin", "last_end", "peak_rss_bytes")


def stage_images(data: Path, split: str, limit: int | None, folder: Path) -> list[str]:
    """Copy the first `limit` images of a BSDS split into `folder` (mine reads a folder); their ids."""
    bsds = BSDS500(data, split, limit)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for image_id in bsds.ids():
        src = bsds.image_path(image_id)
        shutil.copyfile(src, folder / src.name)
    return bsds.ids()


def column_bytes(shards: Path, priors: list[str]) -> dict:
    """Mean stored (compressed) bytes per image of each shard column, from the Parquet footers."""
    totals: dict[str, int] = defaultdict(int)
    raw: dict[str, int] = defaultdict(int)
    rows = file_bytes = 0
    for path in sorted(shards.glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        file_bytes += path.stat().st_size
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                parts = chunk.path_in_schema.split(".")
                name = f"{parts[0]}.{parts[1]}" if parts[0] in priors and len(parts) > 1 else parts[0]
                totals[name] += chunk.total_compressed_size
                raw[name] += chunk.total_uncompressed_size
    if not rows:
        raise RuntimeError(f"no rows in the shards under {shards}")
    per_image = {name: totals[name] / rows for name in sorted(totals)}
    result = {
        "rows": rows,
        "file_bytes_per_image": file_bytes / rows,
        "columns": per_image,
        "uncompressed_columns": {name: raw[name] / rows for name in sorted(raw)},
    }
    for prior in priors:
        result[f"{prior}_total"] = sum(per_image.get(f"{prior}.{f}", 0.0) for f in PRIOR_FIELDS)
    return result


def image_shapes(shards: Path) -> dict[str, int]:
    table = pq.read_table(shards, columns=["height", "width"])
    shapes: dict[str, int] = defaultdict(int)
    for h, w in zip(table.column("height").to_pylist(), table.column("width").to_pylist()):
        shapes[f"{w}x{h}"] += 1
    return dict(shapes)


def run_once(cfg_name: str, overrides: list[str], workers: int, images: Path, out: Path, progress: bool) -> dict:
    cfg = load_config(cfg_name, [*overrides, f"mine.num_actors={workers}", f"ray.num_cpus={workers}"])
    if out.exists():
        shutil.rmtree(out)
    shutdown_ray()  # a fresh cluster per worker count (a no-op the first time)
    t0 = time.perf_counter()
    init_ray(cfg.ray)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = mine(cfg, str(images), str(out), progress=progress)
    wall = time.perf_counter() - t0
    shutdown_ray()
    if summary.errors or summary.crashed:
        raise RuntimeError(f"{workers} workers: {summary.errors} images failed (see {out}/errors)")
    n = summary.new
    processing = summary.processing_seconds or wall
    busy = sum(w["busy_seconds"] for w in summary.workers)
    # each worker's own rate from its first image to its last, summed: the pool's rate with every worker
    # warm (a worker whose start-up ends late does not dilute it)
    pool = sum(
        w["images"] / (w["last_end"] - w["first_begin"]) for w in summary.workers if w["last_end"] > w["first_begin"]
    )
    return {
        "workers": workers,
        "images": n,
        "ray_startup_s": startup,
        "wall_s": wall,
        "processing_s": processing,
        "images_per_s": n / processing,
        "s_per_image_core": processing * workers / n,
        "wall_s_per_image_core": wall * workers / n,
        "busy_s_per_image": busy / n,
        "pool_images_per_s": pool,
        "worker_init_s": max((w["init_seconds"] for w in summary.workers), default=None),
        "peak_rss_mb": max(w["peak_rss_bytes"] for w in summary.workers) / 2**20,
        "worker_processes": [{k: w[k] for k in WORKER_KEYS} for w in summary.workers],
        "output": str(out),
    }


def kb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.1f}"


def render(result: dict) -> str:
    runs, cols = result["runs"], result["bytes"]
    shapes = ", ".join(f"{k}: {v}" for k, v in result["shapes"].items())
    lines = [
        f"Mining benchmark: {result['images']} BSDS500 {result['split']} images ({shapes}), "
        f"config {result['config']}, priors {','.join(result['priors'])}, edges {result['edges']}",
        f"machine: {result['machine']['cpus']} CPUs, load average {result['machine']['load_before']} before, "
        f"{result['machine']['load_after']} after",
        "",
        f"{'workers':>7} {'wall s':>8} {'proc s':>8} {'img/s':>7} {'s/img/core':>10} {'wall s/img/core':>15} "
        f"{'busy s/img':>10} {'pool img/s':>10} {'speedup':>7} {'eff.':>5} {'peak RSS MB/worker':>18}",
    ]
    base = runs[0]["images_per_s"] / runs[0]["workers"]
    for r in runs:
        speedup = r["images_per_s"] / runs[0]["images_per_s"]
        eff = r["images_per_s"] / (base * r["workers"])
        lines.append(
            f"{r['workers']:>7} {r['wall_s']:>8.1f} {r['processing_s']:>8.1f} {r['images_per_s']:>7.2f} "
            f"{r['s_per_image_core']:>10.3f} {r['wall_s_per_image_core']:>15.3f} {r['busy_s_per_image']:>10.3f} "
            f"{r['pool_images_per_s']:>10.2f} "
            f"{speedup:>6.2f}x {eff:>5.2f} {r['peak_rss_mb']:>18.0f}"
        )
    lines += ["", f"{'shard column':<24} {'KB/image':>9} {'raw KB/image':>12}"]
    for name, value in cols["columns"].items():
        lines.append(f"{name:<24} {kb(value):>9} {kb(cols['uncompressed_columns'][name]):>12}")
    for prior in result["priors"]:
        lines.append(f"{prior + ' total':<24} {kb(cols[prior + '_total']):>9}")
    lines.append(f"{'file total':<24} {kb(cols['file_bytes_per_image']):>9}")
    lines += ["", "targets:"]
    for t in result["targets"]:
        mark = "-" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"  {t['name']:<46} {t['value']:>10} (target {t['target']}) {mark}")
    return "\n".join(lines)


def targets(result: dict) -> list[dict]:
    runs = {r["workers"]: r for r in result["runs"]}
    out = []
    if 1 in runs and 2 in runs:
        speedup = runs[2]["images_per_s"] / runs[1]["images_per_s"]
        out.append(
            {
                "name": "throughput 1 -> 2 workers",
                "value": f"{speedup:.2f}x",
                "target": f">= {TARGET_SPEEDUP}x",
                "pass": speedup >= TARGET_SPEEDUP,
            }
        )
    best = min(r["s_per_image_core"] for r in result["runs"])
    ucm = "ucm" in result["priors"] and result["edges"] == "learned"
    out.append(
        {
            "name": "s/image/core, processing (best run)",
            "value": f"{best:.3f}",
            "target": f"<= {TARGET_S_PER_IMAGE_CORE} (ucm, learned edges)",
            "pass": best <= TARGET_S_PER_IMAGE_CORE if ucm else None,
        }
    )
    wall = min(r["wall_s_per_image_core"] for r in result["runs"])
    out.append(
        {
            "name": "s/image/core, wall incl. actor start-up (best)",
            "value": f"{wall:.3f}",
            "target": "(start-up amortises over large jobs)",
            "pass": None,
        }
    )
    if "ucm" in result["priors"]:
        total = result["bytes"]["ucm_total"]
        out.append(
            {
                "name": "ucm columns per image",
                "value": f"{total / 1000:.1f} KB",
                "target": f"<= {TARGET_UCM_BYTES / 1000:.0f} KB",
                "pass": total <= TARGET_UCM_BYTES,
            }
        )
    return out


def log_to_mlflow(cfg_name: str, overrides: list[str], result: dict, out: Path) -> str:
    from distseg.tracking import start_run

    cfg = load_config(cfg_name, overrides)
    with start_run(cfg, run_name="benchmark_mining", tags={"benchmark": "mining"}) as tracker:
        metrics = {}
        for r in result["runs"]:
            for key in (
                "images_per_s",
                "s_per_image_core",
                "wall_s_per_image_core",
                "busy_s_per_image",
                "pool_images_per_s",
                "peak_rss_mb",
                "wall_s",
            ):
                metrics[f"mine.w{r['workers']}.{key}"] = r[key]
        metrics.update({f"shard_bytes.{k}": v for k, v in result["bytes"]["columns"].items()})
        metrics.update({f"shard_bytes.{p}_total": result["bytes"][f"{p}_total"] for p in result["priors"]})
        tracker.log_metrics(metrics)
        runs = result["runs"]
        tracker.log_table(
            {
                k: [r[k] for r in runs]
                for k in (
                    "workers",
                    "images",
                    "wall_s",
                    "processing_s",
                    "images_per_s",
                    "s_per_image_core",
                    "busy_s_per_image",
                    "peak_rss_mb",
                )
            },
            "benchmark_mining_runs.json",
        )
        tracker.log_artifact(out / "benchmark.json")
        tracker.log_artifact(out / "benchmark.md")
        return tracker.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO / "../shared/data/bsds500",
        help="BSDS500 root (images/<split>/*.jpg); default ../shared/data/bsds500 beside the repository",
    )
    parser.add_argument("--split", default="test", help="BSDS split whose images are mined (default: test)")
    parser.add_argument("--limit", type=int, default=40, help="mine only the first N images of the split (default: 40)")
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated worker (CPU) counts to compare (default: 1,2)"
    )
    parser.add_argument("--priors", default="ucm", help="comma-separated priors to mine (default: ucm)")
    parser.add_argument(
        "--config",
        default="hiergroup",
        help="config name or YAML path (default: hiergroup: learned edges, <= 40 regions)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/benchmarks/mining"),
        help="output folder: input/, shards_w<N>/, benchmark.json, benchmark.md",
    )
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log the numbers and tables to MLflow (the config's tracking store)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="show mine's progress (Ray Data bars, images/s lines) while benchmarking",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (e.g. mine.batch_size=4)")
    args = parser.parse_args()

    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    priors = [p.strip() for p in args.priors.split(",") if p.strip()]
    if not worker_counts or min(worker_counts) < 1 or not priors:
        parser.error("--workers needs counts >= 1 and --priors at least one prior")
    overrides = [f"mine.priors=[{','.join(priors)}]", *args.overrides]
    cfg = load_config(args.config, overrides)  # fail early on a bad config
    out = args.out.resolve()
    ids = stage_images(args.data.resolve(), args.split, args.limit, out / "input")
    if os.environ.get("RAY_ADDRESS"):
        print("RAY_ADDRESS is set: runs share that cluster (ray.num_cpus is ignored), mine.num_actors sets the workers")

    load_before = [round(v, 2) for v in os.getloadavg()]
    runs = []
    for workers in worker_counts:
        print(f"mining {len(ids)} images with {workers} worker(s) ...", flush=True)
        runs.append(run_once(args.config, overrides, workers, out / "input", out / f"shards_w{workers}", args.progress))
        print(f"  {runs[-1]['images_per_s']:.2f} images/s, {runs[-1]['s_per_image_core']:.3f} s/image/core", flush=True)
    shards = Path(runs[-1]["output"]) / SHARDS
    result = {
        "config": args.config,
        "overrides": overrides,
        "edges": cfg.edges.detector,
        "data": str(args.data.resolve()),
        "split": args.split,
        "images": len(ids),
        "priors": priors,
        "shapes": image_shapes(shards),
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": [round(v, 2) for v in os.getloadavg()],
        },
        "runs": runs,
        "bytes": column_bytes(shards, priors),
    }
    result["targets"] = targets(result)
    table = render(result)
    print("\n" + table)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    (out / "benchmark.md").write_text(f"# Mining benchmark\n\n```\n{table}\n```\n")
    print(f"\nwrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    if args.mlflow:
        run_id = log_to_mlflow(args.config, overrides, result, out)
        print(f"MLflow run {run_id} ({cfg.tracking.experiment})")


if __name__ == "__main__":
    main()
