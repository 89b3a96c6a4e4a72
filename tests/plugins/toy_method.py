"""A toy pretraining method in one module, loaded as a plugin (`plugins: [toy_method.py]` in toy.yaml).

It exists to prove that a method is one unit: its params, its loss and its Method subclass live here,
and `distseg pretrain` trains it without any other file of distseg knowing its name. The loss pulls
the two views' mean embeddings of each segment together (cosine), a minimal grouping objective.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distseg.core.section import Section
from distseg.methods import Method, register_method


class ToyParams(Section):
    weight: float = Field(1.0, gt=0, description="scale of the loss")


class ToyLoss(nn.Module):
    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, emb1, emb2, seg1, seg2, dist=None, **_) -> dict[str, torch.Tensor]:
        m1, m2 = emb1.mean(dim=(2, 3)), emb2.mean(dim=(2, 3))
        agreement = torch.nn.functional.cosine_similarity(m1, m2, dim=1).mean()
        loss = self.weight * (1 - agreement)
        return {"loss": loss, "toy_agreement": agreement.detach()}


@register_method("toy", params=ToyParams)
class Toy(Method):
    loss_class = ToyLoss
    prior_yields = "regions"
    default_prior = "ucm"
