"""The fused-MoE Triton kernel (in Triton's interpreter here) against each (row, expert) computed on its own, and its
block layout against what it promises; and an engine whose routed experts run through it."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: its kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

triton_moe = pytest.importorskip("moeserve.kernels.triton_moe")

from moeserve.cluster import LLM, SamplingParams  # noqa: E402
from moeserve.cluster.llm import DEMO_MODEL_FP8  # noqa: E402
from moeserve.kernels.errors import InputError  # noqa: E402
from moeserve.kernels.experts import MLP, moe_kernel, pack_fp8_experts, run_assignments  # noqa: E402
from moeserve.kernels.fp8 import FP8Linear, weight_quant  # noqa: E402
from tests.tiny import random_experts, rel_err  # noqa: E402


@pytest.mark.parametrize("seed,n_experts,block_m", [(0, 8, 16), (1, 32, 4), (2, 5, 64)])
def test_blocks_hold_each_assignment_once_and_one_expert_each(seed, n_experts, block_m):
    g = torch.Generator().manual_seed(seed)
    expert_ids = torch.randint(0, n_experts // 2 + 1, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g)
    A = len(expert_ids)
    slots, block_expert = triton_moe.align_to_blocks(expert_ids, n_experts, block_m)
    assert len(slots) == len(block_expert) * block_m
    assert sorted(s for s in slots.tolist() if s < A) == list(range(A)) and slots.max() <= A
    used = 0
    for b, e in enumerate(block_expert.tolist()):
        ids = [s for s in slots[b * block_m:(b + 1) * block_m].tolist() if s < A]
        if e == n_experts:  # past the last used block: nothing in it, nothing used after it
            assert not ids
            continue
        used = b + 1
        assert ids and all(expert_ids[i] == e for i in ids)
        assert ids == sorted(ids)  # an expert's assignments keep their order
    assert (block_expert[used:] == n_experts).all() and (block_expert[:used] < n_experts).all()
    # each expert's blocks are consecutive, its padding at the end of its last block
    expected = [e for e in range(n_experts) for _ in range(-(-int((expert_ids == e).sum()) // block_m))]
    assert block_expert[:used].tolist() == expected


@pytest.mark.parametrize("tokens,hot", [(1, False), (7, False), (50, True)])
def test_fused_moe_equals_each_row_and_expert_on_its_own(tokens, hot):
    """Ragged sizes (dim 40, inter 24: neither a multiple of the 64-wide tiles); with `hot`, most assignments on two
    experts (runs over several blocks of 64), most experts empty, repeated rows, and rows with no expert at all."""
    g = torch.Generator().manual_seed(tokens)
    experts = random_experts(32, 40, 24, g)
    x = torch.randn(tokens, 40, generator=g)
    if hot:
        expert_ids = torch.cat([torch.tensor([3, 17])[torch.randint(0, 2, (150,), generator=g)],
                                torch.randint(20, 24, (10,), generator=g)])
        rows = torch.randint(0, tokens - 5, (160,), generator=g)
    else:
        expert_ids = torch.rand(tokens, 32, generator=g).topk(4, dim=-1).indices.flatten()
        rows = torch.arange(tokens).repeat_interleave(4)
    weights = torch.rand(len(rows), generator=g)
    with torch.inference_mode():
        y = triton_moe.fused_moe(experts._pack(), x, rows, expert_ids, weights)
        expected = torch.zeros_like(x)
        for r, e, w in zip(rows.tolist(), expert_ids.tolist(), weights.tolist()):
            expected[r] += w * experts[e](x[r:r + 1])[0]
        assert rel_err(y, expected) < 1e-6
        if hot:
            assert not y[tokens - 5:].any()
        empty = torch.zeros(0, dtype=torch.long)
        assert not triton_moe.fused_moe(experts._pack(), x, empty, empty, torch.zeros(0)).any()


def fp8_experts(n, dim, inter, g):
    """n MLPs of FP8Linear layers, as an FP8 checkpoint loads them."""
    experts = []
    for _ in range(n):
        mlp = MLP(dim, inter)
        for name in ("w1", "w2", "w3"):
            plain = getattr(mlp, name)
            layer = FP8Linear(plain.in_features, plain.out_features)
            layer.weight.data, layer.weight_scale_inv.data = weight_quant(torch.randn(plain.weight.shape, generator=g)
                                                                          * 0.1)
            setattr(mlp, name, layer)
        experts.append(mlp)
    return experts


@pytest.mark.parametrize("tokens,dim,inter", [(1, 192, 80), (9, 200, 136), (60, 256, 128)])
def test_fused_fp8_experts_equal_each_expert_through_its_fp8_layers(tokens, dim, inter):
    """FP8 experts stacked (e4m3 weights, 128x128 block scales, ragged edges where dim or inter is not a multiple of
    128) against each expert's FP8Linear layers one expert at a time, which quantise their inputs in 1x128 tiles."""
    g = torch.Generator().manual_seed(tokens)
    experts = fp8_experts(12, dim, inter, g)
    x = torch.randn(tokens, dim, generator=g)
    expert_ids = torch.rand(tokens, 12, generator=g).topk(3, dim=-1).indices.flatten()
    rows = torch.arange(tokens).repeat_interleave(3)
    weights = torch.rand(len(rows), generator=g)
    with torch.inference_mode():
        expected = run_assignments(experts, x, rows, expert_ids, weights)
        stacked = pack_fp8_experts(experts)
        assert stacked.w1.dtype == torch.float8_e4m3fn and stacked.s2.shape == (12, -(-dim // 128), -(-inter // 128))
        assert rel_err(triton_moe.fused_moe(stacked, x, rows, expert_ids, weights), expected) < 1e-5
        assert rel_err(run_assignments(experts, x, rows, expert_ids, weights), expected) == 0  # views, same values


def test_an_fp8_engine_routing_through_the_kernel_keeps_its_tokens():
    """The FP8 demo checkpoint resident in e4m3: its experts stacked through the kernel against one at a time."""
    prompts = ["def fibonacci(", "class Stack:"]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    kwargs = dict(device="cpu", dtype="float32", fp8_resident=True)
    expected = [o.token_ids for o in LLM(DEMO_MODEL_FP8, **kwargs).generate(prompts, params)]
    fused = LLM(DEMO_MODEL_FP8, moe_kernel="triton", **kwargs)
    assert [o.token_ids for o in fused.generate(prompts, params)] == expected
    assert all(m.experts._packed is not None for _, m in fused.engine.runner.moe_layers)  # it ran stacked


def test_an_engine_routing_through_the_kernel_keeps_its_tokens(monkeypatch):
    """Prompts long enough that the CPU routes their prefill's rows (below ~50 tokens every expert runs on every
    token instead); the kernel is seen to run."""
    calls = []
    fused = triton_moe.fused_moe

    def counted(*args):
        calls.append(len(args[2]))
        return fused(*args)
    monkeypatch.setattr(triton_moe, "fused_moe", counted)
    prompts = ["import os\nimport sys\nimport json\n\n\ndef load(path):\n    with open(path) as f:\n        return "
               "json.load(f)\n\n\ndef main(argv):\n    config = load(argv[1])\n    for key, value in config.items():"
               "\n        print(key, value)\n"]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(device="cpu").generate(prompts, params)]
    assert [o.token_ids for o in LLM(device="cpu", moe_kernel="triton").generate(prompts, params)] == expected
    assert calls and max(calls) >= 200


def test_an_unknown_moe_kernel_is_refused_and_triton_off_a_gpu(monkeypatch):
    with pytest.raises(InputError, match="moe_kernel must be one of"):
        moe_kernel("cutlass", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InputError, match="runs on GPUs, not on cpu"):
        moe_kernel("triton", torch.device("cpu"))
    assert moe_kernel("triton", torch.device("cuda")) is triton_moe.fused_moe
