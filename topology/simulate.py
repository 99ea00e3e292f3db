"""The simulator: run the real EPLB and dispatch planner over a routing trace at cluster scale and report
inter-node bytes, per-link and per-plane load, expert imbalance with and without redundant experts, and TPOT.

Default layout: DeepSeek's prefill deployment, 4 nodes x 8 GPUs (EP32), 32 redundant experts, 32 tokens per
GPU. Traces: `zipf` (expert popularity ~ 1/rank^s, ranks shuffled over experts), `uniform`, or a file of
recorded top-k expert ids ([tokens, k], .pt or .npy).

A synthetic trace is used two ways. Load statistics (what EPLB balances) draw each of a token's k expert
slots independently from the popularity, as the published EPLB figures assume. Network traffic comes from
tokens routed by the gate's own group-limited selection on log-popularity plus Gumbel noise (a draw of k
distinct experts within `topk_group` groups): that is what node-limited routing sends. A recorded trace
serves both.
"""
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cost import Architecture, decode_tpot_ms
from .eplb import rebalance_experts
from .planner import Placement, bf16_combine_bytes, fp8_dispatch_bytes, plan_dispatch
from .spec import TopologySpec

Route = Callable[[torch.Tensor, bool], torch.Tensor]  # (scores [T, E], node_limited) -> topk ids [T, k]
POLICIES = ("hierarchical", "global", "topology_aware")


def popularity(n_experts: int, trace: str, zipf_s: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if trace == "uniform":
        return torch.full((n_experts,), 1.0 / n_experts)
    if trace == "zipf":
        p = 1.0 / torch.arange(1, n_experts + 1, dtype=torch.float64) ** zipf_s
        return (p / p.sum())[torch.randperm(n_experts, generator=g)].float()
    raise ValueError(f"trace {trace!r}: expected zipf, uniform, or a file of expert ids")


def iid_draws(p: torch.Tensor, tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """[tokens, k] expert ids, each slot drawn independently from p."""
    g = torch.Generator().manual_seed(seed + 2)
    return torch.multinomial(p, tokens * k, replacement=True, generator=g).view(tokens, k)


def synthetic_scores(p: torch.Tensor, tokens: int, seed: int = 0) -> torch.Tensor:
    """Gumbel-perturbed log-popularity [tokens, E]: its top-k is a k-draw without replacement from p."""
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(tokens, p.numel(), generator=g).clamp_(1e-9, 1 - 1e-9)
    return p.log() - torch.log(-torch.log(u))


def load_trace(path: str | Path) -> torch.Tensor:
    path = Path(path)
    ids = torch.load(path) if path.suffix == ".pt" else torch.from_numpy(np.load(path))
    if ids.dim() != 2:
        raise ValueError(f"{path}: a routing trace is [tokens, k] expert ids, got shape {tuple(ids.shape)}")
    return ids.long()


def _no_replica_placement(arch: Architecture, spec: TopologySpec, n_groups: int) -> Placement:
    """Every expert once, in order; with more GPUs than experts, every expert the same number of times."""
    E, G = arch.routed_experts, spec.num_gpus
    copies = max(1, G // E)
    if (E * copies) % G:
        raise ValueError(f"{E} experts cannot be spread evenly over {G} GPUs")
    return Placement(torch.arange(E * copies) % E, E * copies // G, spec.gpus_per_node, n_groups)


def _gpu_imbalance(plan, num_gpus: int) -> float:
    load = torch.bincount(plan.expert_gpu.flatten(), minlength=num_gpus).float()
    return float(load.max() / load.mean())


def simulate(arch: Architecture, spec: TopologySpec, route: Route, trace: str = "zipf", tokens_per_gpu: int = 32,
             redundant: int = 32, n_groups: int = 8, max_nodes: int = 4, zipf_s: float = 1.0, seed: int = 0,
             policy: str = "topology_aware") -> dict:
    """Plan one MoE layer's dispatch for every GPU's tokens; scale by layers for TPOT. `route(scores,
    node_limited)` is the gate's top-k selection."""
    E, num_gpus = arch.routed_experts, spec.num_gpus
    if not E:
        raise ValueError(f"{arch.name} has no routed experts: nothing to dispatch")
    if (E + redundant) % num_gpus:
        raise ValueError(f"{E} experts + {redundant} redundant slots must split evenly over {num_gpus} GPUs "
                         f"(choose --redundant so that the sum is a multiple of {num_gpus})")
    T = tokens_per_gpu * num_gpus
    src = torch.arange(num_gpus).repeat_interleave(tokens_per_gpu)
    if trace in ("zipf", "uniform"):
        p = popularity(E, trace, zipf_s, seed)
        scores = synthetic_scores(p, T, seed)
        limited, unlimited = route(scores, True), route(scores, False)
        loads = iid_draws(p, T, limited.shape[1], seed)
    else:
        limited = unlimited = loads = load_trace(trace)[:T]
        T = limited.shape[0]
        src = src[:T]
    hidden = arch.hidden
    per_crossing = fp8_dispatch_bytes(hidden) + bf16_combine_bytes(hidden)

    weight = torch.bincount(loads.flatten(), minlength=E).float()[None]  # [1, E]
    unreplicated = _no_replica_placement(arch, spec, n_groups)
    before = plan_dispatch(loads, src, unreplicated, spec, hidden)
    naive = plan_dispatch(unlimited, src, unreplicated, spec, hidden)
    node_limited = plan_dispatch(limited, src, unreplicated, spec, hidden)
    placements, balance = {}, {}
    for name in POLICIES:
        phy2log, _, _ = rebalance_experts(weight, E + redundant, n_groups, spec.nodes, num_gpus, policy=name)
        placements[name] = Placement(phy2log[0], (E + redundant) // num_gpus, spec.gpus_per_node, n_groups)
        balance[name] = plan_dispatch(loads, src, placements[name], spec, hidden, max_nodes)
    chosen = plan_dispatch(limited, src, placements[policy], spec, hidden, max_nodes)
    layer_us = chosen.time_us["dispatch"] + chosen.time_us["combine"]
    experts_per_token = limited.shape[1] + arch.shared_experts
    return {
        "model": arch.name, "topology": spec.name, "nodes": spec.nodes, "gpus": num_gpus, "trace": str(trace),
        "tokens": T, "tokens_per_gpu": tokens_per_gpu, "redundant_experts": redundant, "policy": policy,
        "internode_bytes_per_token": {
            "naive": naive.naive_sends * per_crossing / T,                       # unrestricted gate, per expert
            "node_limited": node_limited.naive_sends * per_crossing / T,         # node-limited gate, per expert
            "node_limited_dedup": chosen.inter_node_sends * per_crossing / T,    # node-limited, once per node
        },
        "max_nodes_per_token": {"unrestricted": naive.max_nodes_per_token, "node_limited": chosen.max_nodes_per_token,
                                **{f"loads_{p}": balance[p].max_nodes_per_token for p in POLICIES}},
        "expert_imbalance": {"before": _gpu_imbalance(before, num_gpus),
                             "after": _gpu_imbalance(balance[policy], num_gpus),
                             "policies": {p: _gpu_imbalance(balance[p], num_gpus) for p in POLICIES}},
        "expert_load": weight[0].tolist(),
        "plane_bytes": chosen.bytes_per_plane.tolist(),
        "max_link_bytes": {k: float(v.max()) for k, v in chosen.link_load.items()},
        "layer_time_us": chosen.time_us,
        "tpot_ms": 2 * arch.layers * layer_us / 1e3,  # two overlapped micro-batches, communication-bound
        "tpot_ms_analytic": decode_tpot_ms(hidden, arch.layers, tokens_per_gpu, experts_per_token,
                                           spec.nic_gbps if spec.nodes > 1 else spec.intra_node_gbps),
    }


def plot(result: dict, path: str | Path) -> Path:
    """Per-plane inter-node bytes and per-expert load (sorted) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    planes = result["plane_bytes"]
    a.bar(range(len(planes)), [x / 1e6 for x in planes], color="#3b75af")
    a.set(title=f"inter-node bytes per plane ({result['topology']}, {result['nodes']} nodes)", xlabel="plane",
          ylabel="MB per MoE layer")
    load = sorted(result["expert_load"], reverse=True)
    mean = sum(load) / len(load)
    b.plot([x / mean for x in load], color="#c44e52")
    b.axhline(1.0, color="grey", lw=0.8, ls="--")
    imb = result["expert_imbalance"]
    b.set(title=f"expert load / mean ({result['trace']}); GPU max/mean {imb['before']:.2f} -> {imb['after']:.2f}",
          xlabel="expert (sorted by load)", ylabel="load / mean", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
