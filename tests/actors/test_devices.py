"""Which actor asks Ray for which GPUs, on a Ray cluster that declares GPUs (two raylets of two each). torch sees no
GPU here, so every actor computes on the CPU under device auto; the GPU ids Ray hands out are real bookkeeping,
and the outputs must still be the engine's."""

import pytest
import torch

ray = pytest.importorskip("ray")

from tests.actors.raylets import raylets  # noqa: E402
from moeserve.actors.cluster import Cluster, node_resource  # noqa: E402
from moeserve.cluster import LLM, ClusterConfig, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def gpu_cluster():
    yield from raylets({"num_cpus": 2, "num_gpus": 2, "resources": {node_resource(0): 100}},
                       {"num_cpus": 2, "num_gpus": 2, "resources": {node_resource(1): 100}})


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(2, 200, (n,), generator=g).tolist() for n in (6, 27, 13)]


@pytest.fixture(scope="module")
def expected(mtp_checkpoint, prompts):
    return [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, GREEDY)]


def run(path, prompts, **devices):
    cfg = ClusterConfig(model=str(path), engine={"kv_cache_tokens": 1024, "block_size": 4}, devices=devices)
    with Cluster(cfg) as c:
        tokens = [o.token_ids for o in c.generate(prompts, GREEDY)]
        actors = {a["name"]: a for a in c.status()["actors"]}
        free = ray.available_resources().get("GPU", 0)
    return tokens, actors, free


def test_shards_and_groups_share_the_gpus_half_each(gpu_cluster, mtp_checkpoint, prompts, expected):
    tokens, actors, free = run(mtp_checkpoint, prompts)
    assert tokens == expected
    assert set(actors) == {"prefill-0", "decode-0"} | {f"expert-group-{g}" for g in range(4)}
    assert all(len(a["gpu_ids"]) == 1 and a["device"] == "cpu" for a in actors.values())  # no CUDA here
    assert free == pytest.approx(4 - 6 * 0.5)
    for node in (0, 1):  # every actor holds a GPU of the raylet its topology node is on
        ids = {a["gpu_ids"][0] for a in actors.values() if a["topology_node"] == node}
        assert ids <= {"0", "1"}
    assert len({a["ray_node"] for a in actors.values()}) == 2


def test_cpu_offloaded_experts_hold_no_gpu_and_equal_the_engine(gpu_cluster, mtp_checkpoint, prompts, expected):
    tokens, actors, free = run(mtp_checkpoint, prompts, experts="cpu")
    assert tokens == expected
    groups = [a for name, a in actors.items() if name.startswith("expert-group")]
    shards = [a for name, a in actors.items() if not name.startswith("expert-group")]
    assert len(groups) == 4 and all(a["gpu_ids"] == [] for a in groups)
    assert len(shards) == 2 and all(len(a["gpu_ids"]) == 1 for a in shards)
    assert free == pytest.approx(4 - 2)  # a whole GPU per shard: nothing shares it
    # the two shards are on two different GPUs: Ray hands whole GPUs out once
    assert len({(a["ray_node"], a["gpu_ids"][0]) for a in shards}) == 2
