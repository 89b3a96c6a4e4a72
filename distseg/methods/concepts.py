"""Pixel embeddings grounded in visual concepts (He et al., IJCAI 2022; seed 001, Sec. 3 and 4.1).

Notation: z_p a pixel embedding (unit), z_s = normalise(mean of z_p over segment s) a segment (local
concept), e_0..e_{K-1} a learnable dictionary of global concepts (normalised), kappa a concentration,
sim the cosine similarity. Per pixel p (Eq. 5): L(p) = lambda_s L_s(p) + lambda_v L_v(p) + lambda_c L_c(p),
averaged over pixels.

- Eq. 1, L_s (pixel-to-segment): -log( sum_{s in S+} exp(kappa sim(z_p, z_s)) / sum_{s in S+ u S-} exp(...) ).
  S+ = the segment p belongs to, in both augmented views; S- = every other segment of the batch (both
  views, the other segments of p's own image included: "push pixels from either different pseudo
  segments or different images") and the memory bank.
- Eq. 2, assignment: a segment's concept is k = argmax_i sim(z_s, e_i) (current dictionary, no gradient).
- Eq. 3, L_v: (1 - sim(sg(z_s), e_k)) + beta (1 - sim(z_s, sg(e_k))): the first term moves the
  dictionary, the commitment term the embeddings. Eq. 5 writes it per pixel, L_v(p) = L_v of the segment
  containing p, so each segment's term is weighted by its pixel count (C6: per pixel, not per segment).
- Eq. 4, L_c (co-occurrence): the form of Eq. 1 with other sets. The pixel's concept k_p is the Eq. 2
  concept of the segment containing it; C+ = the segments (batch and bank) whose image contains a
  segment of concept k_p ("segments that co-occur with the pixel's concept in the same image"), C- = the
  rest. An image's concepts are those of all its segments in the batch and the bank (both views, and
  every row or bank entry with its image id). Two pixels of one image with different concepts thus
  have different positive sets.

Total = lambda_s L_s + lambda_v L_v + lambda_c L_c with the paper's settings (Sec. 4.1): kappa 10, D 32,
K 512, beta 0.5, lambdas 1 / 2 / 1, a memory bank of the previous 2 batches' segment embeddings (no
gradient). Under several workers the bank holds the global batches: each step's segments of every rank
are gathered (`base.gather_rows`) and each rank's bank is the same. The shipped concepts.yaml has the
paper's optimisation: 5k iterations, batch 8, lr 0.001 with poly decay.

Same image, never a negative: `image_ids` (B,) says which image each row is. A row with the id of the
pixel's row (the ingest drew the image twice) is another pair of augmented views of the same image:
its copy of the pixel's segment is a positive of L_s, its other segments are neither positives nor
negatives of L_s (only the pixel's own row supplies within-image negatives, as in the paper), and bank
entries of the same image are left out of L_s. The bank stores each entry's image id. In L_c every
segment of the pixel's own image is a positive by Eq. 4's definition. Without `image_ids` every row is
its own image, distinct from all bank entries (unique negative ids are drawn from a counter).

Diagnostics per step: `concepts_used`, the number of distinct concepts the batch's segments are
assigned to, and `concept_perplexity`, exp of the entropy of that assignment histogram (1 = every
segment on one concept: L_v and L_c then carry no signal).

Departures, each deliberate:
- Initialisation (C9): the paper starts from an ImageNet-pretrained dilated ResNet-50 PSPNet. Weights
  cannot be downloaded here, and the network is distseg's hypercolumn net: concepts.yaml starts from
  random init unless `model.weights` names a local ImageNet state dict, and concepts_msrc.yaml starts
  the whole network from the self-supervised hiergroup_msrc checkpoint (`model.init_from`), at the
  paper's lr 1e-3 poly. From random init the embeddings are nearly parallel, so Eq. 2 uses a handful
  of the K concepts (watch `concepts_used`).
- Segments per view (C2): the paper merges a segment's two views into one "to save time"; here each
  view keeps its entry, so S+ holds two terms, as Eq. 1 is written.
- Anchor pixels (C13): the paper uses every pixel; by default L_s and L_c here use `pixels_per_image`
  = 256 pixels per image and view drawn uniformly (an unbiased estimate of the same mean), because the
  logits are pixels x segments: at the paper's scale (batch 8, 56x56 embeddings, ~40 segments per
  image, a full bank) the loss's forward + backward measured 0.8-1.0 s CPU time and 1.0 GB peak RSS
  with 256, 15-20 s and 3.6 GB with every pixel (one thread, a loaded 2-core machine).
  concepts.yaml, the paper-scale (GPU) config, sets 0 = every pixel; the CPU-scale concepts_msrc keeps
  256. Segment embeddings and the L_v weights always use every valid pixel.
- Optimiser: the paper gives lr 0.001 and poly decay but not the optimiser; the configs use SGD with
  momentum 0.9 (distseg's `sgd`).
- Not in this module: the Gaussian blur of the SimCLR augmentations (C11: the ingest's
  `pretrain.blur`, 0.5 in concepts.yaml as SimCLR's; concepts_msrc, measured without it, keeps 0) and
  the HED-owt-ucm pseudo segments (C12: distseg's learned-edge UCM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distseg.core.section import Section
from distseg.losses import info_nce, random_subset, zero_loss
from distseg.methods.base import Method, gather_rows, register_method, world_size


def segment_embeddings(
    emb: torch.Tensor, seg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (row, segment id) present in `seg` (R, h, w): its normalised mean embedding (S, D), row (S,),
    segment id (S,) and pixel count (S,), sorted by (row, segment id)."""
    D = emb.shape[1]
    flat, s = emb.flatten(2).transpose(1, 2), seg.flatten(1)
    valid = s >= 0
    if not valid.any():
        empty = torch.zeros(0, dtype=torch.long, device=emb.device)
        return emb.new_zeros(0, D), empty, empty, empty
    row, ids = valid.nonzero()[:, 0], s[valid]
    n = int(ids.max()) + 1
    keys, inverse, counts = (row * n + ids).unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(len(keys), D, dtype=emb.dtype, device=emb.device).index_add(0, inverse, flat[valid])
    return F.normalize(sums, dim=1), keys // n, keys % n, counts


def vq_loss(segments: torch.Tensor, concepts: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """He et al. Eq. 3 per segment, with its Eq. 2 assignment k: (1 - sg[z_s].e_k) + beta (1 - z_s.sg[e_k]).

    `segments` (S, D) and `concepts` (K, D) are unit vectors. Returns the (S,) terms and k (S,).
    """
    with torch.no_grad():
        assign = (segments @ concepts.T).argmax(dim=1)
    e = concepts[assign]
    codebook = 1 - (segments.detach() * e).sum(dim=1)
    commitment = 1 - (segments * e.detach()).sum(dim=1)
    return codebook + beta * commitment, assign


def assignment_stats(assign: torch.Tensor, num_concepts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct concepts used, perplexity exp(H) of the assignment histogram); 0 and 0 when empty."""
    if len(assign) == 0:
        zero = torch.zeros((), device=assign.device)
        return zero, zero
    hist = torch.bincount(assign, minlength=num_concepts).float()
    p = hist[hist > 0] / hist.sum()
    return (hist > 0).sum().float(), torch.exp(-(p * p.log()).sum())


class ConceptsLoss(nn.Module):
    """He et al.'s L_s + L_v + L_c with a concept dictionary and a memory bank (module docstring)."""

    uses_key_encoder = False

    def __init__(
        self,
        kappa: float = 10.0,
        num_concepts: int = 512,
        dim: int = 32,
        beta: float = 0.5,
        lambda_s: float = 1.0,
        lambda_v: float = 2.0,
        lambda_c: float = 1.0,
        bank_batches: int = 2,
        pixels_per_image: int = 256,
        bank_capacity: int = 1024,
    ):
        super().__init__()
        if kappa <= 0 or num_concepts < 1 or dim < 1 or bank_batches < 0 or pixels_per_image < 0 or bank_capacity < 1:
            raise ValueError("kappa > 0, num_concepts, dim, bank_capacity >= 1, bank_batches, pixels_per_image >= 0")
        self.kappa, self.beta = kappa, beta
        self.lambda_s, self.lambda_v, self.lambda_c = lambda_s, lambda_v, lambda_c
        self.dim, self.bank_batches, self.pixels_per_image = dim, bank_batches, pixels_per_image
        self.dictionary = nn.Parameter(F.normalize(torch.randn(num_concepts, dim), dim=1))
        # bank slot j holds bank_count[j] segment embeddings of one past batch and their image ids;
        # bank_ptr is the oldest slot; rows_seen draws ids for batches that come without image ids
        self.register_buffer("bank", torch.zeros(bank_batches, bank_capacity, dim))
        self.register_buffer("bank_ids", torch.zeros(bank_batches, bank_capacity, dtype=torch.long))
        self.register_buffer("bank_count", torch.zeros(bank_batches, dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("rows_seen", torch.zeros((), dtype=torch.long))

    @property
    def concepts(self) -> torch.Tensor:
        """The global-concept dictionary, normalised: (num_concepts, dim)."""
        return F.normalize(self.dictionary, dim=1)

    def bank_segments(self) -> torch.Tensor:
        """The memory bank's segment embeddings, oldest batch first: (Q, dim)."""
        return self.bank_entries()[0]

    def bank_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory bank's segment embeddings (Q, dim) and their image ids (Q,), oldest batch first."""
        n, start = self.bank_batches, int(self.bank_ptr)
        slots = [(start + i) % n for i in range(n)]
        segments = [self.bank.new_zeros(0, self.dim)] + [self.bank[j, : int(self.bank_count[j])] for j in slots]
        ids = [self.bank_ids.new_zeros(0)] + [self.bank_ids[j, : int(self.bank_count[j])] for j in slots]
        return torch.cat(segments), torch.cat(ids)

    @torch.no_grad()
    def _push(self, segments: torch.Tensor, ids: torch.Tensor) -> None:
        """Store this step's segments, every rank's (gather_rows), as the newest bank slot: under several
        workers each rank's bank holds the same entries, those of the global batch. More than the slot's
        capacity are subsampled, with rank 0's draw on every rank."""
        if not self.training or self.bank_batches == 0:
            return
        segments, ids = gather_rows(segments.detach().to(self.bank.dtype), ids)
        if len(segments) == 0:
            return
        capacity = self.bank.shape[1]
        if len(segments) > capacity:
            keep = torch.randperm(len(segments), device=segments.device)[:capacity]
            if world_size() > 1:
                torch.distributed.broadcast(keep, src=0)
            segments, ids = segments[keep], ids[keep]
        j = int(self.bank_ptr)
        self.bank[j].zero_()
        self.bank[j, : len(segments)] = segments.detach().to(self.bank.dtype)
        self.bank_ids[j, : len(segments)] = ids
        self.bank_count[j] = len(segments)
        self.bank_ptr.fill_((j + 1) % self.bank_batches)

    def _row_ids(self, image_ids: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
        if image_ids is not None:
            return image_ids.to(device=device, dtype=torch.long)
        # no ids: each row its own image; negative ids from a counter never repeat (a real id is a
        # 64-bit hash: a clash has probability ~2^-64)
        ids = -(int(self.rows_seen) + 1 + torch.arange(B, device=device))
        if self.training:
            self.rows_seen += B
        return ids

    def _anchors(self, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, flat pixel index) of the anchor pixels: `pixels_per_image` valid pixels per row, or all."""
        valid = seg.flatten(1) >= 0
        if self.pixels_per_image == 0:
            rows, idx = valid.nonzero(as_tuple=True)
            return rows, idx
        idx, ok = random_subset(valid, self.pixels_per_image)
        rows = torch.arange(len(valid), device=seg.device)[:, None].expand_as(idx)
        return rows[ok], idx[ok]

    def forward(
        self,
        emb1: torch.Tensor,
        emb2: torch.Tensor,
        seg1: torch.Tensor,
        seg2: torch.Tensor,
        *,
        dist: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        **unused: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if emb1.shape[1] != self.dim:
            raise ValueError(f"embedding dimension {emb1.shape[1]} != the concept dictionary's {self.dim}")
        B = emb1.shape[0]
        ids = self._row_ids(image_ids, B, emb1.device)
        # both views as 2B rows: row r is image r % B
        emb, seg = torch.cat([emb1, emb2]), torch.cat([seg1, seg2])
        seg_emb, seg_row, seg_id, seg_count = segment_embeddings(emb, seg)
        bank, bank_key = self.bank_entries()
        bank = bank.to(emb.dtype)
        concepts = self.concepts
        if len(seg_emb) == 0:
            self._push(seg_emb, ids.new_zeros(0))  # the other ranks' segments still reach this rank's bank
            zero = zero_loss(emb1, emb2, self.dictionary)
            terms = ("loss_s", "loss_v", "loss_c", "concepts_used", "concept_perplexity")
            return {"loss": zero, **{t: zero.detach() for t in terms}}
        seg_img = seg_row % B
        seg_key = ids[seg_img]

        # anchors: pixel embedding, image row, image id, index of the segment holding it
        a_row, a_idx = self._anchors(seg)
        z = emb.flatten(2).transpose(1, 2)[a_row, a_idx]
        a_id = seg.flatten(1)[a_row, a_idx]
        lookup = torch.full((2 * B, int(seg_id.max()) + 1), -1, dtype=torch.long, device=emb.device)
        lookup[seg_row, seg_id] = torch.arange(len(seg_emb), device=emb.device)
        a_seg = lookup[a_row, a_id]
        a_img = a_row % B
        a_key = ids[a_img]
        logits = self.kappa * z @ torch.cat([seg_emb, bank]).T  # (M, S + Q)

        # Eq. 1: S+ = the pixel's segment in every view of its image (both views; a copy's views too)
        with torch.no_grad():
            same_image = a_key[:, None] == seg_key[None, :]
            pos_s = same_image & (a_id[:, None] == seg_id[None, :])
            copy_other = same_image & ~pos_s & (a_img[:, None] != seg_img[None, :])  # a copy's other segments
            bank_same = a_key[:, None] == bank_key[None, :]
            pos_s = torch.cat([pos_s, torch.zeros_like(bank_same)], dim=1)
            neg_s = ~pos_s & ~torch.cat([copy_other, bank_same], dim=1)
        per_pixel_s = info_nce(logits, pos_s, neg_s)

        # Eqs. 2-3: each segment's concept; L_v per pixel = each segment's term weighted by its pixel count
        per_segment, assign = vq_loss(seg_emb, concepts, self.beta)
        weights = seg_count.to(per_segment.dtype)
        loss_v = (per_segment * weights).sum() / weights.sum()

        # Eq. 4: C+ = segments whose image holds a segment of the pixel's own concept k_p
        with torch.no_grad():
            bank_assign = (bank @ concepts.T).argmax(dim=1) if len(bank) else assign.new_zeros(0)
            keys, image_of = torch.cat([seg_key, bank_key]).unique(return_inverse=True)
            contains = torch.zeros(len(keys), len(concepts), dtype=torch.bool, device=emb.device)
            contains[image_of, torch.cat([assign, bank_assign])] = True
            k_p = assign[a_seg]
            pos_c = contains.T[k_p][:, image_of]  # (M, S + Q): does candidate's image hold k_p
        per_pixel_c = info_nce(logits, pos_c)

        zero = emb1.new_zeros(())
        loss_s = per_pixel_s.mean() if len(per_pixel_s) else zero
        loss_c = per_pixel_c.mean() if len(per_pixel_c) else zero
        used, perplexity = assignment_stats(assign, len(concepts))
        self._push(seg_emb, seg_key)
        loss = self.lambda_s * loss_s + self.lambda_v * loss_v + self.lambda_c * loss_c
        return {
            "loss": loss,
            "loss_s": loss_s.detach(),
            "loss_v": loss_v.detach(),
            "loss_c": loss_c.detach(),
            "concepts_used": used,
            "concept_perplexity": perplexity,
        }


class ConceptsParams(Section):
    """`losses.concepts`: He et al.'s L_s, L_v, L_c and the memory bank (Sec. 4.1 settings)."""

    kappa: float = Field(10.0, gt=0, description="concentration kappa of the contrasts L_s and L_c")
    num_concepts: int = Field(512, ge=2, description="concept dictionary size K")
    beta: float = Field(0.5, ge=0, description="VQ commitment weight")
    lambda_s: float = Field(1.0, ge=0, description="weight of L_s")
    lambda_v: float = Field(2.0, ge=0, description="weight of L_v")
    lambda_c: float = Field(1.0, ge=0, description="weight of L_c")
    bank_batches: int = Field(2, ge=0, description="memory bank: segment embeddings of this many past batches")
    pixels_per_image: int = Field(
        256, ge=0, description="anchor pixels of L_s / L_c per image and view (0: every pixel, as the paper)"
    )


@register_method("concepts", params=ConceptsParams)
class Concepts(Method):
    """He et al.: pixel-to-segment contrast plus a VQ concept dictionary (a loss parameter)."""

    loss_class = ConceptsLoss
    prior_yields = "regions"
    default_prior = "ucm"

    def loss_kwargs(self) -> dict:
        return {**self.params.model_dump(), "dim": self.cfg.model.embed_dim}
