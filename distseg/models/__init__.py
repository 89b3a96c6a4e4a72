"""Models: backbones by name and the hypercolumn pixel-embedding network.

model = create_model(ModelConfig(backbone="resnet18", embed_dim=32))
emb = model(images)  # (B, D, H/4, W/4), L2-normalised along D
"""

from distseg.models.backbones import BACKBONES, Backbone, create_backbone, register_backbone
from distseg.models.config import ModelConfig
from distseg.models.hypercolumn import HypercolumnNet, create_model, load_network_weights
from distseg.models.vit import VIT_MODELS, ViTBackbone  # registers the ViT backbones

__all__ = [
    "BACKBONES",
    "Backbone",
    "HypercolumnNet",
    "create_backbone",
    "create_model",
    "ModelConfig",
    "load_network_weights",
    "register_backbone",
    "VIT_MODELS",
    "ViTBackbone",
]
