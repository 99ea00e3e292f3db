"""The disaggregated cluster on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, one
raylet per topology node), against the single-process engine, token for token."""
import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # the actors' Triton kernels (moe_kernel: triton) on the CPU
ray = pytest.importorskip("ray")

from moeserve.actors.attention_shard import HandedOff  # noqa: E402
from moeserve.actors.client import ClusterClient, Delta, ShardLost  # noqa: E402
from tests.actors.raylets import raylets  # noqa: E402
from tests.actors.workload import mixed_requests  # noqa: E402
from moeserve.actors import cluster as cluster_module  # noqa: E402
from moeserve.actors.cluster import Cluster, node_resource  # noqa: E402
from moeserve.actors.controller import Controller  # noqa: E402
from moeserve.cluster import LLM, ClusterConfig, SamplingParams  # noqa: E402
from moeserve.cluster.engine import RequestOutput  # noqa: E402
from moeserve.kernels.errors import InputError  # noqa: E402
from moeserve.topology.spec import TopologySpec  # noqa: E402

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
TWO_NODES_ONE_GPU = TopologySpec(name="two-by-one", nodes=2, gpus_per_node=1, nics_per_node=1, planes=1,
                                 intra_node_gbps=10, nic_gbps=1)
# for the tests that are not about the layout: two expert groups on two nodes start faster than the default four
TWO_GROUPS = {"topology": TWO_NODES_ONE_GPU, "expert_groups": 2, "redundant_experts": 0}


@pytest.fixture(scope="module")
def ray_cluster():
    for cluster in raylets({"num_cpus": 2, "resources": {node_resource(0): 100}},
                           {"num_cpus": 2, "resources": {node_resource(1): 100}}):
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        yield cluster


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 200, (n,), generator=g).tolist() for n in (5, 31, 12, 20)]


@pytest.fixture(scope="module")
def expected(mtp_checkpoint, prompts):
    return [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, GREEDY)]


def config(path, engine=None, **kw):
    return ClusterConfig(model=str(path), engine={"kv_cache_tokens": 1024, "block_size": 4, **(engine or {})}, **kw)


def test_one_prefill_one_decode_two_expert_groups(ray_cluster, mtp_checkpoint, prompts, expected):
    cfg = config(mtp_checkpoint, topology=TWO_NODES_ONE_GPU, expert_groups=2, redundant_experts=2,
                 engine={"prefill_max_num_batched_tokens": 8})  # the default dtypes: exact
    with Cluster(cfg) as c:
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
        stats = c.stats()
        prefill_steps = [s["engine"]["steps"] for s in stats["shards"] if s["role"] == "prefill"]
        assert prefill_steps[0] >= -(-sum(map(len, prompts)) // 8)  # the prefill shard's own budget: 8 a step
        measured, planned = stats["bytes"]["measured"], stats["bytes"]["planned"]
        assert measured == planned and measured["inter_node"] > 0
        a = c.args  # only the latent moved: tokens x layers x (kv_lora_rank + qk_rope_head_dim) x 4 bytes
        assert stats["kv_transfer_bytes"] == sum(map(len, prompts)) * a.n_layers * a.latent_dim * 4
        nodes = {stats["where"][f"expert-group-{g}"]["ray_node"] for g in range(2)}
        assert len(nodes) == 2  # the two topology nodes are two different raylets
        pids = [w["pid"] for w in stats["where"].values()]
        # a second client on the same shards (a Serve ingress beside the driver): each gets its own outputs
        other = ClusterClient(c.args, c.tokenizer, c.prefill_shards, c.decode_shards, 1024, 4)

        async def both():
            return await asyncio.gather(*(client.generate_one(p, GREEDY) for client in (c.client, other)
                                          for p in prompts))
        assert [o.token_ids for o in asyncio.run(both())] == expected * 2
        # a shard takes requests between its steps, but refuses a bad one at once, in the caller
        shard = c.prefill_shards[0]
        long_prompt = prompts[1] * 8  # 31 prefill steps of 8 tokens: still running when the second add comes
        ray.get(shard.add.remote("twice", long_prompt, GREEDY, None, "nobody"))
        with pytest.raises(InputError, match="already in use"):
            ray.get(shard.add.remote("twice", long_prompt, GREEDY, None, "nobody"))
        with pytest.raises(InputError, match="empty"):
            ray.get(shard.add.remote("empty", [], GREEDY, None, "nobody"))
        # several at once (a client's burst): a bad one is refused alone, the others are taken
        ok, again = ray.get(shard.add_many.remote([("batch-1", prompts[1], GREEDY, None, "nobody"),
                                                   ("batch-1", prompts[0], GREEDY, None, "nobody")]))
        assert ok is None and isinstance(again, InputError) and "already in use" in str(again)
        ray.get([shard.abort.remote("twice"), shard.abort.remote("batch-1")])
    for pid in pids:  # teardown leaves no actor process behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("transport, backend, micro_batches", [("ray", "gloo", 1), ("collective", "gloo", 2),
                                                                ("collective", "sockets", 2)])
def test_two_decode_shards_four_groups_redundant_replicas_and_mtp(ray_cluster, mtp_checkpoint, prompts, expected,
                                                                  transport, backend, micro_batches):
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", decode_shards=2, expert_groups=4,
                        redundant_experts=4, mtp=True, transport=transport, collective_backend=backend,
                        engine={"kv_cache_tokens": 1024, "block_size": 4, "micro_batches": micro_batches})
    with Cluster(cfg) as c:
        outs = c.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert all(o.drafts_proposed > 0 for o in outs)
        stats = c.stats()
        b = stats["bytes"]
        assert b["measured"] == b["planned"]
        assert b["inter_node_crossings"] < b["naive_crossings"]  # one crossing per (token, node), not per expert
        assert {stats["where"][f"decode-{i}"]["shard"] for i in range(2)} == {0, 1}
        served = [s["engine"]["steps"] for s in stats["shards"] if s["role"] == "decode"]
        assert all(steps > 0 for steps in served)  # both decode shards took requests
        assert sum(sum(v) for v in stats["tokens_per_expert"].values()) > 0


@pytest.mark.parametrize("transport", ["ray", "collective"])
def test_prefill_and_decode_on_expert_groups_of_their_own(ray_cluster, mtp_checkpoint, prompts, expected, transport):
    """shared_expert_groups: false gives the prefill shards a pool of expert groups of their own: each pool serves
    only its shards' tokens, relaying inside a node to its own pool's groups, and the outputs are the engine's,
    also after a rebalance, which places both pools' experts alike."""
    cfg = config(mtp_checkpoint, topology="cpu-local", expert_groups=4, redundant_experts=4,
                 shared_expert_groups=False, transport=transport)
    with Cluster(cfg) as c:
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
        stats = c.stats()
        assert stats["bytes"]["measured"] == stats["bytes"]["planned"] and stats["bytes"]["measured"]["intra_node"]
        where = stats["where"]
        for g in range(4):  # each pool has a group on each GPU slot, on that slot's node's raylet
            assert where[f"expert-group-{g}"]["ray_node"] == where[f"prefill-expert-group-{g}"]["ray_node"]
        assert where["expert-group-0"]["ray_node"] != where["expert-group-2"]["ray_node"]
        decode_pool, prefill_pool = stats["expert_groups"][:4], stats["expert_groups"][4:]
        prompt_tokens = sum(map(len, prompts))
        decoded = len(prompts) * (GREEDY.max_tokens - 1)  # the prefill shard samples each first token
        moe_layers = sum(c.args.is_moe_layer(i) for i in range(c.args.n_layers))
        k = c.args.n_activated_experts
        # a group counts the (token, expert) assignments it computes: k per token and MoE layer, in its own pool
        for pool, tokens in ((prefill_pool, prompt_tokens), (decode_pool, decoded)):
            assert sum(g["assignments_computed"] for g in pool) == tokens * moe_layers * k
        layers = sorted(c.phy2log)
        assert c.rebalance(torch.arange(1.0, 17.0).pow(3).repeat(len(layers), 1))["version"] == 1
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
        slots = len(c.phy2log[layers[0]]) // 4
        pools = ray.get(c.controller.view.remote())
        for pool in (pools["groups"], pools["prefill_groups"]):  # a rebalance moves both pools' experts alike
            for g, report in enumerate(ray.get([group.ready.remote() for group in pool])):
                assert report["experts"] == {layer: sorted(set(p[g * slots:(g + 1) * slots]))
                                             for layer, p in c.phy2log.items()}


def wait_until_dead(actor, timeout_s: float = 30) -> None:
    """`ray.kill` returns before the process is gone, and a call made meanwhile is still served: a step could pass
    through the victim before it dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the actor still answers {timeout_s:g} s after ray.kill")


def test_a_dead_expert_group_fails_the_requests_with_an_error_not_a_hang(ray_cluster, mtp_checkpoint, prompts):
    """Where dead actors stay dead (failures.restart: false), a step that raises (here: an expert group is gone)
    reaches every client of the shard as an error. Which shard's step raises first depends on the routing: a
    prompt whose tokens all chose experts of the live group prefills and is handed off, and its decode step is the
    first to reach the dead group."""
    with Cluster(config(mtp_checkpoint, topology=TWO_NODES_ONE_GPU, expert_groups=2, redundant_experts=2,
                        failures={"restart": False})) as c:
        ray.kill(c.groups[1])
        wait_until_dead(c.groups[1])
        outcome = {}

        def run():
            try:
                outcome["outputs"] = c.generate(prompts, GREEDY)
            except Exception as e:  # noqa: BLE001
                outcome["error"] = e
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(120)
        assert not thread.is_alive(), "the requests hang"
        assert isinstance(outcome.get("error"), RuntimeError)
        assert re.match(r"(prefill|decode) shard 0: ", str(outcome["error"])), outcome["error"]


@pytest.mark.parametrize("victim, transport", [("expert-group-1", "collective"), ("expert-group-2", "ray"),
                                               ("decode-0", "collective"), ("prefill-0", "collective"),
                                               ("expert-group-3", "sockets"), ("decode-0", "sockets")])
def test_an_actor_killed_under_running_requests_is_restarted_and_no_request_fails_or_changes(
        ray_cluster, mtp_checkpoint, victim, transport):
    """SIGKILL one actor while requests of mixed lengths prefill and decode: Ray restarts its process, the cluster
    brings it back into the live layout (a later placement version, to be sure it is the live one that is
    restored), the steps that lost their experts send them again and the requests on a dead shard resume on its
    successor. Every request, greedy or seeded sampled, completes with the engine's tokens, and requests after it
    too. The load watcher measures all along (it never sees enough tokens to rebalance): a measurement must not
    hold up the recovery that the step it waits for waits for."""
    prompts, params = mixed_requests(seed=1)
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)]
    # the collective transport over Unix sockets, its receives polling first (four groups outnumber the cores
    # here, where collective_spin_us null would not poll)
    backend = {"transport": "collective", "collective_backend": "sockets", "collective_spin_us": 2000} \
        if transport == "sockets" else {"transport": transport}
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", **backend,
                        rebalance={"auto": True, "interval_s": 0.05, "min_tokens": 10**9},
                        engine={"kv_cache_tokens": 1024, "block_size": 4, "prefill_max_num_batched_tokens": 2})
    with Cluster(cfg) as c:
        c.generate(prompts[:2], GREEDY)
        skewed = torch.arange(1.0, 17.0).pow(3).repeat(len(c.phy2log), 1)  # the watcher takes the measured load
        assert c.rebalance(skewed)["version"] == 1
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts, params)), daemon=True)
        thread.start()
        busy = c.prefill_shards[0] if victim.startswith("prefill") else c.decode_shards[0]
        while not ray.get(busy.stats.remote())["engine"]["running"]:  # prompts of 2 tokens a step: prefill is long
            time.sleep(0.01)
        os.kill(c.where[victim]["pid"], signal.SIGKILL)
        thread.join(180)
        assert [o.token_ids for o in outcome["outs"]] == expected
        assert [event["lost"] for event in c.recoveries] == [[victim]]
        if "expert-group" in victim:
            assert c.client.resumed == 0  # the steps sent their experts again: no request started over
        else:
            assert c.client.resumed > 0   # the dead shard's requests resumed on its successor
        assert c.stats()["placement_version"] == 1
        assert all(s["placement_version"] == 1 for s in c.stats()["shards"])
        assert [o.token_ids for o in c.generate(prompts, params)] == expected


def test_a_killed_controller_restarts_rebuilds_its_view_and_recovers_failures(ray_cluster, mtp_checkpoint):
    """The controller is an actor too. SIGKILLed under running requests, and an expert group with it while no
    controller watches: Ray restarts both; the new controller rebuilds its view from the live actors (the same
    shards, the placement version and layout of the rebalance before, the recoveries before its death) and brings
    the restarted group back, so the steps that lost their experts go on; a group recovered before is left be.
    Every request completes with the engine's tokens; a later failure is recovered too."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (5, 31, 12, 20)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (80, 50, 120, 70)]
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)]
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", rebalance={"auto": False},
                        engine={"kv_cache_tokens": 1024, "block_size": 4})
    with Cluster(cfg) as c:
        c.generate(prompts[:2], GREEDY)
        c.rebalance()
        os.kill(c.where["expert-group-0"]["pid"], signal.SIGKILL)  # a failure the first controller recovers
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
        deadline = time.monotonic() + 60
        while not c.recoveries and time.monotonic() < deadline:
            time.sleep(0.1)
        before = c.status()
        first = ray.get(c.controller.view.remote())["pid"]
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts, params)), daemon=True)
        thread.start()
        time.sleep(0.3)
        os.kill(first, signal.SIGKILL)
        os.kill(next(a["pid"] for a in before["actors"] if a["name"] == "expert-group-1"), signal.SIGKILL)
        thread.join(120)
        assert [o.token_ids for o in outcome["outs"]] == expected
        view = ray.get(c.controller.view.remote(), timeout=60)
        assert view["pid"] != first
        after = c.status()
        assert after["controller_rebuilt"] and not before["controller_rebuilt"]
        assert after["placement_version"] == before["placement_version"] == 1 and c.phy2log == view["phy2log"]
        assert [a["name"] for a in after["actors"]] == [a["name"] for a in before["actors"]]
        assert [event["lost"] for event in c.recoveries] == [["expert-group-0"], ["expert-group-1"]]
        assert after["failures_survived"] == 2
        thread = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts, params)), daemon=True)
        thread.start()
        time.sleep(0.3)
        os.kill(c.where["expert-group-2"]["pid"], signal.SIGKILL)
        thread.join(120)
        assert [o.token_ids for o in outcome["outs"]] == expected
        assert [event["lost"] for event in c.recoveries] == [["expert-group-0"], ["expert-group-1"], ["expert-group-2"]]


# Another process that starts a named cluster, asks it for one completion and exits without stopping it
NAMED_CLUSTER_DRIVER = """
import sys, ray
from moeserve.actors.cluster import Cluster
from moeserve.cluster import ClusterConfig, SamplingParams
c = Cluster(ClusterConfig.model_validate_json(sys.argv[1]), name="named").start()
tokens = c.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids
print("controller", ray.get(c.controller.view.remote())["pid"], "tokens", len(tokens))
"""


def test_a_named_cluster_outlives_its_process_and_another_process_attaches_to_it(ray_cluster, mtp_checkpoint,
                                                                                 prompts, expected):
    """What a restarted Serve replica does: `Cluster(config, name=)` from a new driver finds the running cluster
    of that name and config (Ray gives each driver an anonymous namespace of its own, so the names must live in
    one namespace of moeserve's) instead of starting a second one beside it."""
    cfg = config(mtp_checkpoint, ray={"address": ray_cluster.address}, **TWO_GROUPS)
    started = subprocess.run([sys.executable, "-c", NAMED_CLUSTER_DRIVER, cfg.model_dump_json()], capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    line = next(line for line in started.stdout.splitlines() if line.startswith("controller "))
    _, pid, _, generated = line.split()
    assert generated == "4"
    with Cluster(cfg, name="named") as c:
        assert ray.get(c.controller.view.remote())["pid"] == int(pid)
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
    assert all_gone("named")  # stopping it stopped the cluster the other process started


def named_actors(cluster: str) -> list[dict]:
    """The live actors named after the cluster `cluster`, in moeserve's namespace."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "moeserve" and a["name"].startswith(f"{cluster}-")]


def all_gone(cluster: str, timeout_s: float = 30.0) -> bool:
    """Whether every actor named after `cluster` is gone within `timeout_s` (Ray frees a name a moment after the
    actor's process has exited)."""
    deadline = time.monotonic() + timeout_s
    while named_actors(cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not named_actors(cluster)


def dying_at_start(marker: str) -> type:
    """A controller whose process dies (SIGKILL) while it starts the cluster: its expert groups started, no shard
    yet. Once: the file `marker` says it has died."""
    class DyingController(Controller):
        def _start_expert_groups(self, *args, **kw):
            groups = super()._start_expert_groups(*args, **kw)
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return groups
    return DyingController


def test_a_controller_that_dies_while_it_starts_the_cluster_is_replaced_and_the_start_made_again(
        ray_cluster, mtp_checkpoint, prompts, expected, monkeypatch, tmp_path):
    """Ray restarts a dead controller, but one that died inside `start` has no layout to rebuild, and the expert
    groups it had started hold the names the next start needs: the half-started cluster is discarded and started
    once more. It serves the engine's tokens; stopping it leaves no actor of it."""
    marker = tmp_path / "died"
    monkeypatch.setattr(cluster_module, "Controller", dying_at_start(str(marker)))
    cfg = config(mtp_checkpoint, ray={"address": ray_cluster.address}, **TWO_GROUPS)
    with Cluster(cfg, name="restarted") as c:
        assert marker.exists()
        assert sorted(a["name"] for a in named_actors("restarted")) == [
            "restarted-controller", "restarted-decode-0", "restarted-expert-group-0", "restarted-expert-group-1",
            "restarted-prefill-0"]
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
    assert all_gone("restarted")


def refusing(marker: str) -> type:
    """A controller whose construction fails, as it would every time; each try leaves a line in `marker`."""
    class RefusingController(Controller):
        def __init__(self, config: dict, private_dir, prefix: str):
            with open(marker, "a") as f:
                f.write("constructed\n")
            raise RuntimeError(f"no controller for {prefix}")
    return RefusingController


def test_a_controller_that_cannot_be_constructed_fails_the_start_once(ray_cluster, mtp_checkpoint, monkeypatch,
                                                                     tmp_path):
    marker = tmp_path / "tries"
    monkeypatch.setattr(cluster_module, "Controller", refusing(str(marker)))
    cfg = config(mtp_checkpoint, ray={"address": ray_cluster.address}, **TWO_GROUPS)
    with pytest.raises(ray.exceptions.RayActorError, match="no controller for refused") as raised:
        Cluster(cfg, name="refused").start()
    assert raised.value.actor_init_failed and marker.read_text() == "constructed\n"
    assert not named_actors("refused")


def killing_at_start(victim: str, marker: str) -> type:
    """A controller that SIGKILLs the actor `victim` as the cluster's process group is about to form at its start.
    Once: the file `marker` says it has."""
    class KillingController(Controller):
        def _join_collective(self, pids):
            if not self.where and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(pids[victim], signal.SIGKILL)
            return super()._join_collective(pids)
    return KillingController


def test_an_actor_that_dies_while_the_cluster_starts_has_the_start_made_again(ray_cluster, mtp_checkpoint, prompts,
                                                                              expected, monkeypatch, tmp_path):
    """An expert group killed as the process group forms at the start: the members that came wait out the
    rendezvous, the start is discarded and made again, and the cluster serves the engine's tokens."""
    marker = tmp_path / "killed"
    monkeypatch.setattr(cluster_module, "Controller", killing_at_start("expert-group-1", str(marker)))
    cfg = config(mtp_checkpoint, ray={"address": ray_cluster.address}, failures={"rendezvous_timeout_s": 5},
                 **TWO_GROUPS)
    with Cluster(cfg, name="again") as c:
        assert marker.exists() and not c.recoveries
        assert len(named_actors("again")) == 5
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
    assert all_gone("again")


def test_each_actor_sends_through_the_nic_of_its_gpu_slot(ray_cluster, mtp_checkpoint, prompts, expected):
    """A topology that names its NICs: every expert group and shard gets NCCL_IB_HCA naming the NIC of its GPU
    slot's local index (NIC i serves GPU i, on plane i), exactly; the cluster serves as before."""
    spec = TopologySpec(name="named-nics", nodes=2, gpus_per_node=2, nics_per_node=2, planes=2, intra_node_gbps=10,
                        nic_gbps=1, nic_names=["mlx5_0", "mlx5_1"])
    with Cluster(config(mtp_checkpoint, topology=spec)) as c:
        where = c.where
        for g in range(4):
            assert where[f"expert-group-{g}"]["nccl_ib_hca"] == f"=mlx5_{g % 2}"
        for name in ("prefill-0", "decode-0"):
            assert where[name]["nccl_ib_hca"] == f"=mlx5_{where[name]['gpu_slot'] % 2}"
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
    with pytest.raises(ValueError, match="nic_names names 1 NICs; the nodes have 2"):
        TopologySpec(**{**spec.model_dump(), "nic_names": ["mlx5_0"]})


def test_a_client_that_stops_polling_has_its_requests_aborted(ray_cluster, mtp_checkpoint, prompts):
    """A client that dies mid-request stops polling; after ray.client_timeout_s the decode shard aborts its request
    (it would otherwise decode to max_tokens for nobody) and leaves one error for it, while a live client's
    request completes as usual. The timeout is short (0.3 s) so that the silent request is still decoding when it
    passes: its 500 steps take about 1 s on a 2-core CPU (at a 1 s timeout the request sometimes finished first)."""
    cfg = config(mtp_checkpoint, topology=TWO_NODES_ONE_GPU, expert_groups=2, redundant_experts=2,
                 ray={"client_timeout_s": 0.3})
    with Cluster(cfg) as c:
        prefill, decode = c.prefill_shards[0], c.decode_shards[0]
        long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        ray.get(prefill.add.remote("ghost-1", prompts[0], long, None, "ghost", 0, True))
        handed = []
        while not handed:
            _, handed = ray.get(prefill.poll.remote("ghost", 0, 5.0))
        # the prefill shard sent the sequence on to the decode shard itself; its client got a notice without the
        # latent (and "ghost" never polls the decode shard)
        notice = handed[0][2]
        assert isinstance(notice, HandedOff) and not any(isinstance(v, torch.Tensor) for v in vars(notice).values())
        deadline = time.monotonic() + 30
        while ray.get(decode.stats.remote())["kv_bytes_received"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ray.get(decode.stats.remote())["kv_bytes_received"] == notice.kv_bytes > 0
        deadline = time.monotonic() + 60
        while ray.get(decode.stats.remote())["engine"]["running"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.get(decode.stats.remote())["engine"]["running"] == 0, "the silent client's request runs on"
        _, left = ray.get(decode.poll.remote("ghost", 0, 0.0))
        assert [(r, type(e)) for _, r, e in left] == [("ghost-1", RuntimeError)]
        assert "had not polled for 0.3 s" in str(left[0][2])

        async def streamed():  # the shard serves on; a streaming client polls every step, well within 0.3 s
            return [d async for d in c.client.stream(prompts[0], GREEDY)]
        assert asyncio.run(streamed())[-1].finish_reason == "length"


def test_a_request_without_increments_gets_its_first_token_then_only_its_final_output(ray_cluster, mtp_checkpoint,
                                                                                     prompts, expected):
    """`generate` waits for whole completions: the decode shard builds and sends no per-step increments for its
    requests, and the completion is the one a streamed request gets."""
    with Cluster(config(mtp_checkpoint, **TWO_GROUPS)) as c:
        async def deltas(increments: bool) -> list:
            return [d async for d in c.client.stream(prompts[1], GREEDY, increments=increments)]
        streamed, quiet = asyncio.run(deltas(True)), asyncio.run(deltas(False))
    assert [len(d.new_token_ids) for d in streamed] == [1] * GREEDY.max_tokens
    assert len(quiet) == 2 and quiet[0].token_ids == streamed[0].token_ids
    assert quiet[1].token_ids == streamed[-1].token_ids == expected[1]


def test_a_burst_of_prompts_shares_its_prefill_and_decode_steps(ray_cluster, mtp_checkpoint, prompts, expected):
    """The prompts of one `generate` reach the prefill shard in one call, and their hand-offs the decode shard in
    one call: one prefill step computes them all (68 tokens, within the prefill budget) and every decode step
    runs them together, rather than the first alone while the rest wait for the next step."""
    with Cluster(config(mtp_checkpoint, **TWO_GROUPS)) as c:
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
        steps = {s["role"]: s["engine"]["steps"] for s in c.stats()["shards"]}
        assert steps == {"prefill": 1, "decode": GREEDY.max_tokens - 1}  # the first token comes from the prefill


def test_an_expert_group_refuses_experts_it_does_not_hold_or_the_layer_does_not_have(ray_cluster, mtp_checkpoint):
    """Tokens routed to an expert outside the group's slots, or past the layer's experts, are an error that names
    the expert and the layer (the second was an IndexError about a stack); an expert it holds computes."""
    from moeserve.actors import wire
    with Cluster(config(mtp_checkpoint, transport="ray", **TWO_GROUPS)) as c:
        held = ray.get(c.groups[0].held.remote(0))
        layer, experts = next(iter(held.items()))
        n_routed = c.args.n_routed_experts
        elsewhere = min(set(range(n_routed)) - set(experts))
        payload = wire.Payload(torch.randn(1, c.args.dim))
        for expert, error in [(elsewhere, f"experts \\[{elsewhere}\\] of layer {layer}, which this group does not "
                                          f"hold"),
                              (n_routed, f"expert {n_routed} of layer {layer}, which has {n_routed} routed experts")]:
            work = wire.Assignments(torch.tensor([0], dtype=torch.int32), torch.tensor([expert], dtype=torch.int32),
                                    torch.tensor([1.0]))
            with pytest.raises(ray.exceptions.RayTaskError, match=error):
                ray.get(c.groups[0].compute.remote(layer, payload, work))
        assert ray.get(c.groups[0].compute.remote(layer, payload, wire.Assignments(
            torch.tensor([0], dtype=torch.int32), torch.tensor([experts[0]], dtype=torch.int32),
            torch.tensor([1.0])))).shape == (1, c.args.dim)


def test_bf16_dispatch_keeps_greedy_and_fp8_moves_logprobs_a_bounded_amount(ray_cluster, mtp_checkpoint, prompts,
                                                                           expected, capsys):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    exact = LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)
    with Cluster(config(mtp_checkpoint, dispatch_dtype="bf16", **TWO_GROUPS)) as c:
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
    with Cluster(config(mtp_checkpoint, dispatch_dtype="fp8", **TWO_GROUPS)) as c:
        fp8 = c.generate(prompts, params)
    diffs = [abs(a - b) for e, f in zip(exact, fp8) for a, b, t, u in zip(e.logprobs, f.logprobs, e.token_ids,
                                                                          f.token_ids) if t == u]
    with capsys.disabled():
        print(f"\nFP8 dispatch: max |delta logprob| {max(diffs):.4f}, mean {sum(diffs) / len(diffs):.5f} "
              f"over {len(diffs)} tokens")
    assert max(diffs) < 0.1


def test_nccl_kv_transfer_without_gpus_is_refused_with_what_to_do(ray_cluster, mtp_checkpoint):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs: the transfer itself is tested below")
    with pytest.raises(InputError, match="kv_transfer: nccl .* 2 needed, the Ray cluster has 0; use "
                                         "kv_transfer: object_store"):
        Cluster(config(mtp_checkpoint, kv_transfer="nccl")).start()
    assert ray.is_initialized()  # a cluster joined by address is left running


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between a prefill and a decode shard needs 2 GPUs")
def test_nccl_kv_transfer_moves_exactly_the_latent_and_keeps_greedy(ray_cluster, mtp_checkpoint, prompts,
                                                                     expected):
    with Cluster(config(mtp_checkpoint, kv_transfer="nccl", dispatch_dtype="float32",
                        combine_dtype="float32")) as c:
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
        a = c.args
        assert c.stats()["kv_transfer_bytes"] == sum(map(len, prompts)) * a.n_layers * a.latent_dim * 4


@pytest.mark.parametrize("transport", ["collective", "ray"])
def test_a_rebalance_under_running_requests_moves_experts_and_changes_no_token(ray_cluster, mtp_checkpoint, prompts,
                                                                               transport):
    """EPLB on the load the shards measured, applied while requests decode: the groups load the moved experts
    beside the ones they serve, the shards switch between two steps, the old version is released, and every
    token equals the engine's, before, during and after."""
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = LLM(mtp_checkpoint, kv_cache_tokens=1024)
    expected = [o.token_ids for o in engine.generate(prompts * 2, long)]
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", expert_groups=4, redundant_experts=4,
                        transport=transport, engine={"kv_cache_tokens": 1024, "block_size": 4},
                        rebalance={"auto": False})  # on demand only: this test counts the versions
    with Cluster(cfg) as c:
        assert [o.token_ids for o in c.generate(prompts, long)] == expected[:len(prompts)]  # load to measure
        before = c.phy2log
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts * 2, long)), daemon=True)
        thread.start()
        time.sleep(1.0)  # the requests are decoding
        report = c.rebalance()
        thread.join(300)
        print(f"rebalance ({transport}): {report['moved_experts']} experts moved; per-group max/mean load by layer "
              f"{[round(x, 2) for x in report['imbalance_before']]} -> {[round(x, 2) for x in report['imbalance_after']]}")
        assert [o.token_ids for o in outcome["outs"]] == expected
        assert report["version"] == 1 and report["moved_experts"] > 0 and report["tokens"] > 0
        assert max(report["imbalance_after"]) < max(report["imbalance_before"])
        assert c.phy2log != before
        stats = c.stats()
        assert stats["placement_version"] == 1
        assert all(s["placement_version"] == 1 for s in stats["shards"])
        assert all(g["placement_versions"] == [1] for g in stats["expert_groups"])  # version 0 released
        held = ray.get([g.ready.remote() for g in c.groups])
        slots = len(c.phy2log[next(iter(c.phy2log))]) // 4
        for g, report_g in enumerate(held):  # each group holds exactly its new slots' experts
            assert report_g["experts"] == {layer: sorted(set(p[g * slots:(g + 1) * slots]))
                                           for layer, p in c.phy2log.items()}
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == \
            [o.token_ids for o in engine.generate(prompts, GREEDY)]


def test_uneven_load_triggers_a_rebalance_by_itself(ray_cluster, mtp_checkpoint, prompts):
    """rebalance.auto: the watcher sees an interval's per-group max/mean over the threshold and runs a round by
    itself; the tokens before and after are the engine's."""
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts * 2, long)]
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", expert_groups=4, redundant_experts=4,
                        engine={"kv_cache_tokens": 1024, "block_size": 4},
                        rebalance={"interval_s": 0.5, "threshold": 1.1, "min_tokens": 16})
    with Cluster(cfg) as c:
        assert [o.token_ids for o in c.generate(prompts * 2, long)] == expected
        deadline = time.monotonic() + 30
        while c.version == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        report = c.stats()["last_rebalance"]
        assert c.version >= 1 and report["moved_experts"] > 0
        assert max(report["imbalance_before"]) > 1.1
        assert max(report["imbalance_after"]) < max(report["imbalance_before"])
        assert [o.token_ids for o in c.generate(prompts * 2, long)] == expected


def test_an_fp8_checkpoint_resident_in_the_cluster_equals_the_fp8_engine(ray_cluster, prompts):
    """FP8 weights stay e4m3 in the shards and the expert groups, which compute as the engine's FP8Linear layers do:
    with the default dispatch the experts quantise the rows the engine quantises; with FP8 dispatch they receive
    them quantised in the same 1x128 tiles, which quantise again to themselves in float32. Then the groups' FP8
    experts stacked through the fused-MoE Triton kernel (in the interpreter here)."""
    from moeserve.cluster import DEMO_MODEL_FP8
    engine = LLM(DEMO_MODEL_FP8, device="cpu", dtype="float32", fp8_resident=True, kv_cache_tokens=1024)
    expected = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    for dispatch in ("auto", "fp8"):
        with Cluster(config(DEMO_MODEL_FP8, fp8_resident=True, dispatch_dtype=dispatch, **TWO_GROUPS)) as c:
            assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected, dispatch
            # the experts' e4m3 weights and their fp32 block scales, nothing dequantised
            assert all(g["weight_dtypes"] == ["float32", "float8_e4m3fn"] for g in c.stats()["expert_groups"])
            assert all(g["experts_held_as"] == ["modules"] for g in c.stats()["expert_groups"])  # one at a time
    pytest.importorskip("triton")  # the groups' FP8 experts stacked, through the fused-MoE kernel
    with Cluster(config(DEMO_MODEL_FP8, fp8_resident=True, moe_kernel="triton", **TWO_GROUPS)) as c:
        assert [o.token_ids for o in c.generate(prompts, GREEDY)] == expected
        groups = c.stats()["expert_groups"]
        assert all(g["experts_held_as"] == ["fp8 stacks"] and g["moe_kernel"] == "triton" for g in groups)
        assert all(g["weight_dtypes"] == ["float32", "float8_e4m3fn"] for g in groups)


def resuming_client(llm: LLM, prompt: list[int], free: RequestOutput, k: int, closed: list) -> ClusterClient:
    """A client whose attempts are played by the engine: the first sends the first k of `free`'s tokens and loses
    its shard; the resumed one generates from the prompt and those tokens. `closed` gets each resumed attempt's
    (tokens sent, tokens generated) when it is closed."""
    async def attempt(tokens, attempt_params, rid, trace, wants_increments):
        if "resumed" not in rid:  # k tokens, then the shard is lost
            for i in range(1, k + 1):
                yield Delta(rid, free.token_ids[i - 1:i], free.token_ids[:i], num_prompt_tokens=len(prompt))
            raise ShardLost("killed")
        out = llm.generate([tokens], attempt_params)[0]  # blind to the text before the point of resumption
        sent = 0
        try:
            for i in range(1, len(out.token_ids)):
                sent = i
                yield Delta(rid, out.token_ids[i - 1:i], out.token_ids[:i], num_prompt_tokens=len(tokens))
            sent = len(out.token_ids)
            yield Delta(rid, out.token_ids[-1:], out.token_ids, out.finish_reason, num_prompt_tokens=len(tokens),
                        final=out)
        finally:
            closed.append((sent, len(out.token_ids)))

    client = ClusterClient(llm.model.args, llm.tokenizer, [], [], 4096, 16, recover_timeout_s=10)
    client._attempt = attempt
    return client


def resumed_deltas(client: ClusterClient, prompt: list[int], params: SamplingParams, increments: bool) -> list:
    async def run():
        return [delta async for delta in client.stream(prompt, params, increments=increments)]
    return asyncio.run(run())


@pytest.mark.parametrize("increments", [True, False])
@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_the_point_of_resumption_ends_the_request_there(increments, include):
    """A request whose shard dies after its first k tokens resumes from its prompt and those tokens, so its new
    shard sees only the text after them and misses a stop string that began before: the client finds it and ends
    the request where the engine would have (tokens, text, finish reason; the text with the stop string when
    include_stop_str_in_output), and stops the resumed attempt there. The attempts are played by the engine
    itself, the first cut short by a lost shard."""
    llm = LLM()
    prompt = llm.encode("def fibonacci(")
    free = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    decode = llm.tokenizer.decode
    for k in range(3, 30):  # a stop string of the last two characters before token k and the first two after
        head, text = decode(free.token_ids[:k]), free.text
        stop = text[len(head) - 2:len(head) + 2]
        if text.startswith(head) and len(stop) == 4 and text.find(stop) == len(head) - 2:
            break
    else:
        raise AssertionError(f"no stop string spans a token boundary of {text!r} the first time it occurs")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    expected = llm.generate([prompt], params)[0]
    assert expected.finish_reason == "stop" and len(expected.token_ids) < 40
    assert expected.text.endswith(stop) == include
    closed = []
    client = resuming_client(llm, prompt, free, k, closed)
    deltas = resumed_deltas(client, prompt, params, increments)
    final = deltas[-1].final
    assert (final.token_ids, final.text, final.finish_reason) == (expected.token_ids, expected.text, "stop")
    assert final.stop_reason == stop == expected.stop_reason  # the string its shard did not see whole
    assert deltas[-1].token_ids == expected.token_ids and client.resumed == 1
    assert [t for d in deltas for t in d.new_token_ids] == expected.token_ids  # no token twice or missing
    sent, generated = closed[0]
    assert sent == len(expected.token_ids) - k < generated  # the resumed attempt was closed where the request ended


@pytest.mark.parametrize("include", [False, True])
def test_a_resumed_request_ended_by_a_stop_token_reports_the_engines_text(include):
    """The client joins a resumed request's text from all of its tokens: the stop token that ended it is left out
    of the text (kept with include_stop_str_in_output), as the engine reports it."""
    llm = LLM()
    prompt = llm.encode("def fibonacci(")
    free = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    k = 4
    stop = next(t for i, t in enumerate(free.token_ids) if i > k and free.token_ids.index(t) == i and
                llm.tokenizer.decode([t]).strip())
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop],
                            include_stop_str_in_output=include)
    expected = llm.generate([prompt], params)[0]
    assert expected.token_ids[-1] == stop and expected.finish_reason == "stop"
    client = resuming_client(llm, prompt, free, k, [])
    final = resumed_deltas(client, prompt, params, increments=False)[-1].final
    assert (final.token_ids, final.text, final.finish_reason) == (expected.token_ids, expected.text, "stop")
    assert final.stop_reason == stop and client.resumed == 1


def killing_controller(victim: str, before_loading: bool) -> type:
    """A controller that SIGKILLs the actor `victim` in the middle of a rebalance: once every group has loaded the
    new placement, before the shards are told of it; or (`before_loading`) just before the groups load it. Once."""
    class KillingController(Controller):
        killed = False

        def _prepare(self, version, phy2log, groups):
            if before_loading:
                self._kill()
            super()._prepare(version, phy2log, groups)
            self._kill()

        def _kill(self):
            if not self.killed:
                os.kill(self.where[victim]["pid"], signal.SIGKILL)
                self.killed = True
    return KillingController


@pytest.mark.parametrize("victim, transport, when", [("expert-group-1", "collective", "loaded"),
                                                     ("decode-0", "ray", "loaded"),
                                                     ("expert-group-0", "collective", "loading")])
def test_an_actor_killed_during_a_rebalance_leaves_one_live_placement_and_no_request_fails_or_changes(
        ray_cluster, mtp_checkpoint, monkeypatch, victim, transport, when):
    """An actor dies while a rebalance runs under requests. Killed once the groups hold the new placement, it is
    recovered into it: the steps that lost their experts wait for that recovery (which the rebalance must not hold
    up while it waits for the shards to switch), a restarted group serves the old placement too until every shard
    has switched. Killed before, the rebalance is called off with an error saying so, and the groups drop what they
    loaded for it. Either way every request completes with the engine's tokens, the controller, every shard and
    every group end on one placement version, each group holding exactly its slots' experts of it, and a later
    rebalance works."""
    prompts, params = mixed_requests(seed=4)
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)]
    monkeypatch.setattr(cluster_module, "Controller", killing_controller(victim, before_loading=when == "loading"))
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", transport=transport, rebalance={"auto": False},
                        engine={"kv_cache_tokens": 1024, "block_size": 4})
    with Cluster(cfg) as c:
        c.generate(prompts[:2], GREEDY)
        layers = sorted(c.phy2log)
        load = torch.arange(1.0, 17.0).pow(3).repeat(len(layers), 1)  # skewed: experts move
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts, params)), daemon=True)
        thread.start()
        while not ray.get(c.decode_shards[0].stats.remote())["engine"]["running"]:
            time.sleep(0.01)
        if when == "loaded":
            report = c.rebalance(load)
            assert report["version"] == 1 and report["moved_experts"] > 0
        else:
            with pytest.raises(ray.exceptions.RayTaskError, match="called off.*version 0, which goes on serving"):
                c.rebalance(load)
        thread.join(180)
        assert [o.token_ids for o in outcome["outs"]] == expected
        deadline = time.monotonic() + 60
        while not c.recoveries and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [event["lost"] for event in c.recoveries] == [[victim]]
        live = 1 if when == "loaded" else 0
        stats = c.stats()
        assert stats["placement_version"] == live
        assert [s["placement_version"] for s in stats["shards"]] == [live, live]
        assert [g["placement_versions"] for g in stats["expert_groups"]] == [[live]] * 4
        slots = len(c.phy2log[layers[0]]) // 4
        for g, report_g in enumerate(ray.get([g.ready.remote() for g in c.groups])):
            assert report_g["experts"] == {layer: sorted(set(p[g * slots:(g + 1) * slots]))
                                           for layer, p in c.phy2log.items()}
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
        if when == "loading":  # the controller kills once
            assert c.rebalance(load)["version"] == 1
            assert [o.token_ids for o in c.generate(prompts, params)] == expected


def killing_at_join(victim: str) -> type:
    """A controller that SIGKILLs the actor `victim` as a recovery is about to form the process group anew. Once."""
    class KillingController(Controller):
        killed = False

        def _join_collective(self, pids):
            if not self.killed and "recovering" in self.states.values():
                os.kill(self.where[victim]["pid"], signal.SIGKILL)
                self.killed = True
            return super()._join_collective(pids)
    return KillingController


@pytest.mark.parametrize("second", ["expert-group-2", "decode-0"])
def test_an_actor_killed_as_a_recovery_forms_the_process_group_is_recovered_in_it(ray_cluster, mtp_checkpoint,
                                                                                 monkeypatch, second):
    """Collective transport: an expert group dies under requests, and `second` as the recovery forms the process
    group anew. The other members wait for the dead one until the rendezvous timeout; the same recovery then brings
    the second back too and forms the group again with it. Every request completes with the engine's tokens (those
    of a dead decode shard resumed on its successor), and requests after it too."""
    prompts, params = mixed_requests(seed=2)
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)]
    monkeypatch.setattr(cluster_module, "Controller", killing_at_join(second))
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", transport="collective",
                        rebalance={"auto": False}, failures={"rendezvous_timeout_s": 5},
                        engine={"kv_cache_tokens": 1024, "block_size": 4, "prefill_max_num_batched_tokens": 2})
    with Cluster(cfg) as c:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts, params)), daemon=True)
        thread.start()
        while not ray.get(c.decode_shards[0].stats.remote())["engine"]["running"]:
            time.sleep(0.01)
        os.kill(c.where["expert-group-1"]["pid"], signal.SIGKILL)
        thread.join(180)
        assert [o.token_ids for o in outcome["outs"]] == expected
        assert [event["lost"] for event in c.recoveries] == [["expert-group-1", second]]
        assert (c.client.resumed > 0) == second.startswith("decode")
        assert {actor["state"] for actor in c.status()["actors"]} == {"alive"}
        assert [o.token_ids for o in c.generate(prompts, params)] == expected


def test_a_controller_killed_while_the_shards_switch_placements_finishes_the_switch(ray_cluster, mtp_checkpoint):
    """The controller dies in the middle of a rebalance: every group holds the new placement, the prefill shard was
    told of it, the decode shard not yet (played here by calling the actors as the controller does). The restarted
    controller takes the newest placement as the live one, tells the shard that was not told and releases the one
    before; requests running meanwhile keep the engine's tokens. The cluster's calls made while the controller
    restarts wait for it."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (5, 31, 12, 20)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (80, 50, 120, 70)]
    expected = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024).generate(prompts, params)]
    cfg = ClusterConfig(model=str(mtp_checkpoint), topology="cpu-local", rebalance={"auto": False},
                        engine={"kv_cache_tokens": 1024, "block_size": 4})
    with Cluster(cfg) as c:
        before = c.phy2log
        slots = len(before[next(iter(before))]) // 4
        swapped = {layer: p[slots:2 * slots] + p[:slots] + p[2 * slots:] for layer, p in before.items()}  # groups 0, 1
        groups, first = c.groups, ray.get(c.controller.view.remote())["pid"]
        ray.get([group.prepare.remote(1, {layer: p[i * slots:(i + 1) * slots] for layer, p in swapped.items()})
                 for i, group in enumerate(groups)])
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(outs=c.generate(prompts, params)), daemon=True)
        thread.start()
        time.sleep(0.3)
        ray.get(c.prefill_shards[0].set_placement.remote(1, swapped))
        os.kill(first, signal.SIGKILL)
        thread.join(120)
        assert [o.token_ids for o in outcome["outs"]] == expected
        assert c.status()["controller_rebuilt"]  # waits while Ray restarts the controller
        assert ray.get(c.controller.view.remote())["pid"] != first
        deadline = time.monotonic() + 30
        while any(g["placement_versions"] != [1] for g in c.stats()["expert_groups"]):
            assert time.monotonic() < deadline, c.stats()["expert_groups"]
            time.sleep(0.1)
        stats = c.stats()
        assert stats["placement_version"] == 1 and c.phy2log == swapped
        assert [s["placement_version"] for s in stats["shards"]] == [1, 1]
        assert [o.token_ids for o in c.generate(prompts, params)] == expected
