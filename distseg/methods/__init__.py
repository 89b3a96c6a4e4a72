"""Pretraining methods, one module each, registered in `METHODS` (see distseg.methods.base).

method = create_method(cfg)          # cfg.pretrain.method, with cfg.losses.<name>
loss = create_loss("hiergroup")      # just the loss, by method name
"""

from distseg.methods import concepts, hiergroup, maskcontrast  # noqa: F401  (importing registers them)
from distseg.methods.base import METHODS, Method, Views, create_loss, create_method, register_method

__all__ = ["METHODS", "Method", "Views", "create_loss", "create_method", "register_method"]
