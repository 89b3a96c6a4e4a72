"""Models: backbones by name and the hypercolumn pixel-embedding network.

model = create_model(ModelConfig(backbone="resnet18", embed_dim=32))
emb = model(images)  # (B, D, H/4, W/4), L2-normalised along D

The names below load on first use (PEP 562): `distseg.models.config` (the `model.*` section every config
holds) imports no torch, so a process that only reads configs (the CLI's parsing, Ray's Train controller,
the ingest's coordinators, the mining monitor) does not pay torch's import. Any name loads them all, the
ViT backbones' registration included.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BACKBONES": "backbones",
    "Backbone": "backbones",
    "create_backbone": "backbones",
    "register_backbone": "backbones",
    "ModelConfig": "config",
    "HypercolumnNet": "hypercolumn",
    "create_model": "hypercolumn",
    "load_network_weights": "hypercolumn",
    "VIT_MODELS": "vit",
    "ViTBackbone": "vit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distseg.models' has no attribute {name!r}")
    for module in dict.fromkeys(_EXPORTS.values()):  # every backbone registered, whichever name came first
        loaded = importlib.import_module(f"distseg.models.{module}")
        globals().update({k: getattr(loaded, k) for k, m in _EXPORTS.items() if m == module})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
