"""One set of request defaults for every protocol: a field that an HTTP (OpenAI) or gRPC client leaves out means
the same on both. Temperature and top_p are OpenAI's defaults (sampling); max_tokens is what the context leaves
after the prompt, at most MAX_TOKENS."""
from typing import Optional

from ..sampling_params import SamplingParams

TEMPERATURE = 1.0
TOP_P = 1.0
MAX_TOKENS = 256


def max_tokens(prompt_tokens: int, max_seq_len: int) -> int:
    return max(1, min(MAX_TOKENS, max_seq_len - prompt_tokens))


def sampling_params(*, max_tokens: Optional[int], default_max_tokens: int, temperature: Optional[float],
                    top_p: Optional[float], **rest) -> SamplingParams:
    """SamplingParams from a request's fields, None where the client gave none."""
    return SamplingParams(max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                          temperature=TEMPERATURE if temperature is None else temperature,
                          top_p=TOP_P if top_p is None else top_p, **rest)
