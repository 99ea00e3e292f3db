"""Which sequences run in the next step, and with how many tokens each.

Decoding sequences go first, one token each (two with an MTP draft); the rest of the step's token budget
goes to prefill chunks, of sequences already admitted and then of new ones, so a long prompt is computed
over several steps while the others keep decoding. When the cache has no block for a decoding sequence,
the most recently admitted sequence is preempted: its blocks are freed and it waits at the head of the
queue to be recomputed from its tokens, so nothing it has generated is lost.
"""
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class Batch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.is_prefilling or seq.status != SequenceStatus.RUNNING:
                continue
            need = len(seq) + (1 if seq.draft else 0)  # positions that must have a slot this step
            if not self._make_room(seq, need):
                continue
            self.block_manager.append_slots(seq, need)
            batch.decodes.append(seq)
            budget -= 1 + (1 if seq.draft else 0)
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(seq.prefill_target - seq.num_computed_tokens, budget)
                batch.prefills.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, use_prefix_cache=seq.params.prompt_logprobs is None)
            # at least the last token is computed: its logits choose the next token
            seq.num_computed_tokens = min(seq.num_cached_tokens, seq.prefill_target - 1)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.prefill_target - seq.num_computed_tokens, budget)
            batch.prefills.append((seq, n))
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, need: int) -> bool:
        """Preempt newer sequences until `seq` can grow to `need` positions; False if `seq` itself had to go."""
        while not self.block_manager.can_append(seq, need):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.prefill_target = len(seq)
        seq.draft = None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
