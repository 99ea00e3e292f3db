"""What a request asks of the sampler and when it stops."""
from dataclasses import dataclass, field
from typing import Optional

from moeserve.kernels.errors import InputError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0             # nucleus mass in (0, 1]
    top_k: int = 0                 # 0 = no top-k cut
    seed: Optional[int] = None     # a seeded request draws the same tokens every time
    stop: list[str] = field(default_factory=list)            # stop strings, not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end-of-sequence token
    ignore_eos: bool = False
    logprobs: Optional[int] = None         # None: none; k >= 0: the chosen token's plus the top-k alternatives
    prompt_logprobs: Optional[int] = None  # None: none; k >= 0: each prompt token's log-probability (+ top-k)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise InputError(f"{name} must be between 0 and 20, got {value}")
        if any(not s for s in self.stop):
            raise InputError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_logits(self) -> bool:
        """Whether choosing and reporting a token takes more than the batch's greedy tokens."""
        return not self.greedy or self.logprobs is not None

    @property
    def stop_hold(self) -> int:
        """Characters at the end of unfinished text that may yet begin a stop string: a stream holds them back."""
        return max((len(s) for s in self.stop), default=1) - 1
