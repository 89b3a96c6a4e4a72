"""`distseg distill cluster`: MaskDistill's pseudo classes. k-means (faiss) over one feature per
mined mask, across the whole dataset, written as each mask's label into a NEW shard version.

    shards (mine, priors.vit_masks) -> Ray Data actor pool: decode image + masks, the affinity
    source embeds each masked image (output [CLS] token, Sec. 3.2; or the pooled patch tokens, or a
    distseg checkpoint's embedding) -> driver: faiss k-means, K = priors.vit_masks.clusters
    -> <output>/shards/<same file names> with masks[].label = cluster id + 1 (0 stays "no class"),
       <output>/centroids.npy, <output>/_manifest.json (version = parent's + 1, `parent` recorded)

The proposals are any mask prior's column (`prior`, `--prior`): vit_masks (MaskDistill), or, as the
baselines of "cluster the initial masks" (the paper's Table 1 row (a); its Sec. 3.1 argues against
handcrafted priors), `saliency` (one foreground mask) or `felzenszwalb_masks` (the largest
Felzenszwalb regions). Whatever the proposals, the features and the clustering settings are those of
priors.vit_masks (source, features, clusters, ...), so only the proposals differ between the rows.
With `score`, the clustered version is scored right away (distseg.distill.pipeline.score_version:
Hungarian-matched mIoU against evaluate.dataset's labels of the mined images).

The parent's shards are never rewritten: the output folder must not exist yet (each shard is
written to a temporary name and renamed, as mining does). Features are L2-normalised before
k-means (spherical k-means, as for [CLS] tokens usually); empty rows (no masks) pass through.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distseg.config import Config
from distseg.distill.versions import ChunkReader, fresh_output, map_chunks, write_version
from distseg.mining.listing import resolve_uri
from distseg.mining.manifest import MANIFEST
from distseg.storage import write_bytes

FEATURE_SCHEMA = pa.schema([("image_id", pa.string()), ("mask_index", pa.int32()), ("feature", pa.list_(pa.float32()))])


@dataclass
class ClusterSummary:
    output: str
    images: int
    masks: int
    clusters: int
    seconds: float
    inertia: float
    sizes: list[int] = field(default_factory=list)
    run_id: str | None = None
    prior: str = "vit_masks"
    scores: dict | None = None  # with score: pipeline.score_version's row (a)


def read_manifest(data_uri: str) -> dict:
    fs, root = resolve_uri(data_uri)
    path = f"{root}/{MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{data_uri}: no {MANIFEST} (not a finished `distseg mine` output)")
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


class MaskFeatures:
    """Ray Data actor: chunks {path, start, count} of shard rows -> one row per mask (image_id,
    mask_index, feature). It reads the shard itself (the last file stays cached), so no read task
    competes with the pool for CPUs."""

    def __init__(self, cfg: dict, prior: str, source=None):  # prior: the proposals' column
        import torch

        from distseg.config import build_config
        from distseg.distill.prior import build_source

        torch.set_num_threads(1)
        self.cfg = build_config(cfg)
        self.prior = prior
        self.params = self.cfg.priors.vit_masks  # the affinity source, whatever the proposals
        self.source = source if source is not None else build_source(self.params)
        self.reader = ChunkReader(["image_id", "height", "width", "image", prior])

    def rows(self, path: str, start: int, count: int) -> list[dict]:
        return self.reader.rows(path, start, count)

    def __call__(self, batch: dict) -> pa.Table:
        from distseg.shards import decode_image, decode_masks

        out = {"image_id": [], "mask_index": [], "feature": []}
        for path, start, count in zip(batch["path"], batch["start"], batch["count"]):
            for row in self.rows(str(path), int(start), int(count)):
                cell = row.get(self.prior) or {}
                masks = decode_masks(cell.get("masks"), int(row["height"]), int(row["width"]))
                if not masks:
                    continue
                image = decode_image(row["image"])
                feats = self.source.pooled(image, [m.mask for m in masks], self.params.features)
                for i, f in enumerate(feats):
                    out["image_id"].append(row["image_id"])
                    out["mask_index"].append(i)
                    out["feature"].append(f.astype(np.float32).tolist())
        return pa.Table.from_pydict(out, schema=FEATURE_SCHEMA)


def kmeans(features: np.ndarray, k: int, iters: int, redo: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """faiss spherical k-means -> (assignments, centroids, objective)."""
    import faiss

    x = np.array(features, np.float32, copy=True, order="C")  # normalised in place: never the caller's array
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    if len(x) < k:
        raise ValueError(f"priors.vit_masks.clusters={k} exceeds the {len(x)} masks to cluster; lower it")
    km = faiss.Kmeans(x.shape[1], k, niter=iters, nredo=redo, seed=seed, spherical=True, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64), km.centroids.copy(), float(km.obj[-1])


def relabel_table(table: pa.Table, prior: str, labels: dict[tuple[str, int], int]) -> pa.Table:
    """The same table with masks[i].label of `prior` replaced by labels[(image_id, i)]."""
    index = table.schema.get_field_index(prior)
    cells = table.column(prior).to_pylist()
    for image_id, cell in zip(table.column("image_id").to_pylist(), cells):
        for i, m in enumerate((cell or {}).get("masks") or []):
            m["label"] = labels[(image_id, i)]
    column = pa.array(cells, type=table.schema.field(prior).type)
    return table.set_column(index, table.schema.field(prior), column).replace_schema_metadata(table.schema.metadata)


def check_proposals(prior: str) -> None:
    """`prior` must be a registered prior whose column holds masks (what the clustering labels)."""
    from distseg.grouping.priors import PRIORS, prior_yields

    masks = sorted(n for n in PRIORS.list() if prior_yields(n) == "masks")
    if prior not in PRIORS.list():
        raise ValueError(f"--prior (the proposals' column): unknown prior {prior!r}; mask priors: {', '.join(masks)}")
    if prior_yields(prior) != "masks":
        raise ValueError(
            f"--prior (the proposals' column): {prior!r} yields regions, not masks; cluster one of {', '.join(masks)} "
            "(felzenszwalb_masks: the largest felzenszwalb regions as masks)"
        )


def cluster_masks(
    cfg: Config,
    data_uri: str,
    output_uri: str | None = None,
    prior: str = "vit_masks",
    track: bool = True,
    score: bool = False,
) -> ClusterSummary:
    """Cluster every mask of `prior` in the shards at data_uri with the features and settings of
    priors.vit_masks; write the labelled version to output_uri (default: `<data_uri>_k<K>` for
    vit_masks, `<data_uri>_<prior>_k<K>` otherwise). With score, also row (a)'s mIoU (summary.scores).
    Returns the counts; logs an MLflow run (tags stage=distill.cluster, prior)."""

    from distseg.cluster import init_ray

    t0 = time.perf_counter()
    check_proposals(prior)
    params = cfg.priors.vit_masks
    if params.features == "embedding" and params.source != "checkpoint":
        raise ValueError("priors.vit_masks.features=embedding needs source=checkpoint (the vit source: cls | tokens)")
    from distseg.distill.stage import check_source

    check_source(params)
    manifest = read_manifest(data_uri)
    if prior not in manifest.get("priors", []):
        raise ValueError(f"{data_uri}: the shards hold {manifest.get('priors')}, not {prior!r} (mine it first)")
    fs, root = resolve_uri(data_uri)
    suffix = f"_k{params.clusters}" if prior == "vit_masks" else f"_{prior}_k{params.clusters}"
    output_uri = output_uri or f"{data_uri.rstrip('/')}{suffix}"
    out_fs, out_root = fresh_output(output_uri)
    paths = [f"{root}/{s['path']}" for s in manifest["shards"]]
    if not paths:
        raise ValueError(f"{data_uri}: the manifest lists no shards")

    init_ray(cfg.ray)
    kwargs = {"cfg": cfg.model_dump(mode="json"), "prior": prior}
    table = map_chunks(manifest, data_uri, MaskFeatures, kwargs, cfg.mine.num_actors, params.num_gpus, FEATURE_SCHEMA)
    if table.num_rows == 0:
        raise ValueError(f"{data_uri}: no {prior} masks to cluster")
    features = np.stack([np.asarray(f, np.float32) for f in table.column("feature").to_pylist()])
    assign, centroids, inertia = kmeans(features, params.clusters, params.kmeans_iters, params.kmeans_redo, cfg.seed)
    ids, idx = table.column("image_id").to_pylist(), table.column("mask_index").to_pylist()
    labels = {(i, m): int(c) + 1 for i, m, c in zip(ids, idx, assign)}

    sizes = np.bincount(assign, minlength=params.clusters).tolist()
    cluster_entry = {
        "prior": prior,
        "clusters": params.clusters,
        "features": params.features,
        "source": params.source,
        "masks": len(assign),
        "sizes": sizes,
        "inertia": inertia,
        "labels": "masks[].label = cluster id + 1",
    }
    new_manifest = write_version(
        manifest,
        data_uri,
        output_uri,
        lambda table: relabel_table(table, prior, labels),
        "distill.cluster",
        {"cluster": cluster_entry},
    )
    buffer = io.BytesIO()
    np.save(buffer, centroids)
    write_bytes(out_fs, f"{out_root}/centroids.npy", buffer.getvalue())
    summary = ClusterSummary(
        output=output_uri,
        images=len(set(ids)),
        masks=len(assign),
        clusters=params.clusters,
        seconds=time.perf_counter() - t0,
        inertia=inertia,
        sizes=sizes,
        prior=prior,
    )
    if score:
        from distseg.distill.pipeline import score_version

        summary.scores = score_version(cfg, output_uri, prior)
    if track:
        summary.run_id = _log_run(cfg, summary, new_manifest, paths, fs, prior)
    return summary


def _log_run(cfg: Config, summary: ClusterSummary, manifest: dict, paths, fs, prior: str) -> str:
    """MLflow: counts, the manifest, and a picture of the first images' masks coloured by cluster."""
    from distseg.tracking import start_run

    tags = {"stage": "distill.cluster", "output": summary.output, "prior": prior}
    name = f"{cfg.name}-distill-cluster" + ("" if prior == "vit_masks" else f"-{prior}")
    with start_run(cfg, run_name=name, tags=tags) as tracker:
        metrics = {
            "images": summary.images,
            "masks": summary.masks,
            "masks_per_image": summary.masks / max(1, summary.images),
            "seconds": summary.seconds,
            "inertia": summary.inertia,
        }
        if summary.scores:
            metrics |= {f"a_initial_masks_{k}": summary.scores[k]["miou"] for k in ("hungarian", "majority")}
            tracker.log_dict(summary.scores, "scores.json")
        tracker.log_metrics(metrics)
        tracker.log_dict(manifest, MANIFEST)
        out_fs, out_root = resolve_uri(summary.output)
        first = pq.read_table(f"{out_root}/{manifest['shards'][0]['path']}", filesystem=out_fs).slice(0, 8)
        tracker.log_image(mask_sheet(first, prior), "masks_by_cluster.png")
        return tracker.run_id


def mask_sheet(table: pa.Table, prior: str) -> np.ndarray:
    """Each image beside its masks painted in their label's colour (later masks on top)."""
    from distseg.shards import decode_record
    from distseg.viz import contact_sheet, palette

    pictures = []
    for row in table.to_pylist():
        record = decode_record(row, [prior])
        out = record.priors.get(prior)
        labels = np.zeros(record.image.shape[:2], np.int64)
        for m in out.masks if out else []:
            labels[m.mask] = m.label
        colours = palette(max(2, int(labels.max()) + 1))[labels]
        blend = np.where(labels[..., None] > 0, (0.45 * record.image + 0.55 * colours).astype(np.uint8), record.image)
        pictures += [record.image, blend]
    return contact_sheet(pictures, columns=4)
