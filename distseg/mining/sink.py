"""The shard sink: each Ray Data write task writes one shard and one errors file, each atomically."""

from __future__ import annotations

import time
import uuid

import pyarrow as pa

from distseg.mining.listing import ERRORS, SHARDS, resolve_uri
from distseg.storage import write_parquet

ERROR_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


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
            write_parquet(ok.select(self.schema.names).cast(self.schema), fs, f"{root}/{SHARDS}/{name}")
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
            write_parquet(errors, fs, f"{root}/{ERRORS}/{name}")
        return {"rows": ok.num_rows, "errors": bad.num_rows}
