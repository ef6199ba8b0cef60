import pytest


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of a coordinating head and two 3-CPU worker nodes for one test module."""
    pytest.importorskip("ray")
    from helpers.ray_cluster import ray_cluster

    with ray_cluster() as c:
        yield c
