"""The latent KV cache: per token per layer, the normalised KV latent `c_kv` [kv_lora_rank] and the rotated
shared key `k_pe` [qk_rope_head_dim], stored side by side as one [kv_lora_rank + qk_rope_head_dim] row.
Nothing else is cached; both MLA forms recompute what they need from these rows.

A cache hands the attention layers a view for the rows (sequences) of one forward call; a view has one
method, `update(layer_id, latent, positions) -> latent of every cached position`, so the paged cache of
the engine can stand in for this contiguous one.
"""
import torch

from .args import ModelArgs


class LatentCache:
    """Contiguous cache for `batch` sequences of up to `max_len` tokens: [layers, batch, max_len, latent_dim]."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, n_layers: int | None = None):
        self.kv = torch.zeros(n_layers or args.n_layers, batch, max_len, args.latent_dim, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def view(self, rows: torch.Tensor | None = None) -> "LatentCacheView":
        """The sequences at batch `rows` (all when None), in that order."""
        return LatentCacheView(self, torch.arange(self.kv.shape[1]) if rows is None else rows)


class LatentCacheView:
    def __init__(self, cache: LatentCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows

    def update(self, layer_id: int, latent: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Write latent [B, S, C] at positions [B, S]; return [B, L, C] for positions 0..L-1, L = max + 1.
        Entries past a row's own length are stale; the causal mask (key position <= query position) hides them."""
        kv = self.cache.kv[layer_id]
        kv[self.rows[:, None], positions] = latent.to(kv.dtype)
        length = int(positions.max()) + 1
        return kv[self.rows, :length]
