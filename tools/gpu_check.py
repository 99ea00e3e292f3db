"""moeserve on one GPU, without Ray or a network: fidelity, kernels and decode speed, in one run of a few minutes.

    python tools/gpu_check.py [--json out.json] [--quick]

Sections (each reports on its own; one that fails prints why and the rest go on):
- demo: the demo model on cuda/bf16 against CPU/fp32, greedy: token agreement, and the largest difference of a
  chosen token's log-probability with both fed the CPU's tokens;
- demo_fp8: the FP8 demo checkpoint with its weights resident in e4m3 against dequantised at load: token
  agreement and weight bytes;
- fp8_gemm: FP8Linear layers (the block-scaled GEMM) at V2-Lite and V3 shapes: error against the
  dequantised fp32 product of the same quantised inputs, time against the BF16 product, which path ran;
- grouped_experts: `torch._grouped_mm` over rows sorted by expert, and the fused-MoE Triton kernel
  (`kernels/triton_moe.py`), against the zero-padded [E, C_max, dim] bmm the grouped products replaced, V2-Lite and
  V3 layer shapes, skewed routing: time and agreement;
- fp8_experts: FP8 experts at the same shapes, the fused-MoE Triton kernel over their stacked e4m3 weights against
  one expert at a time through FP8Linear layers (the default for FP8 experts): time and agreement;
- mla_decode: one absorbed-MLA decode layer at V3's shapes, B=64 and L up to 8k: the history gathered then SDPA,
  against the Triton kernel reading the pages in place;
- decode: the demo model's decode tokens/s at batch 1/32/64 (equal work: the same prompts, the same number of
  tokens, EOS ignored), eager (`cuda_graphs=False`) and with decode steps as CUDA graphs (the default on GPUs; their
  tokens against the eager ones, in BF16 and in float32), against transformers' generate on the same GPU, and the
  bandwidth floor (weights + KV bytes read per step / 4.8 TB/s);
- decode_v2lite: the same at DeepSeek-V2-Lite's shapes (15.7B parameters, random weights, BF16), where the
  bandwidth floor means something;
- profile_v2lite: where an eager decode step's device time goes at those shapes, kernel by kernel;
- nccl: the data plane's messages and the prefill/decode KV hand-off over NCCL (cupy), on a world-size-1
  communicator.
Times are medians of several runs after a warm-up, measured with CUDA events.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

try:
    import moeserve  # noqa: F401  (installed)
except ImportError:  # a bare checkout: the repository root is the package
    root = Path(tempfile.mkdtemp())
    (root / "moeserve").symlink_to(Path(__file__).resolve().parents[1])
    sys.path.insert(0, str(root))

from moeserve.cluster.engine import Engine, EngineConfig  # noqa: E402
from moeserve.cluster.llm import DEMO_MODEL, DEMO_MODEL_FP8, LLM  # noqa: E402
from moeserve.cluster.sampling_params import SamplingParams  # noqa: E402
from moeserve.kernels.args import ModelArgs  # noqa: E402
from moeserve.kernels.cache import PagedLatentCache  # noqa: E402
from moeserve.kernels.checkpoint import Checkpoint, local_to_hf  # noqa: E402
from moeserve.kernels.experts import run_assignments_grouped  # noqa: E402
from moeserve.kernels.fp8 import FP8Linear, act_dequant, act_quant, weight_quant  # noqa: E402
from moeserve.kernels.load import load_model  # noqa: E402
from moeserve.kernels.model import MLA, Transformer  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # H200
PROMPTS = ["def fibonacci(", "import os\n", "class Stack:", "for i in range("]


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() on the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def first_differences(outputs_a, outputs_b) -> list[int]:
    """For each request, the index of the first generated token where the two runs part (its length if none);
    outputs are RequestOutputs or token-id lists."""
    def ids(o):
        return o if isinstance(o, list) else o.token_ids
    return [next((i for i, (x, y) in enumerate(zip(ids(a), ids(b))) if x != y), len(ids(a)))
            for a, b in zip(outputs_a, outputs_b)]


def section_demo(quick: bool) -> dict:
    n = 32
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    cpu = LLM(device="cpu", dtype="float32")
    gpu = LLM(device="cuda")  # bf16 by default on a GPU
    cpu_out = cpu.generate(PROMPTS, params)
    gpu_out = gpu.generate(PROMPTS, params)
    agree = first_differences(cpu_out, gpu_out)
    worst = 0.0
    for prompt, out in zip(PROMPTS, cpu_out):
        ids = cpu.encode(prompt) + out.token_ids
        with torch.inference_mode():
            ref = cpu.model.logits(cpu.model(torch.tensor([ids]))).log_softmax(-1)[0]
            got = gpu.model.logits(gpu.model(torch.tensor([ids], device="cuda"))).log_softmax(-1)[0].cpu()
        chosen = torch.tensor(ids[1:])[:, None]
        worst = max(worst, (ref[:-1].gather(1, chosen) - got[:-1].gather(1, chosen)).abs().max().item())
    return {"tokens_equal_before_first_difference": agree, "tokens_per_prompt": n,
            "max_chosen_logprob_diff": worst, "gpu_text_0": gpu_out[0].text}


def section_demo_fp8(quick: bool) -> dict:
    """The FP8 demo checkpoint on the GPU, its weights resident in e4m3 against dequantised at load."""
    n = 32
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    resident = LLM(DEMO_MODEL_FP8, device="cuda")  # by default the Triton MoE kernel and CUDA graphs
    assert resident.engine.runner.graphs is not None
    dequantised = LLM(DEMO_MODEL_FP8, device="cuda", fp8_resident=False)
    a, b = resident.generate(PROMPTS, params), dequantised.generate(PROMPTS, params)
    agree = first_differences(a, b)
    eager = LLM(DEMO_MODEL_FP8, device="cuda", cuda_graphs=False).generate(PROMPTS, params)
    weight_bytes = {name: sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in llm.model.parameters()}.values())
                    for name, llm in (("resident", resident), ("dequantised", dequantised))}
    return {"tokens_equal_before_first_difference": agree, "weight_bytes": weight_bytes,
            "resident_graphs_part_from_eager_at": first_differences(a, eager)}


# (name, in_features K, out_features N)
GEMM_SHAPES = [("v2-lite expert w1", 2048, 1408), ("v2-lite expert w2", 1408, 2048),
               ("v3 q_b", 1536, 24576), ("v3 o_proj", 16384, 7168), ("v3 expert w1", 7168, 2048),
               ("v3 expert w2", 2048, 7168)]


def section_fp8_gemm(quick: bool) -> dict:
    """FP8Linear layers at V2-Lite and V3 shapes: error against the dequantised fp32 product of the same quantised
    inputs; a call's time (activation quantisation included) against the BF16 product; the quantisation alone."""
    from moeserve.kernels import fp8 as fp8_module
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, K, N in GEMM_SHAPES:
        for M in (16, 512):
            x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
            layer = FP8Linear(K, N).cuda()
            layer.weight.data, layer.weight_scale_inv.data = weight_quant(torch.randn(N, K, device="cuda",
                                                                                      generator=g) * 0.02)
            y = layer(x).float()
            blockwise = fp8_module.BLOCKWISE.get(str(x.device)) is not None
            ref = act_dequant(*act_quant(x)) @ layer.dequantized(torch.float32).t()
            dense = layer.dequantized(torch.bfloat16)
            rows.append({"layer": name, "M": M, "K": K, "N": N, "path": "blockwise _scaled_mm" if blockwise
                         else "row-wise _scaled_mm per K tile",
                         "rel_err": ((y - ref).abs().max() / ref.abs().max()).item(),
                         "fp8_us": timed(lambda: layer(x)) * 1e6,
                         "act_quant_us": timed(lambda: act_quant(x)) * 1e6,
                         "bf16_us": timed(lambda: torch.nn.functional.linear(x, dense)) * 1e6})
    chosen = {device: None if i is None else " via ".join(map(str, fp8_module.SPELLINGS[i][1:]))
              for device, i in fp8_module.BLOCKWISE.items()}
    return {"blockwise_spelling": chosen, "passed_over": fp8_module.BLOCKWISE_ERRORS, "layers": rows}


def padded_bmm(packed, x, rows, expert_ids, weights):
    """The zero-padded reference: every expert's rows in a [E, C_max, dim] block, one bmm per weight."""
    w13, w2 = packed
    E = w13.shape[0]
    counts = torch.bincount(expert_ids, minlength=E)
    C = int(counts.max())
    order = torch.sort(expert_ids, stable=True).indices
    slot = torch.arange(len(order), device=x.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    xs = x.new_zeros(E, C, x.shape[1])
    xs[expert_ids[order], slot] = x[rows[order]]
    a, b = torch.bmm(xs, w13).chunk(2, dim=-1)
    out = torch.bmm(torch.nn.functional.silu(a) * b, w2)[expert_ids[order], slot]
    y = torch.zeros_like(x)
    y.index_add_(0, rows[order], out * weights[order, None].to(x.dtype))
    return y


def section_grouped_experts(quick: bool) -> list:
    from moeserve.kernels.triton_moe import fused_moe
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, E, dim, inter, k in (("v2-lite", 64, 2048, 1408, 6), ("v3", 256, 7168, 2048, 8)):
        packed = tuple(torch.randn(E, a, b, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
                       for a, b in ((dim, 2 * inter), (inter, dim)))  # w1 and w3 side by side, w2
        for T in (1, 64, 512):
            x = torch.randn(T, dim, device="cuda", generator=g, dtype=torch.bfloat16)
            skew = torch.distributions.Dirichlet(torch.full((E,), 0.3, device="cuda")).sample()  # uneven experts
            ids = torch.stack([torch.multinomial(skew, k, generator=g) for _ in range(T)])
            weights = torch.rand(T, k, device="cuda", generator=g)
            args = (packed, x, torch.arange(T, device="cuda").repeat_interleave(k), ids.flatten(), weights.flatten())
            a, b, c = run_assignments_grouped(*args), padded_bmm(*args), fused_moe(*args)
            rows.append({"layer": name, "tokens": T, "experts": E,
                         "rel_diff": ((a.float() - b.float()).abs().max() / b.float().abs().max()).item(),
                         "fused_rel_diff": ((c.float() - b.float()).abs().max() / b.float().abs().max()).item(),
                         "grouped_us": timed(lambda: run_assignments_grouped(*args)) * 1e6,
                         "fused_triton_us": timed(lambda: fused_moe(*args)) * 1e6,
                         "padded_bmm_us": timed(lambda: padded_bmm(*args)) * 1e6})
        del packed
        torch.cuda.empty_cache()
    return rows


def section_fp8_experts(quick: bool) -> list:
    """FP8 experts (e4m3 weights, 128x128 block scales) at V2-Lite and V3 layer shapes: the fused-MoE Triton kernel
    over the stacks against one expert at a time through FP8Linear layers (the default), skewed routing."""
    from moeserve.kernels.experts import FP8Experts, MLP, run_assignments
    from moeserve.kernels.triton_moe import fused_moe
    rows = []
    g = torch.Generator(device="cuda").manual_seed(2)
    for name, E, dim, inter, k in (("v2-lite", 64, 2048, 1408, 6), ("v3", 256, 7168, 2048, 8)):
        stacks = {}
        for w, (n_out, n_in) in (("w1", (inter, dim)), ("w3", (inter, dim)), ("w2", (dim, inter))):
            stacks[w] = (torch.randn(E, n_out, n_in, device="cuda", generator=g, dtype=torch.bfloat16) * 64).clamp(
                -448, 448).to(torch.float8_e4m3fn)  # past e4m3's largest finite value the cast gives NaN
            stacks["s" + w[1]] = torch.rand(E, -(-n_out // 128), -(-n_in // 128), device="cuda", generator=g) * 1e-4
        stacked = FP8Experts(**stacks)
        experts = []
        for e in range(E):  # the same weights as FP8Linear layers, one expert at a time
            with torch.device("meta"):
                mlp = MLP(dim, inter)
            for w in ("w1", "w3", "w2"):
                layer = FP8Linear(stacks[w].shape[2], stacks[w].shape[1]).to("cuda")
                layer.weight.data, layer.weight_scale_inv.data = stacks[w][e], stacks["s" + w[1]][e]
                setattr(mlp, w, layer)
            experts.append(mlp)
        for T in ((1, 64) if quick else (1, 64, 512)):
            x = torch.randn(T, dim, device="cuda", generator=g, dtype=torch.bfloat16)
            skew = torch.distributions.Dirichlet(torch.full((E,), 0.3, device="cuda")).sample()
            ids = torch.stack([torch.multinomial(skew, k, generator=g) for _ in range(T)]).flatten()
            token_rows = torch.arange(T, device="cuda").repeat_interleave(k)
            weights = torch.rand(T * k, device="cuda", generator=g)
            with torch.inference_mode():
                a = fused_moe(stacked, x, token_rows, ids, weights).float()
                b = run_assignments(experts, x, token_rows, ids, weights).float()
                rows.append({"layer": name, "tokens": T, "experts": E,
                             "rel_diff": ((a - b).abs().max() / b.abs().max()).item(),
                             "fused_triton_us": timed(lambda: fused_moe(stacked, x, token_rows, ids, weights)) * 1e6,
                             "one_at_a_time_us": timed(lambda: run_assignments(experts, x, token_rows, ids, weights),
                                                       repeats=3, warmup=1) * 1e6})
        stacked = None  # this layer's weights freed before the next is made
        stacks.clear()
        experts.clear()
        torch.cuda.empty_cache()
    return rows


def section_mla_decode(quick: bool) -> list:
    """One absorbed-MLA decode layer at V3's shapes, B=64 rows of L cached positions: the history gathered into
    [B, L, 576] then SDPA, against the Triton kernel reading the pages in place (blocks of 64, shuffled)."""
    from moeserve.kernels import triton_mla
    from moeserve.kernels.rope import rope_freqs_cis, rope_inv_freq
    args = ModelArgs()  # DeepSeek-V3's shapes
    torch.manual_seed(0)
    with torch.device("cuda"):
        mla = MLA(args).to(torch.bfloat16)
        for p in mla.parameters():
            p.data.normal_(0, 0.02)
    rows, B, block = [], 64, 64
    for L in ((1024, 4096) if quick else (1024, 4096, 8192)):
        cache = PagedLatentCache(args, B * L // block, block, torch.bfloat16, 1, "cuda")
        cache.kv.normal_()
        order = torch.randperm(B * L // block).tolist()
        tables = [order[b * L // block:(b + 1) * L // block] for b in range(B)]
        positions = torch.full((B, 1), L - 1, dtype=torch.long)
        write, read, table = cache.slots(tables, positions.numpy(), positions.numpy() >= 0, L)
        gather = cache.view(write.cuda(), read.cuda(), L)
        paged = cache.view(write.cuda(), None, L, table.cuda(), positions.cuda(), triton_mla.paged_mla_decode)
        x = torch.randn(B, 1, args.dim, device="cuda", dtype=torch.bfloat16)
        freqs = rope_freqs_cis(rope_inv_freq(args).cuda(), positions.cuda(), args.rope_attention_factor)
        mask = torch.zeros(B, 1, L, device="cuda")

        def step(view):
            def attend(latent, q, scale):
                return view.attend(0, latent, q, scale, args.kv_lora_rank)
            with torch.inference_mode():
                return mla(x, freqs, mask, lambda latent: view.update(0, latent, positions), "absorbed",
                           attend=attend if view.decode else None)
        a, b = step(gather).float(), step(paged).float()
        kv_bytes = B * L * args.latent_dim * 2
        times = {"gather_us": timed(lambda: step(gather)) * 1e6, "triton_us": timed(lambda: step(paged)) * 1e6}
        rows.append({"B": B, "L": L, **times, "rel_diff": ((a - b).abs().max() / a.abs().max()).item(),
                     "triton_kv_gb_per_s": kv_bytes / times["triton_us"] * 1e-3})
        del cache
        torch.cuda.empty_cache()
    return rows


def section_decode(quick: bool) -> list:
    from transformers import AutoModelForCausalLM
    n_new, prompt_len = 64, 32
    llm = LLM(device="cuda", max_num_seqs=64, cuda_graphs=False)
    graphed = LLM(device="cuda", max_num_seqs=64)  # the default: decode steps replayed as CUDA graphs
    assert graphed.engine.runner.graphs is not None
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.bfloat16).cuda().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    per_token_kv = llm.engine.cache.bytes_per_token
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, 32, 64):
        prompts = torch.randint(2, llm.model.args.vocab_size, (batch, prompt_len), generator=g)
        params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)

        def ours():
            return llm.generate(prompts.tolist(), params)

        def ours_graphs():
            return graphed.generate(prompts.tolist(), params)

        def theirs():
            with torch.inference_mode():
                hf.generate(prompts.cuda(), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                            attention_mask=torch.ones_like(prompts).cuda())
        parted = first_differences(ours(), ours_graphs())
        theirs()
        times = {"ours": [], "ours_graphs": [], "transformers": []}
        for _ in range(3):
            for side, fn in (("ours", ours), ("ours_graphs", ours_graphs), ("transformers", theirs)):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[side].append(time.perf_counter() - start)
        mid_kv = batch * (prompt_len + n_new // 2) * per_token_kv
        floor = (weight_bytes + mid_kv) / HBM_BYTES_PER_S  # seconds per decode step at the bandwidth limit
        row = {"batch": batch, "new_tokens": n_new, "floor_tokens_per_s": batch / floor,
               "graphs_equal_eager": f"{parted.count(n_new)}/{batch}",
               "graphs_part_from_eager_at": sorted(i for i in parted if i < n_new)}
        if batch == 32:  # the same comparison in float32, where rounding rarely flips a token
            params32 = dict(device="cuda", dtype="float32", moe_kernel="triton", max_num_seqs=64)
            eager32 = LLM(**params32, cuda_graphs=False).generate(prompts.tolist(), params)
            graphs32 = LLM(**params32, cuda_graphs=True).generate(prompts.tolist(), params)
            parted32 = first_differences(eager32, graphs32)
            row["float32_graphs_equal_eager"] = f"{parted32.count(n_new)}/{batch}"
            row["float32_graphs_part_from_eager_at"] = sorted(i for i in parted32 if i < n_new)
        for side, ts in times.items():
            row[f"{side}_tokens_per_s"] = batch * n_new / statistics.median(ts)
            row[f"{side}_spread"] = [round(batch * n_new / t) for t in ts]
        rows.append(row)
    return rows


# DeepSeek-V2-Lite's shapes (15.7B parameters); rope without YaRN, which changes nothing a step reads or computes
V2_LITE = ModelArgs(model_type="deepseek_v2", vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408,
                    n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
                    n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, topk_method="greedy",
                    score_func="softmax", norm_topk_prob=False, route_scale=1.0, q_lora_rank=None, n_mtp_layers=0,
                    rope_type="default")


class RandomCheckpoint(Checkpoint):
    """Random weights (norms 1, the rest N(0, 0.02)) made on the device as `load_model` reads them: a model too large
    to write to disk first."""

    def __init__(self, args: ModelArgs, device: str):
        self.args, self.path, self.device = args, Path(f"<random {args.model_type} weights>"), device
        with torch.device("meta"):
            state = Transformer(args, with_mtp=False).state_dict()
        self.shapes = {local_to_hf(local, args.n_layers): t.shape for local, t in state.items()}

    def names(self, select=None) -> list[str]:
        return [n for n in self.shapes if select is None or select(n)]

    def is_fp8(self, name: str) -> bool:
        return False

    def tensor(self, name: str, dtype=None) -> torch.Tensor:
        t = torch.empty(self.shapes[name], dtype=dtype or torch.float32, device=self.device)
        return t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0, 0.02)


def random_hf_model(args: ModelArgs, device: str, dtype: torch.dtype):
    """transformers' model of the same shapes, random the same way (its own draws)."""
    import transformers
    config = {k: v for k, v in args.to_config().items() if k not in ("architectures", "model_type")}
    cls_config, cls_model = {"deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
                             "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[
        args.model_type]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls_model(cls_config(**config))
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    return model.eval()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_at_scale(args: ModelArgs, device: str, batches=(1, 32, 64), n_new: int = 64, prompt_len: int = 32,
                    runs: int = 3, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Decode tokens/s of random-weight models of `args`' shapes in `dtype`: ours with CUDA graphs (the default), ours
    eager, transformers' generate; equal work (the same prompts, n_new tokens each, EOS ignored). The floor: the
    bytes a decode step must read (every weight but the embedding table's unread rows, the routed experts the
    batch's tokens reach, the KV) at 4.8 TB/s; experts reached by uniform routing, as these random gates route."""
    model = load_model(RandomCheckpoint(args, device), dtype=dtype, device=device)
    engines = {"ours_graphs": Engine(model, EngineConfig(max_num_seqs=max(batches), kv_cache_tokens=max(batches) * 128)),
               "ours_eager": Engine(model, EngineConfig(max_num_seqs=max(batches), kv_cache_tokens=max(batches) * 128,
                                                        cuda_graphs=False))}
    if engines["ours_graphs"].runner.graphs is None:
        del engines["ours_graphs"]  # a CPU: no graphs
    llms = {}
    for side, engine in engines.items():
        llms[side] = LLM.__new__(LLM)
        llms[side].model, llms[side].tokenizer, llms[side].engine = model, None, engine
    hf = random_hf_model(args, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    size = torch.finfo(dtype).bits // 8
    expert_bytes = 3 * args.dim * args.moe_inter_dim * size
    moe_layers = sum(args.is_moe_layer(i) for i in range(args.n_layers))
    embed_bytes = args.vocab_size * args.dim * size
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        prompts = torch.randint(2, args.vocab_size, (batch, prompt_len), generator=g)
        params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
        fns = {side: (lambda llm=llm: llm.generate(prompts.tolist(), params)) for side, llm in llms.items()}

        def theirs():
            with torch.inference_mode():
                out = hf.generate(prompts.to(device), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                  attention_mask=torch.ones_like(prompts).to(device))
            assert out.shape[1] == prompt_len + n_new
        fns["transformers"] = theirs
        for fn in fns.values():
            fn()  # warm-up: compilation, graph capture
        times = {side: [] for side in fns}
        for _ in range(runs):
            for side, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[side].append(time.perf_counter() - start)
        reached = args.n_routed_experts * (1 - (1 - args.n_activated_experts / args.n_routed_experts) ** batch)
        kv = batch * (prompt_len + n_new // 2) * args.kv_cache_bytes_per_token(dtype)
        step_bytes = (weight_bytes - embed_bytes - moe_layers * args.n_routed_experts * expert_bytes
                      + moe_layers * reached * expert_bytes + kv)
        row = {"batch": batch, "new_tokens": n_new, "step_gb_floor": step_bytes / 1e9,
               "floor_tokens_per_s": batch * HBM_BYTES_PER_S / step_bytes}
        for side, ts in times.items():
            row[f"{side}_tokens_per_s"] = batch * n_new / statistics.median(ts)
            row[f"{side}_spread"] = [round(batch * n_new / t) for t in ts]
        rows.append(row)
    return {"parameters_b": sum(p.numel() for p in model.parameters()) / 1e9, "weight_gb": weight_bytes / 1e9,
            "rows": rows}


def section_decode_v2lite(quick: bool) -> dict:
    return decode_at_scale(V2_LITE, "cuda", batches=(1, 32) if quick else (1, 32, 64))


def profile_decode(args: ModelArgs, device: str, batches=(1, 32), steps: int = 8, top: int = 12) -> list:
    """Where a decode step's device time goes: the kernels of `steps` eager decode steps of a random-weight model
    (torch.profiler), grouped by name, per step, the largest first; and the step's device time in all."""
    from torch.profiler import ProfilerActivity, profile
    model = load_model(RandomCheckpoint(args, device), dtype=torch.bfloat16, device=device)
    rows = []
    for batch in batches:
        engine = Engine(model, EngineConfig(max_num_seqs=batch, kv_cache_tokens=batch * 128, cuda_graphs=False))
        g = torch.Generator().manual_seed(0)
        for prompt in torch.randint(2, args.vocab_size, (batch, 32), generator=g).tolist():
            engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
        for _ in range(4):  # the prompts, then warm decode steps
            engine.step()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            sync(device)
        kernels = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us() / steps
        total = sum(kernels.values())
        largest = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
        rows.append({"batch": batch, "device_us_per_step": total,
                     "kernels_us_per_step": {name[:90]: round(us, 1) for name, us in largest}})
    return rows


def section_profile_v2lite(quick: bool) -> list:
    return profile_decode(V2_LITE, "cuda")


def nccl_to_itself(comm, t: torch.Tensor) -> torch.Tensor:
    """t sent and received on a world-size-1 NCCL communicator (a send to one's own rank), as raw bytes."""
    from cupy.cuda import nccl
    out = torch.empty_like(t)
    stream = torch.cuda.current_stream().cuda_stream
    nbytes = t.numel() * t.element_size()
    nccl.groupStart()
    comm.send(t.data_ptr(), nbytes, nccl.NCCL_UINT8, 0, stream)
    comm.recv(out.data_ptr(), nbytes, nccl.NCCL_UINT8, 0, stream)
    nccl.groupEnd()
    torch.cuda.current_stream().synchronize()
    return out


def section_nccl(quick: bool) -> dict:
    """NCCL through cupy (what Ray's collective library drives on GPUs; Ray is not on this machine, so a
    world-size-1 communicator stands in for the transport's groups): every data-plane message kind in the wire
    format, as a CUDA uint8 tensor, back bit for bit; and the prefill/decode KV hand-off on the GPU: one engine
    prefills, the latent crosses NCCL and is written into a second engine's cache, which decodes on; its tokens
    against one engine's."""
    from cupy.cuda import nccl
    from moeserve.actors import wire
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    x = torch.randn(5, 256)
    x8, scale = act_quant(x)
    work = {g: wire.Assignments(torch.arange(3, dtype=torch.int32), torch.tensor([g, 7, 9], dtype=torch.int32),
                                torch.rand(3)) for g in (0, 2)}
    messages = [wire.Dispatch(3, wire.Payload(x.bfloat16()), work, torch.bfloat16, relay=True, version=7),
                wire.Dispatch(3, wire.Payload(x8, scale), work, torch.float32),
                wire.Reply(torch.randn(5, 256), forwarded=1234), wire.Error("expert group 2: KeyError: 5"),
                wire.Ping(), wire.Stop()]
    equal = {}
    for message in messages:
        body = wire.encode(message)
        sent = torch.frombuffer(bytearray(body), dtype=torch.uint8).cuda()
        back = nccl_to_itself(comm, sent).cpu().numpy().tobytes()
        equal[type(message).__name__ + ("/fp8" if getattr(message, "payload", None) is not None
                                         and message.payload.scale is not None else "")] = (
            back == body and wire.encode(wire.decode(back)) == body)
    # the KV hand-off: prefill on one engine, the latent over NCCL (or through host memory, as Ray's object store
    # carries it) into another engine's cache; float32, where the only differences left are the batches' shapes
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm = LLM(device="cuda", dtype="float32")
    one_engine = [o.token_ids for o in llm.generate(PROMPTS, params)]

    def handed_off(carry) -> list:
        prefill, decode = (Engine(llm.model, llm.engine.config) for _ in range(2))
        for p in PROMPTS:
            prefill.add_request(llm.encode(p), params)
        moved = []
        while prefill.has_unfinished():
            prefill.step()
            moved += [prefill.take_prefilled(s) for s in prefill.prefilled()]
        for pre in moved:
            pulled = carry(pre.latent)
            assert pulled.is_cuda and torch.equal(pulled, pre.latent)
            pre.latent = pulled
            decode.add_prefilled(pre)
        outs = {}
        while decode.has_unfinished():
            outs.update({o.request_id: o for o in decode.step() if o.finished})
        return [outs[pre.request_id].token_ids for pre in moved]
    over_nccl = handed_off(lambda latent: nccl_to_itself(comm, latent))
    through_host = handed_off(lambda latent: latent.cpu().cuda())
    big = torch.randn(4096 * 61, 576, device="cuda", dtype=torch.bfloat16)  # a 4k-token prompt's latent in V3
    seconds = timed(lambda: nccl_to_itself(comm, big))
    return {"nccl_version": nccl.get_version(), "messages_bit_for_bit": equal,
            "handoff_over_nccl_equal_through_host": f"{sum(a == b for a, b in zip(over_nccl, through_host))}/4",
            "handoff_over_nccl_part_from_one_engine_at": first_differences(over_nccl, one_engine),
            "v3_4k_latent_mb": big.numel() * 2 / 1e6,
            "v3_4k_latent_ms": seconds * 1e3}


SECTIONS = {"demo": section_demo, "demo_fp8": section_demo_fp8, "fp8_gemm": section_fp8_gemm,
            "grouped_experts": section_grouped_experts, "fp8_experts": section_fp8_experts,
            "mla_decode": section_mla_decode, "decode": section_decode, "nccl": section_nccl,
            "decode_v2lite": section_decode_v2lite, "profile_v2lite": section_profile_v2lite}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python tools/gpu_check.py --json gpu.json")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections alone")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no GPU here; run it on a machine with one (CUDA build of torch)")
        return 2
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps(results), flush=True)
    for name in args.only or SECTIONS:
        started = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            results[name] = SECTIONS[name](args.quick)
        except Exception:  # noqa: BLE001  (a section that fails says why; the others still run)
            results[name] = {"error": traceback.format_exc()}
        print(f"[{name}] {time.perf_counter() - started:.1f} s: {json.dumps(results[name], indent=1)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
