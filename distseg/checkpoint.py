"""The checkpoint contract (docs/DESIGN.md), in one place for every stage that saves or reads one.

A checkpoint is a folder:

- `model.pt`: the network's plain state_dict (`torch.load(..., weights_only=True)` loads it);
- one `<name>.pt` per other piece of training state (`optimizer.pt`, `loss.pt`, `key_encoder.pt`, ...);
- `config.yaml`: the resolved config that trained it;
- `meta.json`: step, epoch, metrics at that step, git sha, config hash, MLflow run id, wall time.

    save_checkpoint(folder, cfg=cfg, step=100, metrics={...}, model=net.state_dict(), optimizer=opt.state_dict())
    meta = restore_checkpoint(folder, model=net, optimizer=opt)   # load_state_dict on each object
    model, cfg = load_embedding_model(folder)                     # evaluation: the network in eval mode
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distseg.config import load_config, to_yaml

if TYPE_CHECKING:
    from distseg.config import Config

META = "meta.json"
CONFIG = "config.yaml"
MODEL = "model.pt"


class CheckpointMismatch(RuntimeError):
    """A checkpoint does not fit the network, loss or optimizer it is restored into."""


def git_sha() -> str | None:
    """$DISTSEG_GIT_SHA (e.g. set by a job that ships no .git), else the checkout's HEAD, else None."""
    if os.environ.get("DISTSEG_GIT_SHA"):
        return os.environ["DISTSEG_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def config_hash_of(cfg: Config) -> str:
    from distseg.shards import config_hash

    return config_hash(cfg.model_dump(mode="json"))


def save_checkpoint(
    folder: str | Path,
    *,
    cfg: Config,
    step: int,
    metrics: dict | None = None,
    epoch: int | None = None,
    run_id: str | None = None,
    sha: str | None = None,
    **states: dict | None,
) -> Path:
    """Write each state_dict in `states` as `<name>.pt` (None is skipped), config.yaml and meta.json
    (`sha`: the code version, default this checkout's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        if state is not None:
            torch.save(state, folder / f"{name}.pt")
    (folder / CONFIG).write_text(to_yaml(cfg))
    meta = {
        "step": step,
        "epoch": epoch,
        "metrics": metrics or {},
        "git_sha": sha or git_sha(),
        "config_hash": config_hash_of(cfg),
        "mlflow_run_id": run_id,
        "time": time.time(),
    }
    (folder / META).write_text(json.dumps(meta, indent=2))
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META
    return json.loads(path.read_text()) if path.is_file() else {}


def load_state(folder: str | Path, name: str, device: str | torch.device = "cpu") -> dict | None:
    """The state_dict saved as `<name>.pt`, or None when the checkpoint has none."""
    path = Path(folder) / f"{name}.pt"
    return torch.load(path, map_location=device, weights_only=True) if path.is_file() else None


def restore_checkpoint(
    folder: str | Path,
    device: str | torch.device = "cpu",
    optional: tuple[str, ...] = (),
    what: str = "",
    **objects: Any,
) -> dict[str, Any]:
    """`load_state_dict` each object from its `<name>.pt`; returns meta.json's dict.

    Names in `optional` may be absent (an older checkpoint). Anything that does not fit raises
    `CheckpointMismatch` naming the folder and the first line of torch's complaint."""
    folder = Path(folder)
    try:
        for name, obj in objects.items():
            state = load_state(folder, name, device)
            if state is None:
                if name in optional:
                    continue
                raise KeyError(f"{name}.pt is missing")
            obj.load_state_dict(state)
            if isinstance(obj, torch.optim.Optimizer) and obj.param_groups:
                # torch loads another optimizer's state without complaint (Adam's into SGD), and the first
                # step fails on a missing hyperparameter; keys a newer torch adds are filled in by the load
                missing = sorted(set(obj.defaults) - set(obj.param_groups[0]))
                if missing:
                    raise ValueError(
                        f"the optimizer state has no {', '.join(missing)}: it was saved by another optimizer "
                        f"than {type(obj).__name__}"
                    )
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip("'\"").splitlines()[0]
        raise CheckpointMismatch(f"{what or 'checkpoint'} {folder}: {first}") from None
    return read_meta(folder)


def export_checkpoint(source: str | Path, target: str | Path, exclude: tuple[str, ...] = ("optimizer.pt",)) -> Path:
    """Copy a checkpoint folder (all but `exclude`: what evaluation needs) to `target`, replacing it.

    The copy is written beside `target` and renamed into place, so a crash or a full disk mid-copy leaves
    the previous export (or none), never a folder with meta.json and no model.pt."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial, old = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")
    for leftover in (partial, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    partial.mkdir()
    for path in Path(source).iterdir():
        if path.name not in exclude:
            shutil.copy2(path, partial / path.name)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def load_embedding_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """(model in eval mode, its Config) from a checkpoint directory (model.pt + config.yaml)."""
    from distseg.models import create_model

    folder = Path(checkpoint)
    for name in (MODEL, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"checkpoint {folder}: {name} is missing (expected model.pt, config.yaml, meta.json)"
            )
    cfg = load_config(folder / CONFIG)
    model_cfg = cfg.model.model_copy(update={"weights": None, "init_from": None})  # the checkpoint holds every weight
    model = create_model(model_cfg)
    model.load_state_dict(torch.load(folder / MODEL, map_location="cpu", weights_only=True))
    return model.to(device).eval(), cfg
