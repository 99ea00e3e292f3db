"""The `moeserve` command line. Heavy imports happen inside each command so `--help` is instant."""
import argparse
import json
import sys
import time

EXAMPLES = """\
examples:
  moeserve info --model ./DeepSeek-V3            # shapes, experts, KV-cache bytes per token
  moeserve generate --prompt "def fibonacci(" --mtp   # the shipped demo model
  moeserve generate --model CKPT --prompt-ids 1,2,3 --max-tokens 16 --temperature 0 --json
  moeserve quantize --model CKPT --output CKPT-fp8  # BF16 -> FP8 e4m3, 128x128 block scales
"""


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, metavar="DIR", default=None,
                   help="checkpoint directory: config.json (model_type deepseek_v3 or deepseek_v2) and "
                        "*.safetensors, BF16/FP32 or FP8 with weight_scale_inv" +
                        ("" if required else " (default: the demo model shipped with moeserve)"))


def cmd_info(a: argparse.Namespace) -> int:
    from moeserve.kernels.args import ModelArgs
    args = ModelArgs.from_file(a.model)
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


def cmd_generate(a: argparse.Namespace) -> int:
    from moeserve.cluster import LLM, SamplingParams
    from moeserve.kernels.errors import InputError

    if (a.prompt is None) == (a.prompt_ids is None):
        raise InputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    llm = LLM(a.model, dtype=a.dtype, mtp=a.mtp)
    loaded = time.perf_counter()
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, ignore_eos=a.ignore_eos, logprobs=0)
    prompt = a.prompt_ids if a.prompt_ids is not None else a.prompt
    if a.json:
        out = llm.generate([prompt], params)[0]
        print(json.dumps({"prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids, "text": out.text,
                          "logprobs": out.logprobs, "finish_reason": out.finish_reason,
                          "mtp": {"drafts": out.drafts_proposed, "accepted": out.drafts_accepted} if a.mtp else None}))
        return 0
    if a.prompt is not None:
        print(a.prompt, end="", flush=True)
    out = None
    for out in llm.stream(prompt, params):  # print text as it is generated
        print(out.new_text if out.text is not None else " ".join(map(str, out.new_token_ids)) + " ", end="", flush=True)
    done = time.perf_counter()
    rate = len(out.token_ids) / (done - loaded)
    mtp = f", MTP acceptance {out.acceptance_rate:.0%}" if a.mtp else ""
    print(f"\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, load {loaded - start:.1f}s, "
          f"{rate:.1f} tokens/s{mtp}]", file=sys.stderr)
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from moeserve.kernels.quantize import quantize_checkpoint
    out = quantize_checkpoint(a.model, a.output, block=(a.block, a.block),
                              progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote FP8 checkpoint to {out}")
    return 0


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
                       description="Read config.json and print the architecture moeserve will build, with the "
                                   "latent KV cache's bytes per token (kv_lora_rank + qk_rope_head_dim) x layers.")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate from one prompt in this process (no Ray)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load a checkpoint into the single-process engine (paged latent KV cache, "
                                   "optional MTP speculation) and generate, streaming the text as it comes."
                                   "\n\nexamples:\n  moeserve generate --prompt \"def fibonacci(\" --mtp\n"
                                   "  moeserve generate --model CKPT --prompt-ids 1,2,3 --max-tokens 16 "
                                   "--temperature 0 --json")
    _add_model(p, required=False)
    p.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint)")
    p.add_argument("--prompt-ids", type=_token_ids, metavar="IDS", help="prompt as token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the checkpoint's MTP module: same output, fewer steps")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="compute dtype; FP8 weights are dequantised into it (default float32, fastest on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true",
                   help="print {prompt_token_ids, token_ids, text, logprobs, finish_reason} as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="write an FP8 (e4m3, block-scaled) copy of a BF16/FP32 checkpoint",
                       description="Quantise the decoder's linear weights to float8_e4m3fn with one "
                                   "weight_scale_inv per block, in DeepSeek-V3's released layout. Embeddings, "
                                   "heads, norms and the router stay in their source dtype.")
    _add_model(p)
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the FP8 checkpoint")
    p.add_argument("--block", type=int, default=128, help="block edge for weight scales (default 128)")
    p.set_defaults(func=cmd_quantize)
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
