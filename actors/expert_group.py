"""The expert-group actor: the routed experts of one GPU slot, for every MoE layer (the MTP layer included),
read from the checkpoint by name and nothing else, and the serving half of the configured transport. It also
serves as the relay of its node: tokens that reach the node on its plane arrive here once, and it forwards each
to the other groups of the node that hold its experts, sums their partial outputs with its own, and sends one
combined row per token back."""
import os
import socket
import time
from typing import Optional

import numpy as np
import ray
import torch

from moeserve.kernels.checkpoint import Checkpoint, routed_expert_of
from moeserve.kernels.experts import (MLP, FP8Experts, assignments_runner, moe_kernel, pack_experts, pack_fp8_experts,
                                      resolve_moe_kernel, run_assignments, takes_fp8_stacks)
from moeserve.kernels.fp8 import FP8Linear, act_dequant
from moeserve.kernels.load import DTYPES, resolve_device
from moeserve.topology.spec import TopologySpec

from . import collective, wire
from .transport import RayGroupServer


class ExpertGroupWorker:
    def __init__(self, group_id: int, model: str, dtype: str, experts: dict[int, list[int]], transport: str,
                 spec: dict, threads: int = 1, first_rank: int = 0, version: int = 0, device: str = "auto",
                 fp8_resident: Optional[bool] = None, moe_kernel_name: str = "auto"):
        """experts: MoE layer id -> the logical experts this group holds for it (its physical slots) in placement
        `version`. group_id is its GPU slot; its pool's groups hold collective ranks first_rank.. in slot order.
        `transport` names the serving half this actor hosts. `device`: where the experts compute, among the GPUs
        Ray gave this actor (none: the CPU). `fp8_resident`: an FP8 checkpoint's experts stay e4m3 and compute in
        FP8 as the engine's `FP8Linear` layers do (None: on a GPU). `moe_kernel_name`: the routed product
        (experts.moe_kernel)."""
        torch.set_num_threads(threads)
        self.group_id = group_id
        self.dtype = DTYPES[dtype]
        self.device = resolve_device(device) if ray.get_gpu_ids() else torch.device("cpu")
        self.fp8 = self.device.type == "cuda" if fp8_resident is None else fp8_resident
        self.ckpt = Checkpoint(model)
        fp8_experts = self.fp8 and any(self.ckpt.is_fp8(name) for name in self.ckpt.names(select=routed_expert_of))
        self.moe_kernel = resolve_moe_kernel(moe_kernel_name, self.device, fp8_experts)  # as the status reports it
        self.routed = moe_kernel(self.moe_kernel, self.device)
        self.modules: dict[tuple[int, int], MLP] = {}   # (layer, logical expert) -> its weights, any version's
        # placement version -> per MoE layer, the held experts' weights stacked for batched matmuls and logical id
        # -> index in the stack; a dispatch names the version it was planned against
        self.versions: dict[int, dict[int, tuple]] = {version: self._stacks(experts)}
        self.assignments_computed = 0   # (token, expert) pairs computed here, over every layer
        self.compute_s = 0.0
        # asked once: it holds for this process's life, and each asking reads the GCS's actor table
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        spec = TopologySpec(**spec)
        self.server = RayGroupServer(group_id, self.compute) if transport == "ray" else \
            collective.CollectiveGroupServer(group_id, self.compute, spec, spec.num_gpus, first_rank)

    def ready(self) -> dict:
        context = ray.get_runtime_context()
        return {"group": self.group_id, "pid": os.getpid(), "host": socket.gethostname(),
                "ray_node": context.get_node_id(), "restarted": self.restarted,
                "nccl_ib_hca": os.environ.get("NCCL_IB_HCA"), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "device": str(self.device), "experts": self.held(max(self.versions))}

    def held(self, version: int) -> dict[int, list[int]]:
        """MoE layer -> the logical experts this group holds in a placement version."""
        return {layer: sorted(torch.nonzero(index >= 0).flatten().tolist())
                for layer, (_, index) in self.versions[version].items()}

    def _stacks(self, experts: dict[int, list[int]]) -> dict[int, tuple]:
        """The stacks of one placement (MoE layer -> logical experts), loading from the checkpoint, by name, the
        experts no version here holds yet."""
        args = self.ckpt.args
        wanted = {(layer, e) for layer, es in experts.items() for e in es} - set(self.modules)
        for key in wanted:
            with torch.device("meta"):  # each projection is read from the checkpoint below
                self.modules[key] = MLP(args.dim, args.moe_inter_dim)
        for name in self.ckpt.names(select=lambda n: routed_expert_of(n) in wanted):
            proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[name.split(".")[-2]]
            setattr(self.modules[routed_expert_of(name)], proj, self._linear(name))
        stacks = {}
        for layer, es in experts.items():
            ids = sorted(set(es))
            index = torch.full((args.n_routed_experts,), -1, dtype=torch.long)
            index[ids] = torch.arange(len(ids))
            held = [self.modules[layer, e] for e in ids]
            stacks[layer] = (self._pack(held), index)
        return stacks

    def _pack(self, held: list[MLP]):
        """Experts stacked for the routed product; FP8 experts where the product takes them stacked (the Triton
        kernel), else left as modules to run one at a time through their FP8Linear layers."""
        if not isinstance(held[0].w1, FP8Linear):
            return pack_experts(held)
        return pack_fp8_experts(held) if takes_fp8_stacks(self.routed) else held

    def _linear(self, name: str) -> torch.nn.Module:
        """One expert projection from the checkpoint on this group's device: e4m3 with its block scales where the
        checkpoint stores it so and FP8 stays resident, else in the compute dtype."""
        if self.fp8 and self.ckpt.is_fp8(name):
            weight, scale = self.ckpt.fp8(name)
            layer = FP8Linear(weight.shape[1], weight.shape[0], self.ckpt.args.weight_block_size or (128, 128))
            layer.weight.data, layer.weight_scale_inv.data = weight.to(self.device), scale.to(self.device)
            return layer
        tensor = self.ckpt.tensor(name, self.dtype).to(self.device)
        layer = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(tensor, requires_grad=False)
        return layer

    def prepare(self, version: int, experts: dict[int, list[int]]) -> int:
        """Load placement `version` beside the ones being served (which go on serving meanwhile); returns how
        many experts came from the checkpoint."""
        before = len(self.modules)
        self.versions[version] = self._stacks(experts)
        return len(self.modules) - before

    def release(self, current: int) -> None:
        """Drop the placement versions before `current` (no shard plans against them any more) and the experts
        only they held."""
        self._drop([v for v in self.versions if v < current])

    def discard(self, version: int) -> None:
        """Drop placement `version`, prepared for a change that was called off (a group died before the shards were
        told), and the experts only it held."""
        self._drop([version] if version in self.versions and len(self.versions) > 1 else [])

    def _drop(self, versions: list[int]) -> None:
        for version in versions:
            del self.versions[version]
        kept = {(layer, e) for v in self.versions for layer, es in self.held(v).items() for e in es}
        for key in set(self.modules) - kept:
            del self.modules[key]

    def stats(self) -> dict:
        weights = {str(p.dtype).removeprefix("torch.") for m in self.modules.values() for p in m.parameters()}
        held_as = {"modules" if isinstance(packed, list) else "fp8 stacks" if isinstance(packed, FP8Experts) else "stacks"
                   for layers in self.versions.values() for packed, _ in layers.values()}
        return {"group": self.group_id, "assignments_computed": self.assignments_computed, "compute_s": self.compute_s,
                "placement_versions": sorted(self.versions), "weight_dtypes": sorted(weights),
                "moe_kernel": self.moe_kernel, "experts_held_as": sorted(held_as)}

    # ---- the serving half: the ray transport's calls, or the collective transport's threads ----------------

    def set_layout(self, spec: dict) -> None:
        """Another number of expert groups in the pool (`spec`'s GPU slots): whom this group relays to and serves,
        from the next process group on (collective transport)."""
        if isinstance(self.server, collective.CollectiveGroupServer):
            self.server.spec = TopologySpec(**spec)
            self.server.n_groups = self.server.spec.num_gpus

    def set_peers(self, peers: dict) -> None:
        """The groups of this node, which a relay forwards to (ray transport)."""
        self.server.peers = peers

    def serve_message(self, body: bytes) -> bytes:
        """A dispatch in the wire format; its reply, or an error, in the same (ray transport)."""
        return self.server.serve(body)

    def collective_address(self) -> str:
        return collective.free_address(ray.util.get_node_ip_address())

    def join_collective(self, init_method: str, world_size: int, micro_batches: int, pools: dict,
                        timeout_s: float, rendezvous_s: float, spin_s: float = 0.0) -> None:
        self.server.join(init_method, world_size, micro_batches, pools, timeout_s, rendezvous_s, spin_s)

    # ---- the experts ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def compute(self, layer: int, payload: wire.Payload, work: wire.Assignments, version: int = 0) -> torch.Tensor:
        """Partial outputs [N, dim] float32 for the payload's N rows: sum of weight x expert(row) over `work`, with
        the experts of placement `version`."""
        start = time.perf_counter()
        if payload.scale is not None:
            x = act_dequant(payload.x, payload.scale, dtype=self.dtype)
        else:
            x = payload.x.to(self.dtype)
        self.assignments_computed += len(work)
        if version not in self.versions:
            raise RuntimeError(f"placement version {version} is not loaded here (versions {sorted(self.versions)})")
        packed, stack_index = self.versions[version][layer]
        # the ids are checked and looked up in NumPy (the message's arrays are host memory): a handful of small
        # torch ops here cost more than the experts of a decode step's token or two
        ids, index = work.expert_ids.numpy(), stack_index.numpy()
        if len(ids) and ids.max() >= len(index):
            raise RuntimeError(f"tokens routed to expert {ids.max()} of layer {layer}, which has {len(index)} routed "
                               "experts")
        stacked = index[ids]
        if (stacked < 0).any():
            missing = sorted(set(ids[stacked < 0].tolist()))
            raise RuntimeError(f"tokens routed to experts {missing} of layer {layer}, which this group does not hold")
        rows, stacked = torch.from_numpy(work.rows.numpy().astype(np.int64)), torch.from_numpy(stacked)
        weights = work.weights.to(self.dtype)
        if self.device.type != "cpu":
            x, rows, stacked, weights = (t.to(self.device) for t in (x, rows, stacked, weights))
        if isinstance(packed, list):  # FP8 experts, one at a time
            y = run_assignments(packed, x, rows, stacked, weights)
        elif isinstance(packed, FP8Experts):
            y = self.routed(packed, x, rows, stacked, weights)
        else:
            y = assignments_runner(packed, len(x), len(rows), self.routed)(packed, x, rows, stacked, weights)
        self.compute_s += time.perf_counter() - start
        return y.float().cpu()  # messages travel from host memory
