"""Rotary position embedding with YaRN context extension, in DeepSeek's interleaved-pair layout.

DeepSeek rotates pairs (x0, x1), (x2, x3), ... of the `qk_rope_head_dim` slice, each pair by one frequency.
Frequencies are computed for the positions at hand rather than precomputed for `max_seq_len`: a V3
config allows 163,840 positions and a decode step needs one.
"""
import math

import torch

from .args import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, [qk_rope_head_dim // 2]. With YaRN, low frequencies (long wavelengths) are
    interpolated by `rope_factor`, high ones kept, with a linear ramp between `beta_slow` and `beta_fast`
    rotations over the original context. Computed on the CPU whatever the default device (the caller moves them):
    under the meta device, where load_model builds the model, arange would import torch._dynamo (2-3 s)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if args.rope_type != "yarn":
        return freqs

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the original frequency is kept (extrapolated)
    return freqs / args.rope_factor * (1 - keep) + freqs * keep


def rope_freqs_cis(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float) -> torch.Tensor:
    """e^(i position x frequency) scaled by YaRN's factor, complex [*positions.shape, dim // 2]."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.polar(torch.full_like(angles, attention_factor), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, d], as complex numbers, by freqs_cis [B, S, d // 2]; in float32.
    One complex product: on the CPU about a quarter of the time of the same rotation in real arithmetic."""
    dtype = x.dtype
    x = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(-2).to(dtype)
