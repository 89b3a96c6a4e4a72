"""_manifest.json: what a mining output holds (shards, rows, errors) and what produced it."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distseg.config import Config, flatten
from distseg.core.constants import SHARD_SCHEMA_VERSION
from distseg.mining.errors import MiningError
from distseg.mining.listing import ERRORS, SHARDS, file_ids, parquet_files, read_ids, resolve_uri
from distseg.shards import config_hash
from distseg.storage import write_bytes, write_parquet

MANIFEST = "_manifest.json"


def drop_duplicate_rows(fs: pafs.FileSystem, root: str) -> tuple[int, set[str]]:
    """One row per image in the shards of a mining output: a shard repeating an image id of an earlier
    shard (by name; names start with the write time) is rewritten without those rows, or deleted when
    none are left. Returns the number of rows dropped and the ids in the shards.

    A repeat can land when Ray retries a write task whose shard was already written, or when a worker of
    a killed run writes its shard after the rerun listed what was done (seen once: a Ray worker outlived
    its SIGKILLed driver and raylet). check_settings makes both copies come from the same settings, so
    which one stays does not matter. Reads only the image_id column of each shard."""
    seen: set[str] = set()
    dropped = 0
    for path in parquet_files(fs, f"{root}/{SHARDS}"):
        ids = file_ids(fs, path)
        repeat = [i in seen for i in ids]
        seen.update(ids)
        dropped += _drop_rows(fs, path, repeat)
    return dropped, seen


def drop_settled_errors(fs: pafs.FileSystem, root: str, mined: set[str]) -> int:
    """One error row per image that is not mined: the latest attempt's. With `mine.retry_errors` a rerun
    tries the errors table's images again; one that succeeds leaves its old error row behind, one that
    fails again adds a second. Both are dropped here (the errors files rewritten without them), so the
    errors table and the count printed are the images that failed and still have no row."""
    seen: set[str] = set()
    dropped = 0
    for path in reversed(parquet_files(fs, f"{root}/{ERRORS}")):  # the latest attempt first
        ids = file_ids(fs, path)
        stale = [i in mined or i in seen for i in ids]
        seen.update(ids)
        dropped += _drop_rows(fs, path, stale)
    return dropped


def _drop_rows(fs: pafs.FileSystem, path: str, drop: list[bool]) -> int:
    """Rewrite a Parquet file without the rows marked in `drop` (whole, as write_parquet), or delete it
    when every row is; returns how many rows went."""
    if not any(drop):
        return 0
    if all(drop):
        fs.delete_file(path)
    else:
        table = pq.read_table(path, filesystem=fs)
        write_parquet(table.filter(pa.array([not d for d in drop])), fs, path)
    return sum(drop)


def write_manifest(cfg: Config, input_uri: str, output_uri: str, inputs: dict[str, str]) -> dict:
    """_manifest.json of a finished mining run: the shards (after drop_duplicate_rows), rows, errors
    (after drop_settled_errors) and the config. It is the output's record of which shard files hold it
    (ingest reads the files it lists)."""
    fs, root = resolve_uri(output_uri)
    duplicates, mined = drop_duplicate_rows(fs, root)
    settled = drop_settled_errors(fs, root, mined)
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
        "duplicates_dropped": duplicates,
        "settled_errors_dropped": settled,
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


def shard_settings(fs: pafs.FileSystem, root: str) -> dict | None:
    """The mining settings the first shard of an output records in its Parquet metadata (None: no shard,
    or one written before shards recorded them)."""
    from distseg.shards import META_SETTINGS

    files = parquet_files(fs, f"{root}/{SHARDS}")
    if not files:
        return None
    try:
        metadata = pq.read_schema(files[0], filesystem=fs).metadata or {}
        return json.loads(metadata[META_SETTINGS]) if META_SETTINGS in metadata else None
    except (OSError, ValueError):
        return None


def check_settings(cfg: Config, output_uri: str) -> None:
    """Refuse to add rows to an output mined with other settings (the rows of one output would not
    agree): raises MiningError naming the output and each differing key, old -> new. The manifest says
    what the output was mined with; without one (a run killed before it finished writes none) the
    shards' own metadata does."""
    fs, root = resolve_uri(output_uri)
    before = None
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as stream:
            old = json.loads(stream.read()).get("config")
        before = mining_settings(old) if isinstance(old, dict) else None
    except FileNotFoundError:
        before = shard_settings(fs, root)
    except (OSError, ValueError):
        pass  # an unreadable manifest is rewritten at the end of the run; the shards are the truth
    if before is None:
        return
    after = mining_settings(cfg.model_dump(mode="json"))
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise MiningError(
            f"{output_uri} was mined with other settings ({diffs}{more}); its rows and new ones would not "
            "agree. Mine into a new --output, or delete that folder to mine it again with these settings."
        )
