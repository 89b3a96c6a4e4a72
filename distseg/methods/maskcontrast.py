"""Pixel-to-mask-prototype contrast with a momentum encoder (Van Gansbeke et al., ICCV 2021, MaskContrast).

Sources: the MaskContrast slides (seed 002) and the authors' public training code
(wvangansbeke/Unsupervised-Semantic-Segmentation, pretrain/: modules/moco/builder.py, modules/models.py,
utils/train_utils.py, modules/losses.py), which fix what the slides leave open.

Each image has one salient-object mask M (segment value 1; 0 = background, -1 = ignore). A training
step, as the authors' `ContrastiveModel.forward`:

- the QUERY view (view 1) goes through the trained network, giving unit pixel embeddings z_i and the
  decoder features; the KEY view (view 2) goes through the momentum encoder (an EMA copy, m = 0.999);
- the key prototype of each image is z_M = normalise(sum_{j in M} k_j) over its key-view mask;
- every query pixel i inside its image's query-view mask is classified among the batch's key
  prototypes and a FIFO queue of past key prototypes, its own image's prototype being the target:

      L_contrast = sum_i w_i * -log( exp(z_i.z_M+ / tau) / sum_{n in candidates(i)} exp(z_i.z_n / tau) ) / sum_i w_i

  with the E-Net weights w_i = 1 / ln(1.02 + share of the batch's query pixels whose target is i's),
  so images with small masks count as much as large ones;
- a saliency head, a 1x1 conv without bias on the DECODER features (the concatenated Res3/Res4
  projections the embedding head reads, `HypercolumnNet(..., return_features=True)`), parallel to
  the embedding head as the authors' `classification_head`, predicts the query view's mask, trained
  with their class-balanced BCE (each class weighted by the other's share, averaged over pixels):
  L = L_contrast + saliency_weight * L_saliency;
- after the loss, the batch's key prototypes enter the queue (training mode only); the queue starts as
  random unit vectors, so the number of candidates is constant from the first step.

Loss direction and queue (audit M11), decided from the authors' code: ONE-WAY, query -> key. Only
view-1 pixels are contrasted, only view-2 (key) prototypes are candidates and enqueued, and the
saliency BCE is on the query view only. The method therefore runs the network on view 1 and the key
encoder on view 2 (half the forward passes of a symmetric loss). Defaults as the authors' configs:
tau 0.5, queue 128 (their supervised-saliency config; 256 with unsupervised saliency), momentum 0.999,
SGD lr 0.004 with poly decay (maskcontrast.yaml). Under several workers every rank's key prototypes are
enqueued on every rank (`base.gather_rows`, as the authors' `concat_all_gather`): the queues stay equal.

Same image, never a negative: `image_ids` (B,) says which image each row is. For a query pixel, the
key prototype of another row with its image id (the ingest drew the image twice) and queue entries
of its image (the queue stores each prototype's image id) are removed from the candidates; the
positive stays the key view's prototype of its own row. The authors need no such rule (a distributed
sampler visits each image once per epoch and the queue holds the last one or two batches).

Diagnostics: `proto_acc`, the share of contrasted pixels whose most similar candidate is their own
prototype, and `chance_loss`, the mean over those pixels of ln(number of candidates): the contrast
term at chance.

Departures from the authors' code, each deliberate:
- Resolution: they upsample the embedding and the saliency logits bilinearly to the input size before
  the loss; here both losses are taken at the embedding's 1/4 resolution against the nearest-resized
  mask (16x fewer pixels for interpolated copies of the same values; the E-Net weights normalise each
  prototype's share, so the contrast's scale does not change).
- Network and init (M7, M8): distseg's hypercolumn net, not DeepLabV3 on a dilated ResNet-50 from
  MoCo v2. maskcontrast_msrc.yaml starts from a self-supervised distseg checkpoint (`model.init_from`);
  from random init the prototypes of different images are almost parallel and the contrast stays at
  chance (docs/RESULTS.md).
- No shuffle-BN (M9): the key encoder runs in train mode (batch statistics, as MoCo) on its own
  forward pass of the key view; within one worker a shuffle could not change which images share a BN
  batch.
- Batch (M4): 8 images per step and worker instead of the authors' 128 (fewer in-batch negatives).
- Images without foreground in a view are skipped; the authors re-crop until 0.01 < fg area < 0.99
  (M10, the ingest's business). The saliency BCE ignores pixels marked -1.
- The saliency prior (M6) is distseg's `saliency` prior, not DeepUSPS / BASNet masks.

Without `key2` (direct use, tests) the detached `emb2` stands in for the key embedding (momentum 0);
without `feat1` the saliency term is 0. The method owns the EMA copy (`MaskContrast.after_step`, which the
training loop calls after each optimizer step) and reads `momentum`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distseg.core.section import Section
from distseg.losses import zero_loss
from distseg.methods.base import Method, Views, gather_rows, register_method, resize_segments


def mask_prototypes(keys: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised sum of the key embeddings over each image's foreground (seg == 1): (B, D), and which
    images have one (B,)."""
    fg = (seg == 1).unsqueeze(1).to(keys.dtype)
    protos = F.normalize((keys.detach() * fg).sum(dim=(2, 3)), dim=1)
    return protos, fg.flatten(1).sum(dim=1) > 0


def enet_weights(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample E-Net class weights 1 / ln(1.02 + p_class) of each sample's target (p: its share of samples)."""
    share = torch.bincount(target, minlength=num_classes).float() / max(len(target), 1)
    return (1.0 / torch.log(1.02 + share))[target]


def prototype_contrast(
    emb: torch.Tensor,
    seg: torch.Tensor,
    protos: torch.Tensor,
    has: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """E-Net-weighted cross-entropy of each foreground pixel of the query `emb` (B, D, h, w): its
    similarities / tau to the key prototypes `protos[has]` and the `queue`, the target being its own
    row's prototype. `exclude` (B, P + Q) bool removes candidates per query row (never the target).

    Returns the loss (None without foreground pixels), whether each pixel's most similar candidate is
    its own prototype (M,) and each pixel's number of candidates (M,)."""
    fg = (seg == 1) & has[:, None, None]
    z = emb.permute(0, 2, 3, 1)[fg]
    rows = fg.nonzero()[:, 0]
    candidates = int(has.sum()) + len(queue)
    if len(z) == 0:
        return None, torch.zeros(0, dtype=torch.bool, device=emb.device), emb.new_zeros(0)
    target = (has.long().cumsum(0) - 1)[rows]
    logits = z @ torch.cat([protos[has], queue]).T / temperature
    count = torch.full((len(z),), float(candidates), device=emb.device)
    if exclude is not None:
        out = exclude[rows]
        logits = logits.masked_fill(out, torch.finfo(logits.dtype).min)
        count = count - out.sum(dim=1)
    hit = logits.detach().argmax(1) == target
    weight = enet_weights(target, logits.shape[1])
    loss = (weight * F.cross_entropy(logits, target, reduction="none")).sum() / weight.sum()
    return loss, hit, count


def balanced_bce(logits: torch.Tensor, seg: torch.Tensor) -> torch.Tensor | None:
    """The authors' balanced BCE of saliency `logits` (B, h, w) against seg == 1, over the non-ignored
    pixels: foreground pixels weighted by the background's share, background pixels by the foreground's,
    averaged over the pixels."""
    valid = seg >= 0
    if not valid.any():
        return None
    target = (seg[valid] == 1).float()
    pos = target.mean()
    weight = torch.where(target > 0, 1 - pos, pos)
    return F.binary_cross_entropy_with_logits(logits[valid], target, weight=weight)


class MaskContrastLoss(nn.Module):
    """MaskContrast's one-way pixel-to-key-prototype contrast with a queue and a saliency head on the
    decoder features (module docstring)."""

    uses_key_encoder = True
    symmetric = False  # one-way: only the query view (emb1) is trained; emb2 / key2 give the prototypes

    def __init__(
        self,
        temperature: float = 0.5,
        queue_size: int = 128,
        momentum: float = 0.999,
        saliency_weight: float = 1.0,
        dim: int = 32,
        feature_dim: int = 512,
    ):
        super().__init__()
        if temperature <= 0 or queue_size < 1 or dim < 1 or feature_dim < 1:
            raise ValueError("temperature > 0, queue_size, dim, feature_dim >= 1")
        if not 0 <= momentum < 1 or saliency_weight < 0:
            raise ValueError("0 <= momentum < 1, saliency_weight >= 0")
        self.temperature, self.momentum, self.saliency_weight = temperature, momentum, saliency_weight
        self.dim, self.feature_dim = dim, feature_dim
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to overwrite
        # the image id of each queue entry; queue_known is False for the random start and unknown ids
        self.register_buffer("queue_ids", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("queue_known", torch.zeros(queue_size, dtype=torch.bool))
        self.saliency_head = nn.Conv2d(feature_dim, 1, kernel_size=1, bias=False)

    @torch.no_grad()
    def _enqueue(self, protos: torch.Tensor, ids: torch.Tensor | None) -> None:
        """Enqueue this step's key prototypes, every rank's (gather_rows, as the authors' MoCo-style
        concat_all_gather), so under several workers each rank's queue holds the same entries."""
        size = len(self.queue)
        if not self.training:
            return
        known = torch.full((len(protos),), ids is not None, dtype=torch.bool, device=protos.device)
        ids = ids if ids is not None else torch.zeros(len(protos), dtype=torch.long, device=protos.device)
        protos, ids, known = gather_rows(protos.to(self.queue.dtype), ids, known)
        if len(protos) == 0:
            return
        protos, ids, known = protos[-size:], ids[-size:], known[-size:]
        slots = (int(self.queue_ptr) + torch.arange(len(protos), device=protos.device)) % size
        self.queue[slots] = protos
        self.queue_ids[slots] = ids
        self.queue_known[slots] = known
        self.queue_ptr.fill_((int(self.queue_ptr) + len(protos)) % size)

    def _exclusions(self, ids: torch.Tensor | None, has: torch.Tensor) -> torch.Tensor | None:
        """(B, P + Q): for each query row, the candidates of its own image other than its target."""
        if ids is None:
            return None
        rows = torch.arange(len(ids), device=ids.device)
        same = ids[:, None] == ids[None, :]
        protos = (same & (rows[:, None] != rows[None, :]))[:, has]
        queue = self.queue_known[None, :] & (ids[:, None] == self.queue_ids[None, :])
        return torch.cat([protos, queue], dim=1)

    def forward(
        self,
        emb1: torch.Tensor,
        emb2: torch.Tensor,
        seg1: torch.Tensor,
        seg2: torch.Tensor,
        *,
        dist: torch.Tensor | None = None,
        key2: torch.Tensor | None = None,
        feat1: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        **unused: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`emb1` (B, D, h, w) the query view's embedding, `feat1` (B, feature_dim, h, w) its decoder
        features; `key2` the key view's momentum-encoder embedding (else `emb2`, detached); `seg1`,
        `seg2` the views' masks."""
        if emb1.shape[1] != self.dim:
            raise ValueError(f"embedding dimension {emb1.shape[1]} != the prototype queue's {self.dim}")
        ids = image_ids.to(device=emb1.device, dtype=torch.long) if image_ids is not None else None
        protos, has = mask_prototypes(emb2 if key2 is None else key2, seg2)
        queue = self.queue.to(emb1.dtype)
        exclude = self._exclusions(ids, has)
        contrast, hit, count = prototype_contrast(emb1, seg1, protos, has, queue, self.temperature, exclude)

        saliency = None
        if feat1 is not None:
            if feat1.shape[1] != self.feature_dim:
                raise ValueError(
                    f"decoder features have {feat1.shape[1]} channels != the saliency head's {self.feature_dim}"
                )
            saliency = balanced_bce(self.saliency_head(feat1)[:, 0], seg1)
        zero = emb1.new_zeros(())
        if contrast is None and saliency is None:
            loss = zero_loss(emb1, emb2, feat1)
        else:
            loss = (contrast if contrast is not None else zero) + self.saliency_weight * (
                saliency if saliency is not None else zero
            )
        self._enqueue(protos[has], ids[has] if ids is not None else None)
        chance = count.log().mean() if len(count) else emb1.new_tensor(math.log(int(has.sum()) + len(queue)))
        return {
            "loss": loss,
            "contrast": contrast.detach() if contrast is not None else zero,
            "saliency": saliency.detach() if saliency is not None else zero,
            "proto_acc": hit.float().mean() if len(hit) else zero,
            "chance_loss": chance,
        }


class MaskContrastParams(Section):
    """`losses.maskcontrast`: the one-way prototype contrast, its queue, the momentum encoder and the
    saliency head."""

    temperature: float = Field(0.5, gt=0, description="contrastive temperature tau")
    queue_size: int = Field(128, ge=1, description="queue of past key prototypes K")
    momentum: float = Field(0.999, ge=0, lt=1, description="momentum m of the key encoder")
    saliency_weight: float = Field(
        1.0, ge=0, description="weight of the saliency head's balanced BCE (0: contrast only)"
    )


@register_method("maskcontrast", params=MaskContrastParams)
class MaskContrast(Method):
    """MaskContrast: query pixels (view 1, the trained network) against key-view mask prototypes of a
    momentum encoder (view 2), with a queue, plus a saliency head on the decoder features.

    The key encoder is an EMA copy of the network kept in train mode (batch statistics), as MoCo's:
    in eval mode its BN would use running statistics that lag far behind the query's (an EMA of an
    EMA) and put the keys on another scale."""

    loss_class = MaskContrastLoss
    prior_yields = "masks"
    default_prior = "saliency"

    def loss_kwargs(self) -> dict:
        model = self.cfg.model
        return {**self.params.model_dump(), "dim": model.embed_dim, "feature_dim": 2 * model.head_channels}

    def setup(self, net: nn.Module, loss: nn.Module, device: torch.device) -> None:
        super().setup(net, loss, device)
        self.key_encoder = copy.deepcopy(net).to(device).train()
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)

    def forward(self, model: nn.Module, views: Views, amp: bool = False) -> dict[str, torch.Tensor]:
        """View 1 through `model` (embedding and decoder features), view 2 through the key encoder, then
        the one-way loss."""
        B = views.seg1.shape[0]
        with torch.autocast(views.images.device.type, enabled=amp):
            emb1, feat1 = model(views.images[:B], return_features=True)
        emb1, feat1 = emb1.float(), feat1.float()
        size = tuple(emb1.shape[-2:])
        seg1, seg2 = resize_segments(views.seg1, size), resize_segments(views.seg2, size)
        extra = self.extra_inputs(views, amp)
        key2 = extra["key2"]
        return self.loss(emb1, key2, seg1, seg2, dist=views.dist, image_ids=views.image_ids, feat1=feat1, **extra)

    def extra_inputs(self, views: Views, amp: bool) -> dict[str, torch.Tensor]:
        """The key view's (view 2's) momentum-encoder embedding, `key2`."""
        B = views.seg2.shape[0]
        with torch.no_grad():
            return {"key2": self.embed(self.key_encoder, views.images[B:], amp)}

    @torch.no_grad()
    def after_step(self) -> None:
        m = float(self.params.momentum)
        for pk, pq in zip(self.key_encoder.state_dict().values(), self.net.state_dict().values()):
            if pk.dtype.is_floating_point:
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)
            else:
                pk.copy_(pq)

    def extra_state(self) -> dict[str, dict]:
        return {"key_encoder": self.key_encoder.state_dict()}

    def load_extra_state(self, states: dict[str, dict]) -> None:
        if "key_encoder" in states:
            self.key_encoder.load_state_dict(states["key_encoder"])
