"""The contrastive primitives the methods' losses share, and the loss contract.

The losses themselves live with their methods (distseg.methods.<name>);
`distseg.methods.create_loss` builds one by method name:

    loss_fn = create_loss("concepts", dim=32)
    terms = loss_fn(emb1, emb2, seg1, seg2, dist=dist, key1=k1, key2=k2)
    terms["loss"].backward()

Every loss takes two views of the same B images: `emb1`, `emb2` (B, D, h, w) unit vectors along D;
`seg1`, `seg2` (B, h, w) int64 segment ids consistent across views, -1 = ignore. `dist` (B, K, K) is
the tree distance d_T between leaf regions (hiergroup only); `image_ids` (B,) int64 says which image
each row is: rows with the same id (another view, or a copy drawn again by the ingest) must never be
each other's negatives, in the batch, a memory bank or a queue; `key1`, `key2` are momentum-encoder
embeddings (losses with `uses_key_encoder`); a loss ignores keyword inputs it does not use. The
result maps "loss" (the total to backprop) and each term to finite scalars; degenerate batches give 0
with a graph attached, never NaN.
"""

from __future__ import annotations

import torch


def zero_loss(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A scalar 0 that keeps the inputs in the graph, for batches with nothing to contrast."""
    present = [t for t in tensors if t is not None]
    return sum((t.sum() * 0 for t in present), start=torch.zeros((), device=present[0].device))


def info_nce(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive InfoNCE per row: -log(sum_pos exp(l) / sum_{pos or neg} exp(l)).

    `logits` (M, C); `pos`, `neg` (M, C) bool masks of the entries that count as positives /
    negatives (everything else is ignored; `neg=None`: every entry that is not a positive). Rows
    without a positive are dropped, so the result has one entry per kept row and no -inf/NaN can
    appear, neither in the value nor in its gradient.
    """
    keep = pos.any(dim=1)
    lowest = torch.finfo(logits.dtype).min
    # a row without positives gets a dummy all-true mask (finite, dropped below) instead of a copy of the rest
    num = torch.logsumexp(logits.masked_fill(~(pos | ~keep[:, None]), lowest), dim=1)
    den = torch.logsumexp(logits if neg is None else logits.masked_fill(~(pos | neg), lowest), dim=1)
    return (den - num)[keep]


def random_subset(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the bool `mask` (M, N), up to `k` column indices drawn uniformly without replacement.

    Returns (idx, ok), both (M, min(k, N)); `ok` is False where a row had fewer than k candidates.
    Uses the global torch RNG (deterministic under `torch.manual_seed`).
    """
    k = min(k, mask.shape[1])
    keys = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
    vals, idx = keys.topk(k, dim=1)
    return idx, vals >= 0


__all__ = ["info_nce", "random_subset", "zero_loss"]
