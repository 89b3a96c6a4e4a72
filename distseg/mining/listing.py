"""Where mining reads and writes: URIs to pyarrow filesystems, the input images, the ids already mined."""

from __future__ import annotations

import fnmatch

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distseg.storage import resolve_uri

SHARDS = "shards"  # folder of the shard files under the output URI
ERRORS = "errors"  # folder of the errors table under the output URI


def mine_inputs(input_uri: str, cfg) -> dict[str, str]:
    """id -> image URI of what `distseg mine --input` reads: a data source's `data.split` (from
    `data.root` when set, else the source's default location), or the images under a folder/URI/glob;
    with `data.limit`, the first N ids in sorted order."""
    from distseg.data import is_source, source_image_files

    if is_source(input_uri):
        inputs = source_image_files(input_uri, cfg.data.split, root=cfg.data.root)
    else:
        inputs = list_images(input_uri, cfg.mine.extensions)
    if cfg.data.limit is not None:
        inputs = dict(sorted(inputs.items())[: cfg.data.limit])
    return inputs


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


def parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The Parquet files directly in `folder`, sorted by name (none if the folder does not exist)."""
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def file_ids(fs: pafs.FileSystem, path: str) -> list[str]:
    """The image_id column of one Parquet file."""
    return pq.read_table(path, columns=["image_id"], filesystem=fs).column("image_id").to_pylist()


def read_ids(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The image_id column of every Parquet file in `folder` (none if the folder does not exist)."""
    return [i for path in parquet_files(fs, folder) for i in file_ids(fs, path)]


def done_ids(output_uri: str, include_errors: bool = True) -> set[str]:
    """The image ids already in the shards (and, with include_errors, in the errors table) of output_uri."""
    fs, root = resolve_uri(output_uri)
    ids = set(read_ids(fs, f"{root}/{SHARDS}"))
    if include_errors:
        ids |= set(read_ids(fs, f"{root}/{ERRORS}"))
    return ids
