"""Label propagation through a video from per-frame features (DINO / CRW, and Zhang & Maire's rule).

:func:`propagate_labels` follows by default the protocol of DINO (Caron et al. 2021,
``eval_video_segmentation.py``) and CRW (Jabri et al. 2020, "Space-Time Correspondence as a
Contrastive Random Walk", ``code/test.py``): each target pixel's L2-normalised feature is compared by
cosine similarity with the pixels of a context (the first frame with its given mask, plus the
previous ``num_prev`` frames with their predicted labels), restricted to a spatial window around the
same location (DINO: a square of half-size ``radius``; CRW: a disk); the top-k context pixels over
the whole context are kept, their similarities go through a softmax with a temperature, and the
target's soft labels are the weighted sum of theirs. The soft labels are upsampled bilinearly to the
frame size and the argmax is the prediction.

Zhang & Maire 2020 (Sec. 5.3: ``y_t(i) = sum_k sum_j sim(F_t(i), F_{t-k}(j)) y_{t-k}(j)``, k = 2
previous frames, j the 10 nearest neighbours, one-hot labels, features "augmented with spatial
coordinates") is the same machinery with ``use_first=False, num_prev=2, topk=10,
topk_per_frame=True, weighting="raw", xy_weight > 0, radius=None`` (the ``davis_zm`` protocol):
``topk_per_frame`` keeps the top-k of each context frame (the inner sum over j runs per frame t-k),
``weighting="raw"`` weighs them by their similarity itself (clipped at 0) instead of a softmax, and
``xy_weight`` makes the similarity that of features augmented with ``xy_weight`` times the pixel's
(y, x) (in units of the longer feature side): ``sim = cos(f, f') - xy_weight**2 / 2 * |p - p'|^2``,
which is ``1 - |a - a'|^2 / 2`` for the augmented vectors ``a = [f, xy_weight * p]``, so its nearest
neighbours are those of the augmented features.

:class:`LabelPropagator` is the same computation driven one frame at a time (``start`` with frame 0
and its mask, then ``step`` per frame): it keeps only the context, so a caller that receives frames
as a stream (the ``davis`` protocols) never holds a whole video's features.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

FeatureMap = torch.Tensor | np.ndarray

_MASKED = -1.0e4  # affinity of keys outside the window (cosine similarities lie in [-1, 1])
_CHUNK_ELEMENTS = 1 << 23  # affinity entries computed at once (32 MiB of float32)
_TILE = 4  # query tile side of the windowed affinity (4 beat 8 and 16 on CPU at radius 12)


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


def _topk(aff: torch.Tensor, k: int, frames: int, layout: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of (B, Q, N) affinities: over all N keys (``frames == 0``), else per context frame.

    Per frame, the keys are ``frames`` blocks of N / frames (``layout=None``: frame-major, key
    ``f * n + m``) or the windowed order (col, frame, row) of ``layout = (cols, rows)``. Returns
    (values, key indices into N), both (B, Q, k') with k' = k, or frames * k per frame."""
    if not frames:
        return aff.topk(min(k, aff.shape[-1]), dim=-1)
    b, q, n = aff.shape
    per = n // frames
    if layout is None:
        values, index = aff.view(b, q, frames, per).topk(min(k, per), dim=-1)
        index = index + (torch.arange(frames, device=aff.device) * per)[:, None]
    else:
        cols, rows = layout
        grouped = aff.view(b, q, cols, frames, rows).permute(0, 1, 3, 2, 4).reshape(b, q, frames, per)
        values, index = grouped.topk(min(k, per), dim=-1)
        frame = torch.arange(frames, device=aff.device)[:, None]
        index = (index // rows) * (frames * rows) + frame * rows + index % rows
    return values.reshape(b, q, -1), index.reshape(b, q, -1)


def _weighted_labels(
    aff: torch.Tensor,
    key_labels: torch.Tensor,
    topk: int,
    temperature: float,
    batch_stride: int = 0,
    *,
    weighting: str = "softmax",
    frames: int = 0,
    layout: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, Q, N) affinities -> (B, Q, L) soft labels of each query's top-k keys; key n of batch entry b
    has the labels ``key_labels[b * batch_stride + n]`` (an (M, L) table). ``weighting``: "softmax"
    of similarity / temperature (DINO, CRW) or "raw" similarity clipped at 0 (Zhang & Maire);
    ``frames`` > 0: top-k per context frame (see :func:`_topk`)."""
    values, index = _topk(aff, topk, frames, layout)
    if weighting == "raw":
        weights = values.clamp(min=0)
    else:
        weights = torch.softmax(values / temperature, dim=-1)
    index = index + (torch.arange(aff.shape[0], device=aff.device) * batch_stride)[:, None, None]
    return (weights[..., None] * key_labels[index]).sum(dim=2)


def _propagate_dense(
    query: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    topk: int,
    temperature: float,
    weighting: str = "softmax",
    per_frame: bool = False,
) -> torch.Tensor:
    """No window: every target pixel against every context pixel, in chunks of target pixels."""
    d, h, w = query.shape
    q = query.reshape(d, -1).T
    k = keys.permute(1, 0, 2, 3).reshape(d, -1)
    key_labels = labels.permute(0, 2, 3, 1).reshape(-1, labels.shape[1])
    out = torch.empty(q.shape[0], labels.shape[1], device=query.device)
    step = max(1, _CHUNK_ELEMENTS // k.shape[1])
    for s in range(0, q.shape[0], step):
        aff = (q[s : s + step] @ k)[None]
        frames = keys.shape[0] if per_frame else 0
        out[s : s + step] = _weighted_labels(aff, key_labels, topk, temperature, weighting=weighting, frames=frames)[0]
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
    weighting: str = "softmax",
    per_frame: bool = False,
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
            out[ty, tx : tx + n] = _weighted_labels(
                aff,
                labels_from,
                topk,
                temperature,
                tile_stride,
                weighting=weighting,
                frames=ctx if per_frame else 0,
                layout=(size, size),
            )
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
    weighting: str = "softmax",
    topk_per_frame: bool = False,
) -> torch.Tensor:
    """Soft labels (L, h, w) of one target frame from its context (L2-normalised (D, h, w) features;
    ``weighting`` and ``topk_per_frame`` as :func:`propagate_labels`)."""
    keys, labels = torch.stack(list(context_features)), torch.stack(list(context_labels))
    if radius is None:
        return _propagate_dense(query, keys, labels, topk, temperature, weighting, topk_per_frame)
    return _propagate_windowed(query, keys, labels, topk, temperature, int(radius), window, weighting, topk_per_frame)


def _xy_channels(feat: torch.Tensor, xy_weight: float, role: str) -> torch.Tensor:
    """Append position channels so that query . key = cos - xy_weight**2 / 2 * |p_query - p_key|^2.

    p = (y, x) of the pixel centre in units of the longer side; a query gets [w p, -w^2 |p|^2 / 2, 1],
    a key [w p, 1, -w^2 |p|^2 / 2] (w = xy_weight)."""
    _, h, w = feat.shape
    side = max(h, w)
    ys = (torch.arange(h, device=feat.device, dtype=feat.dtype) + 0.5) / side
    xs = (torch.arange(w, device=feat.device, dtype=feat.dtype) + 0.5) / side
    pos = xy_weight * torch.stack(torch.meshgrid(ys, xs, indexing="ij"))
    half_sq = -0.5 * (pos**2).sum(0, keepdim=True)
    one = torch.ones_like(half_sq)
    extra = [pos, half_sq, one] if role == "query" else [pos, one, half_sq]
    return torch.cat([feat, *extra])


def _argmax_channels(probs: torch.Tensor) -> torch.Tensor:
    """argmax over dim 0 of (L, H, W), first index on ties; a pass per label is far faster on CPU than
    torch's reduction over a non-contiguous dimension."""
    best, index = probs[0].clone(), torch.zeros(probs.shape[1:], dtype=torch.long, device=probs.device)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        best = torch.where(better, probs[c], best)
        index.masked_fill_(better, c)
    return index


class LabelPropagator:
    """Label propagation one frame at a time: :meth:`start` with frame 0's features and its mask, then
    :meth:`step` with each following frame's features (see the module docstring and
    :func:`propagate_labels` for the arguments). Holds only the context frames."""

    def __init__(
        self,
        *,
        num_prev: int = 2,
        topk: int = 5,
        radius: int | None = 12,
        temperature: float = 0.07,
        use_first: bool = True,
        queue: bool = False,
        window: str = "square",
        weighting: str = "softmax",
        topk_per_frame: bool = False,
        xy_weight: float = 0.0,
    ) -> None:
        if num_prev < 0 or topk < 1 or temperature <= 0:
            raise ValueError(f"need num_prev >= 0, topk >= 1, temperature > 0; got {num_prev}, {topk}, {temperature}")
        if not use_first and num_prev == 0:
            raise ValueError("empty context: use_first=False needs num_prev >= 1")
        if window not in ("square", "disk"):
            raise ValueError(f"window must be 'square' (DINO) or 'disk' (CRW), got {window!r}")
        if weighting not in ("softmax", "raw"):
            raise ValueError(f"weighting must be 'softmax' (DINO, CRW) or 'raw' (Zhang & Maire), got {weighting!r}")
        if xy_weight < 0:
            raise ValueError(f"xy_weight must be >= 0, got {xy_weight}")
        self.num_prev, self.topk, self.radius, self.temperature = num_prev, topk, radius, temperature
        self.use_first, self.queue, self.window = use_first, queue, window
        self.weighting, self.topk_per_frame, self.xy_weight = weighting, topk_per_frame, float(xy_weight)
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def start(
        self, features: FeatureMap, first_mask: np.ndarray, out_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Begin a video: frame 0's features and (H, W) labels; returns frame 0's map at `out_size`."""
        first_mask = np.asarray(first_mask)
        if first_mask.ndim != 2 or first_mask.min() < 0:
            raise ValueError("first_mask must be an (H, W) map of non-negative integer labels")
        self.out_size = tuple(out_size) if out_size is not None else first_mask.shape
        self.num_labels = int(first_mask.max()) + 1
        feat0 = _prepare_features(features, None)
        self.device, self.size, self._shape = feat0.device, tuple(feat0.shape[-2:]), tuple(feat0.shape)
        self._first = (self._as_key(feat0), _soft_labels(first_mask, self.num_labels, self.size, self.device))
        self._recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque([self._first], maxlen=self.num_prev)
        if first_mask.shape != self.out_size:
            first_mask = cv2.resize(first_mask.astype(np.int32), self.out_size[::-1], interpolation=cv2.INTER_NEAREST)
        return first_mask.astype(np.int64)

    @torch.no_grad()
    def step(self, features: FeatureMap) -> np.ndarray:
        """The (H, W) int64 label map of the next frame from its (D, h, w) features."""
        if self._first is None:
            raise RuntimeError("LabelPropagator.step() before start()")
        first = self._first
        feat = _prepare_features(features, self.device)
        if tuple(feat.shape) != self._shape:
            raise ValueError(f"features of shape {tuple(feat.shape)} differ from frame 0's {self._shape}")
        context = ([first] if self.use_first else []) + [c for c in self._recent if not (self.use_first and c is first)]
        soft = propagate_frame(
            _xy_channels(feat, self.xy_weight, "query") if self.xy_weight else feat,
            [c[0] for c in context],
            [c[1] for c in context],
            topk=self.topk,
            radius=self.radius,
            temperature=self.temperature,
            window=self.window,
            weighting=self.weighting,
            topk_per_frame=self.topk_per_frame,
        )
        probs = F.interpolate(soft[None], size=self.out_size, mode="bilinear", align_corners=False)[0]
        pred = _argmax_channels(probs)
        if self.num_prev:
            # queue=True keeps the soft labels (DINO, CRW); otherwise the hard prediction goes back in
            labels = soft if self.queue else _soft_labels(pred, self.num_labels, self.size, self.device)
            self._recent.append((self._as_key(feat), labels))
        return pred.cpu().numpy().astype(np.int64)

    def _as_key(self, feat: torch.Tensor) -> torch.Tensor:
        """A frame's features as the context stores them (with position channels when xy_weight > 0)."""
        return _xy_channels(feat, self.xy_weight, "key") if self.xy_weight else feat


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
    weighting: str = "softmax",
    topk_per_frame: bool = False,
    xy_weight: float = 0.0,
) -> Iterator[np.ndarray]:
    """Lazy :func:`propagate_labels`: yields each frame's label map as soon as its features arrive."""
    propagator = LabelPropagator(
        num_prev=num_prev,
        topk=topk,
        radius=radius,
        temperature=temperature,
        use_first=use_first,
        queue=queue,
        window=window,
        weighting=weighting,
        topk_per_frame=topk_per_frame,
        xy_weight=xy_weight,
    )
    frames = iter(features)
    first_mask = np.asarray(first_mask)
    if first_mask.ndim != 2 or first_mask.min() < 0:  # before reading frame 0's features
        raise ValueError("first_mask must be an (H, W) map of non-negative integer labels")
    yield propagator.start(next(frames), first_mask, out_size)
    for raw in frames:
        yield propagator.step(raw)


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
    weighting: str = "softmax",
    topk_per_frame: bool = False,
    xy_weight: float = 0.0,
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
    the returned maps (default: first_mask's); window: "square" (DINO) or "disk" (CRW);
    weighting: "softmax" of similarity / temperature (DINO, CRW) or "raw" similarity clipped at 0
    (Zhang & Maire); topk_per_frame: keep the top-k of each context frame instead of the top-k of the
    whole context; xy_weight: > 0 augments the features with the pixel position (module docstring).
    Returns one (H, W) int64 label map per frame; frame 0 is first_mask.
    """
    return list(
        iter_propagation(
            features,
            first_mask,
            num_prev=num_prev,
            topk=topk,
            radius=radius,
            temperature=temperature,
            use_first=use_first,
            queue=queue,
            out_size=out_size,
            window=window,
            weighting=weighting,
            topk_per_frame=topk_per_frame,
            xy_weight=xy_weight,
        )
    )
