"""A request's life in the engine: its tokens, its blocks, its draft, and what it has produced."""
import itertools
from dataclasses import dataclass
from enum import Enum, auto
from typing import Optional

import torch

from .sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class Draft:
    """An MTP draft for the position after the next: its token and, when sampling, the draft distribution q."""
    token: int
    probs: Optional[torch.Tensor] = None  # [V], None under greedy


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
        # a seeded request draws on the engine's device (a generator serves only tensors on its own device)
        self.generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[Optional[float]] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None           # why the request failed (finish_reason "error"), this one alone
        self.stop_text_len: Optional[int] = None  # text is cut here when a stop string matched
        self.text_decoder = None                   # the engine's IncrementalDecoder of the completion
        self.drafts_proposed = 0
        self.drafts_accepted = 0
        self.num_steps = 0             # decode steps this sequence took part in
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.token_ids)

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
