"""Streaming ingest: grouping shards -> decoded rows -> two paired augmented views per image.

Ray Data reads the shards' Parquet (the image bytes are in the shard: the source store is never read
again), decodes each row and draws two views. Each view is a random resized crop + horizontal flip
applied identically to the image and its segment map (torchvision v2 transforms on an Image and a
Mask), then colour jitter (p 0.8) and RandomGrayscale (p 0.2), MoCo v2's photometric set (and, with
`pretrain.blur`, SimCLR's Gaussian blur), on the image only.
Both views crop the same segment map, so segment id r means the same region of the same image in
both views. Pixels a view does not cover do not exist
(crops lie inside the image), so no ignore value is needed here; -1 is reserved for padding.

torch and torchvision are imported where views are drawn, not at the top: Ray Data's coordinators (the
DatasetManager, the SplitCoordinator) and Ray Train's controller unpickle this module's functions with the
dataset, and would otherwise each load both (about 6 s of CPU and 640 MB resident, shared library pages
included, per process, measured here).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distseg import storage
from distseg.config import PretrainConfig
from distseg.shards import decode_image, decode_masks, decode_png, decode_region_dist


class IngestError(ValueError):
    """Shards that cannot feed training (missing folder or prior column, too many regions)."""


def shard_files(shards: str | Path) -> list[str]:
    """The Parquet files of a mining output folder (or of a folder of Parquet files): a local path or a
    pyarrow filesystem URI (s3://, gs://, file://; the files come back as URIs of the same scheme).

    Where the output has a _manifest.json listing its shards (every finished `distseg mine` run and
    every distill version writes one), those files and only those: a shard written after it (by a
    killed run's worker, or a run still going) is left out with a warning, until the next finished
    mining run checks it for repeated images (mining.manifest.drop_duplicate_rows) and lists it."""
    root = str(shards)
    folder = storage.join(root, "shards") if storage.is_dir(storage.join(root, "shards")) else root
    files = storage.list_files(folder, ".parquet")
    if folder != root:
        files = _listed_in_manifest(root, folder, files)
    if not files:
        raise IngestError(f"no Parquet shards under {folder} (run `distseg mine` and pass its --output folder)")
    return files


def _listed_in_manifest(root: str, folder: str, files: list[str]) -> list[str]:
    """`files` narrowed to the shards the output's _manifest.json lists (all of them when it has none)."""
    path = storage.join(root, "_manifest.json")
    text = storage.read_text(path)
    if text is None:
        return files
    try:
        listed = json.loads(text).get("shards")
    except (ValueError, AttributeError) as e:
        raise IngestError(f"{path} is not a readable manifest ({e}); rerun `distseg mine` to rewrite it") from None
    if listed is None:
        return files
    present = {f.rsplit("/", 1)[-1]: f for f in files}
    names = [entry["path"].rsplit("/", 1)[-1] for entry in listed]
    missing = [n for n in names if n not in present]
    if missing:
        raise IngestError(
            f"{path} lists {len(missing)} shard file(s) missing from {folder} (first: {missing[0]}); "
            "the output was changed after mining: mine it again into a new --output"
        )
    extra = sorted(set(present) - set(names))
    if extra:
        warnings.warn(
            f"{folder}: {len(extra)} shard file(s) not in {path} left out (first: {extra[0]}): written after "
            "the last finished `distseg mine` run (a killed run's worker, or a run still going); rerun "
            "`distseg mine` with the same --output to check them for repeated images and list them",
            stacklevel=3,
        )
    return [present[n] for n in names]


def _parquet(path: str) -> pq.ParquetFile:
    fs, local = storage.resolve_uri(path)
    return pq.ParquetFile(local, filesystem=fs)


def check_prior(files: list[str], prior: str) -> None:
    names = _parquet(files[0]).schema_arrow.names
    if prior not in names:
        available = [n for n in names if n not in ("image_id", "uri", "height", "width", "image", "prior")]
        raise IngestError(
            f"shard {files[0]} has no column for prior {prior!r} (it has: {', '.join(available) or 'none'}); "
            f"mine with mine.priors=[{prior}] or set pretrain.prior"
        )


def check_regions(files: list[str], cfg: PretrainConfig, sample: int = 64) -> None:
    """The first `sample` rows of the first shard against `pretrain.max_regions`, on the driver: a prior
    cut into more regions than d_T's padding holds (a mining `hierarchy.max_regions` above it, or a
    superpixel prior's hundred segments under hiergroup, which looks each region up in d_T) is refused
    before any worker starts, rather than in the middle of training. Later rows are checked as they are
    read (MakePairs)."""
    columns = ["image_id", "height", "width", cfg.prior]
    table = next(_parquet(files[0]).iter_batches(batch_size=sample, columns=columns), None)  # None: an empty file
    for row in table.to_pylist() if table is not None else []:
        found = segments_of(row.get(cfg.prior), int(row["height"]), int(row["width"]))
        if found is None:
            continue
        segments, dist = found
        count = dist.shape[0] if dist is not None else int(segments.max()) + 1
        if count > cfg.max_regions and (dist is not None or cfg.method == "hiergroup"):
            raise IngestError(
                f"shard {files[0]}, image {row.get('image_id')}: prior {cfg.prior!r} has {count} regions, more "
                f"than pretrain.max_regions={cfg.max_regions} (the d_T size): set pretrain.max_regions={count} "
                "or more (at most 256), or mine with fewer regions (hierarchy.max_regions)"
            )


def image_index(image_id: str) -> int:
    """A stable int64 for an image id, carried into the batch so losses can tell images apart."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little", signed=True)


def segments_of(value: dict | None, height: int, width: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(segment map int16, d_T or None) from one prior cell; None when the image has no usable segments.

    The cell says what it holds (the shard contract): a leaf-label map in `regions` (with `region_dist`
    for ucm), or object `masks` (saliency), whose union becomes the foreground (1) against 0."""
    if value is None:
        return None
    if value.get("regions") is None:
        masks = decode_masks(value.get("masks"), height, width)
        if not masks:
            return None  # MaskContrast drops images without a salient object
        foreground = np.zeros((height, width), bool)
        for m in masks:
            foreground |= m.mask
        return foreground.astype(np.int16), None
    regions = decode_png(value["regions"]).astype(np.int16)
    return regions, decode_region_dist(value.get("region_dist"))


class PairedViews:
    """Draw two augmented views of an image and its segment map (the same transform for both)."""

    def __init__(
        self,
        crop: int,
        crop_scale: tuple[float, float],
        color_jitter: float,
        vertical_flip: bool = False,
        blur: float = 0.0,
    ):
        from torchvision.transforms import v2

        geometric = [v2.RandomResizedCrop(crop, scale=tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip()]
        if vertical_flip:  # only when asked: the default draws exactly the random numbers it always drew
            geometric.append(v2.RandomVerticalFlip())
        photometric = []
        if color_jitter > 0:
            j = color_jitter
            photometric = [v2.RandomApply([v2.ColorJitter(j, j, j, j / 4)], p=0.8), v2.RandomGrayscale(p=0.2)]
        if blur > 0:  # SimCLR's: a kernel of 10 % of the side (odd), sigma uniform in [0.1, 2.0]; images only
            kernel = max(3, int(0.1 * crop) // 2 * 2 + 1)
            photometric.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur))
        self.transform = v2.Compose(geometric + photometric)  # v2 colour ops leave Mask untouched

    def __call__(self, image: np.ndarray, segments: np.ndarray) -> tuple[np.ndarray, ...]:
        """(view1, seg1, coord1, view2, seg2, coord2): coord (2, S, S) int32 is each view pixel's (y, x) in
        `image`, transformed with the segments (nearest), so a loss can find a pixel's twin in the
        other view (Zhang & Maire's augmented reference sampling)."""
        import torch
        from torchvision import tv_tensors

        img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        h, w = segments.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        seg = tv_tensors.Mask(torch.stack([torch.from_numpy(segments.astype(np.int64)), ys, xs]))
        out = []
        for _ in range(2):
            v, s = self.transform(img, seg)
            out += [v.numpy(), s[0].numpy().astype(np.int16), s[1:].numpy().astype(np.int32)]
        return tuple(out)


def row_seed(seed: int, pass_index: int, image_id: str) -> int:
    """The seed of one image's two views in one pass over the shards: a function of the run's seed, the
    pass and the image alone (not of which process or task draws them), so a rerun draws the same views."""
    digest = hashlib.blake2b(f"{seed}/{pass_index}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class MakePairs:
    """Ray Data `map_batches` callable: shard rows (pyarrow) -> a numpy batch of paired views.

    Each row's views are drawn under `row_seed(seed, pass, image_id)` (the row's `pass` column, 0 when
    absent), inside a forked torch RNG: the same run seed gives the same views, whichever task draws them."""

    def __init__(self, cfg: dict, seed: int = 0):
        self.cfg = PretrainConfig.model_validate(cfg)
        self.seed = seed
        c = self.cfg
        self.views = PairedViews(c.crop, c.crop_scale, c.color_jitter, c.vertical_flip, c.blur)

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        import torch

        cfg = self.cfg
        rows = table.to_pylist()
        kept = []
        for row in rows:
            found = segments_of(row.get(cfg.prior), int(row["height"]), int(row["width"]))
            if found is None:
                continue
            segments, dist = found
            if dist is not None and dist.shape[0] > cfg.max_regions:
                raise IngestError(
                    f"image {row.get('image_id')}: {dist.shape[0]} regions > pretrain.max_regions={cfg.max_regions}"
                )
            padded = np.ones((cfg.max_regions, cfg.max_regions), np.float32)
            if dist is not None:
                padded[: dist.shape[0], : dist.shape[0]] = dist
            seed = row_seed(self.seed, int(row.get("pass") or 0), str(row.get("image_id")))
            index = image_index(str(row.get("image_id")))
            kept.append((decode_image(row["image"]), segments, padded, index, int(row.get("pass") or 0), seed))
        c, k = cfg.crop, cfg.max_regions
        keys = ("view1", "seg1", "coord1", "view2", "seg2", "coord2", "dist", "image_index", "pass")
        out: dict[str, list] = {key: [] for key in keys}
        for image, segments, padded, index, pass_index, seed in kept:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                views = self.views(image, segments)
            for key, value in zip(keys, (*views, padded, index, pass_index)):
                out[key].append(value)
        if not kept:
            shapes = {
                "view1": ((3, c, c), np.uint8),
                "seg1": ((c, c), np.int16),
                "view2": ((3, c, c), np.uint8),
                "seg2": ((c, c), np.int16),
                "coord1": ((2, c, c), np.int32),
                "coord2": ((2, c, c), np.int32),
                "dist": ((k, k), np.float32),
                "image_index": ((), np.int64),
                "pass": ((), np.int64),
            }
            return {key: np.zeros((0, *shape), dtype) for key, (shape, dtype) in shapes.items()}
        return {
            key: np.asarray(values, np.int64) if key in ("image_index", "pass") else np.stack(values)
            for key, values in out.items()
        }


def make_pairs(table: pa.Table, cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    return MakePairs(cfg, seed)(table)


def passes_needed(rows: int, cfg: PretrainConfig, world: int, done_steps: int = 0) -> int:
    """Passes over the shards that the steps still to train (`cfg.steps - done_steps`) read, plus one:
    the dataset a run streams covers the whole run, so each pass draws new views of every image (their
    seeds hold the pass index) and the streaming pipeline starts once. The extra pass covers the rows a
    worker drops (the last partial batch, images without segments for the prior)."""
    wanted = max(cfg.steps - done_steps, 1) * cfg.batch_size * world
    return -(-wanted // max(rows, 1)) + 1


def pass_order(files: list[str], seed: int, first_pass: int, passes: int) -> list[tuple[int, str]]:
    """(pass, file) in reading order: each pass reads the files in its own order, seeded by (seed, pass)
    alone, so a run resumed at pass p reads p's files as the uninterrupted run would have."""
    return [
        (p, files[i]) for p in range(first_pass, first_pass + passes)
        for i in np.random.default_rng([seed, p]).permutation(len(files))
    ]  # fmt: skip


def build_dataset(
    shards: str | Path, cfg: PretrainConfig, passes: int = 1, first_pass: int = 0, cpus_per_task: float = 0.5,
    seed: int = 0,
):  # fmt: skip
    """The Ray Dataset of paired views that training streams from (read, decode and augment run as tasks):
    passes `first_pass` ... `first_pass + passes - 1` over the shards, each drawing its own views."""
    import ray

    files = shard_files(shards)
    check_prior(files, cfg.prior)
    # Passes are whole passes over the files, so an image comes back at least a shard file later: a
    # batch never holds an image twice, and a prototype queue or memory bank of recent batches holds
    # no second view of the image being contrasted. Shards keep mining order (often grouped by class
    # or sequence), so each pass reads the files in a new (seeded) random order and the loop mixes rows
    # in a shuffle buffer. One read stage over the list of (pass, file) items, one task per file, rather
    # than a union of `read_parquet` passes: each pass's file listing holds a whole CPU, and on a small
    # cluster ten of them starved the reads for minutes.
    columns = ["image_id", "height", "width", "image", cfg.prior]
    items = [{"path": f, "pass": p} for p, f in pass_order(files, seed, first_pass, passes)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_files, fn_kwargs={"columns": columns}, batch_size=1, batch_format="pyarrow", num_cpus=cpus_per_task
    )
    return ds.map_batches(
        make_pairs,
        fn_kwargs={"cfg": cfg.model_dump(mode="json"), "seed": seed},
        batch_format="pyarrow",
        batch_size=max(cfg.batch_size, 16),
        num_cpus=cpus_per_task,
    )


def _read_files(batch: pa.Table, columns: list[str]) -> pa.Table:
    """The rows of the shard files named in `batch` (a read task), each with its pass over the shards.

    Each file's rows come sorted by image id: mining writes them in the order its actors finish, so two
    minings of the same images (a fresh `make demo`) hold the same rows in another order, and the
    seeded shuffle downstream would otherwise make other batches of them."""
    tables = []
    for path, pass_index in zip(batch.column("path").to_pylist(), batch.column("pass").to_pylist()):
        table = _parquet(path).read(columns=columns).sort_by("image_id")
        tables.append(table.append_column("pass", pa.array([pass_index] * table.num_rows, pa.int32())))
    return pa.concat_tables(tables)


def count_rows(shards: str | Path) -> int:
    return sum(_parquet(f).metadata.num_rows for f in shard_files(shards))
