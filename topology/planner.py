"""The dispatch planner: for a batch of routed tokens, which replica serves each (token, expert), and how the
token's hidden state travels there and back.

Route of one token from source GPU s (local index l on node n):
- experts on node n: NVLink straight to each expert GPU (once per GPU);
- experts on another node m: ONE send per (token, m) over plane(l) to the relay, GPU l of node m, which
  forwards over NVLink to each expert GPU on m (once per GPU). If plane(l) is down, the token first moves
  over NVLink to the GPU of node n on a live plane, and uses that plane and that relay index.
Combine runs the same path backwards; the relay sums its node's expert outputs first, so the return trip
also crosses the network once per (token, node). Dispatch payloads are FP8 (1 byte per value plus one fp32
scale per 128), combine payloads BF16.

Node-limited routing: the gate picks experts from at most M groups, and the placement keeps every logical
expert's primary replica on its group's node, so primaries alone reach at most M nodes; a redundant
replica is used only on a node the token already visits. A plan from an unrestricted gate is accepted too,
and its extra nodes show in `max_nodes_per_token` and the bytes.

Everything is tensor code over all tokens at once; sources may differ per token.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from .spec import TopologySpec


def fp8_dispatch_bytes(hidden: int) -> int:
    return hidden + 4 * -(-hidden // 128)


def bf16_combine_bytes(hidden: int) -> int:
    return 2 * hidden


@dataclass
class Placement:
    """Where the physical expert slots of one MoE layer live. phy2log: [slots]; slot s is on GPU
    s // slots_per_gpu (global GPU index), node gpu // gpus_per_node."""
    phy2log: torch.Tensor
    slots_per_gpu: int
    gpus_per_node: int
    n_groups: int = 1
    log2phy: torch.Tensor = field(init=False)     # [E, max_replicas], -1 padded
    slot_gpu: torch.Tensor = field(init=False)    # [slots]
    slot_node: torch.Tensor = field(init=False)   # [slots]
    primary: torch.Tensor = field(init=False)     # [E] the slot on the expert's group's home node

    def __post_init__(self):
        phy2log = self.phy2log.long()
        S = phy2log.numel()
        E = int(phy2log.max()) + 1
        self.slot_gpu = torch.arange(S) // self.slots_per_gpu
        self.slot_node = self.slot_gpu // self.gpus_per_node
        order = torch.sort(phy2log, stable=True).indices
        counts = torch.bincount(phy2log, minlength=E)
        if (counts == 0).any():
            raise ValueError(f"logical expert {int((counts == 0).nonzero()[0])} has no replica")
        rank = torch.arange(S) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        self.log2phy = torch.full((E, int(counts.max())), -1, dtype=torch.long)
        self.log2phy[phy2log[order], rank] = order
        n_nodes = int(self.slot_node.max()) + 1
        group = phy2log // (E // self.n_groups)                  # [slots]
        per_node = torch.zeros(self.n_groups, n_nodes).index_put_((group, self.slot_node), torch.ones(S),
                                                                  accumulate=True)
        home = per_node.argmax(dim=1)                              # [groups]
        reps = self.log2phy
        rep_node = self.slot_node[reps.clamp(min=0)]
        at_home = (reps >= 0) & (rep_node == home[torch.arange(E) // (E // self.n_groups)][:, None])
        first_home = torch.where(at_home.any(1), at_home.float().argmax(1), torch.zeros(E, dtype=torch.long))
        self.primary = reps.gather(1, first_home[:, None])[:, 0]

    @property
    def num_gpus(self) -> int:
        return self.phy2log.numel() // self.slots_per_gpu


@dataclass
class DispatchPlan:
    expert_slot: torch.Tensor          # [T, k] physical slot serving each (token, expert)
    expert_gpu: torch.Tensor           # [T, k]
    nodes_per_token: torch.Tensor      # [T] distinct nodes a token visits, its own included when used
    inter_node_sends: int              # (token, remote node) pairs: one network crossing each way
    naive_sends: int                   # (token, remote expert) pairs: crossings without deduplication
    bytes: dict                        # link class -> bytes moved (dispatch + combine)
    bytes_per_plane: torch.Tensor      # [planes] inter-node bytes, both directions
    link_load: dict                    # link -> [endpoints] bytes: nic_tx/nic_rx [nodes, planes], nvlink_tx/rx [gpus]
    time_us: dict                      # estimated dispatch and combine time from the spec (both {} when a plan
                                       # is made without link loads)
    plane: torch.Tensor                # [T] the plane each token's inter-node sends use
    relay_local: torch.Tensor          # [T] in-node index of the relay GPU on every target node

    @property
    def max_nodes_per_token(self) -> int:
        return int(self.nodes_per_token.max()) if self.nodes_per_token.numel() else 0


def _occurrence(keys: torch.Tensor) -> torch.Tensor:
    """For each entry, how many earlier entries have the same key (0, 1, 2, ...)."""
    order = torch.sort(keys, stable=True).indices
    sorted_keys = keys[order]
    start = torch.ones_like(sorted_keys, dtype=torch.bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    idx = torch.arange(keys.numel())
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    occ = torch.empty_like(keys)
    occ[order] = idx - first
    return occ


def _choose_replicas(topk_ids: torch.Tensor, src_gpu: torch.Tensor, placement: Placement, n_nodes: int,
                     max_nodes: Optional[int]) -> torch.Tensor:
    """The physical slot serving each (token, expert), [T, k]: primaries define the token's nodes; replicas
    only on those nodes (see plan_dispatch)."""
    if placement.log2phy.shape[1] == 1:  # no expert has a second replica: nothing to choose
        return placement.log2phy[topk_ids, 0]
    T, k = topk_ids.shape
    home_node = placement.slot_node[placement.primary[topk_ids]]                        # [T, k]
    visits = torch.zeros(T, n_nodes, dtype=torch.bool).scatter_(1, home_node, True)
    cand = placement.log2phy[topk_ids]                                                    # [T, k, R]
    cand_node = placement.slot_node[cand.clamp(min=0)]
    on_visited = visits.gather(1, cand_node.view(T, -1)).view_as(cand)
    n_visits = visits.sum(1)
    # free to use any replica: the limit cannot be broken (nodes + k <= M, or M covers every node), or the
    # routing broke it already (an unrestricted gate), where balance is all that is left to gain
    free_to_roam = (n_visits + k <= max_nodes) | (max_nodes >= n_nodes) | (n_visits > max_nodes) if max_nodes \
        else torch.zeros(T, dtype=torch.bool)
    usable = (cand >= 0) & (on_visited | free_to_roam[:, None, None])
    n_usable = usable.sum(-1)                                                             # [T, k] >= 1
    # each source spreads an expert's tokens round-robin over its usable replicas, starting at a replica of
    # its own, so sources planning independently still share the replicas out evenly
    E = placement.log2phy.shape[0]
    turn = (_occurrence((src_gpu[:, None] * E + topk_ids).flatten()).view(T, k) + src_gpu[:, None]) % n_usable
    pick = (usable.cumsum(-1) == (turn + 1)[..., None]) & usable
    return cand.gather(2, pick.float().argmax(-1, keepdim=True))[..., 0]


def plan_dispatch(topk_ids: torch.Tensor, src_gpu: torch.Tensor | int, placement: Placement, spec: TopologySpec,
                  hidden: int, max_nodes: Optional[int] = None, dispatch_bytes: Optional[int] = None,
                  combine_bytes: Optional[int] = None, link_loads: bool = True) -> DispatchPlan:
    """topk_ids: [T, k] logical experts per token; src_gpu: [T] (or one int) global GPU of each token.
    dispatch_bytes / combine_bytes: one token's payload each way (default FP8 with scales / BF16).
    max_nodes (M): a replica on a node the token does not already visit is used only when that cannot make
    the token exceed M nodes (its nodes + k <= M, or M >= all nodes) or its primaries already exceed M;
    None keeps every token on the nodes its primaries visit. Without `link_loads` the plan leaves out the
    per-link loads and the time estimate (`link_load` and `time_us` empty): a transport executing the plan
    at every layer needs only the routes and the bytes."""
    T, k = topk_ids.shape
    G, N = spec.gpus_per_node, spec.nodes
    src_gpu = torch.as_tensor(src_gpu).expand(T) if torch.as_tensor(src_gpu).dim() == 0 else src_gpu
    src_node, src_local = src_gpu // G, src_gpu % G
    slot = _choose_replicas(topk_ids, src_gpu, placement, N, max_nodes)                  # [T, k]
    gpu = placement.slot_gpu[slot]
    node = gpu // G

    # -- routes -----------------------------------------------------------------------------------------
    remote = node != src_node[:, None]
    token = torch.arange(T)[:, None].expand(T, k)
    node_pairs = torch.unique((token * N + node)[remote])                                 # (token, node)
    pair_token = node_pairs // N
    pair_node = node_pairs % N
    live = torch.tensor(spec.live_planes)
    own_plane = torch.tensor([spec.plane_of(l) for l in range(G)])[src_local]           # [T]
    plane_ok = torch.isin(own_plane, live)
    plane = torch.where(plane_ok, own_plane, live[src_local % len(live)])               # [T]
    relay_local = torch.where(plane_ok, src_local, plane if spec.planes > 1 else src_local)
    detour = ~plane_ok & (relay_local != src_local)                                       # NVLink hop first

    # intra-node forwards from the relay (remote experts) or the source (local experts), once per GPU
    relay_gpu = node * G + relay_local[:, None]
    from_gpu = torch.where(remote, relay_gpu, src_gpu[:, None].expand(T, k))
    forward = gpu != from_gpu
    gpu_pairs = torch.unique((token * spec.num_gpus + gpu)[forward])
    detour_tokens = torch.unique(pair_token[detour[pair_token]]) if bool(detour.any()) else pair_token[:0]

    # -- bytes ----------------------------------------------------------------------------------------------
    d = dispatch_bytes if dispatch_bytes is not None else fp8_dispatch_bytes(hidden)  # per token, one way
    c = combine_bytes if combine_bytes is not None else bf16_combine_bytes(hidden)
    per_send = d + c
    bytes_per_plane = torch.zeros(spec.planes)
    if len(pair_token):
        bytes_per_plane.index_add_(0, plane[pair_token], torch.full((len(pair_token),), float(per_send)))
    n_inter = len(node_pairs)
    n_intra = len(gpu_pairs) + len(detour_tokens)
    bytes_ = {"inter_node": n_inter * per_send, "intra_node": n_intra * per_send,
              "inter_node_dispatch": n_inter * d, "inter_node_combine": n_inter * c}

    # -- link loads, and the time: the busiest link of each class, plus one latency per hop -------------------
    link_load, time_us = {}, {}
    if link_loads:
        fwd_token, fwd_gpu = gpu_pairs // spec.num_gpus, gpu_pairs % spec.num_gpus
        first = torch.zeros(T, spec.num_gpus, dtype=torch.long)
        first[token[forward], gpu[forward]] = from_gpu[forward]
        fwd_from = first[fwd_token, fwd_gpu]
        nic_tx = torch.zeros(N, spec.planes)
        nic_rx = torch.zeros(N, spec.planes)
        if len(pair_token):
            p = plane[pair_token]
            nic_tx.index_put_((src_node[pair_token], p), torch.full((len(p),), float(d)), accumulate=True)
            nic_rx.index_put_((pair_node, p), torch.full((len(p),), float(d)), accumulate=True)
            nic_tx.index_put_((pair_node, p), torch.full((len(p),), float(c)), accumulate=True)   # combine back
            nic_rx.index_put_((src_node[pair_token], p), torch.full((len(p),), float(c)), accumulate=True)
        nv_tx = torch.zeros(spec.num_gpus)
        nv_rx = torch.zeros(spec.num_gpus)
        nv_tx.index_add_(0, fwd_from, torch.full((len(fwd_from),), float(d)))
        nv_rx.index_add_(0, fwd_gpu, torch.full((len(fwd_gpu),), float(d)))
        nv_tx.index_add_(0, fwd_gpu, torch.full((len(fwd_gpu),), float(c)))
        nv_rx.index_add_(0, fwd_from, torch.full((len(fwd_from),), float(c)))
        if len(detour_tokens):
            src_g, relay_g = src_gpu[detour_tokens], src_node[detour_tokens] * G + relay_local[detour_tokens]
            nv_tx.index_add_(0, src_g, torch.full((len(src_g),), float(d)))
            nv_rx.index_add_(0, relay_g, torch.full((len(src_g),), float(d)))
            nv_tx.index_add_(0, relay_g, torch.full((len(src_g),), float(c)))
            nv_rx.index_add_(0, src_g, torch.full((len(src_g),), float(c)))
        link_load = {"nic_tx": nic_tx, "nic_rx": nic_rx, "nvlink_tx": nv_tx, "nvlink_rx": nv_rx}

        def busiest(tx, rx, gbps):
            return float(torch.maximum(tx.max(), rx.max())) / (gbps * 1e3) if tx.numel() else 0.0  # B/(GB/s) -> us
        share_d, share_c = d / per_send, c / per_send
        inter_us = busiest(nic_tx, nic_rx, spec.nic_gbps) if n_inter else 0.0
        intra_us = busiest(nv_tx, nv_rx, spec.intra_node_gbps) if n_intra else 0.0
        hops = (spec.inter_node_latency_us if n_inter else 0.0) + (spec.intra_node_latency_us if n_intra else 0.0)
        time_us = {"dispatch": (inter_us + intra_us) * share_d + hops,
                   "combine": (inter_us + intra_us) * share_c + hops}

    nodes_hit = torch.zeros(T, N, dtype=torch.bool).scatter_(1, node, True)
    return DispatchPlan(
        expert_slot=slot, expert_gpu=gpu, nodes_per_token=nodes_hit.sum(1), inter_node_sends=n_inter,
        naive_sends=int(remote.sum()), bytes=bytes_, bytes_per_plane=bytes_per_plane, link_load=link_load,
        time_us=time_us, plane=plane, relay_local=relay_local)
