import os

import ray

from distseg.cluster import init_ray, pool_size, shutdown_ray
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
        assert pool_size(None, 100) == 1  # the cluster's one CPU
    finally:
        shutdown_ray()
    assert not ray.is_initialized()


def test_pool_size_is_one_actor_per_cpu_but_not_more_than_the_items_keep_busy():
    assert pool_size(None, 591, cpus=2) == 2  # MSRC on this machine: one per CPU
    assert pool_size(None, 12, cpus=5) == 2  # a 12-image job: 2 actors, not 5 each loading torch for 2 images
    assert pool_size(None, 16, cpus=3) == 2 and pool_size(None, 17, cpus=3) == 3
    assert pool_size(None, 7, cpus=16) == 1 and pool_size(None, 0, cpus=4) == 1
    assert pool_size(None, 10, cpus=0) == 1  # a cluster whose CPUs are all taken still gets one
    assert pool_size(3, 1, cpus=1) == 3  # mine.num_actors as set, whatever the job
    assert pool_size(None, 9, per_actor=2, cpus=8) == 5  # distillation's chunks of 4 rows: 8 rows per actor
