"""The expert-group actor: the routed experts of one GPU slot, for every MoE layer (the MTP layer included),
read from the checkpoint by name and nothing else. It also serves as the relay of its node: tokens that reach
the node on its plane arrive here once, and it forwards each to the other groups of the node that hold its
experts, sums their partial outputs with its own, and sends one combined row per token back."""
import os
import socket
import threading
import time

import ray
import torch

from moeserve.kernels.checkpoint import Checkpoint, routed_expert_of
from moeserve.kernels.experts import (MLP, dense_is_cheaper, pack_experts, run_assignments_dense,
                                      run_assignments_packed)
from moeserve.kernels.fp8 import act_dequant
from moeserve.kernels.load import DTYPES

from . import collective


def combine_torch_dtype(name: str) -> torch.dtype:
    """The dtype expert outputs travel back in: "bf16" or "float32"."""
    return torch.bfloat16 if name == "bf16" else torch.float32


def decode_payload(payload: dict, dtype: torch.dtype) -> torch.Tensor:
    """Token rows as sent: FP8 bytes with 1x128 tile scales, or a plain tensor."""
    if "fp8" in payload:
        return act_dequant(payload["fp8"].view(torch.float8_e4m3fn), payload["scale"], dtype=dtype)
    return payload["x"].to(dtype)


def slice_payload(payload: dict, rows: torch.Tensor) -> dict:
    if "fp8" in payload:
        return {"fp8": payload["fp8"][rows], "scale": payload["scale"][rows]}
    return {"x": payload["x"][rows]}


def payload_bytes(payload: dict) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


class ExpertGroupWorker:
    def __init__(self, group_id: int, model: str, dtype: str, experts: dict[int, list[int]], threads: int = 1,
                 n_groups: int = 1, first_rank: int = 0):
        """experts: MoE layer id -> the logical experts this group holds for it (its physical slots). group_id is
        its GPU slot; its pool's groups hold collective ranks first_rank.. in slot order."""
        torch.set_num_threads(threads)
        self.group_id, self.n_groups, self.first_rank = group_id, n_groups, first_rank
        self.dtype = DTYPES[dtype]
        ckpt = Checkpoint(model)
        wanted = {(layer, e) for layer, es in experts.items() for e in es}
        self.experts: dict[int, dict[int, MLP]] = {layer: {} for layer in experts}
        args = ckpt.args
        for layer, es in experts.items():
            for e in set(es):
                self.experts[layer][e] = MLP(args.dim, args.moe_inter_dim).to(self.dtype)
        for name, tensor in ckpt.tensors(select=lambda n: routed_expert_of(n) in wanted, dtype=self.dtype):
            layer, e = routed_expert_of(name)
            proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[name.split(".")[-2]]
            getattr(self.experts[layer][e], proj).weight = torch.nn.Parameter(tensor, requires_grad=False)
        # per layer: the held experts' weights stacked for batched matmuls, and logical id -> index in the stack
        self.packed, self.stack_index = {}, {}
        for layer, held in self.experts.items():
            ids = sorted(held)
            self.packed[layer] = pack_experts([held[e] for e in ids])
            self.stack_index[layer] = torch.full((args.n_routed_experts,), -1, dtype=torch.long)
            self.stack_index[layer][ids] = torch.arange(len(ids))
        self.peers: dict[int, "ray.actor.ActorHandle"] = {}
        self.assignments_computed = 0   # (token, expert) pairs computed here, over every layer
        self.compute_s = 0.0

    def ready(self) -> dict:
        return {"group": self.group_id, "pid": os.getpid(), "host": socket.gethostname(),
                "ray_node": ray.get_runtime_context().get_node_id(),
                "experts": {layer: sorted(es) for layer, es in self.experts.items()}}

    def stats(self) -> dict:
        return {"group": self.group_id, "assignments_computed": self.assignments_computed, "compute_s": self.compute_s}

    def set_peers(self, peers: dict) -> None:
        self.peers = peers

    @torch.inference_mode()
    def compute(self, layer: int, payload: dict, rows: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, combine_dtype: str) -> torch.Tensor:
        """Partial outputs [N, dim] for the N payload rows: sum of weight x expert(row) over the assignments."""
        start = time.perf_counter()
        x = decode_payload(payload, self.dtype)
        self.assignments_computed += len(rows)
        stacked = self.stack_index[layer][expert_ids]
        if (stacked < 0).any():
            missing = sorted(set(expert_ids[stacked < 0].tolist()))
            raise RuntimeError(f"tokens routed to experts {missing} of layer {layer}, which this group does not hold")
        packed = self.packed[layer]
        run = run_assignments_dense if dense_is_cheaper(packed, len(x), len(rows)) else run_assignments_packed
        y = run(packed, x, rows, stacked, weights.to(self.dtype))
        self.compute_s += time.perf_counter() - start
        return y.to(combine_torch_dtype(combine_dtype))

    @torch.inference_mode()
    def relay(self, layer: int, payload: dict, work: dict, combine_dtype: str) -> tuple[torch.Tensor, int]:
        """Serve tokens that crossed to this node: `work` maps a group of this node to its assignments
        (rows, expert ids, weights) over the payload rows. Returns (node partial [N, dim], bytes forwarded
        inside the node, both ways). Peers are reached by actor calls."""
        def ask(gid, *args):
            return self.peers[gid].compute.remote(layer, *args, combine_dtype)
        return self._relay(layer, payload, work, combine_dtype, ask, ray.get)

    def _relay(self, layer: int, payload: dict, work: dict, combine_dtype: str, ask, answer):
        """`relay` over any transport: ask(gid, payload, rows, expert ids, weights) sends a peer its part,
        answer(handle) waits for that peer's partial output."""
        asked, forwarded, own = [], 0, None
        for gid, (rows, expert_ids, weights) in work.items():
            if gid == self.group_id:
                own = (rows, expert_ids, weights)
                continue
            needed, local_rows = torch.unique(rows, return_inverse=True)  # each row once per GPU
            sub = slice_payload(payload, needed)
            forwarded += payload_bytes(sub)
            asked.append((needed, ask(gid, sub, local_rows, expert_ids, weights)))
        n = next(iter(payload.values())).shape[0]
        total = None
        if own is not None:
            total = self.compute(layer, payload, *own, combine_dtype).float()
        for needed, handle in asked:
            part = answer(handle)
            forwarded += part.numel() * part.element_size()
            if total is None:
                total = torch.zeros(n, part.shape[1])
            total.index_add_(0, needed, part.float())
        return total.to(combine_torch_dtype(combine_dtype)), forwarded

    # ---- the collective transport: one thread per attention shard, answering messages ---------------------

    def collective_address(self) -> str:
        return collective.free_address(ray.util.get_node_ip_address())

    def join_collective(self, init_method: str, world_size: int, micro_batches: int, pools: dict[int, int]) -> None:
        """Enter the process group (with every other member at once), then serve the subgroups of the shards
        whose pool this group is in (`pools`: shard rank -> rank of its pool's first group)."""
        subgroups = collective.join(init_method, self.first_rank + self.group_id, world_size, pools, self.n_groups,
                                    micro_batches)
        for (shard, m), group in subgroups.items():
            if pools[shard] == self.first_rank:
                threading.Thread(target=self._serve, args=(group,), daemon=True, name=f"serve-{shard}-{m}").start()

    def _serve(self, group) -> None:
        outbox = collective.Outbox()

        def ask(gid, sub, rows, expert_ids, weights):
            outbox.send({"op": "compute", "layer": message["layer"], "payload": sub, "work": {gid: (rows, expert_ids,
                         weights)}, "combine_dtype": message["combine_dtype"]}, self.first_rank + gid, group)
            return gid

        def answer(gid):
            return collective.reply_of(collective.receive(group, self.first_rank + gid)[1])

        while True:
            sender, message = collective.receive(group)
            op = message["op"]
            if op == "stop":
                return
            if op == "ping":
                continue
            try:
                with torch.inference_mode():
                    layer, payload, work, combine_dtype = (message[k] for k in ("layer", "payload", "work",
                                                                                "combine_dtype"))
                    if op == "relay":
                        reply = self._relay(layer, payload, work, combine_dtype, ask, answer)
                    else:
                        reply = self.compute(layer, payload, *work[self.group_id], combine_dtype)
            except Exception as e:  # the sender waits for a reply: it gets the error, and this thread serves on
                reply = {"error": f"expert group {self.group_id}: {type(e).__name__}: {e}"}
            outbox.send(reply, sender, group)
            outbox.flush()
