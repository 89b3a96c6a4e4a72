"""_manifest.json: what a mining output holds (shards, rows, errors) and what produced it."""

from __future__ import annotations

import json
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distseg.config import Config, flatten
from distseg.core.constants import SHARD_SCHEMA_VERSION
from distseg.mining.errors import MiningError
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


def mining_settings(config: dict) -> dict:
    """The settings a shard row depends on, flattened: the priors, the image size, each prior's own
    section, and for `ucm` the edge detector and the hierarchy. Not the run's other settings."""
    mine = config.get("mine") or {}
    priors = list(mine.get("priors") or [])
    settings = {
        "mine.priors": priors,
        "mine.max_side": mine.get("max_side"),
        "mine.image_format": mine.get("image_format"),
    }
    if "ucm" in priors:
        settings.update(flatten({"edges": config.get("edges") or {}, "hierarchy": config.get("hierarchy") or {}}))
    for name in priors:
        section = (config.get("priors") or {}).get(name)
        if section:
            settings.update(flatten(section, f"priors.{name}."))
    return settings


def check_settings(cfg: Config, output_uri: str) -> None:
    """Refuse to add rows to an output mined with other settings (the rows of one output would not
    agree): raises MiningError naming the output and each differing key, old -> new."""
    fs, root = resolve_uri(output_uri)
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as stream:
            old = json.loads(stream.read()).get("config")
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        return  # an unreadable manifest is rewritten at the end of the run; the shards are the truth
    if not isinstance(old, dict):
        return
    before, after = mining_settings(old), mining_settings(cfg.model_dump(mode="json"))
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise MiningError(
            f"{output_uri} was mined with other settings ({diffs}{more}); its rows and new ones would not "
            "agree. Mine into a new --output, or delete that folder to mine it again with these settings."
        )
