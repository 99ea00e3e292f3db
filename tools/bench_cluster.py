"""Benchmark: the disaggregated cluster (Ray actors: prefill shard, decode shard, four expert groups over two
simulated nodes) against the single-process engine, same demo model and prompts, on this machine.

    python tools/bench_cluster.py [--transport ray collective] [--json out.json]

Reports decode tokens/s and TPOT at batch 1 and with 32 concurrent requests, their ratio, and where the
decode shard's step time goes: attention and the rest of the shard's own work, dispatch (planning, FP8
quantisation, sending), and waiting for the experts' replies (expert compute plus transfer).
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from bench_engine import corpus_prompts  # same folder

from moeserve.actors.cluster import Cluster
from moeserve.cluster import DEMO_MODEL, LLM, ClusterConfig, SamplingParams
from moeserve.cluster.tokenizer import Tokenizer


def run(generate, prompts, params):
    start = time.perf_counter()
    outs = generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / seconds, seconds


def bench_cluster(config: ClusterConfig, one, many, params) -> dict:
    with Cluster(config) as cluster:
        cluster.generate(one, SamplingParams(max_tokens=4, temperature=0))
        batch1, _ = run(cluster.generate, one, params)
        base = cluster.stats()["time_s"]
        batch32, _ = run(cluster.generate, many, params)
        after = cluster.stats()
    spent = {k: after["time_s"][k] - base[k] for k in base}
    step = spent["decode_steps"]
    share = {
        "attention and the shard's own work": (step - spent["dispatch"] - spent["combine_wait"]) / step,
        "dispatch (plan, FP8 quantise, send)": spent["dispatch"] / step,
        "waiting for experts (compute + transfer)": spent["combine_wait"] / step,
    }
    return {"batch1_tokens_per_s": batch1, "batch32_tokens_per_s": batch32, "batch32_time_s": spent,
            "share": share, "bytes": after["bytes"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", choices=["ray", "collective"], nargs="+", default=["ray", "collective"],
                   help="the cluster transports to measure (default: both)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(0)
    tok = Tokenizer(DEMO_MODEL)
    one = corpus_prompts(tok, 1, rng, 32, 32)
    many = corpus_prompts(tok, 32, rng, 16, 96)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    llm = LLM()
    llm.generate(one, SamplingParams(max_tokens=4, temperature=0))
    engine = {1: run(llm.generate, one, params)[0], 32: run(llm.generate, many, params)[0]}
    del llm
    results = {"engine_tokens_per_s": engine}
    for transport in a.transport:
        print(f"cluster with the {transport} transport ...", file=sys.stderr)
        results[transport] = bench_cluster(ClusterConfig(transport=transport), one, many, params)
    print("| workload | transport | engine tokens/s | cluster tokens/s | cluster / engine | cluster TPOT |\n"
          "|---|---|---|---|---|---|")
    for n in (1, 32):
        for transport in a.transport:
            c = results[transport][f"batch{n}_tokens_per_s"]
            print(f"| batch {n} | {transport} | {engine[n]:.1f} | {c:.1f} | {c / engine[n]:.2f} | "
                  f"{1e3 * n / c:.1f} ms |")
    for transport in a.transport:
        r = results[transport]
        print(f"\nwhere the decode shard's step time goes at 32 concurrent requests ({transport} transport):")
        for name, value in r["share"].items():
            print(f"- {name}: {value:.0%}")
        print(f"- (expert groups' own compute, summed over groups and both shards: "
              f"{r['batch32_time_s']['experts']:.2f} s of {r['batch32_time_s']['decode_steps']:.2f} s of decode steps)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
