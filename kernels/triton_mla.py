"""Paged MLA decode as a Triton kernel: `mla_decode.paged_mla_decode`'s recurrence, one program per sequence and
tile of its query rows.

A program holds its query rows [rows, D] and walks the sequence's block table: each block's [block_size, D] latent
rows are loaded where the cache keeps them, scored against every query row in one product, masked past each row's
limit, and folded into the running softmax; the values are the same rows' first C columns. Needs triton (GPUs; on
a CPU, TRITON_INTERPRET=1 runs it in the interpreter) and a power-of-two block size of at least 16 (tl.dot's
smallest tile)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _paged_mla_decode_kernel(Q, PAGES, TABLES, LIMITS, OUT, scale, R, C, P, n_blocks,
                             stride_qb, stride_qr, stride_page_slot, stride_tb, stride_lb, stride_ob, stride_or,
                             BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_P: tl.constexpr, IEEE: tl.constexpr):
    """Program (b, t): query rows t*BLOCK_R.. of sequence b. Scores are the latent part's product plus the rope
    part's (C and P apart, so that neither is padded to the next power of two of C + P)."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rope = C + tl.arange(0, BLOCK_P)
    offsets = tl.arange(0, BLOCK)
    row_ok = rows < R
    q_rows = Q + b * stride_qb + rows[:, None] * stride_qr
    q_c = tl.load(q_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
    q_p = tl.load(q_rows + rope[None, :], mask=row_ok[:, None] & (rope[None, :] < C + P), other=0.0)
    limit = tl.load(LIMITS + b * stride_lb + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    last = tl.minimum(tl.max(limit, 0) // BLOCK + 1, n_blocks)  # the blocks any of these rows sees
    for j in range(0, last):
        block = tl.maximum(tl.load(TABLES + b * stride_tb + j), 0)
        slot_rows = PAGES + (block * BLOCK + offsets)[:, None] * stride_page_slot
        k_c = tl.load(slot_rows + cols[None, :], mask=cols[None, :] < C, other=0.0)  # also the values
        k_p = tl.load(slot_rows + rope[None, :], mask=rope[None, :] < C + P, other=0.0)
        if IEEE:
            s = tl.dot(q_c, tl.trans(k_c), input_precision="ieee") + tl.dot(q_p, tl.trans(k_p), input_precision="ieee")
        else:
            s = tl.dot(q_c, tl.trans(k_c)) + tl.dot(q_p, tl.trans(k_p))
        s = s * scale
        position = j * BLOCK + offsets
        s = tl.where(position[None, :] <= limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m - shift)
        if IEEE:
            pv = tl.dot(p, k_c, input_precision="ieee")
        else:
            pv = tl.dot(p.to(k_c.dtype), k_c)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / tl.maximum(l, 1.1754944e-38)[:, None]
    tl.store(OUT + b * stride_ob + rows[:, None] * stride_or + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < C))


def fits(block_size: int) -> bool:
    """Whether the kernel takes this cache block size: a power of two of at least 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def paged_mla_decode(q: torch.Tensor, pages: torch.Tensor, tables: torch.Tensor, limits: torch.Tensor,
                     scale: float, C: int) -> torch.Tensor:
    """`mla_decode.paged_mla_decode` on the GPU (or the interpreter): the same arguments and result."""
    B, R, D = q.shape
    block_size = pages.shape[1]
    if not fits(block_size):
        raise ValueError(f"the Triton MLA decode needs a power-of-two block size of at least 16, got {block_size}")
    q, tables, limits = q.contiguous(), tables.to(torch.int32).contiguous(), limits.to(torch.int32).contiguous()
    flat = pages.view(-1, D)
    out = torch.empty(B, R, C, dtype=pages.dtype, device=q.device)
    # rows per program: all of a sequence's where they fit (a few heads), else tiles of 16 (V3's 128 heads x 512
    # latent columns would not fit one program's registers), each tile reading the pages again
    block_r = min(max(16, triton.next_power_of_2(R)), 16 if C > 128 else 64)
    _paged_mla_decode_kernel[(B, triton.cdiv(R, block_r))](
        q, flat, tables, limits, out, scale, R, C, D - C, tables.shape[1],
        q.stride(0), q.stride(1), flat.stride(0), tables.stride(0), limits.stride(0), out.stride(0), out.stride(1),
        BLOCK=block_size, BLOCK_R=block_r, BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_P=max(16, triton.next_power_of_2(D - C)), IEEE=q.dtype == torch.float32)
    return out
