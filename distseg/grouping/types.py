"""The values grouping produces: edge maps, object masks and a prior's output (a leaf module).

Nothing here imports the rest of distseg beyond the leaf `grouping.nms`, so the shard contract
(distseg.shards), the edge detectors, the hierarchy and the priors can all share these types
without pulling in each other (or higra, torch, or the config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distseg.grouping.nms import non_maximum_suppression


@dataclass
class EdgeMap:
    strength: np.ndarray  # H x W float32 in [0, 1]
    orientation: np.ndarray  # H x W float32 radians in [0, pi): direction of the gradient (the edge normal)

    def thinned(self, radius: int = 1) -> np.ndarray:
        return non_maximum_suppression(self.strength, self.orientation, radius)


@dataclass
class Mask:
    mask: np.ndarray  # H x W bool
    score: float
    label: int = 1


@dataclass
class PriorOutput:
    regions: np.ndarray | None = None  # H x W uint8 ids 0..K-1
    region_dist: np.ndarray | None = None  # K x K float32 (ucm only)
    ucm: np.ndarray | None = None  # H x W float32 in [0, 1] (ucm only)
    masks: list[Mask] = field(default_factory=list)
