"""The data plane's shared half and its default transport. `ExpertRouter` turns one MoE layer's routing into
routes along the dispatch planner's plan, counting the bytes it moves per link class and plane; each transport
(`RayExpertTransport` here, `CollectiveExpertTransport` in `collective.py`) only carries the routes.

Per step and layer: the planner picks a replica for each (token, expert); tokens for experts on the shard's
own node go straight to those groups; for every other node the tokens cross once, as one payload to the
relay group (same in-node index, the shard's plane), which fans them out inside the node and returns one
summed row per token. Combine waits for the replies and adds them up in route order.
"""
import functools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from moeserve.kernels.fp8 import act_quant
from moeserve.topology.planner import Placement, plan_dispatch
from moeserve.topology.spec import TopologySpec

from .expert_group import payload_bytes, slice_payload


@dataclass
class LinkCounters:
    """Bytes moved, measured from the payloads, and as the planner predicted them."""
    inter_node: int = 0
    intra_node: int = 0
    per_plane: list = field(default_factory=list)
    planned_inter_node: int = 0
    planned_intra_node: int = 0
    planned_per_plane: list = field(default_factory=list)
    crossings: int = 0
    naive_crossings: int = 0
    dispatch_s: float = 0.0            # planning, quantising and sending the payloads
    combine_s: float = 0.0             # waiting for the experts' replies and summing them

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Route:
    """One payload of a layer's dispatch: token `rows` of the batch go to group `target`, which serves `work`
    (group -> (rows of the payload, logical expert ids, gate weights)): its own part, and as a relay
    (`relay` True) the parts of the other groups of its node."""
    target: int
    rows: torch.Tensor
    payload: dict
    work: dict
    relay: bool


class ExpertRouter:
    """What every MoE layer of one attention shard shares: the placement, the group actors, its own GPU slot,
    the payload formats and the counters."""

    def __init__(self, placements: dict[int, Placement], groups: list, spec: TopologySpec, src_gpu: int,
                 hidden: int, max_nodes: int, dispatch_dtype: str, combine_dtype: str):
        self.placements, self.groups, self.spec, self.src_gpu = placements, groups, spec, src_gpu
        self.hidden, self.max_nodes = hidden, max_nodes
        self.dispatch_dtype, self.combine_dtype = dispatch_dtype, combine_dtype
        self.counters = LinkCounters(per_plane=[0] * spec.planes, planned_per_plane=[0] * spec.planes)
        self.lock = threading.Lock()   # micro-batches route and count from threads of their own

    def payload(self, x: torch.Tensor) -> dict:
        if self.dispatch_dtype == "fp8":
            q, scale = act_quant(x)
            return {"fp8": q.view(torch.uint8), "scale": scale}
        return {"x": x.to(torch.bfloat16 if self.dispatch_dtype == "bf16" else torch.float32)}

    @functools.cached_property
    def row_bytes(self) -> tuple[int, int]:
        """Bytes of one token's payload each way: dispatch (with its scales) and combine."""
        one = self.payload(torch.zeros(1, self.hidden))
        return payload_bytes(one), self.hidden * (2 if self.combine_dtype == "bf16" else 4)

    def route(self, layer_id: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> list[Route]:
        """The payloads of one layer's dispatch, x [T, dim], indices/weights [T, topk]; counts their bytes."""
        with self.lock:
            return self._route(layer_id, x, indices, weights)

    def _route(self, layer_id: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> list[Route]:
        # index bookkeeping in NumPy, like the planner's: a few dozen small ops a layer, each a fraction of a torch op
        spec, c = self.spec, self.counters
        d_bytes, c_bytes = self.row_bytes
        plan = plan_dispatch(indices, self.src_gpu, self.placements[layer_id], spec, self.hidden, self.max_nodes,
                             d_bytes, c_bytes, link_loads=False)
        T, k = indices.shape
        G = spec.gpus_per_node
        src_node = self.src_gpu // G
        payload = self.payload(x)
        token = np.arange(T).repeat(k)
        gpu, ids, w = plan.expert_gpu.numpy().ravel(), indices.numpy().ravel(), weights.float().numpy().ravel()
        node = gpu // G

        def part(rows: np.ndarray) -> dict:
            return payload if len(rows) == T else slice_payload(payload, torch.from_numpy(rows))  # rows are sorted

        def assignments(local, sel) -> tuple:
            return torch.from_numpy(local), torch.from_numpy(ids[sel]), torch.from_numpy(w[sel])
        routes = []
        for m in np.unique(node).tolist():
            on_m = node == m
            if m == src_node:  # same node: straight to each group, once per (token, GPU)
                for g in np.unique(gpu[on_m]).tolist():
                    sel = gpu == g
                    rows, local = np.unique(token[sel], return_inverse=True)
                    sub = part(rows)
                    if g != self.src_gpu:
                        c.intra_node += payload_bytes(sub) + len(rows) * c_bytes
                    routes.append(Route(g, torch.from_numpy(rows), sub, {g: assignments(local, sel)}, relay=False))
                continue
            rows, local = np.unique(token[on_m], return_inverse=True)  # each token crosses to m once
            plane = int(plan.plane[0])
            work = {}
            for g in np.unique(gpu[on_m]).tolist():
                work[g] = assignments(local[gpu[on_m] == g], on_m & (gpu == g))
            sub = part(rows)
            sent = payload_bytes(sub) + len(rows) * c_bytes
            c.inter_node += sent
            c.per_plane[plane] += sent
            c.crossings += len(rows)
            routes.append(Route(m * G + int(plan.relay_local[0]), torch.from_numpy(rows), sub, work, relay=True))
        if int(plan.relay_local[0]) != self.src_gpu % G:  # our plane is down: each remote-bound token first
            remote_tokens = np.unique(token[node != src_node])  # moves over NVLink to a GPU on a live plane
            c.intra_node += len(remote_tokens) * (d_bytes + c_bytes)
        c.naive_crossings += plan.naive_sends
        c.planned_inter_node += plan.bytes["inter_node"]
        c.planned_intra_node += plan.bytes["intra_node"]
        for p, b in enumerate(plan.bytes_per_plane.tolist()):
            c.planned_per_plane[p] += int(b)
        return routes

    def count_time(self, counter: str, start: float) -> None:
        with self.lock:
            setattr(self.counters, counter, getattr(self.counters, counter) + time.perf_counter() - start)

    def combined(self, T: int, routes: list[Route], replies: list) -> torch.Tensor:
        """Sum the groups' replies, one per route (a relay's also reports the bytes it moved in its node)."""
        if len(routes) == 1 and not routes[0].relay and len(routes[0].rows) == T:  # one group had every token
            return replies[0].float()
        y = torch.zeros(T, self.hidden)
        for route, reply in zip(routes, replies):
            if route.relay:
                reply, forwarded = reply
                with self.lock:
                    self.counters.intra_node += forwarded
            y.index_add_(0, route.rows, reply.float())
        return y


class RayExpertTransport:
    """Every route is one actor call: `compute` on a group of the shard's node, `relay` on another node's."""

    def __init__(self, layer_id: int, router: ExpertRouter):
        self.layer_id, self.router = layer_id, router

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        start = time.perf_counter()
        r = self.router
        routes = r.route(self.layer_id, x, indices, weights)
        refs = []
        for route in routes:
            group = r.groups[route.target]
            if route.relay:
                refs.append(group.relay.remote(self.layer_id, route.payload, route.work, r.combine_dtype))
            else:
                refs.append(group.compute.remote(self.layer_id, route.payload, *route.work[route.target],
                                                 r.combine_dtype))
        r.count_time("dispatch_s", start)
        return x.shape[0], x.dtype, routes, refs

    def combine(self, handle) -> torch.Tensor:
        start = time.perf_counter()
        T, dtype, routes, refs = handle
        y = self.router.combined(T, routes, ray.get(refs))
        self.router.count_time("combine_s", start)
        return y.to(dtype)
