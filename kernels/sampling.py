"""Choosing the next token from logits: greedy, temperature, top-k, top-p, each row with its own generator.
A sampled token is drawn by the exponential race (`draw`): a deterministic function of the distribution and
noise from the row's generator, which is what lets the engine couple an MTP draft to its verification and resume a
seeded request exactly (see Sequence.draw_generator)."""
from typing import Iterable, Optional, Sequence

import torch


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32 -> logits / temperature with everything outside the row's top-k and top-p nucleus
    set to -inf. temperature [B] > 0; top_k [B] (0 = all); top_p [B] in (0, 1]."""
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the nucleus keeps a token while the mass before it < top_p
    drop |= mass_before >= top_p[:, None]
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension, the first index on ties, as torch.argmax. On the CPU through NumPy:
    torch's argmax over a [32, 4096] batch took 150-300 us there against NumPy's 10 (torch 2.13)."""
    if logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    return torch.as_tensor(logits.detach().float().numpy().argmax(axis=-1), device="cpu")


def greedy_tokens(logits: torch.Tensor) -> list:
    """`greedy` read back to the host as (nested) lists of ints: the one device-to-host copy of a greedy step."""
    if logits.device.type != "cpu":
        return logits.argmax(dim=-1).tolist()
    return logits.detach().float().numpy().argmax(axis=-1).tolist()


def sampling_probs_rows(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
                        top_p: Sequence[float]) -> torch.Tensor:
    """The distributions rows draw from, [B, V] logits -> [B, V] probabilities, on the logits' device."""
    device = logits.device
    return filter_logits(logits.float(), torch.tensor(temperature, dtype=torch.float32, device=device),
                         torch.tensor(top_k, dtype=torch.long, device=device),
                         torch.tensor(top_p, dtype=torch.float32, device=device)).softmax(dim=-1)


def sample(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int] = None,
           top_p: Sequence[float] = None, generators: Sequence[Optional[torch.Generator]] = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] on the logits' device, nothing read back to the host. Rows with
    temperature 0 take the argmax; each sampled row draws with its own generator (None: torch's default), and one
    with no distribution to draw from comes out -1 (see `draw`)."""
    B = logits.shape[0]
    tokens = logits.argmax(dim=-1)
    sampled = [b for b in range(B) if temperature[b] > 0]
    if not sampled:
        return tokens
    top_k = [top_k[b] if top_k is not None else 0 for b in sampled]
    top_p = [top_p[b] if top_p is not None else 1.0 for b in sampled]
    probs = sampling_probs_rows(logits[sampled], [temperature[b] for b in sampled], top_k, top_p)
    tokens[sampled] = draw(probs, [generators[b] if generators is not None else None for b in sampled])
    return tokens


def draw(probs: torch.Tensor, generators: Iterable[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row of probs [D, V], row d with noise from the d-th generator (None: torch's default; taken
    in order, each when its row's noise is made, so one generator reseeded for each row may serve them all): the
    exponential race, argmax_i probs_i / E_i with E_i ~ Exp(1) independent (the Gumbel-max trick: token i wins
    with probability probs_i). Two distributions raced with the same noise pick the same token more often the closer
    they are: an MTP draft and the target at its position race with one noise, so the target's token, the one that
    is kept, is exactly what the plain decoder would have drawn, and the draft stands whenever it equals it.
    A row with no distribution to draw from (a NaN, or no mass) comes out -1, read with the other tokens."""
    noise = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
    for row, g in zip(noise, generators):
        row.uniform_(generator=g)
    tokens = (probs / noise.log_().neg_()).argmax(dim=-1)  # E = -log U: uniform draws cost a third of exponential_'s
    valid = probs.isfinite().all(dim=-1) & (probs.sum(dim=-1) > 0)
    return torch.where(valid, tokens, -1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a sampled row draws from: [V] logits -> [V] probabilities after temperature,
    top-k and top-p."""
    return sampling_probs_rows(logits[None], [temperature], [top_k], [top_p])[0]
