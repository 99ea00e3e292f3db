"""FP8 (e4m3) block quantisation, as DeepSeek-V3 stores weights and moves dispatch payloads.

Weights: one fp32 `weight_scale_inv` per 128x128 block (edge blocks may be ragged); the real weight is
`fp8 x scale_inv`. Activations: one scale per 1x128 tile of the last dimension. In both, the scale is the
block's absolute maximum over 448, the largest finite e4m3 value, so every block uses the full range.
"""
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
    padded = torch.zeros(gm * bm, gn * bn, dtype=torch.float32)
    padded[:M, :N] = weight.to(torch.float32)
    amax = padded.view(gm, bm, gn, bn).abs().amax(dim=(1, 3))  # [gm, gn]
    scale_inv = (amax / FP8_MAX).clamp(min=_TINY)
    q = (weight.to(torch.float32) / _expand_blocks(scale_inv, weight.shape, block)).to(FP8_DTYPE)
    return q, scale_inv


def act_quant(x: torch.Tensor, tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., N] -> (e4m3 [..., N], scale fp32 [..., ceil(N/tile)]); a ragged last tile is allowed."""
    N = x.shape[-1]
    tiles = -(-N // tile)
    padded = torch.nn.functional.pad(x.to(torch.float32), (0, tiles * tile - N))
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
