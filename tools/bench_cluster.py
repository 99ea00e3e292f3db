"""Benchmark: the disaggregated cluster (Ray actors: a prefill shard, a decode shard and the expert groups)
against the single-process engine, same demo model and prompts, on this machine.

    python tools/bench_cluster.py [--transport ray collective] [--layout default one-group] [--json out.json]

Layouts: `default` is `ClusterConfig()`'s, four expert groups over two simulated nodes with four redundant
expert slots (tokens for the other node cross once to a relay group); `one-group` keeps the prefill and
decode shards apart from one expert group holding every expert (one node, one slot).

Reports decode tokens/s and TPOT at batch 1 and with 32 concurrent requests, their ratio to the engine, and
where the decode shard's step time goes: attention and the rest of the shard's own work, dispatch (planning,
FP8 quantisation, sending), and waiting for the experts' replies (expert compute plus transfer). Every system
first runs another 32-request workload untimed, so that none pays first-call costs in the timed runs.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

from bench_engine import StealMeter, corpus_prompts  # same folder

from moeserve.actors.cluster import Cluster
from moeserve.cluster import DEMO_MODEL, LLM, ClusterConfig, SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.topology.spec import TopologySpec

ONE_SLOT = TopologySpec(name="one-slot", nodes=1, gpus_per_node=1, nics_per_node=1, planes=1, intra_node_gbps=10,
                        nic_gbps=1)
LAYOUTS = {"default": {}, "one-group": {"topology": ONE_SLOT, "expert_groups": 1, "redundant_experts": 0}}


def run(generate, prompts, params):
    start = time.perf_counter()
    outs = generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / seconds, seconds


def bench_engine(one, many, warm, params) -> dict:
    llm = LLM()
    llm.generate(warm, params)
    return {1: run(llm.generate, one, params)[0], 32: run(llm.generate, many, params)[0]}


def bench_cluster(config: ClusterConfig, one, many, warm, params) -> dict:
    with Cluster(config) as cluster:
        cluster.generate(warm, params)
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
    p.add_argument("--layout", choices=list(LAYOUTS), nargs="+", default=list(LAYOUTS),
                   help="the cluster layouts to measure (default: both)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1],
                   help="micro-batches per decode step on the shards (engine.micro_batches; default: 1)")
    p.add_argument("--threads-per-actor", type=int, default=1,
                   help="torch threads in each actor (ray.threads_per_actor; default: 1)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(0)
    tok = Tokenizer(DEMO_MODEL)
    one = corpus_prompts(tok, 1, rng, 32, 32)
    many = corpus_prompts(tok, 32, rng, 16, 96)
    warm = corpus_prompts(tok, 32, random.Random(1), 16, 96)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    steal = StealMeter()
    engine = bench_engine(one, many, warm, params)
    results = {"engine_tokens_per_s": engine, "clusters": {}}
    runs = [(layout, transport, mb) for layout in a.layout for transport in a.transport for mb in a.micro_batches]
    for layout, transport, mb in runs:
        print(f"cluster, {layout} layout, {transport} transport, {mb} micro-batches ...", file=sys.stderr, flush=True)
        config = ClusterConfig(transport=transport, engine={"micro_batches": mb},
                               ray={"threads_per_actor": a.threads_per_actor}, **LAYOUTS[layout])
        results["clusters"][f"{layout}/{transport}/{mb}"] = bench_cluster(config, one, many, warm, params)
    print("| workload | layout | transport | micro-batches | engine tokens/s | cluster tokens/s | cluster / engine | "
          "cluster TPOT |\n|---|---|---|---|---|---|---|---|")
    for n in (1, 32):
        for layout, transport, mb in runs:
            c = results["clusters"][f"{layout}/{transport}/{mb}"][f"batch{n}_tokens_per_s"]
            print(f"| batch {n} | {layout} | {transport} | {mb} | {engine[n]:.1f} | {c:.1f} | {c / engine[n]:.2f} | "
                  f"{1e3 * n / c:.1f} ms |")
    for layout, transport, mb in runs:
        r = results["clusters"][f"{layout}/{transport}/{mb}"]
        print(f"\nwhere the decode shard's step time goes at 32 concurrent requests ({layout}, {transport}, "
              f"{mb} micro-batches):")
        for name, value in r["share"].items():
            print(f"- {name}: {value:.0%}")
        print(f"- (expert groups' own compute, summed over groups and both shards: "
              f"{r['batch32_time_s']['experts']:.2f} s of {r['batch32_time_s']['decode_steps']:.2f} s of decode steps)")
    steal.finish(results, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
