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

Everything is array code over all tokens at once, sources may differ per token; a shard's few decode tokens
are planned one by one (`plan_routes`), with the same choices.
"""
import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import numpy as np
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

    @functools.cached_property
    def arrays(self) -> SimpleNamespace:
        """log2phy, slot_gpu, slot_node and primary as NumPy arrays, for the planner."""
        return SimpleNamespace(log2phy=self.log2phy.numpy(), slot_gpu=self.slot_gpu.numpy(),
                               slot_node=self.slot_node.numpy(), primary=self.primary.numpy())

    @functools.cached_property
    def lists(self) -> SimpleNamespace:
        """The same as Python lists (each expert's replica slots without the padding), for `plan_routes`, which
        walks a few tokens one by one."""
        return SimpleNamespace(replicas=[[s for s in row if s >= 0] for row in self.log2phy.tolist()],
                               slot_gpu=self.slot_gpu.tolist(), slot_node=self.slot_node.tolist(),
                               primary=self.primary.tolist())

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


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """For each entry, how many earlier entries have the same key (0, 1, 2, ...)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    start = np.ones(len(keys), dtype=bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    idx = np.arange(len(keys))
    first = np.maximum.accumulate(np.where(start, idx, 0))
    occ = np.empty_like(keys)
    occ[order] = idx - first
    return occ


def _distinct(keys: np.ndarray) -> np.ndarray:
    """np.unique of a 1-D array, in fewer array ops: a layer has a few dozen keys, where the ops cost the time."""
    keys = np.sort(keys)
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if keys.size else keys


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_inverse=True) of an ascending array: its distinct values and each entry's index
    among them."""
    start = np.ones(len(keys), dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    return keys[start], np.cumsum(start) - 1


def relay_choice(spec: TopologySpec, src_local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plane, relay_local, plane_ok) for sources at in-node GPU indices src_local [T]: the plane a source's
    inter-node sends use and the in-node index of the relay they reach on every other node, its own when its
    plane is live; otherwise a live plane and the GPU index on it."""
    key = (spec.planes, spec.gpus_per_node, tuple(spec.planes_down))
    if key not in _RELAY_TABLES:  # the same few answers at every MoE layer: worked out once per spec
        _RELAY_TABLES[key] = _relay_table(spec)
    return tuple(column[src_local] for column in _RELAY_TABLES[key])


_RELAY_TABLES: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _relay_table(spec: TopologySpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """relay_choice for every in-node index of `spec`."""
    src_local = np.arange(spec.gpus_per_node)
    live = np.array(spec.live_planes)
    own_plane = np.array([spec.plane_of(l) for l in range(spec.gpus_per_node)])[src_local]
    plane_ok = np.isin(np.arange(spec.planes), live)[own_plane]
    plane = np.where(plane_ok, own_plane, live[src_local % len(live)])
    relay_local = np.where(plane_ok, src_local, plane if spec.planes > 1 else src_local)
    return plane, relay_local, plane_ok


def request_sender(spec: TopologySpec, src_gpu: int, gpu: int) -> Optional[int]:
    """Who sends GPU `gpu` the dispatches of a source at `src_gpu`: None for the source itself (gpu on its node,
    or the relay of gpu's node), otherwise that relay. Fixed for a spec, so a receiver can name its sender."""
    G = spec.gpus_per_node
    if gpu // G == src_gpu // G:
        return None
    relay = gpu // G * G + int(relay_choice(spec, np.array([src_gpu % G]))[1][0])
    return None if gpu == relay else relay


@dataclass
class Route:
    """One message of a layer's dispatch: the token `rows` (ascending) go to GPU `target`; `work` maps each GPU
    computing on them to its assignments (index into `rows`, logical expert id, gate weight); a `relay` target
    forwards the other GPUs' work inside its node and answers for all of them."""
    target: int
    rows: np.ndarray
    work: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
    relay: bool


def routes_of(plan: DispatchPlan, topk_ids: np.ndarray, weights: np.ndarray, src_gpu: int,
              spec: TopologySpec) -> list[Route]:
    """The plan of one source's tokens as messages: experts on its own node get the tokens straight, once per
    (token, GPU); every other node gets each token once, at its relay. topk_ids, weights: [T, k]."""
    T, k = topk_ids.shape
    G = spec.gpus_per_node
    token = np.arange(T).repeat(k)
    gpu, ids, w = plan.expert_gpu.numpy().ravel(), topk_ids.ravel(), weights.ravel()
    node = gpu // G
    relay_local = int(plan.relay_local.numpy()[0]) if T else src_gpu % G

    def assignments(local, sel) -> tuple:
        return local, ids[sel], w[sel]
    routes = []
    # `token` ascends, and so does any selection of it: its distinct rows are its runs
    for m in _distinct(node).tolist():
        on_m = node == m
        if m == src_gpu // G:
            for g in _distinct(gpu[on_m]).tolist():
                sel = gpu == g
                rows, local = _runs(token[sel])
                routes.append(Route(g, rows, {g: assignments(local, sel)}, relay=False))
            continue
        rows, local = _runs(token[on_m])  # each token crosses to node m once
        work = {g: assignments(local[gpu[on_m] == g], on_m & (gpu == g)) for g in _distinct(gpu[on_m]).tolist()}
        routes.append(Route(m * G + relay_local, rows, work, relay=True))
    return routes


def _choose_replicas(topk_ids: np.ndarray, src_gpu: np.ndarray, placement: Placement, n_nodes: int,
                     max_nodes: Optional[int]) -> np.ndarray:
    """The physical slot serving each (token, expert), [T, k]: primaries define the token's nodes; replicas
    only on those nodes (see plan_dispatch)."""
    log2phy, slot_node, primary = placement.arrays.log2phy, placement.arrays.slot_node, placement.arrays.primary
    if log2phy.shape[1] == 1:  # no expert has a second replica: nothing to choose
        return log2phy[topk_ids, 0]
    T, k = topk_ids.shape
    home_node = slot_node[primary[topk_ids]]                                              # [T, k]
    rows = np.arange(T)[:, None]
    visits = np.zeros((T, n_nodes), dtype=bool)
    visits[rows, home_node] = True
    cand = log2phy[topk_ids]                                                              # [T, k, R]
    cand_node = slot_node[np.maximum(cand, 0)]
    on_visited = visits[rows, cand_node.reshape(T, -1)].reshape(cand.shape)
    n_visits = visits.sum(1)
    # free to use any replica: the limit cannot be broken (nodes + k <= M, or M covers every node), or the
    # routing broke it already (an unrestricted gate), where balance is all that is left to gain
    free_to_roam = (n_visits + k <= max_nodes) | (max_nodes >= n_nodes) | (n_visits > max_nodes) if max_nodes \
        else np.zeros(T, dtype=bool)
    usable = (cand >= 0) & (on_visited | free_to_roam[:, None, None])
    n_usable = usable.sum(-1)                                                             # [T, k] >= 1
    # each source spreads an expert's tokens round-robin over its usable replicas, starting at a replica of
    # its own, so sources planning independently still share the replicas out evenly
    E = log2phy.shape[0]
    turn = (_occurrence((src_gpu[:, None] * E + topk_ids).ravel()).reshape(T, k) + src_gpu[:, None]) % n_usable
    pick = (usable.cumsum(-1) == (turn + 1)[..., None]) & usable
    return cand[rows, np.arange(k), pick.argmax(-1)]


def plan_dispatch(topk_ids: torch.Tensor, src_gpu: torch.Tensor | int, placement: Placement, spec: TopologySpec,
                  hidden: int, max_nodes: Optional[int] = None, dispatch_bytes: Optional[int] = None,
                  combine_bytes: Optional[int] = None, link_loads: bool = True) -> DispatchPlan:
    """topk_ids: [T, k] logical experts per token; src_gpu: [T] (or one int) global GPU of each token.
    dispatch_bytes / combine_bytes: one token's payload each way (default FP8 with scales / BF16).
    max_nodes (M): a replica on a node the token does not already visit is used only when that cannot make
    the token exceed M nodes (its nodes + k <= M, or M >= all nodes) or its primaries already exceed M;
    None keeps every token on the nodes its primaries visit. Without `link_loads` the plan leaves out the
    per-link loads and the time estimate (`link_load` and `time_us` empty): a transport executing the plan
    at every layer needs only the routes and the bytes.

    The arithmetic is NumPy's: an MoE layer plans every step for a few dozen tokens, where an array op costs a
    microsecond or two and a torch op five or more (about 60 ops: 0.3 ms a layer in torch on the demo model)."""
    topk = topk_ids.numpy() if isinstance(topk_ids, torch.Tensor) else np.asarray(topk_ids)
    T, k = topk.shape
    G, N = spec.gpus_per_node, spec.nodes
    src = np.asarray(src_gpu.numpy() if isinstance(src_gpu, torch.Tensor) else src_gpu, dtype=np.int64)
    src = np.full(T, src) if src.ndim == 0 else src
    src_node, src_local = src // G, src % G
    slot = _choose_replicas(topk, src, placement, N, max_nodes)                           # [T, k]
    gpu = placement.arrays.slot_gpu[slot]
    node = gpu // G

    # -- routes -----------------------------------------------------------------------------------------
    remote = node != src_node[:, None]
    token = np.arange(T).repeat(k).reshape(T, k)
    node_pairs = _distinct((token * N + node)[remote])                                    # (token, node)
    pair_token = node_pairs // N
    pair_node = node_pairs % N
    plane, relay_local, plane_ok = relay_choice(spec, src_local)                          # [T] each
    detour = ~plane_ok & (relay_local != src_local)                                       # NVLink hop first

    # intra-node forwards from the relay (remote experts) or the source (local experts), once per GPU
    relay_gpu = node * G + relay_local[:, None]
    from_gpu = np.where(remote, relay_gpu, src[:, None])
    forward = gpu != from_gpu
    gpu_pairs = _distinct((token * spec.num_gpus + gpu)[forward])
    detour_tokens = _distinct(pair_token[detour[pair_token]])

    # -- bytes ----------------------------------------------------------------------------------------------
    d = dispatch_bytes if dispatch_bytes is not None else fp8_dispatch_bytes(hidden)  # per token, one way
    c = combine_bytes if combine_bytes is not None else bf16_combine_bytes(hidden)
    per_send = d + c
    bytes_per_plane = np.bincount(plane[pair_token], minlength=spec.planes) * float(per_send)
    n_inter = len(node_pairs)
    n_intra = len(gpu_pairs) + len(detour_tokens)
    bytes_ = {"inter_node": n_inter * per_send, "intra_node": n_intra * per_send,
              "inter_node_dispatch": n_inter * d, "inter_node_combine": n_inter * c}

    # -- link loads, and the time: the busiest link of each class, plus one latency per hop -------------------
    link_load, time_us = {}, {}
    if link_loads:
        fwd_token, fwd_gpu = gpu_pairs // spec.num_gpus, gpu_pairs % spec.num_gpus
        first = np.zeros((T, spec.num_gpus), dtype=np.int64)
        first[token[forward], gpu[forward]] = from_gpu[forward]
        fwd_from = first[fwd_token, fwd_gpu]
        nic_tx = np.zeros((N, spec.planes))
        nic_rx = np.zeros((N, spec.planes))
        p = plane[pair_token]
        np.add.at(nic_tx, (src_node[pair_token], p), d)
        np.add.at(nic_rx, (pair_node, p), d)
        np.add.at(nic_tx, (pair_node, p), c)   # combine back
        np.add.at(nic_rx, (src_node[pair_token], p), c)
        nv_tx = np.zeros(spec.num_gpus)
        nv_rx = np.zeros(spec.num_gpus)
        src_g, relay_g = src[detour_tokens], src_node[detour_tokens] * G + relay_local[detour_tokens]
        for a, b in ((fwd_from, fwd_gpu), (src_g, relay_g)):   # forwards, then detours to a live plane
            np.add.at(nv_tx, a, d)
            np.add.at(nv_rx, b, d)
            np.add.at(nv_tx, b, c)
            np.add.at(nv_rx, a, c)
        link_load = {name: torch.from_numpy(v.astype(np.float32)) for name, v in
                     (("nic_tx", nic_tx), ("nic_rx", nic_rx), ("nvlink_tx", nv_tx), ("nvlink_rx", nv_rx))}

        def busiest(tx, rx, gbps):
            return float(np.maximum(tx.max(), rx.max())) / (gbps * 1e3) if tx.size else 0.0  # B/(GB/s) -> us
        share_d, share_c = d / per_send, c / per_send
        inter_us = busiest(nic_tx, nic_rx, spec.nic_gbps) if n_inter else 0.0
        intra_us = busiest(nv_tx, nv_rx, spec.intra_node_gbps) if n_intra else 0.0
        hops = (spec.inter_node_latency_us if n_inter else 0.0) + (spec.intra_node_latency_us if n_intra else 0.0)
        time_us = {"dispatch": (inter_us + intra_us) * share_d + hops,
                   "combine": (inter_us + intra_us) * share_c + hops}

    nodes_hit = np.zeros((T, N), dtype=bool)
    nodes_hit[np.arange(T)[:, None], node] = True
    return DispatchPlan(
        expert_slot=torch.from_numpy(slot), expert_gpu=torch.from_numpy(gpu),
        nodes_per_token=torch.from_numpy(nodes_hit.sum(1)), inter_node_sends=n_inter,
        naive_sends=int(remote.sum()), bytes=bytes_,
        bytes_per_plane=torch.from_numpy(bytes_per_plane.astype(np.float32)), link_load=link_load,
        time_us=time_us, plane=torch.from_numpy(plane), relay_local=torch.from_numpy(relay_local))


@dataclass
class RoutedBytes:
    """What `plan_routes` predicts one source's routes move, as `plan_dispatch` counts it."""
    inter_node: int
    intra_node: int
    bytes_per_plane: list[int]
    naive_sends: int          # (token, remote expert) pairs
    remote_tokens: int        # tokens with an expert on another node


# Up to this many (token, expert) pairs `plan_routes` walks them one by one. Measured on one CPU thread (the demo
# model's 16 experts on one GPU slot / on ClusterConfig()'s four slots over two nodes; V3's 256 on 32 GPUs): at 4-8
# pairs 8 / 15 / 23 us against 45 / 90 / 111 us for the array code, at 128 pairs 54 / 104 / 142 against 46 / 118 / 226;
# at 256 pairs (V3) 221 against 246.
SMALL_ASSIGNMENTS = 128


def plan_routes(topk_ids: np.ndarray, weights: np.ndarray, src_gpu: int, placement: Placement, spec: TopologySpec,
                max_nodes: Optional[int], dispatch_bytes: int, combine_bytes: int) -> tuple[list[Route], RoutedBytes]:
    """The routes of one source's tokens (`routes_of`) and the bytes `plan_dispatch` predicts for them: what a shard
    sends at every MoE layer. A decode step's few tokens (up to SMALL_ASSIGNMENTS pairs) are planned token by token
    in plain Python, the same choices the array code makes (the tests hold the two equal), since there each array
    op costs more than the arithmetic of a few dozen numbers."""
    if topk_ids.size <= SMALL_ASSIGNMENTS:
        return _routes_one_by_one(topk_ids, weights, src_gpu, placement, spec, max_nodes,
                                  dispatch_bytes + combine_bytes)
    plan = plan_dispatch(torch.from_numpy(topk_ids), src_gpu, placement, spec, 0, max_nodes, dispatch_bytes,
                         combine_bytes, link_loads=False)
    remote = plan.expert_gpu.numpy() // spec.gpus_per_node != src_gpu // spec.gpus_per_node
    return routes_of(plan, topk_ids, weights, src_gpu, spec), RoutedBytes(
        plan.bytes["inter_node"], plan.bytes["intra_node"], [int(b) for b in plan.bytes_per_plane.tolist()],
        plan.naive_sends, int(remote.any(1).sum()))


def _routes_one_by_one(topk_ids: np.ndarray, weights: np.ndarray, src_gpu: int, placement: Placement,
                       spec: TopologySpec, max_nodes: Optional[int], per_send: int) -> tuple[list[Route], RoutedBytes]:
    """plan_routes for a few tokens: each (token, expert) pair goes to its GPU if that is on the source's node,
    else to its node's relay; the bytes count (token, node) crossings and (token, GPU) forwards as plan_dispatch
    does."""
    G = spec.gpus_per_node
    src_node = src_gpu // G
    plane, relay_local, plane_ok = (int(v[0]) for v in relay_choice(spec, np.array([src_gpu % G])))
    slot_gpu = placement.lists.slot_gpu
    slots = _choose_replicas_one_by_one(topk_ids.tolist(), src_gpu, placement, spec.nodes, max_nodes)
    targets: dict[int, dict[int, tuple[list, list, list]]] = {}   # target -> GPU computing -> (tokens, ids, weights)
    node_pairs, gpu_pairs, naive_sends = set(), set(), 0
    for t, (row, ids, ws) in enumerate(zip(slots, topk_ids.tolist(), weights.tolist())):
        for slot, e, w in zip(row, ids, ws):
            gpu = slot_gpu[slot]
            node = gpu // G
            target = gpu if node == src_node else node * G + relay_local
            if node != src_node:
                node_pairs.add((t, node))
                naive_sends += 1
            if gpu != (target if node != src_node else src_gpu):   # forwarded inside the node
                gpu_pairs.add((t, gpu))
            tokens, experts, gate = targets.setdefault(target, {}).setdefault(gpu, ([], [], []))
            tokens.append(t)
            experts.append(e)
            gate.append(w)
    routes = []
    for target in sorted(targets):
        groups = targets[target]
        rows = sorted({t for tokens, _, _ in groups.values() for t in tokens})
        row_of = {t: i for i, t in enumerate(rows)}
        work = {g: (np.array([row_of[t] for t in tokens], dtype=np.int64), np.array(experts, dtype=np.int64),
                    np.array(gate, dtype=np.float32)) for g, (tokens, experts, gate) in sorted(groups.items())}
        routes.append(Route(target, np.array(rows, dtype=np.int64), work, relay=target // G != src_node))
    remote_tokens = {t for t, _ in node_pairs}
    detours = len(remote_tokens) if not plane_ok and relay_local != src_gpu % G else 0  # NVLink to a live plane first
    per_plane = [0] * spec.planes
    per_plane[plane] = len(node_pairs) * per_send
    return routes, RoutedBytes(len(node_pairs) * per_send, (len(gpu_pairs) + detours) * per_send, per_plane,
                               naive_sends, len(remote_tokens))


def _choose_replicas_one_by_one(topk: list[list[int]], src_gpu: int, placement: Placement, n_nodes: int,
                                max_nodes: Optional[int]) -> list[list[int]]:
    """_choose_replicas for one source, token by token."""
    lists = placement.lists
    replicas, slot_node, primary = lists.replicas, lists.slot_node, lists.primary
    if placement.log2phy.shape[1] == 1:  # no expert has a second replica: nothing to choose
        return [[replicas[e][0] for e in row] for row in topk]
    seen: dict[int, int] = {}   # expert -> its entries so far (the round-robin turn)
    slots = []
    for row in topk:
        visits = {slot_node[primary[e]] for e in row}
        n, k = len(visits), len(row)
        free = bool(max_nodes) and (n + k <= max_nodes or max_nodes >= n_nodes or n > max_nodes)
        chosen = []
        for e in row:
            usable = replicas[e] if len(replicas[e]) == 1 else \
                [s for s in replicas[e] if free or slot_node[s] in visits]
            turn = seen.get(e, 0)
            seen[e] = turn + 1
            chosen.append(usable[(turn + src_gpu) % len(usable)])
        slots.append(chosen)
    return slots
