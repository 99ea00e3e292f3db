"""The vectorised dispatch planner against a per-token loop written from the routing rules."""
import numpy as np
import pytest
import torch

from moeserve.kernels.model import select_experts
from moeserve.topology.eplb import rebalance_experts
from moeserve.topology import planner
from moeserve.topology.planner import Placement, bf16_combine_bytes, fp8_dispatch_bytes, plan_dispatch, plan_routes, \
    routes_of
from moeserve.topology.spec import PRESETS

HIDDEN = 7168


def slow_links(plan, topk, src, spec):
    """Per-token loop: one send per (token, remote node) on the sender's plane (or a live one, reached over
    NVLink first), relay = same local index on the target node, NVLink forwards once per expert GPU."""
    d, c = fp8_dispatch_bytes(HIDDEN), bf16_combine_bytes(HIDDEN)
    G, N = spec.gpus_per_node, spec.nodes
    nic_tx, nic_rx = torch.zeros(N, spec.planes), torch.zeros(N, spec.planes)
    nv_tx, nv_rx = torch.zeros(spec.num_gpus), torch.zeros(spec.num_gpus)

    def nvlink(a, b):
        nv_tx[a] += d; nv_rx[b] += d; nv_tx[b] += c; nv_rx[a] += c
    sends = 0
    for t in range(topk.shape[0]):
        s = int(src[t]); n, local = s // G, s % G
        plane = spec.plane_of(local)
        relay_local = local
        if plane in spec.planes_down:
            plane = spec.live_planes[local % len(spec.live_planes)]
            relay_local = plane
        gpus = {int(g) for g in plan.expert_gpu[t]}
        remote_nodes = {g // G for g in gpus} - {n}
        if remote_nodes and relay_local != local:
            nvlink(s, n * G + relay_local)
        for m in remote_nodes:
            sends += 1
            nic_tx[n, plane] += d; nic_rx[m, plane] += d; nic_tx[m, plane] += c; nic_rx[n, plane] += c
            for g in gpus:
                if g // G == m and g != m * G + relay_local:
                    nvlink(m * G + relay_local, g)
        for g in gpus:
            if g // G == n and g != s:
                nvlink(s, g)
    return sends, nic_tx, nic_rx, nv_tx, nv_rx


def node_limited_tokens(T, n_experts=256, seed=0):
    scores = torch.rand(T, n_experts, generator=torch.Generator().manual_seed(seed))
    return select_experts(scores, 8, 8, 4)


@pytest.fixture(scope="module")
def setup():
    spec = PRESETS["h800-mpft"]  # 4 nodes x 8 GPUs, 8 planes
    weight = torch.bincount(node_limited_tokens(4096).flatten(), minlength=256).float()[None]
    phy2log, _, _ = rebalance_experts(weight, 288, 8, 4, 32)
    return spec, Placement(phy2log[0], 9, 8, n_groups=8)


@pytest.mark.parametrize("planes_down", [[], [3], [0, 5]])
def test_link_loads_equal_the_per_token_loop(setup, planes_down):
    spec, placement = setup
    spec = spec.model_copy(update={"planes_down": planes_down})
    topk = node_limited_tokens(300, seed=1)
    src = torch.randint(0, 32, (300,), generator=torch.Generator().manual_seed(2))
    plan = plan_dispatch(topk, src, placement, spec, HIDDEN, max_nodes=4)
    sends, nic_tx, nic_rx, nv_tx, nv_rx = slow_links(plan, topk, src, spec)
    assert plan.inter_node_sends == sends
    for name, expected in (("nic_tx", nic_tx), ("nic_rx", nic_rx), ("nvlink_tx", nv_tx), ("nvlink_rx", nv_rx)):
        assert torch.equal(plan.link_load[name], expected), name
    for p in planes_down:
        assert plan.bytes_per_plane[p] == 0 and plan.link_load["nic_tx"][:, p].sum() == 0
    assert plan.bytes_per_plane.sum() == sends * (fp8_dispatch_bytes(HIDDEN) + bf16_combine_bytes(HIDDEN))


def test_every_token_is_served_by_a_replica_of_its_expert_within_its_nodes(setup):
    spec, placement = setup
    topk = node_limited_tokens(500, seed=3)
    plan = plan_dispatch(topk, 5, placement, spec, HIDDEN, max_nodes=4)
    assert torch.equal(placement.phy2log[plan.expert_slot], topk)
    assert plan.max_nodes_per_token <= 4
    # dedup: a token crosses to each remote node once, however many of its experts live there
    assert plan.inter_node_sends < plan.naive_sends


@pytest.mark.parametrize("sources, slack", [(1, 1), (32, 8)])
def test_replicas_share_an_experts_tokens_evenly(setup, sources, slack):
    """One source round-robins exactly; independent sources start at different replicas, so the leftovers of
    32 sources spread within a few tokens."""
    spec, placement = setup
    topk = node_limited_tokens(2000, seed=4)
    plan = plan_dispatch(topk, torch.arange(2000) % sources, placement, spec, HIDDEN, max_nodes=4)
    for e in (placement.log2phy[:, 1] >= 0).nonzero().flatten().tolist():
        slots = placement.log2phy[e][placement.log2phy[e] >= 0]
        used = torch.stack([(plan.expert_slot == s).sum() for s in slots])
        assert int(used.max() - used.min()) <= slack


def test_an_unrestricted_gate_is_planned_and_costs_more(setup):
    spec, placement = setup
    free = torch.rand(400, 256, generator=torch.Generator().manual_seed(6)).topk(8, dim=-1).indices
    limited = node_limited_tokens(400, seed=6)
    a = plan_dispatch(free, 0, placement, spec, HIDDEN, max_nodes=4)
    b = plan_dispatch(limited, 0, placement, spec, HIDDEN, max_nodes=4)
    assert torch.equal(placement.phy2log[a.expert_slot], free)
    assert a.inter_node_sends >= b.inter_node_sends


@pytest.mark.parametrize("redundant", [True, False])
def test_a_plan_without_link_loads_routes_and_counts_the_same(setup, redundant):
    """The transports' per-layer plan (no link loads) is the full plan's routes and bytes; a placement
    without replicas takes the shortcut and still serves every expert from its one slot."""
    spec, placement = setup
    if not redundant:
        placement = Placement(torch.arange(256), 8, 8, n_groups=8)
    spec = spec.model_copy(update={"planes_down": [3]})
    topk = node_limited_tokens(300, seed=7)
    src = torch.randint(0, 32, (300,), generator=torch.Generator().manual_seed(8))
    full = plan_dispatch(topk, src, placement, spec, HIDDEN, max_nodes=4)
    lean = plan_dispatch(topk, src, placement, spec, HIDDEN, max_nodes=4, link_loads=False)
    assert torch.equal(placement.phy2log[lean.expert_slot], topk)
    for name in ("expert_slot", "expert_gpu", "plane", "relay_local", "bytes_per_plane", "nodes_per_token"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    for name in ("bytes", "inter_node_sends", "naive_sends"):
        assert getattr(full, name) == getattr(lean, name), name
    assert lean.link_load == {} and lean.time_us == {} and full.link_load["nic_tx"].sum() > 0


@pytest.mark.parametrize("src_gpu, planes_down", [(0, []), (13, []), (13, [5]), (31, [7, 2])])
def test_routes_carry_each_choice_once_the_way_the_rules_say(setup, src_gpu, planes_down):
    """The messages of one source's plan against a per-choice loop: a choice served on the source's node goes
    straight to its GPU; any other goes to the relay of its node (the source's in-node index, or the live plane's
    when the source's plane is down), which forwards it to the GPU serving it. Each message names each token once,
    in ascending order."""
    spec, placement = setup
    spec = spec.model_copy(update={"planes_down": planes_down})
    G = spec.gpus_per_node
    topk = node_limited_tokens(200, seed=src_gpu)
    weights = torch.rand(topk.shape, generator=torch.Generator().manual_seed(1))
    plan = plan_dispatch(topk, src_gpu, placement, spec, HIDDEN, max_nodes=4, link_loads=False)
    local = src_gpu % G
    relay_local = local if spec.plane_of(local) not in planes_down else \
        spec.live_planes[local % len(spec.live_planes)]
    expected = []
    for t in range(topk.shape[0]):
        for j in range(topk.shape[1]):
            gpu = int(plan.expert_gpu[t, j])
            target = gpu if gpu // G == src_gpu // G else gpu // G * G + relay_local
            expected.append((target, gpu, t, int(topk[t, j]), float(weights[t, j])))
    got = []
    routes = routes_of(plan, topk.numpy(), weights.numpy(), src_gpu, spec)
    for route in routes:
        assert (route.rows[1:] > route.rows[:-1]).all()
        assert route.relay == (route.target // G != src_gpu // G)
        named = set()
        for gpu, (rows, ids, w) in route.work.items():
            named |= set(route.rows[rows].tolist())
            got += [(route.target, gpu, int(route.rows[r]), int(e), float(x)) for r, e, x in zip(rows, ids, w)]
        assert named == set(route.rows.tolist())
    assert len({r.target for r in routes}) == len(routes)
    assert sorted(got) == sorted(expected)


def small_placements():
    """(spec, placement, experts, top-k, groups, top groups, M): V3's 256 experts with 32 redundant slots on 4 nodes,
    64 experts without replicas, and the demo model's 16 experts over `ClusterConfig()`'s two nodes of two GPUs with
    four redundant slots."""
    h800 = PRESETS["h800-mpft"]
    demo = PRESETS["h800-mpft"].model_copy(update={"nodes": 2, "gpus_per_node": 2, "nics_per_node": 2, "planes": 2})
    cases = []
    for spec, E, k, groups, top, redundant in ((h800, 256, 8, 8, 4, 32), (h800, 64, 6, 8, 3, 0),
                                                (demo, 16, 4, 4, 2, 4)):
        load = torch.bincount(select_experts(torch.rand(4096, E, generator=torch.Generator().manual_seed(E)), k, groups,
                                             top).flatten(), minlength=E).float()[None] + 1
        phy2log, _, _ = rebalance_experts(load, E + redundant, groups, spec.nodes, spec.num_gpus)
        placement = Placement(phy2log[0], (E + redundant) // spec.num_gpus, spec.gpus_per_node, n_groups=groups)
        cases.append((spec, placement, E, k, groups, top))
    return cases


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("planes_down", [[], [1]])
def test_routes_planned_one_by_one_equal_the_array_code(case, planes_down):
    """A shard's few decode tokens are planned pair by pair in plain Python: the routes (targets, rows, each GPU's
    assignments and their dtypes) and the predicted bytes equal those of `routes_of(plan_dispatch(...))`, with and
    without replicas, a plane down, every node limit, an unrestricted gate, and tokens sharing experts (the
    round-robin turns)."""
    spec, placement, E, k, groups, top = small_placements()[case]
    spec = spec.model_copy(update={"planes_down": planes_down})
    rng = np.random.default_rng(case)
    d, c = 1000, 300
    for T in range(1, planner.SMALL_ASSIGNMENTS // k + 1):
        for trial in range(6):
            topk = select_experts(torch.from_numpy(rng.random((T, E), dtype=np.float32)), k, groups, top).numpy()
            if trial == 1:  # an unrestricted gate
                topk = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
            if trial == 2:  # every token the same experts
                topk[:] = topk[0]
            weights = rng.random((T, k), dtype=np.float32)
            src = int(rng.integers(spec.num_gpus))
            for max_nodes in (None, 1, 2, 4):
                plan = plan_dispatch(torch.from_numpy(topk), src, placement, spec, 0, max_nodes, d, c, link_loads=False)
                expected = routes_of(plan, topk, weights, src, spec)
                routes, planned = plan_routes(topk, weights, src, placement, spec, max_nodes, d, c)
                assert [(r.target, r.relay, r.rows.tolist(), list(r.work)) for r in routes] == \
                    [(r.target, r.relay, r.rows.tolist(), list(r.work)) for r in expected]
                for route, want in zip(routes, expected):
                    for g in want.work:
                        for got_array, want_array in zip(route.work[g], want.work[g]):
                            assert got_array.dtype == want_array.dtype and np.array_equal(got_array, want_array)
                assert (planned.inter_node, planned.intra_node, planned.naive_sends) == \
                    (plan.bytes["inter_node"], plan.bytes["intra_node"], plan.naive_sends)
                assert planned.bytes_per_plane == plan.bytes_per_plane.long().tolist()
                remote = plan.expert_gpu // spec.gpus_per_node != src // spec.gpus_per_node
                assert planned.remote_tokens == int(remote.any(1).sum())


def test_many_tokens_count_their_remote_tokens_as_a_loop_does(setup):
    """Past SMALL_ASSIGNMENTS pairs plan_routes takes the array code (whose routes the tests above hold to the rules);
    what it adds, the tokens with an expert on another node (which a shard whose plane is down first moves over
    NVLink), is counted as a loop over the plan counts them, and every pair is carried once."""
    spec, placement = setup
    spec = spec.model_copy(update={"planes_down": [2]})
    topk = node_limited_tokens(planner.SMALL_ASSIGNMENTS // 8 + 5, seed=9)
    weights = torch.rand(topk.shape, generator=torch.Generator().manual_seed(10)).numpy()
    plan = plan_dispatch(topk, 10, placement, spec, HIDDEN, 4, 500, 200, link_loads=False)
    routes, planned = plan_routes(topk.numpy(), weights, 10, placement, spec, 4, 500, 200)
    remote_tokens = {t for t in range(len(topk)) for g in plan.expert_gpu[t].tolist() if g // 8 != 10 // 8}
    assert planned.remote_tokens == len(remote_tokens) > 0
    assert sum(len(rows) for route in routes for rows, _, _ in route.work.values()) == topk.numel()
