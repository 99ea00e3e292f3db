"""A request's life in the engine: its tokens, its blocks, its draft, and what it has produced."""
import itertools
from dataclasses import dataclass
from enum import Enum, auto
from typing import Optional, Union

import torch

from .sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class Draft:
    """An MTP draft for the position after the next."""
    token: int


MASK64 = (1 << 64) - 1


def position_seed(seed: int, index: int) -> int:
    """A 64-bit seed for position `index` of a request seeded with `seed`: SplitMix64's finaliser over both, so that
    nearby seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xD1B54A32D192ED03) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class Sequence:
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: Optional[str] = None,
                 device: torch.device | str = "cpu"):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id or str(self.seq_id)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0     # prompt tokens found in the prefix cache at admission
        self.num_computed_tokens = 0   # positions whose latent KV is in the cache and valid
        self.prefill_target = len(token_ids)  # positions to compute before decoding (all tokens on readmission)
        self.draft: Optional[Draft] = None
        # a sampled request draws on the engine's device (a generator serves only tensors on its own device); one
        # without a seed gets one from torch's default generator (torch.manual_seed still governs those), which
        # then travels with it (see draw_generator)
        self.seed = None if params.greedy else params.seed if params.seed is not None else \
            int(torch.randint(1 << 62, (), device="cpu"))
        self.generator = None if params.greedy else torch.Generator(device)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[Optional[float]] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None           # why the request failed (finish_reason "error"), this one alone
        self.stop_text_len: Optional[int] = None  # text is cut here when a stop string matched
        self.stop_reason: Union[int, str, None] = None  # the stop token or string that ended it (vLLM's)
        self.text_decoder = None                   # the engine's IncrementalDecoder of the completion
        self.drafts_proposed = 0
        self.drafts_accepted = 0
        self.num_steps = 0             # decode steps this sequence took part in
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    def draw_generator(self, index: int) -> torch.Generator:
        """The generator whose noise draws token `index` (its position in the sequence), seeded from the request's
        seed and that position alone: a token's draw does not depend on the draws before it. So a request resumed
        from its prompt and the tokens it had draws on exactly as it would have, and an MTP draft and the
        verification of its position share their noise (see kernels.sampling.draw)."""
        return self.generator.manual_seed(position_seed(self.seed, index))

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
