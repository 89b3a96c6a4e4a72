"""`distseg mine`: run grouping priors over an image collection with Ray Data, writing Parquet shards.

    images (folder, glob, s3://, gs://) -> list -> skip already mined -> actor pool (read, decode,
    resize, priors, encode) -> ShardSink: shards/part-*.parquet + errors/part-*.parquet -> _manifest.json

Exactly once and resumable: each write task writes one shard (and its errors) to a temporary name and
renames it into place, so a killed job leaves only whole shards; a rerun lists the image ids already in
shards/ (and errors/) and mines only the rest. Bad inputs become rows of the errors table with the
stage and reason, never a crash (unless fail_fast).

Native crashes (a segfault or abort in OpenCV or higra, the kernel's OOM killer) kill the actor
process, which Ray restarts a bounded number of times (`mine.max_restarts`). A `MineMonitor` actor
counts, per image, the attempts that began and never finished: an image that has killed its worker
`mine.crash_limit` times is not run again but becomes an errors row with stage `worker_crash`. If a
worker's restart budget runs out anyway, the job stops with a MiningError naming the images in
flight; the shards written so far stay, and a rerun resumes. The same monitor gives the progress
line (images/s) and the per-worker numbers in MineSummary.workers (peak RSS, busy seconds).
"""

from __future__ import annotations

import fnmatch
import json
import os
import resource
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distseg.config import Config
from distseg.shards import config_hash, encode_record, shard_schema

SHARDS = "shards"
ERRORS = "errors"
MANIFEST = "_manifest.json"
ERROR_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string())]
)


CRASH_LIMIT = 2  # default of mine.crash_limit (Ray Data's default restarts, -1, would loop on a crash forever)
MAX_BLOCKS = 10_000  # input blocks of the mining dataset (tasks; a crash retries one whole task)
PROGRESS_LOG_SECONDS = 10.0  # interval of the images/s progress line


class MiningError(RuntimeError):
    """Raised with --fail-fast: names the image, the stage and the reason."""


class MineMonitor:
    """One per mine() run, 0 CPUs: the workers report each image's start and end to it.

    An image that began and never ended was running when its worker process died: `begin` returns
    how many times that already happened, so the worker can give up on an image that keeps crashing
    it. It also counts finished images (for the progress line; an image redone after a crash counts
    again) and keeps the latest statistics of every worker process.
    """

    def __init__(self, total: int):
        self.total = total
        self.attempts: dict[str, int] = {}  # image_id -> attempts begun and not (yet) finished
        self.owner: dict[str, str] = {}  # image_id -> uri, while in flight
        self.finished = self.errors = self.crashed = 0
        self.first_begin: float | None = None
        self.last_end: float | None = None
        self.workers: dict[str, dict] = {}

    def begin(self, image_id: str, uri: str) -> int:
        crashes = self.attempts.get(image_id, 0)
        self.attempts[image_id] = crashes + 1
        self.owner[image_id] = uri
        if self.first_begin is None:
            self.first_begin = time.time()
        return crashes

    def end(self, image_ids: list[str], errors: int, crashed: int, stats: dict) -> None:
        for image_id in image_ids:
            self.attempts.pop(image_id, None)
            self.owner.pop(image_id, None)
        self.finished += len(image_ids)
        self.errors += errors
        self.crashed += crashed
        self.last_end = time.time()
        self.workers[stats["worker"]] = stats

    def progress(self) -> dict:
        return {"total": self.total, "finished": self.finished, "errors": self.errors, "crashed": self.crashed,
                "first_begin": self.first_begin, "last_end": self.last_end}

    def report(self) -> dict:
        in_flight = {i: (self.owner[i], n) for i, n in self.attempts.items() if i in self.owner}
        return {**self.progress(), "workers": list(self.workers.values()), "in_flight": in_flight}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path, file://, s3:// or gs:// URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def list_images(input_uri: str, extensions: list[str]) -> dict[str, str]:
    """image_id -> URI for every image under a folder (recursive) or matching a glob pattern."""
    from distseg.data.folder import assign_ids

    pattern = None
    if any(ch in input_uri for ch in "*?["):
        head = input_uri
        while any(ch in head.rsplit("/", 1)[-1] for ch in "*?[") or any(ch in head for ch in "*?["):
            head = head.rsplit("/", 1)[0]
        pattern = input_uri[len(head) :].lstrip("/")
        input_uri = head
    fs, root = resolve_uri(input_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"mine input not found: {input_uri}")
    if info.type == pafs.FileType.File:
        infos, root = [info], root.rsplit("/", 1)[0]
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rel_paths = [i.path[len(root) :].lstrip("/") for i in infos if i.type == pafs.FileType.File]
    if pattern:
        rel_paths = [r for r in rel_paths if fnmatch.fnmatch(r, pattern)]
    prefix = input_uri.split("://", 1)[0] + "://" if "://" in input_uri else ""
    ids = assign_ids(rel_paths, tuple(extensions))
    return {image_id: f"{prefix}{root}/{rel}" for image_id, rel in ids.items()}


def _read_ids(fs: pafs.FileSystem, folder: str) -> list[str]:
    ids: list[str] = []
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return ids
    for info in fs.get_file_info(pafs.FileSelector(folder)):
        if info.path.endswith(".parquet"):
            ids += pq.read_table(info.path, columns=["image_id"], filesystem=fs).column("image_id").to_pylist()
    return ids


def done_ids(output_uri: str, include_errors: bool = True) -> set[str]:
    fs, root = resolve_uri(output_uri)
    ids = set(_read_ids(fs, f"{root}/{SHARDS}"))
    if include_errors:
        ids |= set(_read_ids(fs, f"{root}/{ERRORS}"))
    return ids


def resize_max_side(image: np.ndarray, max_side: int | None) -> np.ndarray:
    height, width = image.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class MineWorker:
    """One per actor: builds the priors once, then mines batches of {image_id, uri}.

    With a `monitor` (a MineMonitor actor handle) each image's start is registered before it runs,
    so an image that crashes the process is known when the restarted actor meets it again."""

    def __init__(self, cfg: dict, fail_fast: bool = False, monitor=None, crash_limit: int = CRASH_LIMIT):
        t0 = time.perf_counter()
        from distseg.config import build_config
        from distseg.grouping.priors import create_prior

        cv2.setNumThreads(1)  # one core per actor (num_cpus=1): workers never oversubscribe the node
        self.cfg = build_config(cfg)
        self.fail_fast = fail_fast
        self.monitor = monitor
        self.crash_limit = crash_limit
        self.priors = {name: create_prior(name, self.cfg) for name in self.cfg.mine.priors}
        if "torch" in sys.modules:  # a prior runs a network (learned edges): one thread too
            sys.modules["torch"].set_num_threads(1)
        self.schema = shard_schema(self.cfg.mine.priors, cfg)
        self.columns = self.schema.append(pa.field("error_stage", pa.string()))
        self.columns = self.columns.append(pa.field("error_type", pa.string())).append(pa.field("error_message", pa.string()))
        self.stats = {
            "worker": f"{os.uname().nodename}:{os.getpid()}",
            "pid": os.getpid(),
            "init_seconds": time.perf_counter() - t0,
            "images": 0,
            "errors": 0,
            "busy_seconds": 0.0,
            "first_begin": None,  # wall clock (time.time) of this process's first image, and of its last end
            "last_end": None,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def mine_one(self, image_id: str, uri: str) -> dict:
        from distseg.data.imageio import decode_image
        from distseg.shards import GroupingRecord

        stage = "read"
        try:
            fs, path = resolve_uri(uri)
            with fs.open_input_file(path) as f:
                data = f.read()
            stage = "decode"
            image = resize_max_side(decode_image(data, uri), self.cfg.mine.max_side)
            outputs = {}
            for name, prior in self.priors.items():
                stage = f"prior:{name}"
                outputs[name] = prior(image)
            stage = "encode"
            row = encode_record(GroupingRecord(image_id, uri, image, outputs), self.cfg.mine.image_format, self.cfg.mine.jpeg_quality)
            return {**row, "error_stage": None, "error_type": None, "error_message": None}
        except Exception as e:  # every failure becomes a row of the errors table
            if self.fail_fast:
                raise MiningError(f"{uri}: {stage} failed: {type(e).__name__}: {e}") from e
            message = str(e) or traceback.format_exc(limit=1)
            return {"image_id": image_id, "uri": uri, "error_stage": stage, "error_type": type(e).__name__, "error_message": message[:2000]}

    def crash_row(self, image_id: str, uri: str, crashes: int) -> dict:
        message = (
            f"{uri}: the mining worker process died {crashes} times while processing this image "
            "(a crash in native code such as OpenCV or higra, or out of memory); not retried"
        )
        if self.fail_fast:
            raise MiningError(f"{uri}: worker_crash: {message}")
        return {"image_id": image_id, "uri": uri, "error_stage": "worker_crash", "error_type": "WorkerCrash", "error_message": message}

    def __call__(self, batch: dict) -> pa.Table:
        import ray

        rows, crashed = [], 0
        t0 = time.perf_counter()
        if self.stats["first_begin"] is None:
            self.stats["first_begin"] = time.time()
        for image_id, uri in zip(batch["image_id"], batch["uri"]):
            image_id, uri = str(image_id), str(uri)
            crashes = ray.get(self.monitor.begin.remote(image_id, uri)) if self.monitor is not None else 0
            if crashes >= self.crash_limit:
                rows.append(self.crash_row(image_id, uri, crashes))
                crashed += 1
            else:
                rows.append(self.mine_one(image_id, uri))
        errors = sum(r["error_stage"] is not None for r in rows)
        self.stats["images"] += len(rows)
        self.stats["errors"] += errors
        self.stats["busy_seconds"] += time.perf_counter() - t0
        self.stats["last_end"] = time.time()
        self.stats["peak_rss_bytes"] = peak_rss_bytes()
        if self.monitor is not None:  # fire and forget: calls from one worker arrive in order
            self.monitor.end.remote([r["image_id"] for r in rows], errors, crashed, dict(self.stats))
        return pa.Table.from_pylist(rows, schema=self.columns)


class ShardSink:
    """Ray Data datasink: each write task writes one shard and one errors file, each atomically."""

    def __init__(self, output_uri: str, schema: pa.Schema, rows_per_shard: int):
        self.output_uri = output_uri
        self.schema = schema
        self.rows_per_shard = rows_per_shard

    def as_datasink(self):
        from ray.data import Datasink

        sink = self

        class _Sink(Datasink):
            @property
            def min_rows_per_write(self):
                return sink.rows_per_shard

            def get_name(self):
                return "DistsegShards"

            def write(self, blocks, ctx):
                return sink.write(blocks)

        return _Sink()

    def write(self, blocks) -> dict:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "errors": 0}
        table = pa.concat_tables(tables)
        failed = table.column("error_stage").is_valid()
        ok, bad = table.filter(pa.compute.invert(failed)), table.filter(failed)
        fs, root = resolve_uri(self.output_uri)
        name = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        if ok.num_rows:
            self._atomic_write(fs, ok.select(self.schema.names).cast(self.schema), f"{root}/{SHARDS}", name)
        if bad.num_rows:
            errors = pa.table(
                {
                    "image_id": bad.column("image_id"),
                    "uri": bad.column("uri"),
                    "stage": bad.column("error_stage"),
                    "error_type": bad.column("error_type"),
                    "message": bad.column("error_message"),
                },
                schema=ERROR_SCHEMA,
            )
            self._atomic_write(fs, errors, f"{root}/{ERRORS}", name)
        return {"rows": ok.num_rows, "errors": bad.num_rows}

    @staticmethod
    def _atomic_write(fs: pafs.FileSystem, table: pa.Table, folder: str, name: str) -> None:
        fs.create_dir(folder, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{folder}/.{name}.tmp"
            pq.write_table(table, tmp, filesystem=fs, compression="zstd")
            fs.move(tmp, f"{folder}/{name}")  # rename: a reader never sees half a shard
        else:  # object stores publish a put atomically
            pq.write_table(table, f"{folder}/{name}", filesystem=fs, compression="zstd")


@dataclass
class MineSummary:
    mined: int  # rows in the shards (all runs)
    errors: int  # rows in the errors table (all runs)
    new: int  # images processed by this run
    skipped: int  # images already present before this run
    seconds: float
    output: str
    crashed: int = 0  # images of this run recorded as `worker_crash` errors
    processing_seconds: float | None = None  # first image started -> last image finished (no Ray/actor start-up)
    workers: list[dict] = field(default_factory=list)  # per worker process: pid, images, busy_seconds, peak_rss_bytes, ...


def write_manifest(cfg: Config, input_uri: str, output_uri: str, inputs: dict[str, str]) -> dict:
    fs, root = resolve_uri(output_uri)
    shards, rows = [], 0
    shard_dir = f"{root}/{SHARDS}"
    if fs.get_file_info(shard_dir).type == pafs.FileType.Directory:
        for info in sorted(fs.get_file_info(pafs.FileSelector(shard_dir)), key=lambda i: i.path):
            if info.path.endswith(".parquet"):
                n = pq.ParquetFile(info.path, filesystem=fs).metadata.num_rows
                shards.append({"path": f"{SHARDS}/{info.base_name}", "rows": n, "bytes": info.size})
                rows += n
    errors = len(_read_ids(fs, f"{root}/{ERRORS}"))
    import distseg

    fingerprint = config_hash(sorted(inputs.items()))
    manifest = {
        "schema_version": 1,
        "code_version": distseg.__version__,
        "config_hash": config_hash(cfg.model_dump(mode="json")),
        "config": cfg.model_dump(mode="json"),
        "input": input_uri,
        "input_fingerprint": fingerprint,
        "num_inputs": len(inputs),
        "priors": cfg.mine.priors,
        "rows": rows,
        "errors": errors,
        "shards": shards,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=2).encode())
    return manifest


def plan_batches(num_images: int, num_actors: int, batch_size: int) -> tuple[int, int]:
    """(images per actor call, input blocks): at most batch_size, and small enough that a small job still
    gives every actor about 4 calls (so the pool stays balanced); one block per call, up to MAX_BLOCKS."""
    per_call = max(1, min(batch_size, num_images // (4 * num_actors)))
    blocks = max(1, min(-(-num_images // per_call), MAX_BLOCKS))
    return per_call, blocks


class _ProgressLine:
    """While mining, a line on stderr every `interval` seconds: images done, images/s, errors, ETA.

    Ray Data's progress shows no rate in its non-terminal log (ray job logs, CI, a pipe), and on a
    terminal its operator bar's long description pushes the rows/s past the line's end, so this line
    is printed in both cases (Ray's driver print keeps its bars intact). Rates count from the first
    image started, so Ray and actor start-up do not dilute them."""

    def __init__(self, monitor, interval: float = PROGRESS_LOG_SECONDS):
        self.monitor = monitor
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distseg-mine-progress", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        import ray

        while not self.stop.wait(self.interval):
            try:
                p = ray.get(self.monitor.progress.remote(), timeout=self.interval)
            except Exception:  # a slow or restarting cluster: skip this tick
                continue
            print(format_progress(p, time.time()), file=sys.stderr, flush=True)


def format_progress(p: dict, now: float) -> str:
    done, total = p["finished"], p["total"]
    line = f"mine: {done}/{total} images"
    if p["first_begin"] is not None and done:
        elapsed = max(1e-9, (p["last_end"] or now) - p["first_begin"])
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        line += f", {rate:.2f} images/s, ETA {eta:.0f} s"
    line += f", {p['errors']} errors"
    return line + (f" ({p['crashed']} worker crashes)" if p["crashed"] else "")


def _is_actor_death(error: BaseException) -> bool:
    from ray.exceptions import RayActorError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RayActorError):
            return True
        error = error.__cause__ or error.__context__
    return False


def mine(
    cfg: Config,
    input_uri: str,
    output_uri: str,
    fail_fast: bool = False,
    progress: bool = True,
    max_restarts: int | None = None,
    crash_limit: int | None = None,
) -> MineSummary:
    """Mine every image under input_uri into grouping shards under output_uri (resumable).

    progress: Ray Data's progress bars (or its progress log when not on a terminal) and a line with
    images/s every PROGRESS_LOG_SECONDS; False shows neither (tests).
    max_restarts: restarts of a worker actor after its process dies (bounded: never a crash loop).
    crash_limit: an image that killed its worker this many times is recorded in the errors table
    (stage `worker_crash`) instead of being run again."""
    import ray

    from distseg.cluster import init_ray

    if not cfg.mine.priors:
        raise ValueError("mine.priors is empty: name at least one prior (ucm, felzenszwalb, slic, saliency)")
    from distseg.grouping.priors import PRIORS

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
    if "://" not in input_uri:
        input_uri = str(Path(input_uri).resolve()) if not any(c in input_uri for c in "*?[") else input_uri
    cfg = cfg.model_copy(deep=True)
    if cfg.edges.weights and "://" not in cfg.edges.weights:
        cfg.edges.weights = str(Path(cfg.edges.weights).resolve())
    inputs = list_images(input_uri, cfg.mine.extensions)
    if not inputs:
        raise FileNotFoundError(f"no images ({', '.join(cfg.mine.extensions)}) under {input_uri}")
    done = done_ids(output_uri, include_errors=not cfg.mine.retry_errors)
    todo = [{"image_id": i, "uri": u} for i, u in inputs.items() if i not in done]

    cfg_dict = cfg.model_dump(mode="json")
    report: dict = {}
    if todo:
        init_ray(cfg.ray)
        context = ray.data.DataContext.get_current()
        progress_bars, context.enable_progress_bars = context.enable_progress_bars, progress
        num_actors = cfg.mine.num_actors or max(1, int(ray.available_resources().get("CPU", 1)))
        per_call, blocks = plan_batches(len(todo), num_actors, cfg.mine.batch_size)
        monitor = ray.remote(num_cpus=0, max_restarts=0)(MineMonitor).remote(len(todo))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        with warnings.catch_warnings():
            # restarts can only be bounded through ray_remote_args (Ray documents map_batches(...,
            # max_restarts=N)); its deprecation warning has no named replacement in the pinned Ray
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                MineWorker,
                fn_constructor_kwargs={"cfg": cfg_dict, "fail_fast": fail_fast, "monitor": monitor, "crash_limit": crash_limit},
                batch_size=per_call,
                compute=ray.data.ActorPoolStrategy(size=num_actors),
                num_cpus=1,
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
                with _ProgressLine(monitor):
                    write()
            else:
                write()
        except Exception as e:
            text = str(e)
            if _is_actor_death(e) or "ActorDiedError" in text or "RayActorError" in text:
                raise MiningError(_crash_message(monitor, max_restarts, output_uri)) from e
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
    return MineSummary(
        mined=manifest["rows"],
        errors=manifest["errors"],
        new=len(todo),
        skipped=len(inputs) - len(todo),
        seconds=time.perf_counter() - t0,
        output=output_uri,
        crashed=report.get("crashed", 0),
        processing_seconds=(last - first) if first is not None and last is not None else None,
        workers=sorted(report.get("workers", []), key=lambda w: w["pid"]),
    )


def _crash_message(monitor, max_restarts: int, output_uri: str) -> str:
    import ray

    try:
        in_flight = ray.get(monitor.report.remote(), timeout=30)["in_flight"]
    except Exception:
        in_flight = {}
    # most attempts first: an image tried more than once is the likely culprit
    ranked = sorted(in_flight.values(), key=lambda item: (-item[1], item[0]))
    names = [f"{uri} ({attempts} attempts)" if attempts > 1 else uri for uri, attempts in ranked]
    named = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (
        f"a mining worker process died more than its {max_restarts} restarts allow "
        f"(crashes in native code such as OpenCV or higra, or out of memory); "
        f"images in flight when the workers died: {named or 'unknown'}. "
        f"The shards written so far are kept in {output_uri}: rerun the same command to resume."
    )
