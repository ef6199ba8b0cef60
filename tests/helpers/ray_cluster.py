"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster) for the Ray tests, and what
they compare: a database made on the cluster against one made in this process."""

from __future__ import annotations

import contextlib
import os

import numpy as np

STORE_MB = 100 * 2**20


@contextlib.contextmanager
def ray_cluster(workers: int = 2, cpus: int = 3):
    """A head node that only coordinates (no CPUs) and `workers` worker nodes, this process connected;
    yields (cluster, worker nodes) and tears all down after."""
    import ray
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # never report to the network
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False, object_store_memory=STORE_MB,
        # a killed node is found dead in seconds, not Ray's default half minute
        _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 4}))
    nodes = [c.add_node(num_cpus=cpus, object_store_memory=STORE_MB) for _ in range(workers)]
    try:
        ray.init(address=c.address, logging_level="WARNING")
        c.wait_for_nodes()
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


def options(c, **kw):
    from nanodb.cluster import RayOptions

    return RayOptions(address=c.address, **{"clip_actors": 2, **kw})


def assert_same_scan(db, reference) -> None:
    """Same count and paths, one item per file (nothing appended twice), same vectors (cosine 0.999)."""
    assert len(db) == len(reference)
    mine = {item.path: item for item in db}
    assert len(mine) == len(db)
    assert sorted(mine) == sorted(item.path for item in reference)
    for item in reference:
        cosine = float(mine[item.path].vector.astype(np.float32) @ item.vector.astype(np.float32))
        assert cosine > 0.999, item.path
