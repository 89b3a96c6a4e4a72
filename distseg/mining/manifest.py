"""_manifest.json: what a mining output holds (shards, rows, errors) and what produced it."""

from __future__ import annotations

import json
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distseg.config import Config
from distseg.core.constants import SHARD_SCHEMA_VERSION
from distseg.mining.listing import ERRORS, SHARDS, read_ids, resolve_uri
from distseg.shards import config_hash
from distseg.storage import write_bytes

MANIFEST = "_manifest.json"


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
    errors = len(read_ids(fs, f"{root}/{ERRORS}"))
    import distseg

    fingerprint = config_hash(sorted(inputs.items()))
    manifest = {
        "schema_version": SHARD_SCHEMA_VERSION,
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
    write_bytes(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    return manifest
