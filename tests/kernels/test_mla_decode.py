"""Paged MLA decode (the torch recurrence and the Triton kernel, the latter in Triton's interpreter here) against
attention over each row's history gathered out of the pages; and an engine decoding through each."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: its kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from moeserve.cluster import LLM, SamplingParams  # noqa: E402
from moeserve.kernels.mla_decode import paged_mla_decode  # noqa: E402


def gathered_attention(q, pages, tables, limits, scale, C):
    """Row by row: the row's positions copied out of its blocks, softmax over those up to each query's limit."""
    block = pages.shape[1]
    out = []
    for b in range(q.shape[0]):
        length = int(limits[b].max()) + 1
        slots = torch.cat([int(t) * block + torch.arange(block) for t in tables[b] if t >= 0])[:length]
        history = pages.flatten(0, 1)[slots].float()  # [L, D]
        scores = q[b].float() @ history.t() * scale
        scores = scores.masked_fill(torch.arange(length)[None] > limits[b][:, None], float("-inf"))
        out.append(scores.softmax(-1) @ history[:, :C])
    return torch.stack(out)


def ragged_batch(block, lengths, S=1, H=4, C=64, rope=16, seed=0):
    """Pages in shuffled order, rows of the given lengths (their last S positions the queries)."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // block) for n in lengths) + 2
    pages = torch.randn(n_blocks + 1, block, C + rope, generator=g)
    order = torch.randperm(n_blocks, generator=g).tolist()
    width = max(-(-n // block) for n in lengths) + 1  # a column of -1 past every row's blocks
    tables = torch.full((len(lengths), width), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        for j in range(-(-n // block)):
            tables[b, j] = order.pop()
    positions = torch.tensor([[n - S + s for s in range(S)] for n in lengths])
    q = torch.randn(len(lengths), S * H, C + rope, generator=g)
    return q, pages, tables, positions.repeat_interleave(H, dim=1), C


@pytest.mark.parametrize("block,lengths,S,H,C", [(16, [1, 37, 70, 16], 1, 4, 64), (64, [5, 200, 129], 2, 4, 64),
                                                 (16, [33], 2, 4, 64), (16, [20, 45], 2, 12, 256)])
def test_paged_decode_equals_attention_over_the_gathered_history(block, lengths, S, H, C):
    """...the last case with a wide latent, whose 24 query rows the kernel takes in two tiles of 16."""
    q, pages, tables, limits, C = ragged_batch(block, lengths, S, H, C)
    expected = gathered_attention(q, pages, tables, limits, 0.1, C)
    assert (paged_mla_decode(q, pages, tables, limits, 0.1, C) - expected).abs().max() < 1e-5
    triton_mla = pytest.importorskip("moeserve.kernels.triton_mla")
    assert (triton_mla.paged_mla_decode(q, pages, tables, limits, 0.1, C) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("mla_decode", ["paged", "triton"])
def test_an_engine_decoding_through_the_pages_keeps_its_tokens(mla_decode):
    if mla_decode == "triton":
        pytest.importorskip("triton")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["def fibonacci(", "import os\nimport sys\n\n\ndef main(argv):", "class Stack:"]
    expected = LLM(device="cpu", block_size=16, kv_cache_tokens=1024).generate(prompts, params)
    paged = LLM(device="cpu", block_size=16, kv_cache_tokens=1024, mla_decode=mla_decode).generate(prompts, params)
    assert [o.token_ids for o in paged] == [o.token_ids for o in expected]


def test_the_triton_kernel_refuses_a_block_it_cannot_tile():
    from moeserve.kernels.errors import InputError
    pytest.importorskip("triton")
    with pytest.raises(InputError, match="power-of-two block_size"):
        LLM(device="cpu", block_size=8, mla_decode="triton")


def test_the_triton_decode_is_refused_off_a_gpu(monkeypatch):
    from moeserve.kernels.errors import InputError
    from moeserve.kernels.mla_decode import decode_kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InputError, match="runs on GPUs, not on cpu"):
        decode_kernel("triton", torch.device("cpu"), 16)
    assert decode_kernel("auto", torch.device("cpu"), 16) is None  # the gather path
