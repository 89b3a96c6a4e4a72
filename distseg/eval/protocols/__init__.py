"""Evaluation protocols that judge frozen pixel embeddings, all behind one evaluator interface.

Every protocol consumes precomputed :class:`FeatureSample` s (``features (D, h, w)`` from a frozen
network, a label map ``(H, W)`` usually at a higher resolution, and a ``train``/``eval`` split)
through ``reset()`` / ``process(sample)`` / ``evaluate() -> EvalResult``, as detectron2's
``DatasetEvaluator``; :func:`create_protocol` builds one by name from the registry :data:`PROTOCOLS`,
whose metadata (headline metric, params model, needs_train, stochastic, needs_concepts,
needs_video) tells `distseg evaluate` what to feed it (``base.py``). One module per protocol:

==============  ==================================================================================
``linear``      1x1 conv probe (or ``head="aspp"``) trained with cross-entropy on the train split
``kmeans``      spherical k-means of the eval pixels into C clusters, Hungarian matching (or
                ``overcluster=k`` with majority vote)
``knn``         SegSort: per-image k-means segments, each eval segment takes the majority label of
                its 15 nearest train segment prototypes
``retrieval``   Zhang & Maire, Table 2: per-image k-means into 10 regions, each eval region takes
                the label of its nearest train region
``purity``      concept purity: each eval pixel -> nearest concept of a given dictionary
``davis``       DAVIS-2016 J&F of propagating each video's first-frame mask with the features
==============  ==================================================================================

Resolution.  Metrics are always computed at **label resolution**.  The clustering protocols
(``kmeans``, ``knn``, ``retrieval``, ``purity``) assign clusters / segments / concepts at feature
resolution and upsample those index maps to the label size with nearest-neighbour
(:func:`resize_nearest`, pixel-centre aligned).  The linear probe is trained at feature resolution
against labels downsampled with the same nearest-neighbour rule (cheap: the cached train set stays
small), and at evaluation its logits are upsampled **bilinearly** to label resolution before the
argmax (for the 1x1 probe this equals classifying bilinearly upsampled features).

Feature vectors are L2-normalised (cosine geometry) by all protocols except ``linear``, which
centres them with the train split's mean and divides by one global train RMS scale instead.

Samples whose ``label`` is ``None`` are skipped (counted in ``num_skipped``), except that
``kmeans`` still clusters them (its fit needs no labels).

A new protocol: subclass :class:`Evaluator` in a module that registers it with
``@register_protocol(name, headline=..., params=...)`` (or ``PROTOCOLS.register``) and is imported
(here, or through a config's ``plugins``); `distseg evaluate --protocols name` then runs it.
"""

from distseg.eval.protocols.base import (
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
)
from distseg.eval.protocols.davis import DavisParams, DavisProtocol
from distseg.eval.protocols.kmeans import KMeansParams, KMeansProtocol
from distseg.eval.protocols.knn import KNNParams, KNNProtocol, RetrievalParams, RetrievalProtocol
from distseg.eval.protocols.linear import ASPPHead, LinearParams, LinearProbeProtocol
from distseg.eval.protocols.purity import PurityProtocol

__all__ = [
    "PROTOCOLS",
    "ASPPHead",
    "DavisParams",
    "DavisProtocol",
    "EvalResult",
    "Evaluator",
    "FeatureSample",
    "KMeansParams",
    "KMeansProtocol",
    "KNNParams",
    "KNNProtocol",
    "LinearParams",
    "LinearProbeProtocol",
    "NoParams",
    "ProtocolInfo",
    "PurityProtocol",
    "RetrievalParams",
    "RetrievalProtocol",
    "create_protocol",
    "protocol_info",
    "protocol_kwargs",
    "register_protocol",
    "resize_nearest",
]
