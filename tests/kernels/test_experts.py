"""The three ways of running routed experts (one expert at a time, packed batched products, every expert on every
token) give the same sums."""
import pytest
import torch

from moeserve.kernels.experts import (LocalExperts, run_assignments_dense, run_experts, run_experts_dense,
                                      run_experts_packed)
from tests.tiny import rel_err


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_packed_and_dense_experts_equal_one_expert_at_a_time(tokens):
    g = torch.Generator().manual_seed(tokens)
    experts = LocalExperts(16, 24, 8)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(tokens, 24, generator=g)
    indices = torch.rand(tokens, 16, generator=g).topk(4, dim=-1).indices
    weights = torch.rand(tokens, 4, generator=g)
    with torch.inference_mode():
        expected = run_experts(experts, x, indices, weights)  # each expert module on its own rows
        packed = experts._pack()
        assert rel_err(run_experts_packed(packed, x, indices, weights), expected) < 1e-6
        assert rel_err(run_experts_dense(packed, x, indices, weights), expected) < 1e-6
        rows = torch.arange(tokens).repeat_interleave(4)
        assert rel_err(run_assignments_dense(packed, x, rows, indices.flatten(), weights.flatten()), expected) < 1e-6
        assert rel_err(experts.dispatch(x, indices, weights), expected) < 1e-6
