"""Grouping: edge detectors -> region hierarchies -> priors (the supervision pretraining learns from).

Importing the package registers every edge detector. `gradient` and `sed` live in edges.py; the
`learned` detector's network lives in edgenet.py (torch), which is imported only when the detector is
built, so modules that need just the grouping types (distseg.shards) never load torch, higra or the
config. Import graph (no cycles): nms <- types <- edges <- edgenet; types <- hierarchy;
edges, hierarchy, types <- priors; edges <- this package, which imports edgenet lazily.
A new detector: a module with `@register_edge_detector(name, takes=(...))` imported here.
"""

from __future__ import annotations

from pathlib import Path

from distseg.grouping.edges import EdgeDetector, register_edge_detector


@register_edge_detector("learned", takes=("weights", "scales"))
def learned_edges(weights: str | Path | None = None, scales: tuple[float, ...] = (1.0,), **kwargs) -> EdgeDetector:
    """The EdgeNet distseg trains on BSDS500 (default: the shipped weights); see edgenet.LearnedEdges."""
    from distseg.grouping.edgenet import LearnedEdges  # torch loads here, not on import of the package

    return LearnedEdges(weights=weights, scales=scales, **kwargs)
