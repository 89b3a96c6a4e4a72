"""The mining actor: builds the priors once, then turns batches of {image_id, uri} into shard rows."""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback

import cv2
import numpy as np
import pyarrow as pa

from distseg.mining.errors import MiningError
from distseg.mining.listing import resolve_uri
from distseg.shards import encode_record, shard_schema


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def resize_max_side(image: np.ndarray, max_side: int | None) -> np.ndarray:
    height, width = image.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class MineWorker:
    """One per actor: builds the priors once, then mines batches of {image_id, uri}.

    With a `monitor` (a MineMonitor actor handle) each image's start is registered before it runs,
    so an image that crashes the process is known when the restarted actor meets it again. An image
    that did so `crash_limit` times (default: the config's `mine.crash_limit`) becomes an errors row."""

    def __init__(self, cfg: dict, fail_fast: bool = False, monitor=None, crash_limit: int | None = None):
        t0 = time.perf_counter()
        from distseg.config import build_config
        from distseg.grouping.priors import create_prior

        cv2.setNumThreads(1)  # one core per actor (num_cpus=1): workers never oversubscribe the node
        self.cfg = build_config(cfg)
        self.fail_fast = fail_fast
        self.monitor = monitor
        self.crash_limit = self.cfg.mine.crash_limit if crash_limit is None else crash_limit
        self.priors = {name: create_prior(name, self.cfg) for name in self.cfg.mine.priors}
        if "torch" in sys.modules:  # a prior runs a network (learned edges): one thread too
            sys.modules["torch"].set_num_threads(1)
        self.schema = shard_schema(self.cfg.mine.priors, cfg)
        self.columns = self.schema.append(pa.field("error_stage", pa.string()))
        self.columns = self.columns.append(pa.field("error_type", pa.string())).append(
            pa.field("error_message", pa.string())
        )
        self.stats = {
            "worker": f"{os.uname().nodename}:{os.getpid()}",
            "pid": os.getpid(),
            "node_id": _node_id(),  # the Ray node (several nodes can share a host name)
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
            row = encode_record(
                GroupingRecord(image_id, uri, image, outputs), self.cfg.mine.image_format, self.cfg.mine.jpeg_quality
            )
            return {**row, "error_stage": None, "error_type": None, "error_message": None}
        except Exception as e:  # every failure becomes a row of the errors table
            if self.fail_fast:
                raise MiningError(f"{uri}: {stage} failed: {type(e).__name__}: {e}") from e
            message = str(e) or traceback.format_exc(limit=1)
            return {
                "image_id": image_id,
                "uri": uri,
                "error_stage": stage,
                "error_type": type(e).__name__,
                "error_message": message[:2000],
            }

    def crash_row(self, image_id: str, uri: str, crashes: int) -> dict:
        message = (
            f"{uri}: the mining worker process died {crashes} times while processing this image "
            "(a crash in native code such as OpenCV or higra, or out of memory); not retried"
        )
        if self.fail_fast:
            raise MiningError(f"{uri}: worker_crash: {message}")
        return {
            "image_id": image_id,
            "uri": uri,
            "error_stage": "worker_crash",
            "error_type": "WorkerCrash",
            "error_message": message,
        }

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
        if self.monitor is not None:  # waited for (a round trip per batch): the run's summary reads it at the end
            ray.get(self.monitor.end.remote([r["image_id"] for r in rows], errors, crashed, dict(self.stats)))
        return pa.Table.from_pylist(rows, schema=self.columns)
