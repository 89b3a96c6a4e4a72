"""ViT backbones: a timm Vision Transformer giving dense patch tokens to the embedding network.

`vit_tiny` (timm `vit_tiny_patch16_224`) and `vit_small` (`vit_small_patch16_224`, the ViT-S/16 that
MaskDistill reads its affinities from). The patch tokens of the last block are the stride-16 map
(Res4); the tokens of the middle block, upsampled 2x, stand in for the stride-8 map (Res3), so the
hypercolumn head is unchanged. Any input size works (`dynamic_img_size`; sides are padded up to a
multiple of the patch size). The transformer itself is `backbone.vit`: `distseg.distill` hooks its
last attention block to read the [CLS]-to-patch and patch-to-patch affinities, so a ViT pretrained
by `distseg pretrain` (hiergroup) can serve as MaskDistill's affinity source.

Departure from a plain ViT feature pyramid: the stride-8 map is an upsampled token map (a ViT has no
stride-8 stage); no extra layers are added, so a checkpoint's `backbone.vit.*` weights are exactly
a timm ViT's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from distseg.models.backbones import Backbone, register_backbone

VIT_MODELS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}


def create_vit(model_name: str, weights: str | Path | None = None):
    """A timm ViT (no classifier head, any input size), weights ONLY from a local file; never the hub."""
    import timm

    vit = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
    if weights is not None:
        load_vit_weights(vit, weights)
    return vit


def load_vit_weights(vit: torch.nn.Module, weights: str | Path) -> None:
    """Load a state dict (e.g. DINO's `dino_deitsmall16_pretrain.pth`) into `vit`; the head is ignored.

    Position embeddings of another grid size are resampled (timm's checkpoint filter)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"ViT weights file not found: {path} (give a local state-dict file; nothing is downloaded)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, vit)
    try:
        missing, _ = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:300])
        raise ValueError(f"ViT weights {path} do not fit {vit.default_cfg.get('architecture')}: {detail}") from None
    trunk = [k for k in missing if not k.startswith("head")]
    if trunk:
        raise ValueError(f"ViT weights {path}: {len(trunk)} tensors missing, e.g. {trunk[:3]} (another architecture?)")


class ViTBackbone(Backbone):
    """(res3, res4) = (middle-block tokens upsampled 2x, last-block tokens), both with the ViT's width."""

    def __init__(self, vit: torch.nn.Module):
        width = int(vit.embed_dim)
        super().__init__(vit, (width, width))
        self.mid = len(vit.blocks) // 2 - 1

    @property
    def vit(self) -> torch.nn.Module:
        return self.body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid, last = self.body.forward_intermediates(
            x, indices=[self.mid, len(self.body.blocks) - 1], output_fmt="NCHW", intermediates_only=True
        )
        return F.interpolate(mid, scale_factor=2, mode="bilinear", align_corners=False), last


for _name, _timm_name in VIT_MODELS.items():
    register_backbone(_name, vit=_timm_name)(lambda weights=None, _t=_timm_name: ViTBackbone(create_vit(_t, weights)))
