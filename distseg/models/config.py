"""The model's config section (`model.*`): defined beside the model, assembled by distseg.config."""

from __future__ import annotations

from pydantic import Field

from distseg.core.section import Section


class ModelConfig(Section):
    """The hypercolumn embedding network (Zhang & Maire): backbone Res3 + Res4 -> D-dim unit vectors."""

    backbone: str = Field(
        "resnet18", description="resnet18 | resnet34 | resnet50 | resnet101 | vit_tiny | vit_small | timm:<model name>"
    )
    embed_dim: int = Field(32, ge=2, description="embedding dimension D")
    head_channels: int = Field(256, ge=8, description="channels of each Res3/Res4 projection")
    weights: str | None = Field(None, description="backbone init: a local state-dict file (default: random init)")
    init_from: str | None = Field(
        None, description="whole-network init: a distseg checkpoint folder (or its model.pt) of the same architecture"
    )
    padding: str = Field(
        "zeros",
        pattern="^(zeros|reflect|replicate)$",
        description="padding of every convolution: zeros (the papers' networks) | reflect | replicate "
        "(no zero border to read absolute position from; same weights, so checkpoints load either way)",
    )
