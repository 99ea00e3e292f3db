"""What a request asks of the sampler and when it stops."""
import math
from dataclasses import dataclass, field
from typing import Optional

from moeserve.kernels.errors import InputError

# Below this a positive temperature divides float32 logits into overflow (inf - inf = NaN): it is greedy in all
# but name, so it is refused with that advice rather than served as a sampler that cannot draw.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
INT32_MAX = 2**31 - 1
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0             # nucleus mass in (0, 1]
    top_k: int = 0                 # 0 = no top-k cut
    seed: Optional[int] = None     # a seeded request draws the same tokens every time
    stop: list[str] = field(default_factory=list)            # stop strings, not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end-of-sequence token; the token
                                                             # is in token_ids, its text not in the text
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # the text keeps the stop string, or the stop token's text (vLLM's)
    logprobs: Optional[int] = None         # None: none; k >= 0: the chosen token's plus the top-k alternatives
    prompt_logprobs: Optional[int] = None  # None: none; k >= 0: each prompt token's log-probability (+ top-k)

    def validate(self) -> None:
        """Refuse every value the sampler could not honour: wrong types, non-finite or out-of-range numbers."""
        if not _is_int(self.max_tokens) or not 0 < self.max_tokens <= INT32_MAX:
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        t = self.temperature
        if not _is_real(t):
            raise InputError(f"temperature must be a finite number, got {t!r}")
        if t < 0:
            raise InputError(f"temperature must be >= 0, got {t}")
        if 0 < t < MIN_TEMPERATURE:
            raise InputError(f"temperature {t:g} is below {MIN_TEMPERATURE:g}, where sampling is greedy in all but "
                             "name and float32 overflows: use 0 for greedy")
        if t > MAX_TEMPERATURE:
            raise InputError(f"temperature must be <= {MAX_TEMPERATURE:g}, got {t}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= INT32_MAX:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InputError(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= 20):
                raise InputError(f"{name} must be between 0 and 20, got {value!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise InputError("stop must be a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InputError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters")
        if any(not s for s in self.stop):
            raise InputError("stop strings must not be empty")
        if not all(s.isascii() or _is_unicode(s) for s in self.stop):
            raise InputError("stop strings must be valid Unicode (no lone surrogates)")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(i) for i in self.stop_token_ids):
            raise InputError("stop_token_ids must be a list of integers")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise InputError("include_stop_str_in_output must be true or false, got "
                             f"{self.include_stop_str_in_output!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_logits(self) -> bool:
        """Whether choosing and reporting a token takes more than the batch's greedy tokens."""
        return not self.greedy or self.logprobs is not None

    def stops_on(self, token: int, eos_token_id: Optional[int]) -> bool:
        """Whether generating `token` ends the request: one of stop_token_ids, or the end-of-sequence token."""
        return token in self.stop_token_ids or (token == eos_token_id and not self.ignore_eos)

    def text_token_ids(self, completion: list[int], finish_reason: Optional[str], eos_token_id: Optional[int]) \
            -> list[int]:
        """The completion tokens whose text the request reports: all of them but the token that stopped it, as vLLM
        reports them (unless include_stop_str_in_output). A special token such as EOS has no text anyway."""
        if finish_reason == "stop" and completion and not self.include_stop_str_in_output and \
                self.stops_on(completion[-1], eos_token_id):
            return completion[:-1]
        return completion

    def stop_reason(self, token: int, eos_token_id: Optional[int]) -> Optional[int]:
        """What a request that `token` ended (`stops_on`) reports as its stop_reason, as vLLM does: the token when it
        is one of stop_token_ids; None for the end-of-sequence token, which vLLM checks first."""
        return None if token == eos_token_id and not self.ignore_eos else token

    def stop_string_match(self, text: str) -> Optional[tuple[int, str]]:
        """The first stop string in `text` (the earliest to begin) and where the text ends for it: where that string
        begins, or with include_stop_str_in_output where it ends, as (end, stop string); None when it holds none."""
        hits = [(i, i + len(s), s) for s in self.stop for i in [text.find(s)] if i >= 0]
        if not hits:
            return None
        start, end, stop = min(hits)
        return (end if self.include_stop_str_in_output else start), stop

    @property
    def stop_hold(self) -> int:
        """Characters at the end of unfinished text that may yet begin a stop string: a stream holds them back."""
        return max((len(s) for s in self.stop), default=1) - 1
