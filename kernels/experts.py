"""The SwiGLU feed-forward block, and the one interface through which an MoE layer reaches its routed experts.

An MoE layer gates its tokens, then calls `dispatch(x, indices, weights)` and later `combine(handle)`;
between the two it computes the shared experts and the step's other micro-batches run, which is where a remote
transport hides its latency.
`LocalExperts` is the transport whose experts live in the same process: dispatch computes, combine
returns. Transports that send tokens to expert-group actors live in `actors/`, one file each.

Glossary: a *logical* expert is one of the model's `n_routed_experts`; `indices` hold logical ids.
"""
import importlib.util
import os
from typing import Any, Callable, Generator, NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .fp8 import FP8Linear


class MLP(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense FFN, a shared-expert block, and each routed expert."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ExpertTransport(Protocol):
    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, micro_batch: int = 0) -> Any:
        """Send tokens x [T, dim] to their experts indices [T, topk] with gate weights [T, topk]. `micro_batch`
        numbers the step's concurrent micro-batches (their forwards run by turns, so that one computes attention
        while another's tokens are with the experts): a transport with a channel per micro-batch uses it."""

    def combine(self, handle: Any) -> Generator[None, None, torch.Tensor]:
        """Collect the weighted sum of expert outputs, [T, dim], for the tokens of `dispatch`: a generator, which
        yields where the step's other micro-batches should run meanwhile (while remote experts compute; while it
        waits for a recovery of the cluster, which waits until none of their layers is in flight). Closed at its
        first yield, it lets go of the layer (the step failed elsewhere)."""


def tokens_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] counts of each expert id in indices. A scatter, not bincount: bincount reads the largest id back to
    the host to size its output (a host sync per layer on GPUs)."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=indices.device).scatter_add_(0, flat, torch.ones_like(flat))


def run_experts(experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{indices[t, k]}(x[t]) for every token t; [T, dim]."""
    T, k = indices.shape
    rows = torch.arange(T, device=x.device).repeat_interleave(k)
    return run_assignments(experts, x, rows, indices.flatten(), weights.flatten())


def run_assignments(experts, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """y[r] = sum over assignments (r, e, w) of w * expert_e(x[r]); x [N, dim], the rest [A]. `experts` maps
    a logical expert id to its module (a list or a dict). Each expert runs once on all of its rows (a grouped
    call), in ascending expert order, so the sum's order does not depend on how tokens were batched."""
    y = torch.zeros_like(x)
    order = torch.sort(expert_ids, stable=True).indices
    ids, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
    for e, chunk in zip(ids.tolist(), torch.split(order, counts.tolist())):
        expert = experts[e]
        if expert is None:
            raise RuntimeError(f"token routed to expert {e}, which this process does not hold")
        token = rows[chunk]
        y.index_add_(0, token, (expert(x[token]) * weights[chunk, None]).to(y.dtype))
    return y


# Expert work done for nothing that still costs less than routing rows to experts (about 20 small ops, some
# 0.1 ms on a CPU): below it, every expert runs on every token (see run_experts_dense).
DENSE_WASTE_MACS = 5_000_000
# On a CPU with more than one torch thread a grouped product costs about 30 us per expert whatever its rows (torch
# runs it as one small product per expert, each a parallel region), the time of some 1.5M multiply-adds there:
# measured with 16 experts (192 x 80) on two threads, every expert on every token was the faster up to about 48
# tokens (446 against 575 us at 32), the grouped one from 64 on. On one thread (an expert group's default) there is
# no such cost and every expert on every token costs twice as much: the grouped product was the faster from 16
# tokens on (406 against 467 us; 489 against 805 us at 32), the dense one at 8 (295 against 334 us)
CPU_GROUPED_MACS_PER_EXPERT = 1_500_000
# That allowance holds where the stacks stay in cache. Larger stacks are read from memory, where every expert on a few
# tokens pays for reading all the experts' weights and the grouped product only for the experts the tokens chose:
# 64 experts of 1024 x 512 (400 MB in float32) on two threads, one token's eight experts took 13.9 ms every expert
# on every token against 2.7 ms grouped; 32 experts of 512 x 256 (50 MB), 2.4 / 3.2 ms against 1.4 / 2.2 ms at 2 / 4
# tokens
CPU_CACHED_STACK_BYTES = 16 << 20
# Expert weights copied out of the stacks for a few tokens (see run_experts_gathered): the demo model's 4-12 copies
# of 46k weights each were the faster; DeepSeek-V2-Lite's (8.7M each) would copy more than the grouped product reads
GATHERED_MAX_WEIGHTS = 5_000_000


class LocalExperts(nn.ModuleList):
    """Routed experts of one layer held in this process; `held` limits which (None entries elsewhere).
    When it holds them all, the experts' weights are packed once into stacked tensors (each expert's weights
    become views into them, so nothing is stored twice) and every expert runs in one batched matmul; for a
    handful of tokens, each token's chosen experts' weights taken out of the stacks, or every expert on every token
    (decoding one or a few sequences)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, held: Optional[set[int]] = None):
        super().__init__([MLP(dim, inter_dim) if held is None or i in held else None for i in range(n_experts)])
        self._packed = None  # pack_experts' stacks, or FP8Experts, made at the first call that runs them stacked
        # the routed product where rows are routed (run_assignments_grouped's contract); see moe_kernel
        self.routed: Callable = run_assignments_grouped

    def _pack(self):
        if self._packed is None:
            fp8 = isinstance(self[0].w1, FP8Linear)
            self._packed = pack_fp8_experts(list(self)) if fp8 else pack_experts(list(self))
        return self._packed

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 micro_batch: int = 0) -> torch.Tensor:
        if any(e is None for e in self) or torch.is_grad_enabled():  # training keeps its own parameters
            return run_experts(self, x, indices, weights)
        if isinstance(self[0].w1, FP8Linear):  # stacked only where the routed product takes them so
            if not takes_fp8_stacks(self.routed):
                return run_experts(self, x, indices, weights)
            return run_experts_grouped(self._pack(), x, indices, weights, self.routed)
        packed = self._pack()
        if gathered_is_cheaper(packed, indices.numel()):
            return run_experts_gathered(packed, x, indices, weights)
        if dense_is_cheaper(packed, x.shape[0], indices.numel()):
            return run_experts_dense(packed, x, indices, weights)
        return run_experts_grouped(packed, x, indices, weights, self.routed)

    def combine(self, handle: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        yield from ()  # dispatch computed it: nothing to wait for
        return handle


def pack_experts(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the weights of a list of MLPs, each transposed to [in, out], w1 and w3 side by side: w13 [E, dim,
    2 * inter] (one product gives both halves of SwiGLU), w2 [E, inter, dim]; the batched products read them without
    a transpose (about twice as fast on the CPU as over transposed views). Each expert's weights become views into
    the stacks, so nothing is stored twice."""
    w13 = torch.stack([torch.cat([e.w1.weight.detach().t(), e.w3.weight.detach().t()], dim=1) for e in experts])
    w2 = torch.stack([e.w2.weight.detach().t() for e in experts])  # [E, inter, dim]
    inter = w2.shape[1]
    for i, e in enumerate(experts):
        e.w1.weight = nn.Parameter(w13[i, :, :inter].t(), requires_grad=False)
        e.w3.weight = nn.Parameter(w13[i, :, inter:].t(), requires_grad=False)
        e.w2.weight = nn.Parameter(w2[i].t(), requires_grad=False)
    return w13, w2


class FP8Experts(NamedTuple):
    """FP8 experts stacked as the checkpoint stores each: e4m3 [E, out, in] weights, fp32 [E, out/128, in/128] block
    scales (ragged edges rounded up). w1 and w3 stay apart: stacked side by side, w3's blocks would not line up with
    the 128-row grid where the expert's intermediate size is not a multiple of 128."""
    w1: torch.Tensor
    s1: torch.Tensor
    w3: torch.Tensor
    s3: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor


def pack_fp8_experts(experts) -> FP8Experts:
    """Stack FP8 MLPs' e4m3 weights and block scales as they are; each expert's FP8Linear layers become views into
    the stacks, so nothing is stored twice."""
    stacks = {}
    for name in ("w1", "w3", "w2"):
        layers = [getattr(e, name) for e in experts]
        weight = torch.stack([layer.weight.detach() for layer in layers])
        scale = torch.stack([layer.weight_scale_inv.detach() for layer in layers])
        for i, layer in enumerate(layers):
            layer.weight = nn.Parameter(weight[i], requires_grad=False)
            layer.weight_scale_inv = nn.Parameter(scale[i], requires_grad=False)
        stacks[name], stacks["s" + name[1]] = weight, scale
    return FP8Experts(**stacks)


def run_experts_grouped(packed, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        routed: Optional[Callable] = None) -> torch.Tensor:
    """`run_experts` with the stacked weights of `pack_experts`, through `routed` (run_assignments_grouped, or
    the fused Triton kernel: see moe_kernel)."""
    T, k = indices.shape
    rows = torch.arange(T, device=x.device).repeat_interleave(k)
    return (routed or run_assignments_grouped)(packed, x, rows, indices.flatten(), weights.flatten())


def dense_is_cheaper(packed, rows: int, assignments: int) -> bool:
    """Whether running every stacked expert on every row wastes less work than routing rows costs."""
    E, dim, inter = packed[1].shape[0], packed[1].shape[2], packed[1].shape[1]
    cached = sum(w.numel() * w.element_size() for w in packed) <= CPU_CACHED_STACK_BYTES
    parallel_cpu = packed[0].device.type == "cpu" and torch.get_num_threads() > 1 and cached
    allowance = DENSE_WASTE_MACS + (E * CPU_GROUPED_MACS_PER_EXPERT if parallel_cpu else 0)
    return (E * rows - assignments) * 3 * dim * inter <= allowance


def gathered_is_cheaper(packed, assignments: int) -> bool:
    """Whether to take each assignment's expert weights out of the stacks: with fewer assignments than stacked
    experts (a sequence or two decoding), and only where the copies are small. Large experts' copies cost more than
    the grouped product's per-expert calls, which read the same weights in place."""
    E, inter, dim = packed[1].shape
    return assignments < E and assignments * 3 * dim * inter <= GATHERED_MAX_WEIGHTS


def assignments_runner(packed, rows: int, assignments: int, routed: Callable) -> Callable:
    """The cheapest way to run `assignments` (row, expert, weight) pairs over `rows` rows with stacked experts: each
    pair's expert weights taken out of the stacks (a few pairs), every expert on every row (a few rows), or else
    `routed` (run_assignments_grouped's contract)."""
    if gathered_is_cheaper(packed, assignments):
        return run_assignments_gathered
    return run_assignments_dense if dense_is_cheaper(packed, rows, assignments) else routed


def run_experts_gathered(packed, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`run_experts` with each token's chosen experts' weights taken out of the stacks, one product per (token,
    expert): for a few tokens this reads k of the E experts' weights where every expert on every token reads them
    all (one token, top-4 of 16 experts of 192 x 80: 68 against 88 us on two CPU threads, 87 against 136 on one).
    Each token's outputs are summed in the order of its choices."""
    w13, w2 = packed
    T, k = indices.shape
    chosen = indices.flatten()
    a, b = torch.bmm(x.repeat_interleave(k, dim=0).unsqueeze(1), w13.index_select(0, chosen)).chunk(2, dim=-1)
    h = F.silu(a) * b * weights.flatten().to(x.dtype)[:, None, None]
    return torch.bmm(h, w2.index_select(0, chosen)).view(T, k, -1).sum(1)


def run_assignments_gathered(packed, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    """`run_assignments_grouped` with each assignment's expert weights taken out of the stacks (see
    run_experts_gathered; one row, four of 16 experts: 96 against 142 us on one CPU thread)."""
    w13, w2 = packed
    a, b = torch.bmm(x.index_select(0, rows).unsqueeze(1), w13.index_select(0, expert_ids)).chunk(2, dim=-1)
    h = F.silu(a) * b * weights.to(x.dtype)[:, None, None]
    return torch.zeros_like(x).index_add_(0, rows, torch.bmm(h, w2.index_select(0, expert_ids)).squeeze(1))


def run_experts_dense(packed, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`run_experts` with every expert on every token, each output weighted by its gate (0 where not chosen):
    E/k times the arithmetic in a third of the ops, so cheaper for a few tokens (one decoding sequence:
    about 80 against 300 us on the demo model's CPU)."""
    gate = x.new_zeros(x.shape[0], len(packed[0])).scatter_(1, indices, weights.to(x.dtype))  # [T, E]
    return _all_experts(packed, x, gate.t())


def run_assignments_dense(packed, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """`run_assignments_grouped` with every expert on every row (see run_experts_dense)."""
    gate = x.new_zeros(len(packed[0]), x.shape[0])
    gate.index_put_((expert_ids, rows), weights.to(x.dtype), accumulate=True)  # [E, N]
    return _all_experts(packed, x, gate)


def _all_experts(packed, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """sum_e gate[e, n] * expert_e(x[n]) for every row n; gate [E, N]."""
    w13, w2 = packed
    a, b = torch.bmm(x.expand(w13.shape[0], -1, -1), w13).chunk(2, dim=-1)
    h = F.silu(a) * b * gate.unsqueeze(-1)  # [E, N, inter]
    return torch.bmm(h, w2).sum(0)


def run_assignments_grouped(packed, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    """`run_assignments` with stacked weights (expert_ids index the stacks): the rows sorted by expert and each
    expert's run as one segment of `torch._grouped_mm` (offsets: where each expert's rows end), so no row is padded,
    an expert with no rows costs nothing, and the sizes stay on the device. On the CPU it ran 1.1-1.3x the zero-padded
    [E, max rows, dim] bmm it replaces at the demo model's sizes, and 4-22x at V2-Lite-like ones (64 experts, skewed
    routing)."""
    w13, w2 = packed
    y = torch.zeros_like(x)
    if not len(expert_ids):
        return y
    order = torch.sort(expert_ids, stable=True).indices
    ends = torch.cumsum(tokens_per_expert(expert_ids, w13.shape[0]), 0, dtype=torch.int32)
    token = rows[order]
    a, b = grouped_mm(x.index_select(0, token), w13, ends).chunk(2, dim=-1)
    out = grouped_mm(F.silu(a) * b, w2, ends)  # [A, dim], in expert order
    y.index_add_(0, token, (out * weights[order, None]).to(y.dtype))
    return y


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ends[e-1]:ends[e] of x [A, in] times w[e] [in, out]. `torch._grouped_mm` where the device takes these
    dtypes and shapes (CPUs; CUDA takes bf16); elsewhere (fp32 on CUDA, say) one product per expert, which reads
    the offsets back to the host."""
    try:
        return torch._grouped_mm(x, w, offs=ends)
    except RuntimeError:
        bounds = [0] + ends.tolist()
        return torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])


MOE_KERNELS = ("auto", "grouped", "triton")


def takes_fp8_stacks(routed: Callable) -> bool:
    """Whether a routed product (moe_kernel's) runs FP8 experts stacked (FP8Experts): the Triton kernel does; torch
    has no block-scaled grouped product, so with it FP8 experts run one at a time through their FP8Linear layers."""
    return routed is not run_assignments_grouped


def holds_fp8_experts(model: nn.Module) -> bool:
    """Whether a model computes routed experts here whose weights stay e4m3 (FP8Linear layers)."""
    return any(isinstance(m, LocalExperts) and isinstance(m[0].w1, FP8Linear) for m in model.modules())


def resolve_moe_kernel(choice: str, device: torch.device, fp8_experts: bool) -> str:
    """The kernel `auto` stands for: the fused Triton kernel where FP8 experts compute on a GPU (one at a time they
    took 7-60x longer on an H200, tools/gpu_check.py), else grouped (for BF16 experts the faster at V2-Lite's shapes
    and at one token of V3's; the Triton kernel wins at V3's 64 and 512)."""
    if choice not in MOE_KERNELS:
        raise InputError(f"moe_kernel must be one of {MOE_KERNELS}, got {choice!r}")
    if choice != "auto":
        return choice
    return "triton" if device.type == "cuda" and fp8_experts and importlib.util.find_spec("triton") else "grouped"


def moe_kernel(choice: str, device: torch.device, fp8_experts: bool = False) -> Callable:
    """The routed experts' product (run_assignments_grouped's contract) for a kernel's name: "grouped",
    `torch._grouped_mm` over rows sorted by expert; "triton", the fused kernel of `triton_moe` (row gather, SwiGLU and
    gate weights inside its two products; GPUs, or Triton's interpreter), which also takes FP8 experts stacked
    (FP8Experts), which otherwise run one expert at a time; "auto", see resolve_moe_kernel."""
    choice = resolve_moe_kernel(choice, device, fp8_experts)
    if choice == "grouped":
        return run_assignments_grouped
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        raise InputError(f"moe_kernel 'triton' runs on GPUs, not on {device} (TRITON_INTERPRET=1 runs Triton's "
                         "interpreter there, for checks); use moe_kernel 'grouped'")
    try:
        from .triton_moe import fused_moe
    except ImportError:
        raise InputError("moe_kernel 'triton' needs the triton package (pip install triton)") from None
    return fused_moe
