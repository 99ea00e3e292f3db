"""The four ways of running routed experts (one expert at a time, grouped products over rows sorted by expert,
every expert on every token, each token's chosen experts' weights taken out of the stacks) give the same sums."""
import pytest
import torch

from moeserve.kernels.experts import (dense_is_cheaper, gathered_is_cheaper, run_assignments_dense,
                                      run_assignments_gathered, run_assignments_grouped, run_experts, run_experts_dense,
                                      run_experts_gathered, run_experts_grouped)
from tests.tiny import random_experts, rel_err


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_every_way_of_running_experts_equals_one_expert_at_a_time(tokens):
    g = torch.Generator().manual_seed(tokens)
    experts = random_experts(16, 24, 8, g)
    x = torch.randn(tokens, 24, generator=g)
    indices = torch.rand(tokens, 16, generator=g).topk(4, dim=-1).indices
    weights = torch.rand(tokens, 4, generator=g)
    with torch.inference_mode():
        expected = run_experts(experts, x, indices, weights)  # each expert module on its own rows
        packed = experts._pack()
        assert rel_err(run_experts_grouped(packed, x, indices, weights), expected) < 1e-6
        assert rel_err(run_experts_dense(packed, x, indices, weights), expected) < 1e-6
        assert rel_err(run_experts_gathered(packed, x, indices, weights), expected) < 1e-6
        rows = torch.arange(tokens).repeat_interleave(4)
        assert rel_err(run_assignments_dense(packed, x, rows, indices.flatten(), weights.flatten()), expected) < 1e-6
        assert rel_err(run_assignments_gathered(packed, x, rows, indices.flatten(), weights.flatten()), expected) < 1e-6
        assert rel_err(experts.dispatch(x, indices, weights), expected) < 1e-6


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_experts_on_skewed_routing_with_empty_experts_equal_one_expert_at_a_time(seed, native, monkeypatch):
    """Most rows on two experts, most experts with none (their segments are empty), rows repeated across experts,
    some rows with no expert at all; and no assignment at all. Also where the device lacks `torch._grouped_mm` for
    the dtype (fp32 on CUDA): one product per expert."""
    if not native:
        def unsupported(*args, **kwargs):
            raise RuntimeError("grouped gemm is not supported for this dtype here")
        monkeypatch.setattr(torch, "_grouped_mm", unsupported)
    g = torch.Generator().manual_seed(seed)
    experts = random_experts(32, 40, 24, g)
    x = torch.randn(50, 40, generator=g)
    hot = torch.tensor([3, 17])
    expert_ids = torch.cat([hot[torch.randint(0, 2, (150,), generator=g)], torch.randint(20, 24, (10,), generator=g)])
    rows = torch.randint(0, 45, (160,), generator=g)  # rows 45.. get no expert
    weights = torch.rand(160, generator=g)
    with torch.inference_mode():
        packed = experts._pack()
        assert len(set(expert_ids.tolist())) <= 6  # 26 or more of the 32 segments are empty
        y = run_assignments_grouped(packed, x, rows, expert_ids, weights)
        expected = torch.zeros_like(x)
        for r, e, w in zip(rows.tolist(), expert_ids.tolist(), weights.tolist()):  # one (row, expert) at a time
            expected[r] += w * experts[e](x[r:r + 1])[0]
        assert rel_err(y, expected) < 1e-6 and not y[45:].any()
        empty = torch.zeros(0, dtype=torch.long)
        assert not run_assignments_grouped(packed, x, empty, empty, torch.zeros(0)).any()


@pytest.mark.parametrize("threads, dense_at, grouped_at", [(1, [8], [16, 32, 64]), (2, [8, 16, 32], [64])])
def test_dense_or_grouped_follows_what_was_measured_for_the_thread_count(threads, dense_at, grouped_at, monkeypatch):
    """16 experts of 192 x 80, four per token, on this CPU (medians of 300 calls each way): on one thread, every expert
    on every token 295 against 334 us grouped at 8 tokens, 467 against 406 at 16, 805 against 489 at 32, 1,485
    against 718 at 64; on two threads 256 / 541 at 8, 388 / 630 at 16, 597 / 735 at 32, 974 / 980 at 64 (and 575
    against 446 at 32, 64 grouped in an earlier measurement)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    packed = random_experts(16, 192, 80, torch.Generator().manual_seed(0))._pack()
    assert all(dense_is_cheaper(packed, rows, 4 * rows) for rows in dense_at)
    assert not any(dense_is_cheaper(packed, rows, 4 * rows) for rows in grouped_at)


@pytest.mark.parametrize("experts, dim, inter, grouped_at", [(64, 1024, 512, [1, 2, 4, 8, 16, 32]),
                                                         (32, 512, 256, [2, 4])])
def test_stacks_read_from_memory_run_grouped_on_two_threads_as_measured(experts, dim, inter, grouped_at, monkeypatch):
    """Stacks larger than the cache, eight experts per token, on this CPU on two threads (medians of 40-200 calls): 64
    experts of 1024 x 512, every expert on every token against grouped 13.9 / 2.7 ms at one token, 18.1 / 5.7 at two,
    23.1 / 11.7 at four, 26.7 / 17.6 at 8, 32.4 / 30.8 at 16, 48.2 / 39.8 at 32; 32 experts of 512 x 256 2.4 / 1.4 ms at
    two tokens, 3.2 / 2.2 at four (at one, the chosen experts' weights taken out of the stacks, 0.6 ms)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    w13, w2 = torch.empty(1, dim, 2 * inter), torch.empty(1, inter, dim)  # a real size on the CPU, no memory
    packed = (w13.expand(experts, -1, -1), w2.expand(experts, -1, -1))
    assert not any(dense_is_cheaper(packed, rows, 8 * rows) for rows in grouped_at)


def test_gathered_experts_where_measured_the_faster():
    """16 experts of 192 x 80, four per token, on this CPU (2,000 calls each way): the chosen experts' weights taken
    out of the stacks against every expert on every token, on one thread 87 / 136 us at one token, 156 / 212 at two,
    238 / 269 at three, 241 / 217 at four; on two threads 68 / 88, 108 / 124, 135 / 155, 168 / 137. The same on
    both thread counts."""
    packed = random_experts(16, 192, 80, torch.Generator().manual_seed(0))._pack()
    assert all(gathered_is_cheaper(packed, 4 * tokens) for tokens in (1, 2, 3))
    assert not gathered_is_cheaper(packed, 4 * 4)
    v2_lite = (torch.empty(64, 2048, 2 * 1408, device="meta"), torch.empty(64, 1408, 2048, device="meta"))
    assert not gathered_is_cheaper(v2_lite, 6)  # one token's six experts: 52M weights copied, read in place instead
