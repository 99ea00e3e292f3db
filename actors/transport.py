"""The Ray actor-call transport: `dispatch` / `combine` for one MoE layer of an attention shard, along the
dispatch planner's routes, counting the bytes it actually moves per link class and plane.

Per step and layer: the planner picks a replica for each (token, expert); tokens for experts on the shard's
own node go straight to those groups; for every other node the tokens cross once, as one payload to the
relay group (same in-node index, the shard's plane), which fans them out inside the node and returns one
summed row per token. Combine waits for the replies and adds them up in node order.
"""
import time
from dataclasses import dataclass, field

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


class ExpertRouter:
    """What every MoE layer of one attention shard shares: the placement, the group actors, its own GPU slot,
    the payload formats and the counters."""

    def __init__(self, placements: dict[int, Placement], groups: list, spec: TopologySpec, src_gpu: int,
                 hidden: int, max_nodes: int, dispatch_dtype: str, combine_dtype: str):
        self.placements, self.groups, self.spec, self.src_gpu = placements, groups, spec, src_gpu
        self.hidden, self.max_nodes = hidden, max_nodes
        self.dispatch_dtype, self.combine_dtype = dispatch_dtype, combine_dtype
        self.counters = LinkCounters(per_plane=[0] * spec.planes, planned_per_plane=[0] * spec.planes)

    def payload(self, x: torch.Tensor) -> dict:
        if self.dispatch_dtype == "fp8":
            q, scale = act_quant(x)
            return {"fp8": q.view(torch.uint8), "scale": scale}
        return {"x": x.to(torch.bfloat16 if self.dispatch_dtype == "bf16" else torch.float32)}

    def row_bytes(self) -> tuple[int, int]:
        one = self.payload(torch.zeros(1, self.hidden))
        return payload_bytes(one), self.hidden * (2 if self.combine_dtype == "bf16" else 4)


class RayExpertTransport:
    def __init__(self, layer_id: int, router: ExpertRouter):
        self.layer_id, self.router = layer_id, router

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        start = time.perf_counter()
        handle = self._dispatch(x, indices, weights)
        self.router.counters.dispatch_s += time.perf_counter() - start
        return handle

    def _dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        r, spec = self.router, self.router.spec
        placement = r.placements[self.layer_id]
        d_bytes, c_bytes = r.row_bytes()
        plan = plan_dispatch(indices, r.src_gpu, placement, spec, r.hidden, r.max_nodes, d_bytes, c_bytes)
        T, k = indices.shape
        G = spec.gpus_per_node
        src_node = r.src_gpu // G
        payload = r.payload(x)
        token = torch.arange(T).repeat_interleave(k)
        gpu, ids, w = plan.expert_gpu.flatten(), indices.flatten(), weights.flatten().float()
        node = gpu // G
        calls = []
        c = r.counters
        for m in torch.unique(node).tolist():
            on_m = node == m
            if m == src_node:  # same node: straight to each group, once per (token, GPU)
                for g in torch.unique(gpu[on_m]).tolist():
                    sel = gpu == g
                    rows, local = torch.unique(token[sel], return_inverse=True)
                    sub = slice_payload(payload, rows)
                    if g != r.src_gpu:
                        c.intra_node += payload_bytes(sub) + len(rows) * c_bytes
                    calls.append(("direct", rows, r.groups[g].compute.remote(self.layer_id, sub, local, ids[sel],
                                                                             w[sel], r.combine_dtype)))
                continue
            rows, local = torch.unique(token[on_m], return_inverse=True)  # each token crosses to m once
            relay_gpu = m * G + int(plan.relay_local[0])
            plane = int(plan.plane[0])
            work = {}
            for g in torch.unique(gpu[on_m]).tolist():
                sel = gpu[on_m] == g
                work[g] = (local[sel], ids[on_m][sel], w[on_m][sel])
            sub = slice_payload(payload, rows)
            sent = payload_bytes(sub) + len(rows) * c_bytes
            c.inter_node += sent
            c.per_plane[plane] += sent
            c.crossings += len(rows)
            calls.append(("relay", rows, r.groups[relay_gpu].relay.remote(self.layer_id, sub, work, r.combine_dtype)))
        if int(plan.relay_local[0]) != r.src_gpu % G:  # our plane is down: each remote-bound token first moves
            remote_tokens = torch.unique(token[node != src_node])  # over NVLink to a GPU on a live plane
            c.intra_node += len(remote_tokens) * (d_bytes + c_bytes)
        c.naive_crossings += plan.naive_sends
        c.planned_inter_node += plan.bytes["inter_node"]
        c.planned_intra_node += plan.bytes["intra_node"]
        for p, b in enumerate(plan.bytes_per_plane.tolist()):
            c.planned_per_plane[p] += int(b)
        return T, x.shape[1], x.dtype, calls

    def combine(self, handle) -> torch.Tensor:
        start = time.perf_counter()
        T, dim, dtype, calls = handle
        y = torch.zeros(T, dim)
        for kind, rows, ref in calls:
            result = ray.get(ref)
            if kind == "relay":
                result, forwarded = result
                self.router.counters.intra_node += forwarded
            y.index_add_(0, rows, result.float())
        self.router.counters.combine_s += time.perf_counter() - start
        return y.to(dtype)
