"""Shard versions: a stage over a whole mined dataset writes a NEW version, never touching its parent.

    out_fs, out_root = fresh_output(output_uri)          # refuses an existing folder
    chunks = row_chunks(manifest, data_uri)             # {path, start, count} work items for an actor pool
    reader = ChunkReader(columns); reader.rows(path, start, count)
    manifest = write_version(manifest, data_uri, output_uri, rewrite, stage, extra)

`write_version` rewrites each parent shard through `rewrite(table) -> table` under the same file name
(storage.write_parquet: a temporary name, then a rename, as mining writes), copies the errors table,
and writes a manifest
with `version` = parent's + 1, `parent` (path, version, config hash), `stage` and the stage's entry.
`distseg distill cluster` (pseudo classes) and `distseg distill confident` (pseudo label maps) use it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distseg.cluster import MIN_ITEMS_PER_ACTOR, pool_size
from distseg.mining.listing import ERRORS, SHARDS, resolve_uri
from distseg.mining.manifest import MANIFEST
from distseg.storage import absolute, write_bytes, write_parquet

CHUNK = 4  # shard rows per actor call


def fresh_output(output_uri: str) -> tuple[pafs.FileSystem, str]:
    out_fs, out_root = resolve_uri(output_uri)
    if out_fs.get_file_info(out_root).type != pafs.FileType.NotFound:
        raise FileExistsError(f"{output_uri} exists: a shard version is written once (pick another --out)")
    return out_fs, out_root


def absolute_uri(uri: str) -> str:
    """storage.absolute, without a trailing '/' (chunk paths are joined onto it)."""
    return absolute(uri.rstrip("/")) or uri


def row_chunks(manifest: dict, data_uri: str, size: int = CHUNK) -> list[dict]:
    base = absolute_uri(data_uri)
    return [
        {"path": f"{base}/{entry['path']}", "start": start, "count": size}
        for entry in manifest["shards"]
        for start in range(0, int(entry["rows"]), size)
    ]


class ChunkReader:
    """Reads the rows of a chunk; the last shard file read stays cached (chunks come in file order)."""

    def __init__(self, columns: list[str] | None = None):
        self.columns = columns
        self._cached: tuple[str, pa.Table] | None = None

    def rows(self, path: str, start: int, count: int) -> list[dict]:
        if self._cached is None or self._cached[0] != path:
            fs, local = resolve_uri(path)
            self._cached = (path, pq.read_table(local, filesystem=fs, columns=self.columns))
        return self._cached[1].slice(start, count).to_pylist()


def map_chunks(
    manifest: dict, data_uri: str, actor: type, kwargs: dict, num_actors: int | None, num_gpus: float, empty: pa.Schema
) -> pa.Table:
    """Every chunk of rows through a Ray Data pool of `num_actors` `actor(**kwargs)` (one CPU, `num_gpus`
    GPUs each; None: distseg.cluster.pool_size's default for the rows); the tables they return,
    concatenated (an empty table of `empty` when none has rows)."""
    import ray

    chunks = row_chunks(manifest, data_uri)
    num_actors = pool_size(num_actors, len(chunks), per_actor=max(1, MIN_ITEMS_PER_ACTOR // CHUNK))
    ds = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
    refs = ds.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=1,
        num_gpus=num_gpus,
    ).to_arrow_refs()
    return pa.concat_tables([t for t in ray.get(refs) if t.num_rows] or [empty.empty_table()])


def write_version(
    manifest: dict,
    data_uri: str,
    output_uri: str,
    rewrite: Callable[[pa.Table], pa.Table],
    stage: str,
    extra: dict,
) -> dict:
    """Write every parent shard through `rewrite` into output_uri; returns the new manifest (see above)."""
    fs, root = resolve_uri(data_uri)
    out_fs, out_root = resolve_uri(output_uri)
    shards = []
    out_fs.create_dir(f"{out_root}/{SHARDS}", recursive=True)
    for entry in manifest["shards"]:
        name = entry["path"].rsplit("/", 1)[-1]
        table = rewrite(pq.read_table(f"{root}/{entry['path']}", filesystem=fs))
        final = f"{out_root}/{SHARDS}/{name}"
        write_parquet(table, out_fs, final)
        shards.append({"path": f"{SHARDS}/{name}", "rows": table.num_rows, "bytes": out_fs.get_file_info(final).size})
    if fs.get_file_info(f"{root}/{ERRORS}").type == pafs.FileType.Directory:
        out_fs.create_dir(f"{out_root}/{ERRORS}", recursive=True)
        pafs.copy_files(f"{root}/{ERRORS}", f"{out_root}/{ERRORS}", source_filesystem=fs, destination_filesystem=out_fs)
    version = int(manifest.get("version", 1))
    new_manifest = {
        **manifest,
        "version": version + 1,
        "parent": {"path": data_uri, "version": version, "config_hash": manifest.get("config_hash")},
        "stage": stage,
        **extra,
        "shards": shards,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_bytes(out_fs, f"{out_root}/{MANIFEST}", json.dumps(new_manifest, indent=2).encode())
    return new_manifest
