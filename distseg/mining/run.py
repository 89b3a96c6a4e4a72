"""`mine()`: list the inputs, skip what is mined, run the actor pool into the shard sink, write the manifest."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from distseg.config import Config
from distseg.mining.errors import MiningError
from distseg.mining.listing import done_ids, mine_inputs
from distseg.mining.manifest import check_settings, write_manifest
from distseg.mining.monitor import MineMonitor, crash_message, is_actor_death
from distseg.mining.progress import ProgressLine
from distseg.mining.sink import ShardSink
from distseg.mining.worker import MineWorker
from distseg.shards import shard_schema

MAX_BLOCKS = 10_000  # input blocks of the mining dataset (tasks; a crash retries one whole task)


@dataclass
class MineSummary:
    mined: int  # rows in the shards (all runs)
    errors: int  # rows in the errors table (all runs)
    new: int  # images processed by this run
    skipped: int  # images already present before this run
    seconds: float
    output: str
    crashed: int = 0  # images of this run recorded as `worker_crash` errors
    duplicates: int = 0  # repeated rows of an image removed from the shards (manifest.drop_duplicate_rows)
    processing_seconds: float | None = None  # first image started -> last image finished (no Ray/actor start-up)
    workers: list[dict] = field(
        default_factory=list
    )  # per worker process: pid, images, busy_seconds, peak_rss_bytes, ...


def plan_batches(num_images: int, num_actors: int, batch_size: int) -> tuple[int, int]:
    """(images per actor call, input blocks): at most batch_size, and small enough that a small job still
    gives every actor about 4 calls (so the pool stays balanced); one block per call, up to MAX_BLOCKS."""
    per_call = max(1, min(batch_size, num_images // (4 * num_actors)))
    blocks = max(1, min(-(-num_images // per_call), MAX_BLOCKS))
    return per_call, blocks


def mine(
    cfg: Config,
    input_uri: str,
    output_uri: str,
    fail_fast: bool = False,
    progress: bool = True,
    max_restarts: int | None = None,
    crash_limit: int | None = None,
    track: bool = True,
) -> MineSummary:
    """Mine every image under input_uri into grouping shards under output_uri (resumable).

    progress: Ray Data's progress bars (or its progress log when not on a terminal) and a line with
    images/s every PROGRESS_LOG_SECONDS (mining.progress); False shows neither (tests).
    max_restarts: restarts of a worker actor after its process dies (bounded: never a crash loop).
    crash_limit: an image that killed its worker this many times is recorded in the errors table
    (stage `worker_crash`) instead of being run again.
    track: log an MLflow run (tag stage=mine) with the counts and the manifest, in cfg.workdir's store."""
    import ray

    from distseg.cluster import init_ray, pool_size
    from distseg.data import is_source
    from distseg.grouping.priors import PRIORS

    if not cfg.mine.priors:
        raise ValueError(f"mine.priors is empty: name at least one prior ({', '.join(sorted(PRIORS))})")

    unknown = [p for p in cfg.mine.priors if p not in PRIORS]
    if unknown:
        raise ValueError(f"mine.priors: unknown prior(s) {unknown} (known: {', '.join(sorted(PRIORS))})")
    max_restarts = cfg.mine.max_restarts if max_restarts is None else max_restarts
    crash_limit = cfg.mine.crash_limit if crash_limit is None else crash_limit
    if max_restarts < 0 or crash_limit < 1:
        raise ValueError(f"max_restarts must be >= 0 and crash_limit >= 1, got {max_restarts} and {crash_limit}")
    t0 = time.perf_counter()
    if "://" not in output_uri:
        output_uri = str(Path(output_uri).resolve())
    source = is_source(input_uri)  # a data source (voc:PATH, labeled:PATH, msrc ...): the images of its data.split
    if "://" not in input_uri and not source:
        input_uri = str(Path(input_uri).resolve()) if not any(c in input_uri for c in "*?[") else input_uri
    cfg = cfg.model_copy(deep=True)
    if cfg.edges.weights and "://" not in cfg.edges.weights:
        cfg.edges.weights = str(Path(cfg.edges.weights).resolve())
    inputs = mine_inputs(input_uri, cfg)
    if not inputs:
        raise FileNotFoundError(f"no images ({', '.join(cfg.mine.extensions)}) under {input_uri}")
    check_settings(cfg, output_uri)
    done = done_ids(output_uri, include_errors=not cfg.mine.retry_errors)
    todo = [{"image_id": i, "uri": u} for i, u in inputs.items() if i not in done]

    cfg_dict = cfg.model_dump(mode="json")
    report: dict = {}
    if todo:
        init_ray(cfg.ray)
        context = ray.data.DataContext.get_current()
        progress_bars, context.enable_progress_bars = context.enable_progress_bars, progress
        num_actors = pool_size(cfg.mine.num_actors, len(todo))
        per_call, blocks = plan_batches(len(todo), num_actors, cfg.mine.batch_size)
        monitor = ray.remote(num_cpus=0, max_restarts=0)(MineMonitor).remote(len(todo))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        with warnings.catch_warnings():
            # restarts can only be bounded through ray_remote_args (Ray documents map_batches(...,
            # max_restarts=N)); its deprecation warning has no named replacement in the pinned Ray
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                MineWorker,
                fn_constructor_kwargs={
                    "cfg": cfg_dict,
                    "fail_fast": fail_fast,
                    "monitor": monitor,
                    "crash_limit": crash_limit,
                },
                batch_size=per_call,
                compute=ray.data.ActorPoolStrategy(size=num_actors),
                num_cpus=1,
                num_gpus=max(getattr(getattr(cfg.priors, p, None), "num_gpus", 0) for p in cfg.mine.priors),
                batch_format="numpy",
                # bounded fault tolerance (Ray Data's default is -1: a worker that segfaults restarts forever)
                max_restarts=max_restarts,
                max_task_retries=max_restarts,
            )
        sink = ShardSink(output_uri, shard_schema(cfg.mine.priors, cfg_dict), cfg.mine.rows_per_shard)
        # The writer reserves no CPU: with one actor per CPU (the default pool) a 1-CPU write task could
        # not start before the pool ends, so every shard (and a killed job's work) would wait till then.
        write = lambda: ds.write_datasink(sink.as_datasink(), ray_remote_args={"num_cpus": 0})  # noqa: E731
        try:
            if progress:
                with ProgressLine(monitor):
                    write()
            else:
                write()
        except Exception as e:
            text = str(e)
            if is_actor_death(e) or "ActorDiedError" in text or "RayActorError" in text:
                raise MiningError(crash_message(monitor, max_restarts, output_uri)) from e
            if not fail_fast:
                raise
            # Ray wraps the worker's MiningError; surface its message (file, stage, reason) alone
            reason = text[text.rfind("MiningError: ") + len("MiningError: ") :] if "MiningError: " in text else text
            raise MiningError(reason.strip().splitlines()[0]) from None
        finally:
            try:
                report = ray.get(monitor.report.remote(), timeout=30)
            except Exception:
                report = {}
            ray.kill(monitor)
            context.enable_progress_bars = progress_bars
    manifest = write_manifest(cfg, input_uri, output_uri, inputs)
    first, last = report.get("first_begin"), report.get("last_end")
    summary = MineSummary(
        mined=manifest["rows"],
        errors=manifest["errors"],
        new=len(todo),
        skipped=len(inputs) - len(todo),
        seconds=time.perf_counter() - t0,
        output=output_uri,
        crashed=report.get("crashed", 0),
        duplicates=manifest["duplicates_dropped"],
        processing_seconds=(last - first) if first is not None and last is not None else None,
        workers=sorted(report.get("workers", []), key=lambda w: w["pid"]),
    )
    if track:
        _log_run(cfg, summary, manifest, input_uri)
    return summary


def _log_run(cfg: Config, summary: MineSummary, manifest: dict, input_uri: str) -> None:
    """One MLflow run per mining call: the config, the counts and the manifest."""
    from distseg.tracking import start_run

    tags = {"stage": "mine", "input": input_uri, "output": summary.output, "priors": ",".join(cfg.mine.priors)}
    with start_run(cfg, run_name=f"{cfg.name}-mine", tags=tags) as tracker:
        metrics = {
            "rows": summary.mined,
            "errors": summary.errors,
            "new": summary.new,
            "skipped": summary.skipped,
            "seconds": summary.seconds,
            "crashed": summary.crashed,
            "duplicates_dropped": summary.duplicates,
        }
        if summary.new and summary.processing_seconds:
            metrics["images_per_s"] = summary.new / summary.processing_seconds
        tracker.log_metrics(metrics)
        tracker.log_dict(manifest, "_manifest.json")
