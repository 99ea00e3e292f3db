"""The latent KV cache: per token per layer, the normalised KV latent `c_kv` [kv_lora_rank] and the rotated
shared key `k_pe` [qk_rope_head_dim], stored side by side as one [kv_lora_rank + qk_rope_head_dim] row.
Nothing else is cached; both MLA forms recompute what they need from these rows.

A cache hands the attention layers a view for the rows (sequences) of one forward call; a view has one
method, `update(layer_id, latent, positions) -> latent of every cached position`, so the paged cache of
the engine can stand in for this contiguous one.
"""
from typing import Optional

import numpy as np
import torch

from .args import ModelArgs


class LatentCache:
    """Contiguous cache for `batch` sequences of up to `max_len` tokens: [layers, batch, max_len, latent_dim]."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, n_layers: int | None = None,
                 device: torch.device | str = "cpu"):
        self.kv = torch.zeros(n_layers or args.n_layers, batch, max_len, args.latent_dim, dtype=dtype,
                              device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def view(self, rows: torch.Tensor | None = None) -> "LatentCacheView":
        """The sequences at batch `rows` (all when None), in that order."""
        return LatentCacheView(self, torch.arange(self.kv.shape[1], device=self.kv.device) if rows is None else rows)


class LatentCacheView:
    def __init__(self, cache: LatentCache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows

    def update(self, layer_id: int, latent: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Write latent [B, S, C] at positions [B, S]; return [B, L, C] for positions 0..L-1, L = max + 1.
        Entries past a row's own length are stale; the causal mask (key position <= query position) hides them."""
        kv = self.cache.kv[layer_id]
        kv[self.rows[:, None], positions] = latent.to(kv.dtype)
        return kv[self.rows, :self.length(positions)]

    @staticmethod
    def length(positions: torch.Tensor) -> int:
        """How many positions a call at `positions` reads: the furthest one + 1 (read back from the device)."""
        return int(positions.max()) + 1


class PagedLatentCache:
    """Latent rows in fixed-size blocks shared by all sequences: [layers, (num_blocks + 1) * block_size, C].
    A sequence owns a block table (block ids in position order); position p lives in slot
    table[p // block_size] * block_size + p % block_size. The extra block at the end is scratch: padding tokens
    write there, so a padded batch never touches another sequence's rows, and every layer's cache reads as whole
    pages [num_blocks + 1, block_size, C] (the paged MLA decode's view)."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, n_layers: int,
                 device: torch.device | str = "cpu"):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = torch.zeros(n_layers, (num_blocks + 1) * block_size, args.latent_dim, dtype=dtype, device=device)
        self.scratch_slot = num_blocks * block_size

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Allocated bytes over token capacity (the scratch block left out)."""
        return self.kv.shape[0] * self.kv.shape[2] * self.kv.element_size()

    def pages(self, layer_id: int) -> torch.Tensor:
        return self.kv[layer_id].view(self.num_blocks + 1, self.block_size, -1)

    def slots(self, block_tables: list[list[int]], positions: np.ndarray, valid: np.ndarray,
              length: int, gather: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """The slots of a padded batch, built on the host (in NumPy) with its inputs: write_slots [B, S], each
        token's slot, padding's in the scratch block; read_slots [B * length], positions 0..length-1 of every row in
        table order (None without `gather`); the block tables [B, n] (-1 past a row's blocks). positions, valid
        [B, S] host arrays; length: the furthest position + 1. Returned as host tensors: the slots int64, the tables
        int32 (as the paged decode kernels read them: converted once here, not in every layer)."""
        bs = self.block_size
        n_blocks = max(-(-length // bs), max(len(t) for t in block_tables))
        table = np.full((len(block_tables), n_blocks), -1, dtype=np.int32)
        for row, t in zip(table, block_tables):
            row[:len(t)] = t
        block = np.take_along_axis(table, np.minimum(positions // bs, n_blocks - 1), axis=1).astype(np.int64)
        write = np.where((block >= 0) & valid, block * bs + positions % bs, self.scratch_slot)
        if not gather:
            return torch.from_numpy(write), None, torch.from_numpy(table)
        # a row's positions past its own blocks read block 0: stale rows that the causal mask hides like any
        # other past a row's length
        read = np.maximum(table, 0).astype(np.int64)[:, :, None] * bs + np.arange(bs)  # [B, blocks, bs]
        return torch.from_numpy(write), torch.from_numpy(read.reshape(len(table), -1)[:, :length].ravel()), \
            torch.from_numpy(table)

    def view(self, write_slots: torch.Tensor, read_slots: Optional[torch.Tensor], length: int,
             tables: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
             decode=None) -> "PagedCacheView":
        """A view for a padded batch from its `slots`, on the cache's device; with a paged `decode` kernel
        (mla_decode.decode_kernel), the block tables and positions it reads."""
        return PagedCacheView(self, write_slots, read_slots, length, tables, positions, decode)


class PagedCacheView:
    def __init__(self, cache: PagedLatentCache, write_slots: torch.Tensor, read_slots: Optional[torch.Tensor],
                 length: int, tables: Optional[torch.Tensor], positions: Optional[torch.Tensor], decode):
        self.cache = cache
        self.kv = cache.kv
        self.write_slots = write_slots
        self.read_slots = read_slots
        self.read_shape = (write_slots.shape[0], length)
        self.tables, self.positions, self.decode = tables, positions, decode
        self.limits: Optional[torch.Tensor] = None  # the paged decode's, built at the first layer for all of them

    def length(self, positions: torch.Tensor) -> int:
        return self.read_shape[1]

    def update(self, layer_id: int, latent: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv = self.kv[layer_id]
        kv[self.write_slots] = latent.to(kv.dtype)
        # index_select over the flattened slots: about 3.5x faster on the CPU than kv[read_slots]
        return kv.index_select(0, self.read_slots).view(*self.read_shape, kv.shape[-1])

    def attend(self, layer_id: int, latent: torch.Tensor, q: torch.Tensor, scale: float, C: int) -> torch.Tensor:
        """Store this call's latent [B, S, D], then the paged decode of q [B, S * H, D] over every row's pages up
        to each query's own position -> [B, S * H, C]."""
        kv = self.kv[layer_id]
        kv[self.write_slots] = latent.to(kv.dtype)
        if self.limits is None or self.limits.shape[1] != q.shape[1]:  # each query row's last position, int32
            self.limits = self.positions.repeat_interleave(q.shape[1] // self.positions.shape[1], dim=1).int()
        return self.decode(q.to(kv.dtype), self.cache.pages(layer_id), self.tables, self.limits, scale, C)
