"""The plain generation loop: prefill each prompt into a contiguous latent cache, then decode the batch one
token per step until each row stops. The continuous-batching engine must match it token for token."""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .cache import LatentCache
from .errors import InputError
from .model import Transformer
from .sampling import sample


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(chosen token) under the model, temperature 1
    finish_reason: Optional[str] = None  # "stop" (a stop token) or "length" (max_tokens)


def check_prompt(prompt: Sequence[int], vocab_size: int, max_len: int, max_tokens: int) -> None:
    """A prompt the model can take: not empty, ids in the vocabulary, room in the context for max_tokens."""
    if len(prompt) == 0:
        raise InputError("the prompt is empty; give at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(prompt) + max_tokens > max_len:
        raise InputError(f"{len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
                         f"{max_len} tokens; shorten the prompt or lower max_tokens")


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
             stop_token_ids: Sequence[int] = ()) -> list[Generation]:
    args = model.args
    if max_tokens <= 0:
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
    for i, prompt in enumerate(prompts):
        try:
            check_prompt(prompt, args.vocab_size, args.max_seq_len, max_tokens)
        except InputError as e:
            raise InputError(f"prompt {i}: {e}") from None
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    B = len(prompts)
    dtype = model.embed.weight.dtype
    cache = LatentCache(args, B, max(len(p) for p in prompts) + max_tokens, dtype)
    generators = [None if seed is None else torch.Generator().manual_seed(seed + b) for b in range(B)]
    outs = [Generation(list(p)) for p in prompts]
    last = torch.cat([model.logits(model(torch.tensor([p]), cache=cache.view(torch.tensor([b])))[:, -1])
                      for b, p in enumerate(prompts)])  # [B, V]
    rows = list(range(B))
    for _ in range(max_tokens):
        tokens = sample(last, [temperature] * len(rows), [top_k] * len(rows), [top_p] * len(rows),
                        [generators[b] for b in rows])
        logprobs = last.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
        for b, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            outs[b].token_ids.append(token)
            outs[b].logprobs.append(logprob)
            if token in stop_token_ids:
                outs[b].finish_reason = "stop"
            elif len(outs[b].token_ids) == max_tokens:
                outs[b].finish_reason = "length"
        keep = [i for i, b in enumerate(rows) if outs[b].finish_reason is None]
        if not keep:
            break
        rows = [rows[i] for i in keep]
        tokens = tokens[keep]
        positions = torch.tensor([len(outs[b].prompt_token_ids) + len(outs[b].token_ids) - 1 for b in rows])
        h = model(tokens[:, None], positions[:, None], cache=cache.view(torch.tensor(rows)))
        last = model.logits(h[:, -1])
    return outs
