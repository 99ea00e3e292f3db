"""Fused MoE as two Triton kernels: `experts.run_assignments_grouped`'s sums, with the row gather, SwiGLU and the
gate weights inside the products.

The assignments (row, expert, weight) are laid out by expert in blocks of BLOCK_M (`align_to_blocks`): each expert's
assignments fill whole blocks, the last one padded with a sentinel, so that every block belongs to one expert. A
program takes one block and one tile of output columns:
- `_gate_up_kernel` loads its block's rows of x where they lie (no sorted copy of x), multiplies them by the expert's
  w1 and w3 columns of the tile (w13 holds them side by side) and stores silu(w1 x) * w3 x, one row per assignment;
- `_down_kernel` multiplies those rows by the expert's w2 and by each assignment's gate weight.
The host then adds each assignment's row into its token's (`index_add_`). Nothing is read back to the host: the
grid is sized for the most blocks any routing can need, and a program whose block is past the last exits.

Needs triton (GPUs; on a CPU, TRITON_INTERPRET=1 runs it in the interpreter, faithful for float32)."""
import torch
import triton
import triton.language as tl

from .experts import tokens_per_expert


def align_to_blocks(expert_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignment ids laid out by expert, each expert's run padded to whole blocks of block_m: (slots [n_blocks *
    block_m] int32, an assignment id or A (the sentinel) in each; block_expert [n_blocks] int32, each block's expert
    or n_experts past the last used block). Stable: an expert's assignments keep their order. n_blocks is the most
    any routing of A assignments can need, so no size is read back from the device."""
    A, device = expert_ids.numel(), expert_ids.device
    counts = tokens_per_expert(expert_ids, n_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    segment_end = torch.cumsum(padded, 0)
    order = torch.sort(expert_ids, stable=True).indices
    sorted_experts = expert_ids[order]
    first_of_expert = torch.cumsum(counts, 0) - counts  # where each expert's run starts in `order`
    place = (segment_end - padded)[sorted_experts] + torch.arange(A, device=device) - first_of_expert[sorted_experts]
    n_blocks = triton.cdiv(A + min(A, n_experts) * (block_m - 1), block_m)
    slots = torch.full((n_blocks * block_m,), A, dtype=torch.int32, device=device)
    slots[place] = order.to(torch.int32)
    block_starts = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(segment_end, block_starts, right=True).to(torch.int32)
    return slots, block_expert


@triton.jit
def _gate_up_kernel(X, W13, H, ROWS, SLOTS, BLOCK_EXPERT, A, K, inter, n_experts,
                    stride_xm, stride_we, stride_wk, stride_hm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program (m, n): H[a, n-tile] = silu(x[row a] @ w1[e]) * (x[row a] @ w3[e]) for the assignments a of block m,
    all of expert e; w13[e] [K, 2 * inter] has w1's columns, then w3's."""
    m = tl.program_id(0)
    expert = tl.load(BLOCK_EXPERT + m)
    if expert >= n_experts:
        return
    ids = tl.load(SLOTS + m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < A
    rows = tl.load(ROWS + ids, mask=valid, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    w = W13 + expert.to(tl.int64) * stride_we
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + k[None, :], mask=valid[:, None] & (k[None, :] < K),
                    other=0.0)
        w_ok = (k[:, None] < K) & col_ok[None, :]
        w1 = tl.load(w + k[:, None] * stride_wk + cols[None, :], mask=w_ok, other=0.0)
        w3 = tl.load(w + k[:, None] * stride_wk + (inter + cols)[None, :], mask=w_ok, other=0.0)
        if IEEE:
            gate += tl.dot(a, w1, input_precision="ieee")
            up += tl.dot(a, w3, input_precision="ieee")
        else:
            gate += tl.dot(a, w1)
            up += tl.dot(a, w3)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(H + ids[:, None].to(tl.int64) * stride_hm + cols[None, :], h.to(H.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(H, W2, OUT, WEIGHTS, SLOTS, BLOCK_EXPERT, A, K, N, n_experts,
                 stride_hm, stride_we, stride_wk, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program (m, n): OUT[a, n-tile] = weight[a] * (H[a] @ w2[e]) for the assignments a of block m."""
    m = tl.program_id(0)
    expert = tl.load(BLOCK_EXPERT + m)
    if expert >= n_experts:
        return
    ids = tl.load(SLOTS + m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = ids < A
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w = W2 + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        h = tl.load(H + ids[:, None].to(tl.int64) * stride_hm + k[None, :], mask=valid[:, None] & (k[None, :] < K),
                    other=0.0)
        w2 = tl.load(w + k[:, None] * stride_wk + cols[None, :], mask=(k[:, None] < K) & col_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(h, w2, input_precision="ieee")
        else:
            acc += tl.dot(h, w2)
    acc = acc * tl.load(WEIGHTS + ids, mask=valid, other=0.0)[:, None]
    tl.store(OUT + ids[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


def fused_moe(packed, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """`experts.run_assignments_grouped` in two Triton kernels: the same arguments (packed = (w13 [E, dim, 2 * inter],
    w2 [E, inter, dim]) from pack_experts) and result, y [N, dim]."""
    w13, w2 = (w.contiguous() for w in packed)
    E, dim, inter = w13.shape[0], w13.shape[1], w2.shape[1]
    A = expert_ids.numel()
    y = torch.zeros_like(x)
    if not A:
        return y
    x = x.contiguous()
    # a block per expert's few rows when decoding (most of a block would be padding), wider ones for prefill
    block_m = 16 if A <= 4 * E else 64
    slots, block_expert = align_to_blocks(expert_ids.flatten(), E, block_m)
    n_blocks = block_expert.numel()
    ieee = x.dtype == torch.float32
    h = torch.empty(A, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(n_blocks, triton.cdiv(inter, 64))](
        x, w13, h, rows.to(torch.int32).contiguous(), slots, block_expert, A, dim, inter, E,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, IEEE=ieee)
    out = torch.empty(A, dim, dtype=x.dtype, device=x.device)
    _down_kernel[(n_blocks, triton.cdiv(dim, 64))](
        h, w2, out, weights.to(torch.float32).contiguous(), slots, block_expert, A, inter, dim, E,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, IEEE=ieee)
    return y.index_add_(0, rows, out)
