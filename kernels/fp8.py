"""FP8 (e4m3) block quantisation, as DeepSeek-V3 stores weights and moves dispatch payloads.

Weights: one fp32 `weight_scale_inv` per 128x128 block (edge blocks may be ragged); the real weight is
`fp8 x scale_inv`. Activations: one scale per 1x128 tile of the last dimension. In both, the scale is the
block's absolute maximum over 448, the largest finite e4m3 value, so every block uses the full range.
"""
from typing import Optional

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
_TINY = 1e-12  # scale of an all-zero block: anything positive dequantises it back to zeros


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """[ceil(M/bm), ceil(N/bn)] -> [M, N]: each block's scale repeated over its (possibly ragged) extent."""
    bm, bn = block
    return scale.repeat_interleave(bm, dim=0)[: shape[0]].repeat_interleave(bn, dim=1)[:, : shape[1]]


def weight_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight: [M, N] e4m3, scale_inv: [ceil(M/bm), ceil(N/bn)] fp32 -> [M, N] in `dtype`, exactly fp8 x scale."""
    expected = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{tuple(weight.shape)} weight in {block[0]}x{block[1]} blocks")
    full = weight.to(torch.float32) * _expand_blocks(scale_inv.to(torch.float32), weight.shape, block)
    return full.to(dtype)


def weight_quant(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [M, N] -> (e4m3 [M, N], scale_inv fp32 [ceil(M/bm), ceil(N/bn)]), amax/448 per block."""
    M, N = weight.shape
    bm, bn = block
    gm, gn = -(-M // bm), -(-N // bn)
    padded = torch.zeros(gm * bm, gn * bn, dtype=torch.float32, device=weight.device)
    padded[:M, :N] = weight.to(torch.float32)
    amax = padded.view(gm, bm, gn, bn).abs().amax(dim=(1, 3))  # [gm, gn]
    scale_inv = (amax / FP8_MAX).clamp(min=_TINY)
    q = (weight.to(torch.float32) / _expand_blocks(scale_inv, weight.shape, block)).to(FP8_DTYPE)
    return q, scale_inv


def act_quant(x: torch.Tensor, tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., N] -> (e4m3 [..., N], scale fp32 [..., ceil(N/tile)]); a ragged last tile is allowed."""
    N = x.shape[-1]
    tiles = -(-N // tile)
    x = x.to(torch.float32)
    padded = x if N == tiles * tile else torch.nn.functional.pad(x, (0, tiles * tile - N))  # whole tiles: no copy
    amax = padded.unflatten(-1, (tiles, tile)).abs().amax(dim=-1)  # [..., tiles]
    scale = (amax / FP8_MAX).clamp(min=_TINY)
    q = (padded.unflatten(-1, (tiles, tile)) / scale[..., None]).flatten(-2)[..., :N].to(FP8_DTYPE)
    return q, scale


def act_dequant(q: torch.Tensor, scale: torch.Tensor, tile: int = 128,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `act_quant`: [..., N] e4m3 and [..., ceil(N/tile)] scales -> [..., N] in `dtype`."""
    N = q.shape[-1]
    return (q.to(torch.float32) * scale.repeat_interleave(tile, dim=-1)[..., :N]).to(dtype)


def fp8_payload_bytes(n_values: int, tile: int = 128) -> int:
    """Bytes on the wire for n values in FP8 with one fp32 scale per tile."""
    return n_values + 4 * -(-n_values // tile)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int] = (128, 128), layouts: Optional[dict] = None) -> torch.Tensor:
    """x W^T as DeepSeek-V3's FP8 GEMM computes it: x quantised to e4m3 in 1 x block[1] tiles (`act_quant`),
    W e4m3 [N, K] in block[0] x block[1] blocks with `scale_inv`; each K tile's e4m3 products are summed in fp32,
    then scaled by the tile's two scales. x [..., K] -> [..., N] fp32. `layouts`: a dict in which to keep the weight
    scales in the layout the GPU's product reads (an FP8Linear's own), so that they are arranged once.

    On SM90 GPUs `torch._scaled_mm` takes the block scales as they are; elsewhere (CPUs, older GPUs) one row-wise
    scaled product per K tile, whose row scales are the activation tile's and whose column scales are the weight
    blocks' of that tile, expanded over their rows."""
    N, K = weight.shape
    bn, bk = block
    xq, sx = act_quant(x.reshape(-1, K), bk)  # [M, K], [M, K tiles]
    M = xq.shape[0]
    if x.is_cuda:
        xq, sx = _rows_padded(xq, sx, CUBLAS_FP8_ROWS)
    y = _blockwise_scaled_mm(xq, sx, weight, scale_inv, block, {} if layouts is None else layouts) \
        if x.is_cuda else None
    if y is None:
        try:
            y = _scaled_mm_per_k_tile(xq, sx, weight, scale_inv, block)
        except RuntimeError:  # cuBLAS refuses some ragged FP8 shapes (a 64-wide K tile, say)
            y = act_dequant(xq, sx, bk) @ weight_dequant(weight, scale_inv, block).t()
    return y[:M].view(*x.shape[:-1], N)


CUBLAS_FP8_ROWS = 16  # cuBLASLt's FP8 products refuse row counts such as 1 (CUBLAS_STATUS_NOT_SUPPORTED, H200)


def _rows_padded(xq: torch.Tensor, sx: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows and their tile scales with zero rows (scale 1) appended up to a multiple of `multiple`."""
    pad = -xq.shape[0] % multiple
    if not pad:
        return xq, sx
    xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(xq.dtype)  # e4m3's zero is all bits 0
    return xq, torch.nn.functional.pad(sx, (0, 0, 0, pad), value=1.0)


def _scaled_mm_per_k_tile(xq, sx, weight, scale_inv, block):
    N, K = weight.shape
    bn, bk = block
    y = torch.zeros(xq.shape[0], N, dtype=torch.float32, device=xq.device)
    for t, start in enumerate(range(0, K, bk)):
        col_scale = scale_inv[:, t].repeat_interleave(bn)[:N]
        y += torch._scaled_mm(xq[:, start:start + bk], weight[:, start:start + bk].t(),
                              scale_a=sx[:, t:t + 1].contiguous(), scale_b=col_scale[None].contiguous(),
                              out_dtype=torch.float32)
    return y


def _k_major_padded(scale_inv: torch.Tensor) -> torch.Tensor:
    """[N/128, K/128] -> [K/128 rounded up to 4, N/128] seen through .t() (torch 2.11's BlockWise128x128 layout)."""
    n_blocks, k_blocks = scale_inv.shape
    padded = torch.ones(n_blocks, -(-k_blocks // 4) * 4, dtype=torch.float32, device=scale_inv.device)
    padded[:, :k_blocks] = scale_inv
    return padded.t()


# The weight-scale layouts torch builds have asked of the SM90 block-scaled product
SCALE_LAYOUTS = {"k-major, padded to 4": _k_major_padded, "n-major": torch.Tensor.contiguous,
                 "n-major, outer-dim-major": lambda s: s.t().contiguous().t()}
# Ways of spelling the product: (output dtype, weight-scale layout, function)
SPELLINGS = [(out, layout, api) for out in (torch.float32, torch.bfloat16) for layout in SCALE_LAYOUTS
             for api in ("F.scaled_mm", "torch._scaled_mm")]


def _blockwise_call(spelling, xq, sx, weight, scale_inv, layouts: dict) -> torch.Tensor:
    """One spelling of the block-scaled product (1x128 activation scales outer-dimension-major); the weight scales
    arranged for it are kept in `layouts`."""
    out, layout, api = spelling
    if layout not in layouts:
        layouts[layout] = SCALE_LAYOUTS[layout](scale_inv)
    sa, sb = sx.t().contiguous().t(), layouts[layout]
    if api == "F.scaled_mm":
        F = torch.nn.functional
        return F.scaled_mm(xq, weight.t(), sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                           output_dtype=out)
    return torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, out_dtype=out)


BLOCKWISE: dict[str, Optional[int]] = {}  # per GPU: which spelling matched the per-tile product, None: none did
BLOCKWISE_ERRORS: list[str] = []          # why the others were passed over (tools/gpu_check.py reports them)


def _blockwise_scaled_mm(xq, sx, weight, scale_inv, block, layouts: dict):
    """The block-scaled product in one call where this GPU and torch build have it, else None. The first product
    on each GPU tries every spelling against the per-tile product; the one that matches serves from then on."""
    if block != (128, 128) or xq.shape[1] % 128 or weight.shape[0] % 128:
        return None
    device = str(xq.device)
    if device in BLOCKWISE:
        chosen = BLOCKWISE[device]
        try:
            return None if chosen is None else _blockwise_call(SPELLINGS[chosen], xq, sx, weight, scale_inv,
                                                               layouts).float()
        except Exception:  # noqa: BLE001  (a shape this spelling refuses: the per-tile product serves it)
            return None
    reference = _scaled_mm_per_k_tile(xq, sx, weight, scale_inv, block)
    BLOCKWISE[device] = None
    for i, spelling in enumerate(SPELLINGS):
        try:
            y = _blockwise_call(spelling, xq, sx, weight, scale_inv, {}).float()
        except Exception as e:  # noqa: BLE001  (torch raises several kinds for a recipe it lacks)
            BLOCKWISE_ERRORS.append(f"{spelling[1]} via {spelling[2]} ({spelling[0]}): {type(e).__name__}: "
                                    f"{str(e)[:200]}")
            continue
        error = ((y - reference).abs().max() / reference.abs().max()).item()
        if error <= 1e-2:
            BLOCKWISE[device] = i
            return y
        BLOCKWISE_ERRORS.append(f"{spelling[1]} via {spelling[2]} ({spelling[0]}): relative error {error:.3g}")
    return None


class FP8Linear(torch.nn.Module):
    """A linear layer whose weight stays as the checkpoint stores it: e4m3 [out, in] and a fp32 `weight_scale_inv`
    per block, half the bytes of BF16. Computes with `fp8_block_linear`; the output in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128)):
        super().__init__()
        self.block = tuple(block)
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        scales = (-(-out_features // block[0]), -(-in_features // block[1]))
        self.weight_scale_inv = torch.nn.Parameter(torch.empty(scales, dtype=torch.float32), requires_grad=False)
        self.layouts: dict = {}  # the weight scales as the GPU's block-scaled product reads them, made once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self.weight_scale_inv, self.block, self.layouts).to(x.dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as fp8 x scale, [out, in] in `dtype` (for the einsums of MLA's absorbed form)."""
        return weight_dequant(self.weight, self.weight_scale_inv, self.block, dtype)


def dense_weight(linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight [out, in] in `dtype`: an FP8Linear's dequantised, a plain one's as it is."""
    return linear.dequantized(dtype) if isinstance(linear, FP8Linear) else linear.weight
