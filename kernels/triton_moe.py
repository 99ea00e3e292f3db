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

FP8 experts (`FP8Experts`: the e4m3 weights and 128x128 block scales of the checkpoint, stacked) run the same way
with FP8 products, as `fp8.fp8_block_linear` computes each expert's layers: the rows quantised in 1x128 tiles
(`act_quant`, before each kernel), each 128-wide K tile's e4m3 product summed in fp32 and scaled by the tile's
activation scale and weight block scale. One expert at a time, FP8 experts read their row counts back to the host on
every layer; here nothing is.

Needs triton (GPUs; on a CPU, TRITON_INTERPRET=1 runs it in the interpreter, faithful for float32 and e4m3)."""
import torch
import triton
import triton.language as tl

from .experts import FP8Experts, tokens_per_expert
from .fp8 import act_quant


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


def _layout(expert_ids: torch.Tensor, n_experts: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """`align_to_blocks` in blocks sized for this many assignments: 16 rows when decoding (an expert's few rows would
    leave most of a wider block padding), 64 for prefill."""
    block_m = 16 if expert_ids.numel() <= 4 * n_experts else 64
    return (block_m, *align_to_blocks(expert_ids.flatten(), n_experts, block_m))


@triton.jit
def _block(SLOTS, BLOCK_EXPERT, A, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (m, n)'s work: block m's expert, its assignment ids and which of them are real (the rest padding),
    tile n's output columns and which of them exist."""
    m = tl.program_id(0)
    expert = tl.load(BLOCK_EXPERT + m)
    ids = tl.load(SLOTS + m * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, ids, ids < A, cols, cols < N


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b summed in fp32; float32 inputs exactly so (GPUs would round them to TF32 by default)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _gate_up_kernel(X, W13, H, ROWS, SLOTS, BLOCK_EXPERT, A, K, inter, n_experts,
                    stride_xm, stride_we, stride_wk, stride_hm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program (m, n): H[a, n-tile] = silu(x[row a] @ w1[e]) * (x[row a] @ w3[e]) for the assignments a of block m,
    all of expert e; w13[e] [K, 2 * inter] has w1's columns, then w3's."""
    expert, ids, valid, cols, col_ok = _block(SLOTS, BLOCK_EXPERT, A, inter, BLOCK_M, BLOCK_N)
    if expert >= n_experts:
        return
    rows = tl.load(ROWS + ids, mask=valid, other=0)
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
        gate += _dot(a, w1, IEEE)
        up += _dot(a, w3, IEEE)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(H + ids[:, None].to(tl.int64) * stride_hm + cols[None, :], h.to(H.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(H, W2, OUT, WEIGHTS, SLOTS, BLOCK_EXPERT, A, K, N, n_experts,
                 stride_hm, stride_we, stride_wk, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """Program (m, n): OUT[a, n-tile] = weight[a] * (H[a] @ w2[e]) for the assignments a of block m."""
    expert, ids, valid, cols, col_ok = _block(SLOTS, BLOCK_EXPERT, A, N, BLOCK_M, BLOCK_N)
    if expert >= n_experts:
        return
    ks = tl.arange(0, BLOCK_K)
    w = W2 + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        h = tl.load(H + ids[:, None].to(tl.int64) * stride_hm + k[None, :], mask=valid[:, None] & (k[None, :] < K),
                    other=0.0)
        w2 = tl.load(w + k[:, None] * stride_wk + cols[None, :], mask=(k[:, None] < K) & col_ok[None, :], other=0.0)
        acc += _dot(h, w2, IEEE)
    acc = acc * tl.load(WEIGHTS + ids, mask=valid, other=0.0)[:, None]
    tl.store(OUT + ids[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


def fused_moe(packed, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """`experts.run_assignments_grouped` in two Triton kernels: the same arguments (packed = (w13 [E, dim, 2 * inter],
    w2 [E, inter, dim]) from pack_experts, or FP8Experts) and result, y [N, dim]."""
    if isinstance(packed, FP8Experts):
        return fused_moe_fp8(packed, x, rows, expert_ids, weights)
    w13, w2 = (w.contiguous() for w in packed)
    E, dim, inter = w13.shape[0], w13.shape[1], w2.shape[1]
    A = expert_ids.numel()
    y = torch.zeros_like(x)
    if not A:
        return y
    x = x.contiguous()
    block_m, slots, block_expert = _layout(expert_ids, E)
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


@triton.jit
def _fp8_gate_up_kernel(XQ, XS, W1, S1, W3, S3, H, ROWS, SLOTS, BLOCK_EXPERT, A, K, inter, n_experts,
                        stride_xm, stride_xsm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_gate_up_kernel` over e4m3 rows XQ with tile scales XS [N, K/BLOCK_K] and e4m3 w1, w3 [E, inter, K] with
    block scales [E, inter/BLOCK_K, K/BLOCK_K]: each K tile's product scaled by the row's and the block's scale."""
    expert, ids, valid, cols, col_ok = _block(SLOTS, BLOCK_EXPERT, A, inter, BLOCK_M, BLOCK_N)
    if expert >= n_experts:
        return
    rows = tl.load(ROWS + ids, mask=valid, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    w_off = expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
    s_off = expert.to(tl.int64) * stride_se + (cols // BLOCK_K) * stride_sn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        k = t * BLOCK_K + ks
        a = tl.load(XQ + rows[:, None] * stride_xm + k[None, :], mask=valid[:, None] & (k[None, :] < K), other=0.0)
        a_scale = tl.load(XS + rows * stride_xsm + t, mask=valid, other=0.0)
        w_ok = (k[:, None] < K) & col_ok[None, :]
        w1 = tl.load(W1 + w_off + k[:, None], mask=w_ok, other=0.0)
        w3 = tl.load(W3 + w_off + k[:, None], mask=w_ok, other=0.0)
        s1 = tl.load(S1 + s_off + t, mask=col_ok, other=0.0)
        s3 = tl.load(S3 + s_off + t, mask=col_ok, other=0.0)
        gate += tl.dot(a, w1) * a_scale[:, None] * s1[None, :]
        up += tl.dot(a, w3) * a_scale[:, None] * s3[None, :]
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(H + ids[:, None].to(tl.int64) * stride_hm + cols[None, :], h.to(H.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _fp8_down_kernel(HQ, HS, W2, S2, OUT, WEIGHTS, SLOTS, BLOCK_EXPERT, A, K, N, n_experts,
                     stride_hm, stride_hsm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_down_kernel` over e4m3 rows HQ (one per assignment) with tile scales HS and e4m3 w2 [E, N, K]."""
    expert, ids, valid, cols, col_ok = _block(SLOTS, BLOCK_EXPERT, A, N, BLOCK_M, BLOCK_N)
    if expert >= n_experts:
        return
    id64 = ids.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    w_off = expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
    s_off = expert.to(tl.int64) * stride_se + (cols // BLOCK_K) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        k = t * BLOCK_K + ks
        h = tl.load(HQ + id64[:, None] * stride_hm + k[None, :], mask=valid[:, None] & (k[None, :] < K), other=0.0)
        h_scale = tl.load(HS + id64 * stride_hsm + t, mask=valid, other=0.0)
        w2 = tl.load(W2 + w_off + k[:, None], mask=(k[:, None] < K) & col_ok[None, :], other=0.0)
        s2 = tl.load(S2 + s_off + t, mask=col_ok, other=0.0)
        acc += tl.dot(h, w2) * h_scale[:, None] * s2[None, :]
    acc = acc * tl.load(WEIGHTS + ids, mask=valid, other=0.0)[:, None]
    tl.store(OUT + id64[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


FP8_TILE = 128  # the checkpoints' block: K tiles of the activations and weights alike


def fused_moe_fp8(experts: FP8Experts, x: torch.Tensor, rows: torch.Tensor, expert_ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """`fused_moe` over FP8 experts: y [N, dim] in x's dtype."""
    E, inter, dim = experts.w1.shape
    A = expert_ids.numel()
    y = torch.zeros_like(x)
    if not A:
        return y
    block_m, slots, block_expert = _layout(expert_ids, E)
    n_blocks = block_expert.numel()
    xq, xs = act_quant(x, FP8_TILE)
    h = torch.empty(A, inter, dtype=x.dtype, device=x.device)
    _fp8_gate_up_kernel[(n_blocks, triton.cdiv(inter, 64))](
        xq, xs, experts.w1, experts.s1, experts.w3, experts.s3, h, rows.to(torch.int32).contiguous(), slots,
        block_expert, A, dim, inter, E,
        xq.stride(0), xs.stride(0), experts.w1.stride(0), experts.w1.stride(1), experts.s1.stride(0),
        experts.s1.stride(1), h.stride(0), BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=FP8_TILE)
    hq, hs = act_quant(h, FP8_TILE)
    out = torch.empty(A, dim, dtype=x.dtype, device=x.device)
    _fp8_down_kernel[(n_blocks, triton.cdiv(dim, 64))](
        hq, hs, experts.w2, experts.s2, out, weights.to(torch.float32).contiguous(), slots, block_expert, A, inter,
        dim, E, hq.stride(0), hs.stride(0), experts.w2.stride(0), experts.w2.stride(1), experts.s2.stride(0),
        experts.s2.stride(1), out.stride(0), BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=FP8_TILE)
    return y.index_add_(0, rows, out)
