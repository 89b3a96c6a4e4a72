"""Evaluation protocols that judge frozen pixel embeddings, all behind one evaluator interface.

Every protocol consumes precomputed :class:`FeatureSample` s (``features (D, h, w)`` from a frozen
network, a label map ``(H, W)`` usually at a higher resolution, and a ``train``/``eval`` split)
through ``reset()`` / ``process(sample)`` / ``evaluate() -> EvalResult``, as detectron2's
``DatasetEvaluator``; :func:`create_protocol` builds one by name from the registry :data:`PROTOCOLS`,
whose metadata (headline metric, params model, needs_train, stochastic, needs_concepts,
needs_saliency, needs_video) tells `distseg evaluate` what to feed it (``base.py``). One module per protocol:

==================  ==============================================================================
``linear``          1x1 conv probe (or ``head="aspp"``) trained with cross-entropy on the train split;
                    He et al.'s linear classification with our training recipe (``head="aspp"``: a
                    DeepLab-v2-style stand-in; Zhang & Maire's own head is ``deeplab``)
``deeplab``         Zhang & Maire's transfer: torchvision's DeepLab-v3 ASPP head trained with their SGD
                    recipe (20k iterations, batch 20, 384-px crops = 96 feature cells, lr 0.03)
``dataset_kmeans``  spherical k-means of all eval pixels into C clusters, Hungarian matching (or
                    ``overcluster=k`` with majority vote); no paper's protocol (formerly ``kmeans``,
                    still accepted as an alias in configs)
``object_kmeans``   MaskContrast's k-means: one saliency-weighted prototype per image (the masks from a
                    maskcontrast checkpoint's saliency head), PCA-whitened, MiniBatchKMeans into C - 1
                    clusters painted on the masks, Hungarian on IoU
``knn``             He et al.'s "k-means" = SegSort: per-image k-means into 25 segments (50
                    iterations), each eval segment takes the majority label of its 15 nearest train
                    segment prototypes
``retrieval``       Zhang & Maire, Table 2: per-image k-means into K = 15 regions, each eval region
                    takes the label of its nearest train region
``purity``          concept purity (after He et al.'s measure, per pixel instead of per segment): each
                    eval pixel -> nearest concept of the checkpoint's dictionary
``segment_purity``  He et al.'s concept purity: per-image k-means segments -> nearest concept, connected
                    same-concept segments merged, per-concept share of segments in the majority class
``davis``           J&F of propagating each video's first-frame mask with the features, DINO / CRW
                    propagation (no paper of ours), on DAVIS-2016 (single object)
``davis_zm``        the same with Zhang & Maire's propagation (2 previous frames, 10 nearest
                    neighbours, raw similarity weights, features augmented with xy); DAVIS-2016 too,
                    where they report DAVIS-2017
``position``        diagnostic, run for every source by default (``evaluate.diagnostics``): R^2 of a
                    linear read-out of pixel position, and the same-position cosine gap across images
==================  ==============================================================================

Each protocol's module docstring says which paper's protocol it is and where it departs from it.

Resolution.  Metrics are always computed at **label resolution**.  The clustering protocols
(``dataset_kmeans``, ``object_kmeans``, ``knn``, ``retrieval``, ``purity``, ``segment_purity``) assign clusters /
segments / concepts at feature resolution and upsample those index maps to the label size with
nearest-neighbour (:func:`resize_nearest`, pixel-centre aligned).  The linear probe is trained at
feature resolution against labels downsampled with the same nearest-neighbour rule (cheap: the cached
train set stays small), and at evaluation its logits are upsampled **bilinearly** to label resolution
before the argmax (for the 1x1 probe this equals classifying bilinearly upsampled features).

Feature vectors are L2-normalised (cosine geometry) by all protocols except ``linear``, which
centres them with the train split's mean and divides by one global train RMS scale instead.

Samples whose ``label`` is ``None`` are skipped (counted in ``num_skipped``), except that
``dataset_kmeans`` still clusters them (its fit needs no labels) and ``position`` never reads labels.

A new protocol: subclass :class:`Evaluator` in a module that registers it with
``@register_protocol(name, headline=..., params=...)`` (or ``PROTOCOLS.register``) and is imported
(here, or through a config's ``plugins``); `distseg evaluate --protocols name` then runs it.
"""

from distseg.eval.protocols.base import (
    PROTOCOL_ALIASES,
    PROTOCOLS,
    EvalResult,
    Evaluator,
    FeatureSample,
    NoParams,
    ProtocolInfo,
    create_protocol,
    protocol_info,
    protocol_kwargs,
    register_protocol,
    resize_nearest,
    resolve_protocol_name,
)
from distseg.eval.protocols.davis import DavisParams, DavisProtocol, DavisZMParams, DavisZMProtocol
from distseg.eval.protocols.deeplab import DeepLabParams, DeepLabProtocol
from distseg.eval.protocols.kmeans import DatasetKMeansProtocol, KMeansParams
from distseg.eval.protocols.knn import KNNParams, KNNProtocol, RetrievalParams, RetrievalProtocol
from distseg.eval.protocols.linear import ASPPHead, LinearParams, LinearProbeProtocol
from distseg.eval.protocols.object_kmeans import ObjectKMeansParams, ObjectKMeansProtocol
from distseg.eval.protocols.position import PositionParams, PositionProtocol
from distseg.eval.protocols.purity import PurityProtocol, SegmentPurityParams, SegmentPurityProtocol

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_ALIASES",
    "ASPPHead",
    "DavisParams",
    "DavisProtocol",
    "DavisZMParams",
    "DavisZMProtocol",
    "DatasetKMeansProtocol",
    "DeepLabParams",
    "DeepLabProtocol",
    "EvalResult",
    "Evaluator",
    "FeatureSample",
    "KMeansParams",
    "KNNParams",
    "KNNProtocol",
    "LinearParams",
    "LinearProbeProtocol",
    "NoParams",
    "ObjectKMeansParams",
    "ObjectKMeansProtocol",
    "PositionParams",
    "PositionProtocol",
    "ProtocolInfo",
    "PurityProtocol",
    "RetrievalParams",
    "RetrievalProtocol",
    "SegmentPurityParams",
    "SegmentPurityProtocol",
    "create_protocol",
    "protocol_info",
    "protocol_kwargs",
    "register_protocol",
    "resize_nearest",
    "resolve_protocol_name",
]
