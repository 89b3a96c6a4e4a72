"""`distseg mine`: run grouping priors over an image collection with Ray Data, writing Parquet shards.

    images (folder, glob, s3://, gs://) -> list -> skip already mined -> actor pool (read, decode,
    resize, priors, encode) -> ShardSink: shards/part-*.parquet + errors/part-*.parquet -> _manifest.json

Exactly once and resumable: each write task writes one shard (and its errors) to a temporary name and
renames it into place, so a killed job leaves only whole shards; a rerun lists the image ids already in
shards/ (and errors/) and mines only the rest. Bad inputs become rows of the errors table with the
stage and reason, never a crash (unless fail_fast).
"""

from __future__ import annotations

import fnmatch
import json
import time
import traceback
import uuid
from dataclasses import dataclass
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


class MiningError(RuntimeError):
    """Raised with --fail-fast: names the image, the stage and the reason."""


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
    """One per actor: builds the priors once, then mines batches of {image_id, uri}."""

    def __init__(self, cfg: dict, fail_fast: bool = False):
        import torch

        from distseg.config import build_config
        from distseg.grouping.priors import create_prior

        torch.set_num_threads(1)
        self.cfg = build_config(cfg)
        self.fail_fast = fail_fast
        self.priors = {name: create_prior(name, self.cfg) for name in self.cfg.mine.priors}
        self.schema = shard_schema(self.cfg.mine.priors, cfg)
        self.columns = self.schema.append(pa.field("error_stage", pa.string()))
        self.columns = self.columns.append(pa.field("error_type", pa.string())).append(pa.field("error_message", pa.string()))

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

    def __call__(self, batch: dict) -> pa.Table:
        rows = [self.mine_one(str(i), str(u)) for i, u in zip(batch["image_id"], batch["uri"])]
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


def mine(cfg: Config, input_uri: str, output_uri: str, fail_fast: bool = False) -> MineSummary:
    """Mine every image under input_uri into grouping shards under output_uri (resumable)."""
    import ray

    from distseg.cluster import init_ray

    if not cfg.mine.priors:
        raise ValueError("mine.priors is empty: name at least one prior (ucm, felzenszwalb, slic, saliency)")
    from distseg.grouping.priors import PRIORS

    unknown = [p for p in cfg.mine.priors if p not in PRIORS]
    if unknown:
        raise ValueError(f"mine.priors: unknown prior(s) {unknown} (known: {', '.join(sorted(PRIORS))})")
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
    if todo:
        init_ray(cfg.ray)
        num_actors = cfg.mine.num_actors or max(1, int(ray.available_resources().get("CPU", 1)))
        blocks = max(1, min(len(todo), num_actors * 4, -(-len(todo) // cfg.mine.batch_size)))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        ds = ds.map_batches(
            MineWorker,
            fn_constructor_kwargs={"cfg": cfg_dict, "fail_fast": fail_fast},
            batch_size=cfg.mine.batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=1,
            batch_format="numpy",
        )
        sink = ShardSink(output_uri, shard_schema(cfg.mine.priors, cfg_dict), cfg.mine.rows_per_shard)
        try:
            ds.write_datasink(sink.as_datasink())
        except Exception as e:
            if not fail_fast:
                raise
            # Ray wraps the worker's MiningError; surface its message (file, stage, reason) alone
            text = str(e)
            reason = text[text.rfind("MiningError: ") + len("MiningError: ") :] if "MiningError: " in text else text
            raise MiningError(reason.strip().splitlines()[0]) from None
    manifest = write_manifest(cfg, input_uri, output_uri, inputs)
    return MineSummary(
        mined=manifest["rows"],
        errors=manifest["errors"],
        new=len(todo),
        skipped=len(inputs) - len(todo),
        seconds=time.perf_counter() - t0,
        output=output_uri,
    )
