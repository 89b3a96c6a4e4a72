"""The benchmark jobs (jobs/benchmark_*.py) run end to end at toy size and print their tables.

They are how distseg's speed and quality claims are measured (README, Results), so a job that stops
running is a broken claim. Each runs as a user runs it (a subprocess, from a scratch working folder)
on real data: BSDS500 from ../shared (skipped when absent) or the built-in synthetic scenes. Slow (Ray,
real mining and training): `make test-slow`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def run_job(name: str, args: list[str], cwd: Path, timeout: int = 900) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def numbers(line: str) -> list[float]:
    return [float(v) for v in re.findall(r"(?<![\w.])\d+\.\d+", line)]


def test_benchmark_grouping_scores_local_and_spectral_edges(bsds_root, tmp_path):
    out = run_job(
        "benchmark_grouping.py",
        [
            "--data",
            str(bsds_root),
            "--detectors",
            "gradient",
            "--spectral",
            "0,0.5",
            "--limit",
            "2",
            "--thresholds",
            "5",
            "--out",
            str(tmp_path / "out"),
        ],
        tmp_path,
    )
    rows = {line[:38].strip(): numbers(line[38:]) for line in out.splitlines() if "gradient" in line or "gPb" in line}
    assert {"gradient edges", "gradient + UCM", "gradient + sPb 0.5 edges", "gradient + sPb 0.5 + UCM"} <= set(rows)
    for name in ("gradient + UCM", "gradient + sPb 0.5 + UCM"):
        ods, ois, ap, cover, edge_s, ucm_s = rows[name]
        assert 0.2 < ods <= 1 and 0.2 < ois <= 1 and 0 < ap <= 1 and 0 < cover <= 1 and edge_s > 0 and ucm_s > 0
    assert rows["gPb-owt-ucm (official)"][:4] == [0.726, 0.760, 0.727, 0.588]  # the shared official files
    assert len(json.loads((tmp_path / "out" / "table.json").read_text())) == 5


def test_benchmark_mining_times_real_mining_runs(bsds_root, tmp_path):
    out = run_job(
        "benchmark_mining.py",
        ["--data", str(bsds_root), "--limit", "3", "--workers", "1", "--no-mlflow", "--out", str(tmp_path / "out")],
        tmp_path,
    )
    speed = next(line for line in out.splitlines() if "images/s," in line)
    images_per_s, s_per_image_core = numbers(speed)
    assert images_per_s > 0 and s_per_image_core > 0
    result = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert result["images"] == 3 and len(result["runs"]) == 1


def test_benchmark_training_then_device_on_the_shards_it_mined(tmp_path):
    out = run_job(
        "benchmark_training.py",
        [
            "--config",
            "demo",
            "--steps",
            "12",
            "--workers",
            "1",
            "--out",
            str(tmp_path / "training"),
            "data.num_images=8",
            "pretrain.log_every=4",
        ],
        tmp_path,
    )
    rows = [line for line in out.splitlines() if re.match(r"\s*1\s+(memory|ray_data)\s", line)]
    assert {line.split()[1] for line in rows} == {"memory", "ray_data"}
    assert all(numbers(line)[0] > 0 for line in rows)  # images/s
    shards = [m for m in sorted((tmp_path / "training").rglob("_manifest.json")) if (m.parent / "shards").is_dir()]
    assert shards, "benchmark_training mined no shards"
    out = run_job(
        "benchmark_device.py",
        [
            "--shards",
            str(shards[0].parent),
            "--configs",
            "demo",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batches",
            "1",
            "--amp",
            "off",
            "--images",
            "0",
            "--out",
            str(tmp_path / "device.json"),
        ],
        tmp_path,
    )
    table = [line for line in out.splitlines() if line.startswith("| ") and "demo" in line]
    assert len(table) == 1, out
    ms_per_step, images_per_s = numbers(table[0])[:2]
    assert ms_per_step > 0 and images_per_s > 0
