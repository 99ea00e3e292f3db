"""Decode steps as CUDA graphs need a static step: the batch padded to its bucket, the block tables to their full
width, every input copied into the bucket's buffers, nothing read back to the host, the padding's routing left out
of the expert loads. On the CPU (no graphs) the same static step runs eagerly; here it is checked against the
engine's own decode steps."""
import contextlib
import functools

import pytest
import torch

from moeserve.cluster import LLM, EngineConfig, SamplingParams
from moeserve.cluster.engine import check_cuda_graphs
from moeserve.cluster.llm import DEMO_MODEL, DEMO_MODEL_FP8
from moeserve.cluster.model_runner import DecodeGraphs
from moeserve.kernels.errors import InputError
from moeserve.kernels.experts import resolve_moe_kernel
from moeserve.kernels.load import load_model
from tests.cluster.test_device import HostReads

PROMPTS = ["def fibonacci(", "import os\nimport sys\n", "class Stack:", "for i in range(", "# sort the list",
           "x = [i for i in", "while True:"]


def engine(static: bool) -> LLM:
    llm = LLM(device="cpu", mla_decode="paged", kv_cache_tokens=1024, max_num_seqs=8)
    if static:
        llm.engine.runner.graphs = DecodeGraphs(llm.engine.runner, max_batch=8, capture=False)
    return llm


def test_static_decode_steps_keep_the_tokens_and_the_expert_loads():
    """Seven requests ending at different lengths: the decode batch shrinks 7 -> 1 through buckets 8, 4, 2 and 1,
    its padding rows in every bucket but the exact ones."""
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    plain, static = engine(False), engine(True)
    expected = plain.generate(PROMPTS, params)
    seen = []
    forward = static.engine.runner.graphs.forward

    def counted(block_tables, starts, tokens):
        seen.append(len(tokens))
        return forward(block_tables, starts, tokens)
    static.engine.runner.graphs.forward = counted
    assert [o.token_ids for o in static.generate(PROMPTS, params)] == [o.token_ids for o in expected]
    assert {static.engine.runner.graphs.bucket(b) for b in seen} == {8, 4, 2, 1} and 7 in seen
    loads, plain_loads = static.engine.runner.expert_load, plain.engine.runner.expert_load
    assert all(torch.equal(loads[name], plain_loads[name]) for name in loads)  # no padding row counted
    tables = static.engine.runner.graphs.static[8].tables
    assert tables.shape == (8, 1024 // 16)  # the full width: as many blocks as the cache can give a sequence


def test_a_static_decode_step_reads_nothing_back():
    llm = engine(True)
    eng = llm.engine
    for prompt in PROMPTS[:5]:
        eng.add_request(llm.encode(prompt), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    eng.step()  # the prompts
    runner = eng.runner
    seqs = list(eng.scheduler.running)
    with HostReads() as reads, torch.inference_mode():
        runner.graphs.forward([s.block_table for s in seqs], [len(s) - 1 for s in seqs],
                              [s.token_ids[-1] for s in seqs])
    assert reads.count == 0


def test_cuda_graphs_are_refused_where_they_cannot_run():
    with pytest.raises(InputError, match="needs a GPU"):
        LLM(device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="paged MLA decode"):
        DecodeGraphs(LLM(device="cpu").engine.runner, 8, capture=False)  # the CPU's default: the gather path
    # what a GPU would refuse, asked of the rules directly (a device named cuda needs no GPU to be named)
    cuda, triton = torch.device("cuda"), object()  # any paged decode kernel
    float32 = load_model(DEMO_MODEL, torch.float32)
    with pytest.raises(InputError, match="Triton paged MLA decode"):
        check_cuda_graphs(EngineConfig(mla_decode="gather"), cuda, None, float32)
    with pytest.raises(InputError, match="Triton paged MLA decode"):
        check_cuda_graphs(EngineConfig(mla_decode="paged"), cuda, triton, float32)
    with pytest.raises(InputError, match="float32 weights needs moe_kernel 'triton'"):
        check_cuda_graphs(EngineConfig(), cuda, triton, float32)
    check_cuda_graphs(EngineConfig(moe_kernel="triton"), cuda, triton, float32)
    fp8 = load_model(DEMO_MODEL_FP8, torch.bfloat16, fp8_resident=True)
    with pytest.raises(InputError, match="FP8 experts needs moe_kernel 'triton'"):
        check_cuda_graphs(EngineConfig(moe_kernel="grouped"), cuda, triton, fp8)
    check_cuda_graphs(EngineConfig(moe_kernel="triton"), cuda, triton, fp8)
    check_cuda_graphs(EngineConfig(), cuda, triton, fp8)  # auto: FP8 experts on a GPU take the Triton kernel
    check_cuda_graphs(EngineConfig(), cuda, triton, load_model(DEMO_MODEL, torch.bfloat16))
    remote = load_model(DEMO_MODEL, torch.bfloat16, make_experts=lambda layer: object())
    with pytest.raises(InputError, match="experts in this process"):
        check_cuda_graphs(EngineConfig(), cuda, triton, remote)


def test_by_default_graphs_and_the_fused_moe_kernel_go_where_they_can_run():
    """cuda_graphs None and moe_kernel auto: no graphs on a CPU, and the Triton kernel only for FP8 experts on a
    GPU (one at a time they read their row counts back; for BF16 experts torch's grouped product was the faster at
    V2-Lite's shapes on an H200)."""
    assert LLM(device="cpu").engine.runner.graphs is None
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_moe_kernel("auto", cuda, fp8_experts=True) == "triton"
    assert resolve_moe_kernel("auto", cuda, fp8_experts=False) == "grouped"
    assert resolve_moe_kernel("auto", cpu, fp8_experts=True) == "grouped"
    assert resolve_moe_kernel("grouped", cuda, fp8_experts=True) == "grouped"
    with pytest.raises(InputError, match="moe_kernel must be one of"):
        resolve_moe_kernel("fused", cpu, fp8_experts=False)


def test_each_bucket_is_captured_once_then_replayed(monkeypatch):
    """The capture-and-replay flow, with CUDA's stream and graph API stood in by one whose capture records the step
    and whose replay reruns it: a bucket's first step captures (after warm-ups) and replays, later ones replay."""
    events = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            events.append("replay")
            self.step()

    @contextlib.contextmanager
    def capturing(graph, pool=None):
        events.append("capture")
        graph.step = functools.partial(DecodeGraphs._step, graphs, graphs.capturing)
        yield

    capture = DecodeGraphs._capture

    def remember(self, static):
        self.capturing = static
        capture(self, static)
    for name, fake in {"Stream": Stream, "current_stream": Stream, "stream": lambda s: contextlib.nullcontext(),
                       "CUDAGraph": Graph, "graph": capturing, "graph_pool_handle": lambda: "pool"}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(DecodeGraphs, "_capture", remember)
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0, ignore_eos=True) for i in range(4)]
    expected = [o.token_ids for o in engine(False).generate(PROMPTS[:4], params)]
    llm = engine(False)
    graphs = llm.engine.runner.graphs = DecodeGraphs(llm.engine.runner, max_batch=8, capture=True)
    assert [o.token_ids for o in llm.generate(PROMPTS[:4], params)] == expected
    # decode batches of 4, 4, 3, 3, 2, 2, 1, 1 sequences: buckets 4, 2 and 1, each captured once; every step replays
    assert events.count("capture") == 3 and sorted(graphs.static) == [1, 2, 4]
    assert events.count("replay") == 8 and events[:2] == ["capture", "replay"]
