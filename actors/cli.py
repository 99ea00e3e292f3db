"""The `moeserve` command line. Heavy imports happen inside each command so `--help` is instant."""
import argparse
import json
import sys
import time
from typing import Optional

EXAMPLES = """\
examples:
  moeserve info --model ./DeepSeek-V3            # shapes, experts, KV-cache bytes per token
  moeserve generate "def fibonacci(" --mtp       # the shipped demo model
  moeserve generate --model CKPT --prompt-ids 1,2,3 --max-tokens 16 --temperature 0 --json
  moeserve quantize --model CKPT --output CKPT-fp8  # BF16 -> FP8 e4m3, 128x128 block scales
"""


DEFAULT_CLUSTER_PROMPT = "def fibonacci("


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="DIR", default=None,
                   help="checkpoint directory: config.json (model_type deepseek_v3 or deepseek_v2) and "
                        "*.safetensors, BF16/FP32 or FP8 with weight_scale_inv" +
                        ("" if required else " (default: the demo model shipped with moeserve)"))


def cmd_info(a: argparse.Namespace) -> int:
    from moeserve.cluster import DEMO_MODEL
    from moeserve.kernels.args import ModelArgs
    args = ModelArgs.from_file(a.model or DEMO_MODEL)
    kv = {name: args.kv_cache_bytes_per_token(_dtype(name)) for name in ("bfloat16", "float32")}
    info = {
        "model_type": args.model_type, "layers": args.n_layers, "dense_layers": args.n_dense_layers,
        "hidden_size": args.dim, "heads": args.n_heads, "q_lora_rank": args.q_lora_rank,
        "kv_lora_rank": args.kv_lora_rank, "qk_rope_head_dim": args.qk_rope_head_dim,
        "routed_experts": args.n_routed_experts, "shared_experts": args.n_shared_experts,
        "experts_per_token": args.n_activated_experts, "expert_groups": args.n_expert_groups,
        "groups_per_token": args.n_limited_groups, "topk_method": args.topk_method, "scoring_func": args.score_func,
        "mtp_layers": args.n_mtp_layers, "rope": args.rope_type, "fp8_block": args.weight_block_size,
        "kv_cache_bytes_per_token": kv,
    }
    if a.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>26}: {value}")
    return 0


def _prompt_text(a: argparse.Namespace) -> Optional[str]:
    """The prompt text given as the command's argument or as --prompt (not both), or None."""
    from moeserve.kernels.errors import InputError
    if a.text is not None and a.prompt is not None:
        raise InputError("give the prompt once: as the argument or as --prompt, not both")
    return a.text if a.text is not None else a.prompt


def _add_prompt(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """The prompt: as the command's argument, --prompt TEXT or --prompt-ids 1,2,3 (one of them)."""
    fallback = f" (default: {default!r})" if default else ""
    p.add_argument("text", nargs="?", metavar="PROMPT", help=f"prompt text, the same as --prompt{fallback}")
    p.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    p.add_argument("--prompt-ids", type=_token_ids, metavar="IDS", help="prompt as token ids, e.g. 1,2,3")


def _prompt(a: argparse.Namespace, default: Optional[str] = None):
    """The prompt as text or token ids, from exactly one of PROMPT, --prompt and --prompt-ids (else `default`)."""
    from moeserve.kernels.errors import InputError
    given = [p for p in (_prompt_text(a), a.prompt_ids) if p is not None]
    if len(given) > 1 or not (given or default):
        raise InputError("give exactly one of PROMPT (or --prompt TEXT) or --prompt-ids 1,2,3")
    return given[0] if given else default


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """A request's sampling and stopping flags, the same wherever moeserve generates (SamplingParams' fields)."""
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end at this text, which is left out of the output (repeat for several; a newline in bash: "
                        "$'\\n')")
    p.add_argument("--stop-token-ids", type=_token_ids, metavar="IDS",
                   help="end at any of these tokens, e.g. 13,198; the token's text is left out of the output")
    p.add_argument("--include-stop-str-in-output", action="store_true",
                   help="keep the stop text, or the stop token's text, in the output")
    p.add_argument("--json", action="store_true",
                   help="print {prompt_token_ids, token_ids, text, logprobs, finish_reason, stop_reason} as JSON")


def _sampling_params(a: argparse.Namespace):
    """SamplingParams from _add_sampling's flags, checked (before any model loads or cluster starts)."""
    from moeserve.cluster import SamplingParams
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, ignore_eos=a.ignore_eos, logprobs=0, stop=a.stop or [],
                            stop_token_ids=a.stop_token_ids or [],
                            include_stop_str_in_output=a.include_stop_str_in_output)
    params.validate()
    return params


def _output_json(out, **extra) -> str:
    return json.dumps({"prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids, "text": out.text,
                       "logprobs": out.logprobs, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                       **extra})


def cmd_generate(a: argparse.Namespace) -> int:
    from moeserve.cluster import LLM

    prompt = _prompt(a)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    params = _sampling_params(a)
    start = time.perf_counter()
    llm = LLM(a.model, dtype=a.dtype, mtp=a.mtp, device=a.device, moe_kernel=a.moe_kernel, cuda_graphs=a.cuda_graphs)
    loaded = time.perf_counter()
    llm.engine.check(llm.encode(prompt), params)  # before the prompt is echoed
    if a.json:
        out = llm.generate([prompt], params)[0]
        mtp = {"drafts": out.drafts_proposed, "accepted": out.drafts_accepted} if a.mtp else None
        print(_output_json(out, mtp=mtp))
        return 0
    if isinstance(prompt, str):
        print(prompt, end="", flush=True)
    out = None
    for out in llm.stream(prompt, params):  # print text as it is generated
        print(out.new_text if out.text is not None else " ".join(map(str, out.new_token_ids)) + " ", end="", flush=True)
    done = time.perf_counter()
    rate = len(out.token_ids) / (done - loaded)
    mtp = f", MTP acceptance {out.acceptance_rate:.0%}" if a.mtp else ""
    stop = f", stop_reason={out.stop_reason!r}" if out.stop_reason is not None else ""
    print(f"\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}{stop}, load {loaded - start:.1f}s, "
          f"{rate:.1f} tokens/s{mtp}]", file=sys.stderr)
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from moeserve.kernels.quantize import quantize_checkpoint
    out = quantize_checkpoint(a.model, a.output, block=(a.block, a.block),
                              progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote FP8 checkpoint to {out}")
    return 0


def cmd_cost(a: argparse.Namespace) -> int:
    from moeserve.topology.cost import cost_report, load_architecture
    from moeserve.topology.spec import load_topology
    arch, spec = _model_and_topology(a, load_architecture, load_topology)
    report = cost_report(arch, spec, tokens_per_device=a.tokens, hidden_override=a.hidden, seq_len=a.seq_len)
    if a.json:
        print(json.dumps(report))
        return 0
    t = report["tpot_assumptions"]
    print(f"{arch.name} ({report['attention']}) on {spec.name}")
    print(f"  parameters          {_count(report['total_params'])} total, {_count(report['active_params'])} active per token")
    print(f"  KV cache per token  {report['kv_bytes_per_token']:,.0f} B (BF16)")
    for name, value in report["kv_bytes_per_token_alternatives"].items():
        print(f"      {name:<30}{value:>12,.0f} B")
    print(f"  training compute    {report['train_gflops_per_token']:.4g} GFLOPs per token, config-exact (active "
          f"parameters + causal attention at sequence length {a.seq_len})")
    print(f"                      {report['train_gflops_per_token_classic']:.4g} GFLOPs per token, classic dense estimate "
          f"6 x (12 x layers x hidden^2 + vocab x hidden)")
    print(f"  decode TPOT         {report['tpot_ms']:.2f} ms ({report['tokens_per_s']:.0f} tokens/s): {t['tokens_per_device']} "
          f"tokens/device x {t['experts_per_token']} experts x hidden {t['hidden']}, FP8 dispatch + BF16 combine over "
          f"{t['link_gbps']:g} GB/s, 2 overlapped micro-batches, {t['layers']} layers")
    return 0


def _count(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def cmd_simulate(a: argparse.Namespace) -> int:
    from moeserve.kernels.errors import InputError
    from moeserve.kernels.model import select_experts
    from moeserve.topology.cost import load_architecture
    from moeserve.topology.simulate import plot, simulate
    from moeserve.topology.spec import load_topology
    arch, spec = _model_and_topology(a, load_architecture, load_topology)
    spec = spec.scaled(a.nodes)
    k = arch.experts_per_token

    def route(scores, node_limited):  # the model's own gate selection
        return select_experts(scores, k, a.groups if node_limited else 1, a.max_nodes)
    print(f"simulating {arch.name} on {spec.nodes} x {spec.gpus_per_node} GPUs ({spec.name}), "
          f"{a.tokens} tokens per GPU, {a.redundant} redundant experts, trace {a.trace} ...", file=sys.stderr)
    try:
        result = simulate(arch, spec, route, trace=a.trace, tokens_per_gpu=a.tokens, redundant=a.redundant,
                          n_groups=a.groups, max_nodes=a.max_nodes, policy=a.policy)
    except ValueError as e:
        raise InputError(str(e)) from None
    if a.plot:
        print(f"wrote {plot(result, a.plot)}", file=sys.stderr)
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if k != "expert_load"}))
        return 0
    b, imb = result["internode_bytes_per_token"], result["expert_imbalance"]
    print(f"inter-node bytes per token: naive {b['naive']:,.0f}, node-limited {b['node_limited']:,.0f}, "
          f"node-limited + dedup {b['node_limited_dedup']:,.0f} ({b['node_limited_dedup'] / b['naive']:.2f}x naive)")
    print(f"per-GPU load max/mean: no replicas {imb['before']:.2f}")
    for name, value in imb["policies"].items():
        mark = "  (default)" if name == a.policy else ""
        print(f"  {name:<16}{value:.3f}   max nodes per token {result['max_nodes_per_token']['loads_' + name]}{mark}")
    planes = result["plane_bytes"]
    print(f"per-plane bytes (MB): {' '.join(f'{x / 1e6:.1f}' for x in planes)}")
    print(f"TPOT {result['tpot_ms']:.2f} ms from the simulated links (analytic, no dedup: "
          f"{result['tpot_ms_analytic']:.2f} ms)")
    return 0


def _cluster_config(a):
    from moeserve.cluster import ClusterConfig
    cfg = ClusterConfig.from_yaml(a.config) if a.config else ClusterConfig()
    if a.address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": a.address})})
    return cfg


def _print_placement(where: dict) -> None:
    width = max(len("actor"), *map(len, where)) + 2
    print(f"{'actor':<{width}}{'topology node':>14}{'gpu':>5}  {'pid':>7}  ray node")
    for name, w in where.items():
        print(f"{name:<{width}}{w['topology_node']:>14}{w['gpu']:>5}  {w['pid']:>7}  {w['ray_node'][:12]}")


def cmd_cluster(a: argparse.Namespace) -> int:
    from moeserve.actors.cluster import Cluster
    if a.action == "generate":  # checked before the cluster starts
        prompt, params = _prompt(a, DEFAULT_CLUSTER_PROMPT), _sampling_params(a)
    cfg = _cluster_config(a)
    pools = "" if cfg.shared_expert_groups else " (and as many for the prefill shards alone)"
    print(f"starting {cfg.prefill_shards} prefill + {cfg.decode_shards} decode shards and {cfg.expert_groups} expert "
          f"groups{pools} on {cfg.topology_spec.name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with Cluster(cfg) as cluster:
        print(f"ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        _print_placement(cluster.where)
        if a.action == "generate":
            out = cluster.generate([prompt], params)[0]
            if a.json:
                print(_output_json(out))
            elif isinstance(prompt, str):
                print(prompt + out.text)
            else:
                print(" ".join(map(str, out.token_ids)) if out.text is None else out.text)
            stats = cluster.stats()
            b = stats["bytes"]
            print(f"inter-node bytes measured {b['measured']['inter_node']:,} / planned {b['planned']['inter_node']:,};"
                  f" {b['inter_node_crossings']} node crossings vs {b['naive_crossings']} per-expert sends; "
                  f"KV transfer {stats['kv_transfer_bytes']:,} B", file=sys.stderr)
            return 0
        print("cluster up; Ctrl-C stops it", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping ...", file=sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from moeserve.actors.serve import Server, run_forever
    cfg = _cluster_config(a)
    print(f"starting moeserve: {cfg.prefill_shards} prefill + {cfg.decode_shards} decode shards, "
          f"{cfg.expert_groups} expert groups on {cfg.topology_spec.name}, model {cfg.model}", file=sys.stderr,
          flush=True)
    run_forever(Server(cfg, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port, max_pending=a.max_pending))
    return 0


def format_status(status: dict) -> str:
    """`GET /v1/cluster` as the table `moeserve status` prints."""
    lines = [f"placement version {status['placement_version']}, transport {status['transport']}, "
             f"{status.get('inflight', 0)} requests in flight, {status['failures_survived']} failures survived"]
    rows = [("ACTOR", "ROLE", "NODE", "GPU", "PID", "STATE")] + [
        (a["name"], a["role"], str(a["topology_node"]), str(a["gpu"]), str(a["pid"]), a["state"])
        for a in status["actors"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    last = status.get("last_rebalance")
    if last and last.get("imbalance_before"):
        lines.append(f"last rebalance: version {last['version']}, {last['moved_experts']} experts moved, per-group "
                     f"load max/mean (worst layer) {max(last['imbalance_before']):.2f} -> "
                     f"{max(last['imbalance_after']):.2f}")
    for event in status.get("recoveries", []):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
        lines.append(f"recovered {', '.join(event['lost'])} at {when} in {event['recovered_s']:.2f} s")
    return "\n".join(lines)


def cmd_status(a: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request
    from moeserve.kernels.errors import MoeserveError
    try:
        with urllib.request.urlopen(a.url.rstrip("/") + "/v1/cluster", timeout=30) as response:
            status = json.loads(response.read())
    except (urllib.error.URLError, OSError) as e:
        raise MoeserveError(f"no moeserve server answered at {a.url} ({e}); start one with `moeserve serve`, or "
                            "give its address with --url") from None
    print(json.dumps(status, indent=2) if a.json else format_status(status))
    return 0


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from moeserve.actors.bench_serve import run
    print(f"load test: {a.requests} requests, Poisson {a.rate}/s, at most {a.clients} at a time, "
          f"{a.max_tokens} tokens each, {a.duration:.0f}s cap ...", file=sys.stderr, flush=True)
    r = run(a.url, a.requests, a.clients, a.rate, a.max_tokens, a.duration, a.seed)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{r['completed']}/{r['requests_sent']} completed, {r['errors']} errors in {r['wall_s']:.1f}s: "
          f"{r['output_tokens_per_s']:.1f} output tokens/s, {r['requests_per_s']:.2f} requests/s")
    print(f"{'':>8}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for name in ("ttft_s", "tpot_s", "e2e_s"):
        q = r[name]
        if q:
            print(f"{name[:-2].upper():>8}" + "".join(f"{q[k] * 1e3:>8.1f}ms" for k in ("p50", "p90", "p99", "mean")))
    if r["first_error"]:
        print(f"first error: {r['first_error']}", file=sys.stderr)
    return 0


def _model_and_topology(a, load_architecture, load_topology):
    from moeserve.kernels.errors import InputError
    try:
        return load_architecture(a.model), load_topology(a.topology)
    except ValueError as e:
        raise InputError(str(e)) from None


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeserve", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Serve DeepSeek-V3-class Mixture-of-Experts models: MLA latent KV cache, DeepSeekMoE routing, "
                    "MTP speculation, FP8 weights.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a checkpoint's architecture and its KV-cache cost",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read config.json and print the architecture moeserve will build, with the "
                                   "latent KV cache's bytes per token (kv_lora_rank + qk_rope_head_dim) x layers."
                                   "\n\nexamples:\n  moeserve info                # the shipped demo model\n"
                                   "  moeserve info --model /models/DeepSeek-V3 --json")
    _add_model(p, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate from one prompt in this process (no Ray)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load a checkpoint into the single-process engine (paged latent KV cache, "
                                   "optional MTP speculation) and generate, streaming the text as it comes."
                                   "\n\nexamples:\n  moeserve generate \"def fibonacci(\" --mtp\n"
                                   "  moeserve generate --model CKPT --prompt-ids 1,2,3 --max-tokens 16 "
                                   "--temperature 0 --json\n  moeserve generate \"def main(\" --stop $'\\n\\n'\n"
                                   "  moeserve generate --model CKPT --device cuda --prompt \"import os\"\n"
                                   "  moeserve generate --model CKPT --device cuda --moe-kernel triton --no-cuda-graphs "
                                   "--prompt \"import os\"")
    _add_model(p, required=False)
    _add_prompt(p)
    _add_sampling(p, max_tokens=32)
    p.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the checkpoint's MTP module: same output, fewer steps")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs (default auto: a GPU where torch sees one, else the CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute dtype (default auto: bfloat16 on a GPU, float32 on a CPU, the fastest on each); "
                        "an FP8 checkpoint's weights stay e4m3 on a GPU and are dequantised into it on a CPU")
    p.add_argument("--moe-kernel", choices=["auto", "grouped", "triton"], default="auto",
                   help="routed experts: grouped (torch._grouped_mm), triton (the fused-MoE kernel, which also takes "
                        "FP8 experts stacked; needs triton), or auto (the default: triton for FP8 experts on GPUs, "
                        "else grouped)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps as CUDA graphs, one per batch-size bucket (default: wherever they can "
                        "run: GPUs with the Triton paged decode, BF16 or the Triton MoE kernel)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="write an FP8 (e4m3, block-scaled) copy of a BF16/FP32 checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Quantise the decoder's linear weights to float8_e4m3fn with one "
                                   "weight_scale_inv per block, in DeepSeek-V3's released layout. Embeddings, "
                                   "heads, norms and the router stay in their source dtype.\n\nexamples:\n"
                                   "  moeserve quantize --model cluster/models/moeserve-demo --output /tmp/demo-fp8\n"
                                   "  moeserve generate --model /tmp/demo-fp8 --prompt 'def f('")
    _add_model(p)
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the FP8 checkpoint")
    p.add_argument("--block", type=int, default=128, help="block edge for weight scales (default 128)")
    p.set_defaults(func=cmd_quantize)

    cluster = sub.add_parser(
        "cluster", help="start the disaggregated cluster on Ray (up), or run one prompt through it (generate)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start expert groups and prefill/decode attention shards as Ray actors, placed on the topology's "
                    "nodes, and report where each landed: `up` runs until Ctrl-C, `generate` runs one prompt through "
                    "the cluster, then stops it.\n\n"
                    "examples:\n  moeserve cluster up                       # demo model, default layout, local Ray\n"
                    "  moeserve cluster generate 'def f('\n"
                    "  moeserve cluster generate --config cluster.yaml --max-tokens 64 --stop $'\\n\\n' --json "
                    "'def main('\n"
                    "  moeserve cluster up --config cluster.yaml --address HOST:6379")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_, examples in (
            ("up", "start the cluster and keep it up until Ctrl-C",
             "moeserve cluster up\n  moeserve cluster up --config cluster.yaml --address HOST:6379"),
            ("generate", "start the cluster, run one prompt through it and print the text, then stop",
             "moeserve cluster generate 'def f('\n  moeserve cluster generate --config cluster.yaml --prompt-ids 1,2,3 "
             "--max-tokens 16 --json\n  moeserve cluster generate 'def main(' --temperature 0.8 --seed 7 "
             "--stop $'\\n\\n'")):
        p = actions.add_parser(action, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                               description=f"{help_[0].upper()}{help_[1:]}.\n\nexamples:\n  {examples}")
        p.add_argument("--config", metavar="YAML", help="cluster config (default: the demo model on cpu-local)")
        p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
        if action == "generate":
            _add_prompt(p, default=DEFAULT_CLUSTER_PROMPT)
            _add_sampling(p, max_tokens=48)
        p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("serve", help="serve the model over OpenAI-compatible HTTP and gRPC (Ray Serve)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Start the disaggregated cluster (local Ray unless --address) and Ray Serve in "
                                   "front of it. With no arguments: the shipped demo model on the default layout, "
                                   "HTTP on 127.0.0.1:8000, gRPC on 127.0.0.1:9000. Ctrl-C or SIGTERM drains "
                                   "in-flight requests (up to 30 s) and stops everything it started.\n\n"
                                   "examples:\n  moeserve serve\n  moeserve serve --config cluster.yaml "
                                   "--host 0.0.0.0 --http-port 8080\n  curl 127.0.0.1:8000/v1/completions -H "
                                   "'content-type: application/json' -d '{\"model\": \"moeserve-demo\", "
                                   "\"prompt\": \"def f(\", \"max_tokens\": 32}'")
    p.add_argument("--config", metavar="YAML", help="cluster config (default: the demo model on cpu-local)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--host", default="127.0.0.1", help="interface for HTTP and gRPC (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--max-pending", type=int, default=256, help="requests in flight before 429 (default 256)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="the live cluster of a running server: actors, placement, recoveries",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Ask a running moeserve server (GET /v1/cluster) for every actor (role, node, "
                                   "process, state: alive, lost, recovering, dead), the expert placement version, "
                                   "the last rebalance and the failures it recovered from.\n\nexamples:\n"
                                   "  moeserve status\n  moeserve status --url http://10.0.0.5:8000 --json")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("--json", action="store_true", help="print the JSON as the server sent it")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("bench", help="load-test a running server (loopback only)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load-test a moeserve server on this machine: Poisson arrivals, bounded in "
                                   "count and time; reports TTFT/TPOT/end-to-end percentiles and throughput."
                                   "\n\nexamples:\n  moeserve bench serve                     # 64 requests to "
                                   "127.0.0.1:8000\n  moeserve bench serve --requests 128 --clients 32 --rate 8 "
                                   "--max-tokens 64 --json")
    p.add_argument("target", choices=["serve"], help="what to benchmark")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    p.add_argument("--clients", type=int, default=16, help="requests in flight at most (default 16)")
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates, EOS ignored (default 64)")
    p.add_argument("--duration", type=float, default=300.0, help="stop sending after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_serve)

    models = "deepseek-v3, deepseek-v2, qwen2.5-72b, llama3.1-405b, or a config.json / checkpoint directory"
    topologies = "h800-mpft, gb200-nvl72, cpu-local, or a topology YAML"
    p = sub.add_parser("cost", help="KV cache, compute and decode TPOT of a model on a topology",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The cost model: KV-cache bytes per token (MLA vs MHA/GQA/MQA, sliding window, "
                                   "8/4-bit caches), parameters, training GFLOPs per token (config-exact, and the "
                                   "classic dense estimate 6 x (12 L h^2 + V h)), and the communication-bound "
                                   "decode TPOT of expert-parallel inference.\n\nexamples:\n"
                                   "  moeserve cost --model deepseek-v3 --topology h800-mpft --hidden 7000\n"
                                   "  moeserve cost --model qwen2.5-72b            # 394 GFLOPs, the paper's convention\n"
                                   "  moeserve cost --model /models/DeepSeek-V3 --topology gb200-nvl72 --json")
    p.add_argument("--model", required=True, help=models)
    p.add_argument("--topology", default="h800-mpft", help=topologies + " (default h800-mpft)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per device per decode step (default 32)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size for TPOT (the paper rounds 7168 to 7000)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for training FLOPs (default 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("simulate", help="run EPLB and the dispatch planner over a routing trace at cluster scale",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Plan a MoE layer's dispatch for every GPU's tokens with the real EPLB and "
                                   "planner; report inter-node bytes per token (naive, node-limited, deduplicated), "
                                   "per-GPU load balance for each EPLB policy, per-plane bytes and TPOT.\n\n"
                                   "examples:\n  moeserve simulate                        # DeepSeek-V3 on h800-mpft,"
                                   " zipf routing\n  moeserve simulate --nodes 256 --redundant 64 --plot planes.png\n"
                                   "  moeserve simulate --trace routing.npy --policy hierarchical --json")
    p.add_argument("--model", default="deepseek-v3", help=models + " (default deepseek-v3)")
    p.add_argument("--topology", default="h800-mpft", help=topologies + " (default h800-mpft)")
    p.add_argument("--trace", default="zipf", help="zipf, uniform, or a .pt/.npy file of [tokens, k] expert ids")
    p.add_argument("--nodes", type=int, default=None, help="override the topology's node count (256 = 2,048 GPUs)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per GPU (default 32)")
    p.add_argument("--redundant", type=int, default=32, help="redundant expert slots (default 32)")
    p.add_argument("--groups", type=int, default=8, help="expert groups of the gate (default 8)")
    p.add_argument("--max-nodes", type=int, default=4, help="node limit M: groups a token may use (default 4)")
    p.add_argument("--policy", default="topology_aware", choices=["topology_aware", "hierarchical", "global"],
                   help="EPLB policy whose result is reported as 'after' (default topology_aware)")
    p.add_argument("--plot", metavar="PNG", help="write per-plane and per-expert load as a PNG (matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv=None) -> int:
    from moeserve.kernels.errors import MoeserveError
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except MoeserveError as e:
        print(f"moeserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
