"""Expert-parallel load balancing (EPLB): which logical experts get extra replicas, and which GPU holds each
physical expert slot.

Glossary:
- logical expert: one of the model's routed experts (`n_routed_experts` per layer).
- physical expert (slot): a copy of a logical expert's weights on one GPU; a hot logical expert has several,
  and the tokens routed to it are split among them.
- phy2log [layers, slots]: the logical expert in each slot; slots are numbered GPU by GPU
  (slot s sits on GPU s // slots_per_gpu, which is on node gpu // gpus_per_node).
- log2phy [layers, logical, max_replicas]: the slots of each logical expert, -1 padded.
- logcnt [layers, logical]: replicas per logical expert.

Policies:
- `hierarchical` (the published one): pack expert groups onto nodes, replicate hot experts within each node,
  pack the node's replicas onto its GPUs. Keeps a group's experts on one node, so group-limited routing is
  node-limited; replicas cannot leave the node, so a hot node stays hot.
- `global`: replicate and pack over all GPUs as one pool; balances best, ignores nodes.
- `topology_aware` (moeserve's default): every logical expert keeps a primary replica on its group's node (so
  node-limited routing holds with primaries alone), while the redundant replicas go wherever they balance
  load best; the dispatch planner only uses a redundant replica on a node the token already visits.
- `rebalance_with_migration`: keep the current placement when a new one would not improve the imbalance by
  more than a tolerance, else choose among candidates the one that moves the fewest expert weights.
"""
from typing import Literal, Optional

import torch

Policy = Literal["hierarchical", "global", "topology_aware"]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n weighted items into num_packs packs of n / num_packs items each, heaviest first, each into the
    lightest pack that still has room.

    weight: [X, n] -> pack_index [X, n], rank_in_pack [X, n]"""
    X, n = weight.shape
    assert n % num_packs == 0, f"{n} items do not split evenly into {num_packs} packs"
    per_pack = n // num_packs
    pack_index = torch.empty(X, n, dtype=torch.long)
    rank_in_pack = torch.empty(X, n, dtype=torch.long)
    if per_pack == 1:
        return torch.arange(n).expand(X, n).clone(), torch.zeros(X, n, dtype=torch.long)
    order = weight.float().sort(dim=-1, descending=True, stable=True).indices
    for x in range(X):
        load = [0.0] * num_packs
        count = [0] * num_packs
        for item in order[x].tolist():
            pack = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: load[p])
            pack_index[x, item] = pack
            rank_in_pack[x, item] = count[pack]
            load[pack] += float(weight[x, item])
            count[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each extra slot to the logical expert with the highest load per replica.

    weight: [X, num_log] -> phy2log [X, num_phy], rank [X, num_phy] (replica index), logcnt [X, num_log]"""
    X, num_log = weight.shape
    assert num_phy >= num_log
    phy2log = torch.arange(num_phy).repeat(X, 1)
    rank = torch.zeros(X, num_phy, dtype=torch.long)
    logcnt = torch.ones(X, num_log, dtype=torch.long)
    rows = torch.arange(X)
    for slot in range(num_log, num_phy):
        hottest = (weight.float() / logcnt).max(dim=-1).indices
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1)).expand(perm.shape))
    return inv


def rebalance_hierarchical(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight: [layers, num_logical] -> phy2log [layers, num_physical], phyrank, logcnt [layers, num_logical]."""
    L, num_logical = weight.shape
    assert num_logical % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_physical % num_gpus == 0
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    # 1. groups -> nodes, balancing tokens per node. mlog: logical experts renumbered node by node.
    group_tokens = weight.unflatten(-1, (num_groups, group_size)).sum(-1)  # [L, groups]
    group_node, group_rank = balanced_packing(group_tokens, num_nodes)
    log2mlog = (((group_node * groups_per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size)).flatten(-2)  # [L, logical]
    mlog2log = _inverse(log2mlog)
    # 2. replicas within each node
    mlog_tokens = weight.gather(-1, mlog2log).view(-1, num_logical // num_nodes)  # [L * nodes, logical/node]
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_tokens, num_physical // num_nodes)
    # 3. the node's replicas -> its GPUs, by tokens per replica
    phy_tokens = (mlog_tokens / mlogcnt).gather(-1, phy2mlog)
    gpu, rank_in_gpu = balanced_packing(phy_tokens, num_gpus // num_nodes)
    phy2pphy = gpu * slots_per_gpu + rank_in_gpu
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)  # [L * nodes, slots/node], node-local mlog ids
    offsets = torch.arange(0, num_logical, num_logical // num_nodes).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(L, num_nodes, -1) + offsets).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    phyrank = phyrank.gather(-1, pphy2phy).view(L, -1)
    logcnt = mlogcnt.view(L, -1).gather(-1, log2mlog)
    return phy2log, phyrank, logcnt


def rebalance_topology_aware(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                             num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Primaries packed group-by-node as the hierarchical policy does; redundant replicas placed globally on
    the GPUs with the least load, one replica of an expert per GPU."""
    L, num_logical = weight.shape
    slots_per_gpu = num_physical // num_gpus
    assert num_logical % num_gpus == 0, "primaries must fill GPUs evenly"
    primaries_per_gpu = num_logical // num_gpus
    assert slots_per_gpu > primaries_per_gpu or num_physical == num_logical
    # how many replicas each expert gets, then primaries packed group-by-node by the load one replica will
    # carry (the extras take the rest), then the extras onto the lightest GPUs
    _, _, logcnt = replicate_experts(weight, num_physical)
    prim2log, _, _ = rebalance_hierarchical(weight / logcnt, num_logical, num_groups, num_nodes, num_gpus)
    phy2log = torch.empty(L, num_physical, dtype=torch.long)
    phyrank = torch.empty(L, num_physical, dtype=torch.long)
    for layer in range(L):
        per_replica = weight[layer].float() / logcnt[layer]
        slots: list[list[int]] = [prim2log[layer, g * primaries_per_gpu:(g + 1) * primaries_per_gpu].tolist()
                                  for g in range(num_gpus)]
        load = [sum(per_replica[e].item() for e in s) for s in slots]
        extra = [e for e in range(num_logical) for _ in range(int(logcnt[layer, e]) - 1)]
        extra.sort(key=lambda e: -per_replica[e].item())
        for e in extra:  # heaviest replica first, to the lightest GPU with room that lacks this expert
            gpu = min((g for g in range(num_gpus) if len(slots[g]) < slots_per_gpu and e not in slots[g]),
                      key=lambda g: load[g], default=None)
            if gpu is None:
                gpu = min((g for g in range(num_gpus) if len(slots[g]) < slots_per_gpu), key=lambda g: load[g])
            slots[gpu].append(e)
            load[gpu] += per_replica[e].item()
        flat = [e for s in slots for e in s]
        phy2log[layer] = torch.tensor(flat)
        seen: dict[int, int] = {}
        for s, e in enumerate(flat):
            phyrank[layer, s] = seen.get(e, 0)
            seen[e] = seen.get(e, 0) + 1
    return phy2log, phyrank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      policy: Policy = "topology_aware") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight: [layers, num_logical] tokens per expert -> (phy2log [layers, num_replicas],
    log2phy [layers, num_logical, max_replicas] (-1 padded), logcnt [layers, num_logical])."""
    weight = weight.float()
    L, num_logical = weight.shape
    if num_replicas < num_logical:
        raise ValueError(f"{num_replicas} slots cannot hold {num_logical} logical experts")
    if num_replicas % num_gpus:
        raise ValueError(f"{num_replicas} slots do not split evenly over {num_gpus} GPUs")
    if policy == "hierarchical" and num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    elif policy == "topology_aware" and num_groups % num_nodes == 0 and num_logical % num_gpus == 0:
        phy2log, phyrank, logcnt = rebalance_topology_aware(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:  # global: one node, one group
        phy2log, phyrank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    return phy2log, log2phy_of(phy2log, phyrank, logcnt), logcnt


def log2phy_of(phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    L, num_logical = logcnt.shape
    width = int(logcnt.max())
    log2phy = torch.full((L, num_logical * width), -1, dtype=torch.long)
    log2phy.scatter_(-1, phy2log * width + phyrank, torch.arange(phy2log.shape[1]).expand(L, -1).clone())
    return log2phy.view(L, num_logical, width)


def gpu_imbalance(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Per layer, max/mean of GPU loads when each expert's tokens split evenly over its replicas. [layers]"""
    per_slot = (weight.float() / logcnt).gather(-1, phy2log)
    gpu_load = per_slot.view(weight.shape[0], num_gpus, -1).sum(-1)
    return gpu_load.max(-1).values / gpu_load.mean(-1)


def moved_experts(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, slots_per_gpu: int) -> int:
    """Expert weights that must be copied: slots whose GPU did not hold that logical expert before."""
    L, S = new_phy2log.shape
    moves = 0
    for layer in range(L):
        old = old_phy2log[layer].view(-1, slots_per_gpu).tolist()
        new = new_phy2log[layer].view(-1, slots_per_gpu).tolist()
        for before, after in zip(old, new):
            remaining = list(before)
            for e in after:
                if e in remaining:
                    remaining.remove(e)
                else:
                    moves += 1
    return moves


def rebalance_with_migration(weight: torch.Tensor, current: Optional[torch.Tensor], num_replicas: int, num_groups: int,
                             num_nodes: int, num_gpus: int, tolerance: float = 0.05,
                             policy: Policy = "topology_aware"):
    """Migration-aware rebalancing: returns (phy2log, log2phy, logcnt, moved). Keeps `current` when its
    imbalance is within `tolerance` of the fresh plan's; otherwise takes the fresh plan with its GPUs
    relabelled within each node to match the current placement as closely as possible."""
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, policy)
    if current is None:
        return phy2log, log2phy, logcnt, phy2log.numel()
    slots = num_replicas // num_gpus
    cur_cnt = torch.zeros_like(logcnt).scatter_add_(1, current, torch.ones_like(current))
    if (cur_cnt > 0).all():
        keep = gpu_imbalance(weight, current, cur_cnt, num_gpus).max()
        fresh = gpu_imbalance(weight, phy2log, logcnt, num_gpus).max()
        if keep <= fresh * (1 + tolerance):
            ranks = _ranks(current)
            return current, log2phy_of(current, ranks, cur_cnt), cur_cnt, 0
    phy2log = _align_gpus(current, phy2log, slots, num_gpus // num_nodes)
    ranks = _ranks(phy2log)
    return phy2log, log2phy_of(phy2log, ranks, logcnt), logcnt, moved_experts(current, phy2log, slots)


def _ranks(phy2log: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(phy2log)
    for layer in range(phy2log.shape[0]):
        seen: dict[int, int] = {}
        for s, e in enumerate(phy2log[layer].tolist()):
            ranks[layer, s] = seen.get(e, 0)
            seen[e] = seen.get(e, 0) + 1
    return ranks


def _align_gpus(old: torch.Tensor, new: torch.Tensor, slots: int, gpus_per_node: int) -> torch.Tensor:
    """Permute the new plan's GPUs (whole GPUs, within a node, and whole nodes) so each lands where the most
    of its experts already are. Balance is unchanged: only which GPU gets which set of experts."""
    L = new.shape[0]
    out = new.clone()
    n_gpus = new.shape[1] // slots
    n_nodes = n_gpus // gpus_per_node
    for layer in range(L):
        old_sets = [set(old[layer, g * slots:(g + 1) * slots].tolist()) for g in range(n_gpus)]
        new_sets = [new[layer, g * slots:(g + 1) * slots] for g in range(n_gpus)]

        def overlap(g_new, g_old):
            return len(set(new_sets[g_new].tolist()) & old_sets[g_old])
        free_nodes = list(range(n_nodes))
        placement = [None] * n_gpus
        for node in range(n_nodes):  # greedily give each new node the old node it overlaps most
            members = range(node * gpus_per_node, (node + 1) * gpus_per_node)
            best = max(free_nodes, key=lambda o: sum(overlap(g, h) for g in members
                                                     for h in range(o * gpus_per_node, (o + 1) * gpus_per_node)))
            free_nodes.remove(best)
            free_gpus = list(range(best * gpus_per_node, (best + 1) * gpus_per_node))
            for g in sorted(members, key=lambda g: -max(overlap(g, h) for h in free_gpus)):
                h = max(free_gpus, key=lambda h: overlap(g, h))
                free_gpus.remove(h)
                placement[h] = g
        for h, g in enumerate(placement):
            out[layer, h * slots:(h + 1) * slots] = new_sets[g]
    return out
