"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTSEG_DATA_ROOT", REPO.parent / "shared" / "data"))

# Pretrained-weight hubs are unreachable here; without this every pretrained=True call hangs ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def require_data(name: str) -> Path:
    """The path of ../shared/data/<name>, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def bsds_root() -> Path:
    return require_data("bsds500")


@pytest.fixture(scope="session")
def msrc_root() -> Path:
    return require_data("msrc_v2")


@pytest.fixture(scope="session")
def davis_root() -> Path:
    return require_data("davis2016")


def msrc_sample(folder: Path, count: int) -> Path:
    """The first `count` MSRC-v2 images copied into `folder`/images (skips when MSRC is absent)."""
    import shutil

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for path in sorted((require_data("msrc_v2") / "images").glob("*.png"))[:count]:
        shutil.copy(path, images / path.name)
    return images
