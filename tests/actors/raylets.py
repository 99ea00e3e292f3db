"""A multi-node Ray cluster on this machine for the actor tests: one raylet per topology node
(`ray.cluster_utils.Cluster`), joined by the test process. Import it after the test module has set Ray's
environment (token auth, a private temp dir), which Ray reads when it is imported."""
import ray
from ray.cluster_utils import Cluster as RayCluster

NODE = {"object_store_memory": 80 * 2**20}


def raylets(head: dict, *workers: dict):
    """Start a head raylet with `head`'s arguments and one more per worker, join them; yield the cluster, then
    stop it (a generator for a pytest fixture)."""
    cluster = RayCluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False, **head})
    for worker in workers:
        cluster.add_node(**NODE, **worker)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
