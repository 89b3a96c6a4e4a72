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

Modules, one concept each: `listing` (input URIs, ids already mined), `worker` (the actor that mines
a batch), `monitor` (per-image attempts, worker statistics, crash messages), `sink` (the atomic
shard writer), `manifest` (_manifest.json), `progress` (the images/s line), `run` (`mine()`).
"""

from distseg.mining.errors import MiningError
from distseg.mining.listing import ERRORS, SHARDS, done_ids, list_images, resolve_uri
from distseg.mining.manifest import MANIFEST, write_manifest
from distseg.mining.monitor import MineMonitor
from distseg.mining.progress import PROGRESS_LOG_SECONDS, format_progress
from distseg.mining.run import MAX_BLOCKS, MineSummary, mine, plan_batches
from distseg.mining.sink import ERROR_SCHEMA, ShardSink
from distseg.mining.worker import MineWorker, peak_rss_bytes, resize_max_side

__all__ = [
    "ERRORS",
    "ERROR_SCHEMA",
    "MANIFEST",
    "MAX_BLOCKS",
    "PROGRESS_LOG_SECONDS",
    "SHARDS",
    "MineMonitor",
    "MineSummary",
    "MineWorker",
    "MiningError",
    "ShardSink",
    "done_ids",
    "format_progress",
    "list_images",
    "mine",
    "peak_rss_bytes",
    "plan_batches",
    "resize_max_side",
    "resolve_uri",
    "write_manifest",
]
