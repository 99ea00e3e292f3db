"""Expert groups scaled under running requests, on a Ray cluster whose nodes come and go: the added groups wait
for a node offering `moeserve-expert` (here added by hand, as Ray's autoscaler adds one; the autoscaler itself is
in tests/helm/test_kuberay_e2e.py), then take traffic; removed groups are drained and stopped. Every token equals
the single-process engine's."""
import os
import secrets
import tempfile
import threading
import time

import pytest
import torch

os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="moeserve-test-ray-"))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ray = pytest.importorskip("ray")

from tests.actors.raylets import raylets  # noqa: E402
from moeserve.actors.cluster import Cluster  # noqa: E402
from moeserve.actors.controller import ATTENTION_RESOURCE, EXPERT_RESOURCE  # noqa: E402
from moeserve.cluster import LLM, ClusterConfig, SamplingParams  # noqa: E402
from moeserve.kernels.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    yield from raylets({"num_cpus": 2, "resources": {ATTENTION_RESOURCE: 4}},
                       {"num_cpus": 1, "resources": {EXPERT_RESOURCE: 4}})


@pytest.mark.parametrize("transport", ["collective", "ray"])
def test_expert_groups_scale_up_on_a_new_node_and_down_under_running_requests(ray_cluster, mtp_checkpoint,
                                                                               transport):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (5, 31, 12, 20, 7, 26)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (80, 50, 120, 70, 100, 60)]
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
