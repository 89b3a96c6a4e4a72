"""`make demo`'s command, `distseg demo`, end to end through the installed console script (a real local
Ray cluster, real shards, a real sqlite MLflow), shrunk to a few steps; then a second run that resumes
the finished pretraining and re-evaluates it, as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_reproducible import TINY  # tests/ is on sys.path, as for data_layouts


@pytest.mark.slow
def test_distseg_demo_runs_end_to_end_and_a_second_run_resumes(tmp_path):
    distseg = Path(sys.executable).parent / "distseg"
    command = [str(distseg), "demo", f"workdir={tmp_path / 'demo'}", *TINY, "evaluate.baselines=[random,rgbxy]"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    for line in ("generated 12 synthetic scenes", "dataset_kmeans: miou checkpoint", "open the MLflow UI: "):
        assert line in out, f"no {line!r} in the demo's output:\n{out[-3000:]}"
    assert "Traceback" not in first.stderr
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert set(summary["scores"]) == {"checkpoint", "random", "rgbxy"}
    for source, scores in summary["scores"].items():
        assert 0 <= scores["dataset_kmeans/miou"]["mean"] <= 1, source
    assert Path(summary["checkpoint"], "model.pt").is_file()
    assert (tmp_path / "demo" / "eval" / "metrics.json").is_file()
    assert (tmp_path / "demo" / "mlflow.db").is_file()

    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run" in second.stdout + second.stderr
    again = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    # the same checkpoint re-evaluated: deterministic evaluation, the same numbers
    assert again["scores"]["checkpoint"] == summary["scores"]["checkpoint"]
