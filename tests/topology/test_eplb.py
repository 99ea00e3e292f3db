"""EPLB: the published worked example, invariants of every policy, topology- and migration-awareness."""
import pytest
import torch

from moeserve.topology.eplb import gpu_imbalance, rebalance_experts, rebalance_with_migration

WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_published_worked_example():
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8, policy="hierarchical")
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


@pytest.mark.parametrize("policy", ["hierarchical", "global", "topology_aware"])
@pytest.mark.parametrize("seed", [0, 1])
def test_invariants(policy, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(1, 1000, (3, 64), generator=g)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 80, 8, 4, 16, policy=policy)
    assert phy2log.shape == (3, 80)
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == 80).all()
    for layer in range(3):
        counts = torch.bincount(phy2log[layer], minlength=64)
        assert torch.equal(counts, logcnt[layer])
        for e in range(64):  # log2phy lists exactly the slots holding e
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert sorted(slots.tolist()) == (phy2log[layer] == e).nonzero().flatten().tolist()
    # equal slots per GPU is structural (phy2log is GPU-major, 5 slots each); replication only helps balance
    assert (gpu_imbalance(weight, phy2log, logcnt, 16) <=
            gpu_imbalance(weight, torch.arange(64).repeat(3, 1), torch.ones(3, 64, dtype=torch.long), 16) + 1e-6).all()


def test_hierarchical_keeps_each_group_on_one_node_and_topology_aware_keeps_primaries_there():
    weight = torch.randint(1, 1000, (2, 64), generator=torch.Generator().manual_seed(3))
    for policy in ("hierarchical", "topology_aware"):
        phy2log, _, _ = rebalance_experts(weight, 80, 8, 4, 16, policy=policy)
        node_of_slot = torch.arange(80) // 20  # 4 GPUs x 5 slots per node
        for layer in range(2):
            for group in range(8):
                experts = range(group * 8, group * 8 + 8)
                nodes = {int(node_of_slot[s]) for e in experts for s in (phy2log[layer] == e).nonzero().flatten()}
                if policy == "hierarchical":
                    assert len(nodes) == 1
                else:  # one node holds a replica of every expert of the group
                    assert any(all((phy2log[layer][node_of_slot == n] == e).any() for e in experts) for n in nodes)


def test_migration_aware_keeps_a_good_placement_and_moves_little():
    weight = torch.randint(100, 1000, (2, 64), generator=torch.Generator().manual_seed(4)).float()
    current, _, _, moved = rebalance_with_migration(weight, None, 80, 8, 4, 16)
    nudged = weight * (1 + 0.01 * torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)))
    kept, _, _, moved = rebalance_with_migration(nudged, current, 80, 8, 4, 16, tolerance=0.05)
    assert moved == 0 and torch.equal(kept, current)
    shifted = weight.roll(7, dims=1) * torch.linspace(0.2, 3, 64)
    new, _, logcnt, moved = rebalance_with_migration(shifted, current, 80, 8, 4, 16, tolerance=0.0)
    fresh, _, fresh_cnt = rebalance_experts(shifted, 80, 8, 4, 16)
    from moeserve.topology.eplb import moved_experts
    assert moved <= moved_experts(current, fresh, 5)  # aligned GPUs never move more than the fresh labelling
    assert torch.allclose(gpu_imbalance(shifted, new, logcnt, 16), gpu_imbalance(shifted, fresh, fresh_cnt, 16))
