import os

import ray

from distseg.cluster import init_ray, shutdown_ray
from distseg.config import RayConfig


def test_init_ray_starts_a_local_cluster_once(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        init_ray(RayConfig(num_cpus=1))
        assert ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 1
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
        init_ray(RayConfig(num_cpus=2))  # already up: a no-op, not an error
        assert ray.cluster_resources()["CPU"] == 1
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    finally:
        shutdown_ray()
    assert not ray.is_initialized()
