"""Which processes load torch: configs, the CLI's parsing, mining's driver and the ingest's functions do not.

Ray's Train controller and Ray Data's coordinators unpickle the ingest's functions (and every process reads
configs); with torch and torchvision loaded at import each of them paid about 6 s of CPU and 640 MB resident, and a
4-step, 16-image pretrain used 151 CPU-seconds in all instead of 127 (measured with the processes' own
/proc counters). A fresh interpreter, so what other tests imported does not count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT = ["distseg.config", "distseg.cli", "distseg.mining", "distseg.train.ingest", "distseg.train.idle"]


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter (what other tests imported does not count); it must succeed."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.mark.parametrize("module", LIGHT)
def test_module_imports_without_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = fresh_python(code)
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"


def test_models_names_load_on_first_use_with_every_backbone_registered():
    code = (
        "import sys, distseg.models as m\n"
        "assert 'torch' not in sys.modules\n"
        "from distseg.models import create_model, ModelConfig\n"
        "assert 'torch' in sys.modules and 'vit_small' in m.BACKBONES\n"
        "print(type(create_model(ModelConfig(backbone='resnet18', embed_dim=4, head_channels=8))).__name__)\n"
        "try:\n"
        "    m.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    out = fresh_python(code)
    assert out.stdout.splitlines() == ["HypercolumnNet", "module 'distseg.models' has no attribute 'no_such_name'"]


def test_a_fresh_process_validates_every_backbone_name():
    """As in a mining actor, which builds its config from a dict before anything imports the ViT module (the
    slow MaskDistill tests failed there with "unknown name 'vit_tiny'" when the registry came from
    distseg.models.backbones alone)."""
    code = (
        "from distseg.config import ConfigError, load_config\n"
        "print(load_config('demo', ['model.backbone=vit_tiny']).model.backbone)\n"
        "try:\n"
        "    load_config('demo', ['model.backbone=vit_huge_typo'])\n"
        "except ConfigError as e:\n"
        "    print('vit_tiny' in str(e), 'resnet18' in str(e))\n"
    )
    out = fresh_python(code)
    assert out.stdout.splitlines() == ["vit_tiny", "True True"]
