"""Blocks of the paged latent cache: allocation, freeing, and the prefix cache.

A full block is identified by a hash chained over its tokens and every token before it, so two requests
that share a prompt prefix share its blocks: the prefix is computed once. A freed block keeps its hash
until it is handed out again, so a prefix stays reusable while its blocks sit in the free list; a block freed before
its latents were computed (its sequence preempted or aborted mid-prefill) does not.
"""
import hashlib
from collections import deque
from typing import Optional

from .sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[bytes] = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(token_ids: tuple[int, ...], prefix_hash: Optional[bytes]) -> bytes:
    h = hashlib.blake2b(prefix_hash or b"", digest_size=16)
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block_id: dict[bytes, int] = {}
        self.prompt_tokens_seen = 0
        self.prompt_tokens_hit = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, block_id: Optional[int] = None) -> Block:
        """Take a free block (a given one, or the least recently freed); its old hash is forgotten."""
        if block_id is None:
            block_id = self.free_block_ids.popleft()
        else:
            self.free_block_ids.remove(block_id)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block

    def _forget(self, block: Block) -> None:
        """Take a block out of the prefix cache."""
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids = None, ()

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self.blocks_needed(len(seq))

    def allocate(self, seq: Sequence, use_prefix_cache: bool = True) -> None:
        """Blocks for every token of `seq`; full blocks found in the prefix cache are shared, not recomputed."""
        assert not seq.block_table
        seq.num_cached_tokens = 0
        use_prefix_cache = use_prefix_cache and self.prefix_caching
        prefix_hash, hit = None, use_prefix_cache
        bs = self.block_size
        for i in range(self.blocks_needed(len(seq))):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            full = len(tokens) == bs
            h = block_hash(tokens, prefix_hash) if full else None
            block_id = self.hash_to_block_id.get(h) if hit and full else None
            if block_id is not None and self.blocks[block_id].token_ids == tokens:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    self.free_block_ids.remove(block_id)
                block.ref_count += 1
                seq.num_cached_tokens += bs
            else:
                hit = False  # after the first miss nothing further can be shared
                block = self._take()
                if full and use_prefix_cache:
                    self._register(block, tokens, h)
            seq.block_table.append(block.block_id)
            prefix_hash = h
        self.prompt_tokens_seen += len(seq)
        self.prompt_tokens_hit += seq.num_cached_tokens

    def _register(self, block: Block, tokens: tuple[int, ...], h: bytes) -> None:
        block.hash, block.token_ids = h, tokens
        self.hash_to_block_id[h] = block.block_id

    def deallocate(self, seq: Sequence) -> None:
        """Free the sequence's blocks. A block is registered in the prefix cache when it is allocated, before its
        latents are computed: a sequence that leaves before computing all of its prompt (preempted or aborted
        mid-prefill) takes the blocks it never filled out of the cache, or a later request with the same prefix
        would read them as computed."""
        filled = seq.num_computed_tokens // self.block_size
        for i in reversed(range(len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            block.ref_count -= 1
            if block.ref_count == 0:
                if i >= filled:
                    self._forget(block)
                self.free_block_ids.append(block.block_id)
        seq.block_table = []

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_free_blocks >= self.blocks_needed(num_tokens) - len(seq.block_table)

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table to hold `num_tokens` positions."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take().block_id)

    def seal_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that decoding has filled with valid latents, so later requests can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        prefix_hash = None
        for i in range(seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                h = block_hash(tokens, prefix_hash)
                if h not in self.hash_to_block_id:
                    self._register(block, tokens, h)
                else:
                    block.hash = h  # an identical block exists; keep the chain, leave the index as is
            prefix_hash = block.hash

    @property
    def prefix_hit_rate(self) -> float:
        return self.prompt_tokens_hit / self.prompt_tokens_seen if self.prompt_tokens_seen else 0.0
