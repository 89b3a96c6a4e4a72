"""A pretraining method as one unit, and the registry of methods.

A method is one module under distseg/methods/ holding everything that is specific to it:

- its parameters model (`Params`): the config section `losses.<name>`, contributed to the config;
- the prior it learns from (`prior_yields`: "regions" or "masks"; `default_prior`);
- its loss (`build_loss`) and, through `build_model`, the network (the hypercolumn net by default);
- its training step (`forward`: the two augmented views -> loss terms) and any per-step extras
  (`after_step`, e.g. MaskContrast's momentum encoder), with their state (`extra_state`), which the
  checkpoint saves beside model.pt.

The generic Ray Train loop (distseg.train.loop) names no method: it calls these hooks. Register a
method with `@register_method("name", params=MyParams)` on a `Method` subclass; a config selects it
with `pretrain.method: name`, and a user's own method in a file is loaded with `plugins: [my.py]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distseg.core.registry import Registry
from distseg.core.section import Section

if TYPE_CHECKING:
    from distseg.config import Config

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str, params: type[Section]):
    """Class decorator: register a `Method` subclass under `name` with its params model."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"method {name!r}: register a Method subclass, got {cls!r}")
        cls.name, cls.Params = name, params
        METHODS.register(name, cls, params=params)
        return cls

    return deco


def create_method(cfg: Config) -> Method:
    """The method `cfg.pretrain.method` names, set up with its section `cfg.losses.<name>`."""
    return METHODS.get(cfg.pretrain.method)(cfg)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """The loss of method `name`, built with the loss class's keyword arguments (tests, notebooks)."""
    return METHODS.get(name).loss_class(**kwargs)


@dataclass
class Views:
    """One training batch on the device: two augmented views of B images."""

    images: torch.Tensor  # (2B, 3, S, S) normalised: view 1 then view 2
    seg1: torch.Tensor  # (B, S, S) int64 segment ids (consistent across views), -1 = ignore
    seg2: torch.Tensor
    dist: torch.Tensor | None  # (B, K, K) tree distances d_T between leaf regions (ucm prior)
    image_ids: torch.Tensor | None = None  # (B,) int64: which image each row is (same id = same image)
    coord1: torch.Tensor | None = None  # (B, 2, S, S): each view pixel's source (y, x) in the stored image
    coord2: torch.Tensor | None = None


def world_size() -> int:
    """Ranks of the running torch.distributed group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of `tensors` (each (N_rank, ...), the same N_rank on one rank), concatenated in
    rank order on every rank: what a queue or memory bank enqueues under several workers, so each rank
    holds the same entries (MoCo's `concat_all_gather`, with rows that may differ in number per rank).
    Without a process group, or with one rank, the tensors come back as they are. Every rank must call
    it, with or without rows."""
    world = world_size()
    if world == 1:
        return tensors
    dist = torch.distributed
    n = torch.tensor([len(tensors[0])], device=tensors[0].device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    most = max(counts)
    out = []
    for t in tensors:
        padded = t.new_zeros((most, *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([part[:c] for part, c in zip(parts, counts)]))
    return tuple(out)


def resize_segments(seg: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Segment ids at the embedding resolution: each embedding cell takes the id at its centre (torch's
    `nearest-exact`, as the evaluation's `resize_nearest`). Plain `nearest` took each 4 x 4 cell's
    top-left pixel, a 1.5-px shift against the cell (fidelity audit B7)."""
    return F.interpolate(seg[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


class Method:
    """Base class: the two views through the network, then the method's loss (override what differs)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Section]] = Section
    loss_class: ClassVar[type[nn.Module]]
    prior_yields: ClassVar[str] = "regions"  # what the shard prior must hold: "regions" or "masks"
    default_prior: ClassVar[str] = "ucm"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.params = getattr(cfg.losses, self.name)
        self.net: nn.Module | None = None
        self.loss: nn.Module | None = None

    # -- construction ---------------------------------------------------------------------------
    def loss_kwargs(self) -> dict[str, Any]:
        return self.params.model_dump()

    def build_model(self) -> nn.Module:
        from distseg.models import create_model

        return create_model(self.cfg.model)

    def build_loss(self) -> nn.Module:
        return self.loss_class(**self.loss_kwargs())

    def setup(self, net: nn.Module, loss: nn.Module, device: torch.device) -> None:
        """Called once per worker after the network (unwrapped, on `device`) and the loss exist."""
        self.net, self.loss = net, loss

    # -- one step -------------------------------------------------------------------------------
    def embed(self, model: nn.Module, images: torch.Tensor, amp: bool) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=amp):
            return model(images).float()

    def forward(self, model: nn.Module, views: Views, amp: bool = False) -> dict[str, torch.Tensor]:
        """Loss terms for one batch ("loss" is the total to backpropagate)."""
        emb1, emb2 = self.embed(model, views.images, amp).chunk(2)
        size = tuple(emb1.shape[-2:])
        seg1, seg2 = resize_segments(views.seg1, size), resize_segments(views.seg2, size)
        extra = self.extra_inputs(views, amp)
        return self.loss(emb1, emb2, seg1, seg2, dist=views.dist, image_ids=views.image_ids, **extra)

    def extra_inputs(self, views: Views, amp: bool) -> dict[str, torch.Tensor]:
        """More keyword inputs of the loss (e.g. momentum-encoder keys). Every loss also gets `dist` and
        `image_ids` (rows with the same id are views or copies of one image: never each other's negatives)."""
        return {}

    def after_step(self) -> None:
        """After each optimizer step (e.g. a momentum-encoder update)."""

    # -- state beside model.pt, optimizer.pt and loss.pt ----------------------------------------
    def extra_state(self) -> dict[str, dict]:
        """Name -> state_dict of anything else a resume needs (saved as <name>.pt)."""
        return {}

    def load_extra_state(self, states: dict[str, dict]) -> None:
        """Restore what `extra_state` saved (a state missing from an older checkpoint is absent)."""
