"""Pretraining methods, one module each, registered in `METHODS` (see distseg.methods.base).

    method = create_method(cfg)          # cfg.pretrain.method, with cfg.losses.<name>
    loss = create_loss("hiergroup")      # just the loss, by method name

Every module of this package is imported here, so a new method is one new file (plus its YAML).
"""

import importlib
import pkgutil

from distseg.methods.base import METHODS, Method, Views, create_loss, create_method, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")  # importing registers the method

__all__ = ["METHODS", "Method", "Views", "create_loss", "create_method", "register_method"]
