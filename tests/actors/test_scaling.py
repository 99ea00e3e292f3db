"""Expert groups scaled under running requests, on a Ray cluster whose nodes come and go: the added groups wait
for a node offering `moeserve-expert` (here added by hand, as Ray's autoscaler adds one; the autoscaler itself is
in tests/helm/test_kuberay_e2e.py), then take traffic; removed groups are drained and stopped. Every token equals
the single-process engine's."""
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from tests.actors.raylets import raylets  # noqa: E402
from tests.actors.workload import mixed_requests  # noqa: E402
from moeserve.actors import cluster as cluster_module  # noqa: E402
from moeserve.actors.cluster import Cluster  # noqa: E402
from moeserve.actors.controller import ATTENTION_RESOURCE, EXPERT_RESOURCE, Controller  # noqa: E402
from moeserve.cluster import LLM, ClusterConfig  # noqa: E402
from moeserve.kernels.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    yield from raylets({"num_cpus": 2, "resources": {ATTENTION_RESOURCE: 4}},
                       {"num_cpus": 1, "resources": {EXPERT_RESOURCE: 4}})


@pytest.mark.parametrize("transport", ["collective", "ray"])
def test_expert_groups_scale_up_on_a_new_node_and_down_under_running_requests(ray_cluster, mtp_checkpoint,
                                                                               transport):
    prompts, params = mixed_requests(seed=2, sampled=False)
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)]
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", transport=transport, placement="resources",
                        scaling={"max_expert_groups": 6, "start_timeout_s": 120}, rebalance={"auto": False},
                        engine={"kv_cache_tokens": 1024, "block_size": 4})
    with Cluster(cfg) as c:
        with pytest.raises(InputError, match="a node"):
            c.scale_experts(5)
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
        outcome, scaled = {}, {}
        requests = threading.Thread(target=lambda: outcome.update(up=c.generate(prompts, params)), daemon=True)
        requests.start()
        scaling = threading.Thread(target=lambda: scaled.update(up=c.scale_experts(6)), daemon=True)
        scaling.start()
        deadline = time.monotonic() + 30
        while c.status()["pending_scale_up"] is None:  # the two new groups wait for a node with the resource
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)
        assert scaling.is_alive() and c.status()["expert_groups"] == 4
        node = ray_cluster.add_node(num_cpus=1, resources={EXPERT_RESOURCE: 2}, object_store_memory=80 * 2**20)
        scaling.join(120)
        requests.join(120)
        assert [o.token_ids for o in outcome["up"]] == expected
        assert scaled["up"]["expert_groups"] == 6 and scaled["up"]["version"] == 1
        status = c.status()
        assert status["expert_groups"] == 6 and status["pending_scale_up"] is None
        new_nodes = {a["ray_node"] for a in status["actors"] if a["name"] in ("expert-group-4", "expert-group-5")}
        assert new_nodes == {node.node_id}
        before = sum(g["assignments_computed"] for g in ray.get([g.stats.remote() for g in c.groups[4:]]))
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
        after = sum(g["assignments_computed"] for g in ray.get([g.stats.remote() for g in c.groups[4:]]))
        assert after > before  # the new groups take traffic
        held = ray.get([g.ready.remote() for g in c.groups])
        for g, report in enumerate(held):  # each group holds exactly its slots' experts of the live version
            slots = len(c.phy2log[next(iter(c.phy2log))]) // 6
            assert report["experts"] == {layer: sorted(set(p[g * slots:(g + 1) * slots]))
                                         for layer, p in c.phy2log.items()}

        removed = c.groups[4:]
        requests = threading.Thread(target=lambda: outcome.update(down=c.generate(prompts, params)), daemon=True)
        requests.start()
        time.sleep(0.3)
        report = c.scale_experts(4)
        requests.join(120)
        assert [o.token_ids for o in outcome["down"]] == expected
        assert report["expert_groups"] == 4 and report["version"] == 2 and len(c.groups) == 4
        for actor in removed:
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(actor.ready.remote(), timeout=30)
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
        assert c.recoveries == []
    ray_cluster.remove_node(node)


def killing_controller(victim: str) -> type:
    """A controller that SIGKILLs the actor `victim` (a kept group, an added one, a shard) as a scaling begins to
    switch the shards to the new groups, once."""
    class KillingController(Controller):
        killed = False

        def _switch_layout(self, version, phy2log, spec, pool, added):
            if not self.killed:
                pids = {name: where["pid"] for name, where in self.where.items()}
                pids.update({f"expert-group-{len(self.groups) + g}": report["pid"] for g, report in enumerate(added)})
                os.kill(pids[victim], signal.SIGKILL)
                self.killed = True
            super()._switch_layout(version, phy2log, spec, pool, added)
    return KillingController


def test_an_actor_killed_as_a_scale_up_switches_is_recovered_into_the_new_layout(ray_cluster, mtp_checkpoint,
                                                                                 monkeypatch):
    """An expert group just added dies as the shards switch to six groups from four, under running requests. The
    new layout stands (the controller's, every shard's, every group's) and the dead group is recovered into it;
    every request completes with the engine's tokens."""
    victim = "expert-group-5"
    prompts, params = mixed_requests(seed=5)
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)]
    monkeypatch.setattr(cluster_module, "Controller", killing_controller(victim))
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", placement="resources",
                        scaling={"max_expert_groups": 6, "start_timeout_s": 120}, rebalance={"auto": False},
                        engine={"kv_cache_tokens": 1024, "block_size": 4})
    node = ray_cluster.add_node(num_cpus=1, resources={EXPERT_RESOURCE: 2}, object_store_memory=80 * 2**20)
    with Cluster(cfg) as c:
        c.generate(prompts[:2], params[:2])
        outcome = {}
        requests = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts, params)), daemon=True)
        requests.start()
        while not ray.get(c.decode_shards[0].stats.remote())["engine"]["running"]:
            time.sleep(0.01)
        assert c.scale_experts(6)["version"] == 1
        requests.join(180)
        assert [o.token_ids for o in outcome["outs"]] == expected
        deadline = time.monotonic() + 60
        while not c.recoveries and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [event["lost"] for event in c.recoveries] == [[victim]]
        stats = c.stats()
        assert stats["placement_version"] == 1 and len(stats["expert_groups"]) == 6
        assert [s["placement_version"] for s in stats["shards"]] == [1, 1]
        assert [g["placement_versions"] for g in stats["expert_groups"]] == [[1]] * 6
        slots = len(c.phy2log[next(iter(c.phy2log))]) // 6
        for g, report in enumerate(ray.get([g.ready.remote() for g in c.groups])):
            assert report["experts"] == {layer: sorted(set(p[g * slots:(g + 1) * slots]))
                                         for layer, p in c.phy2log.items()}
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
    ray_cluster.remove_node(node)
