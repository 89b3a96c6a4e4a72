"""Where stages read and write: a local path or any pyarrow filesystem URI (s3://, gs://, file://, hdfs://).

Shards (mining's output, training's input) and Ray Train's run folders (`pretrain.storage_path`: the
checkpoints) go through these helpers, so a multi-node cluster can keep them on a bucket or a shared
mount that every node sees. Credentials come from the cloud's usual chain (instance role, workload
identity, environment); nothing here takes one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def resolve_uri(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path, file://, s3:// or gs:// URI."""
    uri = str(uri)
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a local path or a URI (a URI keeps its scheme)."""
    return "/".join([str(location).rstrip("/"), *parts])


def absolute(location: str | None) -> str | None:
    """A local path made absolute (Ray workers run in another working directory); URIs unchanged."""
    if location is None or is_uri(location):
        return location
    return str(Path(location).resolve())


def read_text(location: str) -> str | None:
    """The text of a file, or None when it does not exist."""
    fs, path = resolve_uri(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file whole or not at all: on a local disk through a temporary name and a rename (a crash
    mid-write leaves the old file, or none, never half of one); object stores publish a put atomically."""
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{folder}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_parquet(table, fs: pafs.FileSystem, path: str) -> None:
    """A Parquet file (zstd) written whole or not at all, as write_bytes: readers never see half a shard."""
    import pyarrow.parquet as pq

    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        return
    tmp = f"{folder}/.{name}.tmp"
    pq.write_table(table, tmp, filesystem=fs, compression="zstd")
    fs.move(tmp, path)


def write_text(location: str, text: str) -> None:
    """A text file at a local path or URI, written whole or not at all (write_bytes)."""
    fs, path = resolve_uri(location)
    write_bytes(fs, path, text.encode())


def list_files(location: str, suffix: str = "") -> list[str]:
    """Files directly under a folder ending in `suffix`, sorted, as paths of the folder's filesystem
    (URIs keep their scheme); [] for a missing folder."""
    fs, root = resolve_uri(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(location if is_uri(location) else root, n) for n in names]


def list_dirs(location: str) -> list[str]:
    """Sub-folders of a folder (same form as `list_files`); [] for a missing folder."""
    fs, root = resolve_uri(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return [join(location if is_uri(location) else root, n) for n in names]


def is_dir(location: str) -> bool:
    fs, path = resolve_uri(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory
