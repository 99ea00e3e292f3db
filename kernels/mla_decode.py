"""Paged MLA decode: the absorbed form's attention read from the latent cache's pages where they lie.

Each query row attends, in the latent, to the cached positions up to its own: scores q . [c_kv; k_pe] over the
row's blocks, values c_kv. The blocks are visited one at a time with the online softmax of flash decoding (a running
maximum m, normaliser l and weighted sum acc, rescaled as each block arrives), so no [B, L, C] copy of a batch's
history is made and no [B, R, L] mask is built: positions past a row's limit are dropped block by block.

Shapes: B sequences, R query rows per sequence (new tokens x heads, token-major), D = kv_lora_rank + rope dims,
C = kv_lora_rank; pages [num_blocks + 1, block_size, D] (the last block is the cache's scratch block).
`paged_mla_decode` is the torch statement of it, and the reference of the Triton kernel in `triton_mla.py`.
"""
import os

import torch

from .errors import InputError


def paged_mla_decode(q: torch.Tensor, pages: torch.Tensor, tables: torch.Tensor, limits: torch.Tensor,
                     scale: float, C: int) -> torch.Tensor:
    """q [B, R, D]; tables [B, n] block ids in position order (-1 past a row's blocks); limits [B, R] the last
    position each row may see -> [B, R, C] in q's dtype, computed in fp32."""
    B, R, _ = q.shape
    block_size = pages.shape[1]
    q = q.float()
    m = torch.full((B, R), float("-inf"), device=q.device)
    l = torch.zeros(B, R, device=q.device)
    acc = torch.zeros(B, R, C, device=q.device)
    for j in range(tables.shape[1]):
        kv = pages[tables[:, j].clamp(min=0)].float()  # [B, block, D]: this block of every row
        s = torch.einsum("brd,bkd->brk", q, kv) * scale
        position = j * block_size + torch.arange(block_size, device=q.device)
        s = s.masked_fill(position > limits[..., None], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        shift = torch.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = torch.exp(s - shift[..., None])
        alpha = torch.exp(m - shift)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("brk,bkc->brc", p, kv[..., :C])
        m = m_new
    return (acc / l.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).to(pages.dtype)


MLA_DECODE = ("auto", "gather", "paged", "triton")


def decode_kernel(choice: str, device: torch.device, block_size: int):
    """The paged decode an engine runs, or None for the gather path (attention over each row's history copied
    out): "paged" this module's torch recurrence, "triton" the kernel; "auto" the kernel on a GPU where triton
    imports and the block size fits it, else the gather path (on CPUs it is the faster: one copy and two batched
    products per layer)."""
    if choice not in MLA_DECODE:
        raise InputError(f"mla_decode must be one of {MLA_DECODE}, got {choice!r}")
    if choice == "gather" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "paged":
        return paged_mla_decode
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        if choice == "auto":
            return None
        raise InputError(f"mla_decode 'triton' runs on GPUs, not on {device} (TRITON_INTERPRET=1 runs Triton's "
                         "interpreter there, for checks); use 'gather' or 'paged'")
    try:
        from . import triton_mla
    except ImportError:
        if choice == "auto":
            return None
        raise InputError("mla_decode 'triton' needs the triton package (pip install triton)") from None
    if not triton_mla.fits(block_size):
        if choice == "auto":
            return None
        raise InputError(f"mla_decode 'triton' needs a power-of-two block_size of at least 16, got {block_size}")
    return triton_mla.paged_mla_decode
