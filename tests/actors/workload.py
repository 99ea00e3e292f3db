"""The requests of the tests that change the cluster under load: prompts of mixed lengths that prefill and decode
together, each asking for another number of tokens; where `sampled`, every other one samples with its own seed (so a
request sent again must draw the same tokens)."""
import torch

from moeserve.cluster import SamplingParams


def mixed_requests(seed: int, sampled: bool = True) -> tuple[list[list[int]], list[SamplingParams]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (5, 31, 12, 20, 7, 26)]
    params = [SamplingParams(max_tokens=n, temperature=0.8 * (i % 2) if sampled else 0.0, top_p=0.9, seed=i,
                             ignore_eos=True)
              for i, n in enumerate((80, 50, 120, 70, 100, 60))]
    return prompts, params
