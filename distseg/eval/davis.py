"""DAVIS video object segmentation: the J and F measures, label propagation, and the benchmark loop.

Measures (as the official DAVIS code defines them: ``davis2017-evaluation/davis2017/metrics.py`` and
``utils.db_statistics``; the DAVIS 2016 Python package ``davis/measures/{jaccard,f_boundary,
statistics}.py`` and ``davis/dataset/evaluation.py``; Perazzi et al., CVPR 2016):

* J, region similarity (:func:`db_eval_iou`): ``|pred & gt| / |pred | gt|``, 1 when both are empty.
* F, contour accuracy (:func:`db_eval_boundary`): the boundaries of both masks are extracted as
  ``seg2bmap`` does (:func:`boundary_map`); a boundary pixel counts as matched when it lies within
  ``ceil(bound_th * image diagonal)`` pixels (``bound_th = 0.008``; a value >= 1 is a radius in
  pixels) of the other boundary, i.e. inside the other boundary dilated by a disk of that radius.
  precision = matched predicted / predicted, recall = matched true / true, F = their harmonic mean;
  both boundaries empty -> 1, exactly one empty -> 0.
* Per sequence: mean, recall (fraction of frames scoring > 0.5) and decay (mean of the first quarter
  of the frames minus mean of the last quarter, four overlapping bins as ``db_statistics``). The
  dataset number is the mean of the per-sequence numbers; ``JF_mean = (J_mean + F_mean) / 2``.
  The official semi-supervised evaluation scores frames ``[1:-1]``: the first frame (whose mask is
  given) and also the last are left out. :class:`DavisEvaluator` does the same by default
  (``skip_last=False`` keeps the last frame).

Label propagation (:func:`propagate_labels`) follows the protocol of DINO (Caron et al. 2021,
``eval_video_segmentation.py``) and CRW (Jabri et al. 2020, "Space-Time Correspondence as a
Contrastive Random Walk", ``code/test.py``): each target pixel's L2-normalised feature is compared by
cosine similarity with the pixels of a context (the first frame with its given mask, plus the
previous ``num_prev`` frames with their predicted labels), restricted to a spatial window around the
same location (DINO: a square of half-size ``radius``; CRW: a disk); the top-k context pixels over
the whole context are kept, their similarities go through a softmax with a temperature, and the
target's soft labels are the weighted sum of theirs. The soft labels are upsampled bilinearly to the
frame size and the argmax is the prediction.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from skimage.morphology import disk
from tqdm import tqdm

FeatureMap = torch.Tensor | np.ndarray

_MASKED = -1.0e4  # affinity of keys outside the window (cosine similarities lie in [-1, 1])
_CHUNK_ELEMENTS = 1 << 23  # affinity entries computed at once (32 MiB of float32)
_TILE = 4  # query tile side of the windowed affinity (4 beat 8 and 16 on CPU at radius 12)


# ----------------------------------------------------------------------------------------------------
# J and F


def _as_bool_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    return pred, gt


def db_eval_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Region similarity J: intersection over union of two binary masks (1.0 when both are empty)."""
    pred, gt = _as_bool_pair(pred, gt)
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel-wide boundary of a binary mask (non-zero = foreground), as DAVIS's ``seg2bmap``.

    A pixel is a boundary pixel when its right, lower or lower-right neighbour differs from it. The
    image is extended past its last row and column by replication, so the image border itself is never
    a boundary; the outline therefore sits half a pixel towards the origin (outside the object on its
    top/left sides, inside it on its bottom/right sides).
    """
    seg = np.asarray(mask)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map needs a 2-D mask, got shape {seg.shape}")
    seg = seg.astype(bool)
    padded = np.pad(seg, ((0, 1), (0, 1)), mode="edge")
    return (seg != padded[:-1, 1:]) | (seg != padded[1:, :-1]) | (seg != padded[1:, 1:])


def boundary_radius(shape: tuple[int, int], bound_th: float = 0.008) -> int:
    """The matching tolerance in pixels: ``bound_th`` itself when >= 1, else a fraction of the diagonal."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def db_eval_boundary(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Contour accuracy F: boundary F-measure of two binary masks with a disk tolerance (see module doc)."""
    pred, gt = _as_bool_pair(pred, gt)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    footprint = disk(boundary_radius(pred.shape, bound_th)).astype(np.uint8)
    pred_near = cv2.dilate(pred_b.view(np.uint8), footprint).astype(bool)
    gt_near = cv2.dilate(gt_b.view(np.uint8), footprint).astype(bool)
    precision = np.count_nonzero(pred_b & gt_near) / n_pred
    recall = np.count_nonzero(gt_b & pred_near) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------
# label propagation


def _prepare_features(feat: FeatureMap, device: torch.device | None) -> torch.Tensor:
    t = torch.as_tensor(feat)
    if t.ndim != 3:
        raise ValueError(f"features must be (D, h, w), got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return F.normalize(t.float(), dim=0)


def _soft_labels(
    mask: np.ndarray | torch.Tensor, num_labels: int, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(num_labels, *size) label fractions of an (H, W) label map, area-averaged to `size`."""
    labels = torch.as_tensor(mask, device=device)
    onehot = torch.stack([labels == c for c in range(num_labels)]).float()
    if tuple(onehot.shape[-2:]) == tuple(size):
        return onehot
    return F.interpolate(onehot[None], size=size, mode="area")[0]


def _window_bias(tile: int, radius: int, ctx: int, shape: str, device: torch.device) -> torch.Tensor:
    """(tile*tile, K*ctx*K) additive bias, 0 where query (a, b) of a tile may see key (col, frame, row)
    of its key tile (K = tile + 2 * radius, the key-tile order used by `_propagate_windowed`)."""
    size = tile + 2 * radius
    d = torch.arange(size, device=device)[None, :] - torch.arange(tile, device=device)[:, None] - radius
    dy, dx = d[:, None, None, None, :], d[None, :, :, None, None]  # query (a, b), key (col, ctx, row)
    if shape == "square":
        allowed = (dy.abs() <= radius) & (dx.abs() <= radius)
    else:  # CRW's disk: Euclidean distance strictly below the radius
        allowed = dy**2 + dx**2 < radius**2
    allowed = allowed.expand(tile, tile, size, ctx, size).reshape(tile * tile, -1)
    return torch.where(allowed, 0.0, _MASKED)


def _weighted_labels(
    aff: torch.Tensor, key_labels: torch.Tensor, topk: int, temperature: float, batch_stride: int = 0
) -> torch.Tensor:
    """(B, Q, N) affinities -> (B, Q, L) soft labels of each query's top-k keys; key n of batch entry b
    has the labels ``key_labels[b * batch_stride + n]`` (an (M, L) table)."""
    k = min(topk, aff.shape[-1])
    values, index = aff.topk(k, dim=-1)
    weights = torch.softmax(values / temperature, dim=-1)
    index = index + (torch.arange(aff.shape[0], device=aff.device) * batch_stride)[:, None, None]
    return (weights[..., None] * key_labels[index]).sum(dim=2)


def _propagate_dense(
    query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, topk: int, temperature: float
) -> torch.Tensor:
    """No window: every target pixel against every context pixel, in chunks of target pixels."""
    d, h, w = query.shape
    q = query.reshape(d, -1).T
    k = keys.permute(1, 0, 2, 3).reshape(d, -1)
    key_labels = labels.permute(0, 2, 3, 1).reshape(-1, labels.shape[1])
    out = torch.empty(q.shape[0], labels.shape[1], device=query.device)
    step = max(1, _CHUNK_ELEMENTS // k.shape[1])
    for s in range(0, q.shape[0], step):
        out[s : s + step] = _weighted_labels((q[s : s + step] @ k)[None], key_labels, topk, temperature)[0]
    return out.T.reshape(-1, h, w)


def _key_band(stack: torch.Tensor, row: int, size: int) -> torch.Tensor:
    """Rows [row, row + size) of a (ctx, ch, rows, cols) map as a contiguous (cols, ctx, size, ch) band."""
    return stack[:, :, row : row + size].permute(3, 0, 2, 1).contiguous()


def _propagate_windowed(
    query: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    topk: int,
    temperature: float,
    radius: int,
    shape: str,
) -> torch.Tensor:
    """Windowed affinity by tiles: a tile x tile block of targets meets the (tile + 2r)^2 keys around it.

    Keys outside a query's own window get a large negative bias, so each row of tiles is one batched
    matrix product instead of a gather per pixel. The keys of a row of tiles are laid out column-major
    (col, frame, row, channel): every key tile is then one contiguous block, and the tiles of the row
    are a single strided view with no per-tile copy.
    """
    ctx, d, h, w = keys.shape
    num_labels = labels.shape[1]
    t, r = _TILE, radius
    size = t + 2 * r
    nty, ntx = -(-h // t), -(-w // t)
    hp, wp = nty * t, ntx * t
    pad = (r, r + wp - w, r, r + hp - h)
    # one more channel: 1 for queries; 0 for keys, a large negative value for the padding keys
    flag = F.pad(torch.zeros(ctx, 1, h, w, device=keys.device), pad, value=_MASKED)
    key_maps = torch.cat([F.pad(keys, pad), flag], dim=1)
    label_maps = F.pad(labels, pad)
    q_all = torch.cat([query, torch.ones(1, h, w, device=query.device)])
    q_tiles = F.pad(q_all, (0, wp - w, 0, hp - h)).reshape(d + 1, nty, t, ntx, t)
    bias = _window_bias(t, r, ctx, shape, keys.device)[None]
    n_keys = ctx * size * size
    tile_stride = t * ctx * size  # band rows (one per key) from one tile to the next
    cols = max(1, _CHUNK_ELEMENTS // (t * t * n_keys))
    out = torch.empty(nty, ntx, t * t, num_labels, device=query.device)
    for ty in range(nty):
        band = _key_band(key_maps, ty * t, size)
        band_labels = _key_band(label_maps, ty * t, size).reshape(-1, num_labels)
        q_row = q_tiles[:, ty].permute(2, 1, 3, 0).reshape(ntx, t * t, d + 1)
        for tx in range(0, ntx, cols):
            n = min(cols, ntx - tx)
            kt = band[tx * t :].as_strided((n, n_keys, d + 1), (tile_stride * (d + 1), d + 1, 1))
            aff = torch.bmm(q_row[tx : tx + n], kt.transpose(1, 2)).add_(bias)  # baddbmm is slower here
            labels_from = band_labels[tx * tile_stride :]
            out[ty, tx : tx + n] = _weighted_labels(aff, labels_from, topk, temperature, tile_stride)
    out = out.reshape(nty, ntx, t, t, num_labels).permute(4, 0, 2, 1, 3).reshape(num_labels, hp, wp)
    return out[:, :h, :w]


def propagate_frame(
    query: torch.Tensor,
    context_features: Sequence[torch.Tensor],
    context_labels: Sequence[torch.Tensor],
    *,
    topk: int = 5,
    radius: int | None = 12,
    temperature: float = 0.07,
    window: str = "square",
) -> torch.Tensor:
    """Soft labels (L, h, w) of one target frame from its context (L2-normalised (D, h, w) features)."""
    keys, labels = torch.stack(list(context_features)), torch.stack(list(context_labels))
    if radius is None:
        return _propagate_dense(query, keys, labels, topk, temperature)
    return _propagate_windowed(query, keys, labels, topk, temperature, int(radius), window)


def _argmax_channels(probs: torch.Tensor) -> torch.Tensor:
    """argmax over dim 0 of (L, H, W), first index on ties; a pass per label is far faster on CPU than
    torch's reduction over a non-contiguous dimension."""
    best, index = probs[0].clone(), torch.zeros(probs.shape[1:], dtype=torch.long, device=probs.device)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        best = torch.where(better, probs[c], best)
        index.masked_fill_(better, c)
    return index


@torch.no_grad()
def iter_propagation(
    features: Iterable[FeatureMap],
    first_mask: np.ndarray,
    *,
    num_prev: int = 2,
    topk: int = 5,
    radius: int | None = 12,
    temperature: float = 0.07,
    use_first: bool = True,
    queue: bool = False,
    out_size: tuple[int, int] | None = None,
    window: str = "square",
) -> Iterator[np.ndarray]:
    """Lazy :func:`propagate_labels`: yields each frame's label map as soon as its features arrive."""
    if num_prev < 0 or topk < 1 or temperature <= 0:
        raise ValueError(f"need num_prev >= 0, topk >= 1, temperature > 0; got {num_prev}, {topk}, {temperature}")
    if not use_first and num_prev == 0:
        raise ValueError("empty context: use_first=False needs num_prev >= 1")
    if window not in ("square", "disk"):
        raise ValueError(f"window must be 'square' (DINO) or 'disk' (CRW), got {window!r}")
    first_mask = np.asarray(first_mask)
    if first_mask.ndim != 2 or first_mask.min() < 0:
        raise ValueError("first_mask must be an (H, W) map of non-negative integer labels")
    out_size = tuple(out_size) if out_size is not None else first_mask.shape
    num_labels = int(first_mask.max()) + 1
    frames = iter(features)
    feat0 = _prepare_features(next(frames), None)
    device, size = feat0.device, tuple(feat0.shape[-2:])
    first = (feat0, _soft_labels(first_mask, num_labels, size, device))
    recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque([first], maxlen=num_prev)
    if first_mask.shape != out_size:
        first_mask = cv2.resize(first_mask.astype(np.int32), out_size[::-1], interpolation=cv2.INTER_NEAREST)
    yield first_mask.astype(np.int64)
    for raw in frames:
        feat = _prepare_features(raw, device)
        if tuple(feat.shape) != tuple(feat0.shape):
            raise ValueError(f"features of shape {tuple(feat.shape)} differ from frame 0's {tuple(feat0.shape)}")
        context = ([first] if use_first else []) + [c for c in recent if not (use_first and c is first)]
        soft = propagate_frame(
            feat, [c[0] for c in context], [c[1] for c in context],
            topk=topk, radius=radius, temperature=temperature, window=window,
        )
        probs = F.interpolate(soft[None], size=out_size, mode="bilinear", align_corners=False)[0]
        pred = _argmax_channels(probs)
        if num_prev:
            # queue=True keeps the soft labels (DINO, CRW); otherwise the hard prediction goes back in
            recent.append((feat, soft if queue else _soft_labels(pred, num_labels, size, device)))
        yield pred.cpu().numpy().astype(np.int64)


def propagate_labels(
    features: Iterable[FeatureMap],
    first_mask: np.ndarray,
    *,
    num_prev: int = 2,
    topk: int = 5,
    radius: int | None = 12,
    temperature: float = 0.07,
    use_first: bool = True,
    queue: bool = False,
    out_size: tuple[int, int] | None = None,
    window: str = "square",
) -> list[np.ndarray]:
    """Propagate the first frame's labels through a video given per-frame features.

    features: one (D, h, w) map per frame (tensor or array; all the same shape; L2-normalised here).
    first_mask: (H, W) integer labels of frame 0 (0 = background, 1.. = objects).
    num_prev: previous frames in the context besides the first; topk: neighbours kept per target pixel
    (over the whole context); radius: window half-size in feature pixels (None = the whole frame, which
    costs O((h*w)^2): use it only on small maps);
    temperature: of the softmax over the top-k cosine similarities; use_first: keep frame 0 (with its
    given mask) in the context; queue: the previous frames carry their soft predictions at feature
    resolution (DINO/CRW) instead of their hard predictions re-encoded as one-hot; out_size: (H, W) of
    the returned maps (default: first_mask's); window: "square" (DINO) or "disk" (CRW).
    Returns one (H, W) int64 label map per frame; frame 0 is first_mask.
    """
    return list(
        iter_propagation(
            features, first_mask, num_prev=num_prev, topk=topk, radius=radius, temperature=temperature,
            use_first=use_first, queue=queue, out_size=out_size, window=window,
        )
    )


# ----------------------------------------------------------------------------------------------------
# the benchmark


def _decay(values: np.ndarray, bins: int = 4) -> float:
    """Mean of the first quarter of the frames minus the last (overlapping bins, as db_statistics)."""
    if len(values) == 0:
        return float("nan")
    edges = np.floor(np.linspace(0, len(values) - 1, bins + 1) + 0.5).astype(int)
    parts = [values[edges[i] : edges[i + 1] + 1] for i in range(bins)]
    return float(np.mean(parts[0]) - np.mean(parts[-1]))


def _statistics(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": float("nan"), "recall": float("nan"), "decay": float("nan")}
    return {"mean": float(np.mean(values)), "recall": float(np.mean(values > 0.5)), "decay": _decay(values)}


@dataclass
class _SequenceScores:
    frames: list[int] = field(default_factory=list)
    j: list[float] = field(default_factory=list)
    f: list[float] = field(default_factory=list)


class DavisEvaluator:
    """Accumulates per-frame J and F of DAVIS-2016 sequences (one object: label > 0) and summarises them.

    As the official evaluation, the first frame (given) and by default the last frame are not scored;
    frames whose ground truth is None (not annotated) are skipped.
    """

    def __init__(self, bound_th: float = 0.008, skip_first: bool = True, skip_last: bool = True) -> None:
        self.bound_th = bound_th
        self.skip_first = skip_first
        self.skip_last = skip_last
        self.reset()

    def reset(self) -> None:
        self._scores: dict[str, _SequenceScores] = {}

    def process(
        self, sequence: str, predictions: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray | None]
    ) -> None:
        """Score one sequence's predicted label maps against its masks (both lists in frame order)."""
        if len(predictions) != len(ground_truth):
            raise ValueError(f"{sequence}: {len(predictions)} predictions for {len(ground_truth)} ground-truth frames")
        start = 1 if self.skip_first else 0
        stop = len(ground_truth) - (1 if self.skip_last else 0)
        scores = _SequenceScores()
        for i in range(start, stop):
            if ground_truth[i] is None:
                continue
            pred, gt = np.asarray(predictions[i]) > 0, np.asarray(ground_truth[i]) > 0
            scores.frames.append(i)
            scores.j.append(db_eval_iou(pred, gt))
            scores.f.append(db_eval_boundary(pred, gt, self.bound_th))
        self._scores[sequence] = scores

    def table(self) -> list[dict[str, Any]]:
        """One row per sequence: frames scored, J/F mean, recall and decay, JF mean."""
        rows = []
        for name, s in self._scores.items():
            j, f = _statistics(np.asarray(s.j)), _statistics(np.asarray(s.f))
            row: dict[str, Any] = {"sequence": name, "frames": len(s.frames)}
            row.update({f"J_{k}": v for k, v in j.items()})
            row.update({f"F_{k}": v for k, v in f.items()})
            row["JF_mean"] = (j["mean"] + f["mean"]) / 2
            rows.append(row)
        return rows

    def evaluate(self) -> dict[str, float]:
        """``davis/{J,F}_{mean,recall,decay}`` and ``davis/JF_mean`` (means over sequences), plus per sequence."""
        rows = self.table()
        if not rows:
            raise RuntimeError("DavisEvaluator.evaluate() before any sequence was processed")
        scored = [r for r in rows if r["frames"] > 0]
        out: dict[str, float] = {}
        for key in ("J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay"):
            out[f"davis/{key}"] = float(np.mean([r[key] for r in scored])) if scored else float("nan")
        out["davis/JF_mean"] = (out["davis/J_mean"] + out["davis/F_mean"]) / 2
        out["davis/num_sequences"] = float(len(scored))
        out["davis/num_frames"] = float(sum(r["frames"] for r in rows))
        for r in rows:
            for key in ("J_mean", "F_mean", "JF_mean"):
                out[f"davis/{r['sequence']}/{key}"] = r[key]
        return out


def _sequence_samples(dataset: Any, seq: str, max_frames: int | None) -> list[Any]:
    """A sequence's first `max_frames` frames, reading only those when the reader lists its frame ids."""
    if max_frames is not None and hasattr(dataset, "ids"):
        ids = [i for i in dataset.ids() if i.rsplit("/", 1)[0] == seq]
        if len(ids) >= max_frames:  # else the listing is cut short (a `limit`): read the sequence
            return [dataset[i] for i in ids[:max_frames]]
    return list(dataset.frames(seq))[:max_frames]


@torch.no_grad()
def evaluate_sequences(
    features_fn: Callable[[np.ndarray], FeatureMap],
    dataset: Any,
    sequences: Sequence[str] | None = None,
    *,
    max_frames: int | None = None,
    evaluator: DavisEvaluator | None = None,
    progress: bool = True,
    **propagation_kwargs: Any,
) -> dict[str, float]:
    """Propagate each sequence's first mask with `features_fn(image_rgb_uint8) -> (D, h, w)` and score it.

    dataset: a DAVIS reader (``distseg.data.davis.DAVIS2016``: ``sequences()``, ``frames(seq)``).
    max_frames limits the frames per sequence (quick runs; the numbers are then not the benchmark's).
    propagation_kwargs go to :func:`propagate_labels` (out_size is each frame's size). Pass an
    `evaluator` to keep its per-sequence ``table()``; returns ``evaluator.evaluate()``.
    """
    evaluator = evaluator if evaluator is not None else DavisEvaluator()
    for seq in sequences if sequences is not None else dataset.sequences():
        samples = _sequence_samples(dataset, seq, max_frames)
        frames = tqdm(samples, desc=f"davis {seq}", unit="frame", disable=not progress, leave=False)
        feats = (features_fn(s.image) for s in frames)
        kwargs = {"out_size": samples[0].image.shape[:2], **propagation_kwargs}
        predictions = propagate_labels(feats, samples[0].labels.astype(np.int64), **kwargs)
        evaluator.process(seq, predictions, [s.labels for s in samples])
    return evaluator.evaluate()
