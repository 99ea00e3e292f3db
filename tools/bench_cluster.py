"""Benchmark: the disaggregated cluster (Ray actors: a prefill shard, a decode shard and the expert groups)
against the single-process engine, same model (the demo model unless --model) and prompts, on this machine.

    python tools/bench_cluster.py [--transport ray collective sockets] [--layout default one-group one-group-each]
                                  [--dispatch-dtype auto|fp8|bf16|float32] [--mtp] [--phases] [--json out.json]
    python tools/bench_cluster.py --transport sockets --layout one-group --collective-spin-us 0 auto
                                  # receives that sleep at once against the default (polling first where it may)
    python tools/random_model.py --out /tmp/moeserve-47m    # an untrained model with more compute per layer
    python tools/bench_cluster.py --model /tmp/moeserve-47m --transport sockets --layout one-group default

Layouts: `default` is `ClusterConfig()`'s, four expert groups over two simulated nodes with four redundant
expert slots (tokens for the other node cross once to a relay group); `one-group` keeps the prefill and
decode shards apart from one expert group holding every expert (one node, one slot); `one-group-each` gives the
prefill shard an expert group of its own (`shared_expert_groups: false`).

Reports decode tokens/s and TPOT at batch 1 and with 32 concurrent requests, their ratio to the engine, and
where the decode shard's step time goes: attention and the rest of the shard's own work, planning the dispatch,
encoding and sending it, and waiting for the experts' replies (expert compute plus transfer). Every system
first runs another 32-request workload untimed, so that none pays first-call costs in the timed runs. Each
timed workload runs on a fresh engine, then on a second fresh engine limited to one torch thread (each of the
cluster's actors computes on one), then on the cluster, nine times over (--repeats) with new prompts each time;
the ratios are the medians of the side-by-side ratios. The one-thread engine shows how much of the engine's speed its
second core buys: the cluster's processes take turns on the same two cores.

`--phases` also times, on both sides and with new prompts of the same kind, each workload with only two new tokens
(the prompt, the hand-off to the decode shard and one decode step; the engine's prompt and one step) and splits each
call into those first two tokens and the decode steps after them (the 64-token call's time less the two-token
call's, per step), so that the prompts' share of a ratio shows apart from the decode loop's.
"""
import argparse
import contextlib
import random
import statistics
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
LAYOUTS = {"default": {}, "one-group": {"topology": ONE_SLOT, "expert_groups": 1, "redundant_experts": 0},
           "one-group-each": {"topology": ONE_SLOT, "expert_groups": 1, "redundant_experts": 0,
                              "shared_expert_groups": False}}

TRANSPORTS = {"ray": {"transport": "ray"}, "collective": {"transport": "collective", "collective_backend": "gloo"},
              "sockets": {"transport": "collective", "collective_backend": "sockets"}}


def run(generate, prompts, params) -> float:
    """Generated tokens per second of one call."""
    start = time.perf_counter()
    outs = generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def elapsed(generate, prompts, params) -> float:
    """Seconds of one call."""
    start = time.perf_counter()
    generate(prompts, params)
    return time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_cluster(config: ClusterConfig, engine: LLM, engine_one: LLM, workloads: dict, params) -> dict:
    """Each workload (fresh prompts, so no prefix cache helps either side) runs on the engine, on the engine
    limited to one thread (`engine_one`, another instance: the prompts must be new to it too) and then on the
    cluster, `repeats` times in turn: the engines' speed is measured beside the cluster's, not minutes before,
    which on a machine whose speed drifts by a third makes the ratios mean something. Medians."""
    ratios, one_thread_ratios = {1: [], 32: []}, {1: [], 32: []}
    cluster_rates = {1: [], 32: []}
    engine_rates = {1: [], 32: []}
    first_two = {side: {1: [], 32: []} for side in ("engine", "cluster")}  # --phases: seconds of two-token calls
    two = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    with Cluster(config) as cluster:
        cluster.generate(workloads["warm"], params)
        base = cluster.stats()["time_s"]
        aside = dict.fromkeys(base, 0.0)  # the two-token calls' share of the counters, left out of the breakdown
        for r in range(len(workloads[1])):
            for n in (1, 32):
                prompts = workloads[n][r]
                e = run(engine.generate, prompts, params)
                with torch_threads(1):
                    e1 = run(engine_one.generate, prompts, params)
                c = run(cluster.generate, prompts, params)
                if "two_tokens" in workloads:  # other new prompts: neither side's prefix cache holds them
                    first_two["engine"][n].append(elapsed(engine.generate, workloads["two_tokens"][n][r], two))
                    before = cluster.stats()["time_s"]
                    first_two["cluster"][n].append(elapsed(cluster.generate, workloads["two_tokens"][n][r], two))
                    for key, value in cluster.stats()["time_s"].items():
                        aside[key] += value - before[key]
                engine_rates[n].append(e)
                cluster_rates[n].append(c)
                ratios[n].append(c / e)
                one_thread_ratios[n].append(e1 / e)
        after = cluster.stats()
    spent = {k: after["time_s"][k] - base[k] - aside[k] for k in base}  # both batch sizes' decode steps
    step = spent["decode_steps"]
    share = {
        "attention and the shard's own work": (step - spent["dispatch"] - spent["combine_wait"]) / step,
        "planning the dispatch and building its messages": (spent["dispatch"] - spent["dispatch_send"]) / step,
        "encoding and sending it": spent["dispatch_send"] / step,
        "waiting for experts (compute + transfer)": spent["combine_wait"] / step,
    }
    med = statistics.median
    return {**{f"batch{n}_tokens_per_s": med(cluster_rates[n]) for n in (1, 32)},
            **{f"batch{n}_engine_tokens_per_s": med(engine_rates[n]) for n in (1, 32)},
            **{f"batch{n}_ratio": med(ratios[n]) for n in (1, 32)},
            **{f"batch{n}_one_thread_engine_ratio": med(one_thread_ratios[n]) for n in (1, 32)},
            "ratios": ratios, "one_thread_ratios": one_thread_ratios, "time_s": spent, "share": share,
            "bytes": after["bytes"], "phases": phases(first_two, engine_rates, cluster_rates, params.max_tokens)}


def phases(first_two: dict, engine_rates: dict, cluster_rates: dict, new_tokens: int) -> dict:
    """Each side's first two tokens (median seconds of the two-token calls) and the decode steps after them: the
    median whole call (its tokens over its median rate) less the first two tokens, per remaining step."""
    med = statistics.median
    out = {}
    for n in (1, 32):
        if not first_two["engine"][n]:
            continue
        rates = {"engine": engine_rates[n], "cluster": cluster_rates[n]}
        side = {}
        for name in ("engine", "cluster"):
            first = med(first_two[name][n])
            whole = n * new_tokens / med(rates[name])
            side[name] = {"first_two_s": first, "step_s": (whole - first) / (new_tokens - 2)}
        side["step_ratio"] = side["engine"]["step_s"] / side["cluster"]["step_s"]
        out[n] = side
    return out


def spin_us(value: str):
    if value == "auto":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: auto or microseconds (an integer, 0 or more)")
    return int(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL,
                   help="checkpoint directory, the same on both sides (default: the demo model)")
    p.add_argument("--transport", choices=list(TRANSPORTS), nargs="+", default=list(TRANSPORTS),
                   help="the cluster transports to measure: ray, collective (over gloo), sockets (the collective "
                        "transport over a Unix socket between each pair of actors, the default on a cluster moeserve "
                        "starts: collective_backend) (default: all three)")
    p.add_argument("--layout", choices=list(LAYOUTS), nargs="+", default=list(LAYOUTS),
                   help="the cluster layouts to measure (default: all)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1],
                   help="micro-batches per decode step on the shards (engine.micro_batches; default: 1)")
    p.add_argument("--collective-spin-us", nargs="+", default=["auto"], type=spin_us,
                   help="sockets: how long a receive polls before it sleeps, each value measured (collective_spin_us; "
                        "default auto, the cluster's default: 2000 us where each decode shard and expert group has a "
                        "core, else 0)")
    p.add_argument("--dispatch-dtype", choices=["auto", "fp8", "bf16", "float32"], default="auto",
                   help="token rows sent to the experts (dispatch_dtype; default auto, the cluster's default: the "
                        "compute dtype, exact)")
    p.add_argument("--threads-per-actor", type=int, default=1,
                   help="torch threads in each actor (ray.threads_per_actor; default: 1)")
    p.add_argument("--mtp", action="store_true",
                   help="MTP speculative decoding on the cluster's decode shards (the engine beside it runs without, "
                        "its faster setting on the CPU)")
    p.add_argument("--phases", action="store_true",
                   help="also time two-token calls on both sides and split each workload into its first two tokens "
                        "and the decode steps after them")
    p.add_argument("--repeats", type=int, default=9,
                   help="times each workload runs on each side, new prompts each time (default: 9: on a machine whose "
                        "speed swings, a median of three lands anywhere in a range of 0.3)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    torch.set_num_threads(2)
    rng = random.Random(0)
    tok = Tokenizer(a.model)
    workloads = {1: [corpus_prompts(tok, 1, rng, 32, 32) for _ in range(a.repeats)],
                 32: [corpus_prompts(tok, 32, rng, 16, 96) for _ in range(a.repeats)],
                 "warm": corpus_prompts(tok, 32, random.Random(1), 16, 96)}
    if a.phases:
        workloads["two_tokens"] = {1: [corpus_prompts(tok, 1, rng, 32, 32) for _ in range(a.repeats)],
                                   32: [corpus_prompts(tok, 32, rng, 16, 96) for _ in range(a.repeats)]}
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    steal = StealMeter()
    results = {"clusters": {}, "mtp": a.mtp}
    runs = [(layout, transport, mb, spin) for layout in dict.fromkeys(a.layout)
            for transport in dict.fromkeys(a.transport) for mb in dict.fromkeys(a.micro_batches)
            for spin in (dict.fromkeys(a.collective_spin_us) if transport == "sockets" else ["auto"])]
    for layout, transport, mb, spin in runs:
        print(f"cluster, {layout} layout, {transport} transport, {mb} micro-batches, polling {spin} ...",
              file=sys.stderr, flush=True)
        config = ClusterConfig(model=str(a.model), **TRANSPORTS[transport], engine={"micro_batches": mb},
                               dispatch_dtype=a.dispatch_dtype,
                               ray={"threads_per_actor": a.threads_per_actor}, mtp=a.mtp, **LAYOUTS[layout],
                               collective_spin_us=None if spin == "auto" else spin)
        # fresh ones for each configuration: their prefix caches must not remember the prompts
        engine, engine_one = LLM(a.model), LLM(a.model)
        engine.generate(workloads["warm"], params)
        with torch_threads(1):
            engine_one.generate(workloads["warm"], params)
        results["clusters"][f"{layout}/{transport}/{mb}/{spin}"] = bench_cluster(config, engine, engine_one, workloads,
                                                                          params)
    print("| workload | layout | transport | micro-batches | polling (us) | engine tokens/s | cluster tokens/s | "
          "cluster / engine (per repeat) | engine on one thread / engine | cluster TPOT |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for n in (1, 32):
        for layout, transport, mb, spin in runs:
            r = results["clusters"][f"{layout}/{transport}/{mb}/{spin}"]
            c, e = r[f"batch{n}_tokens_per_s"], r[f"batch{n}_engine_tokens_per_s"]
            each = " / ".join(f"{x:.2f}" for x in r["ratios"][n])
            print(f"| batch {n} | {layout} | {transport} | {mb} | {spin if transport == 'sockets' else '-'} | "
                  f"{e:.1f} | {c:.1f} | {r[f'batch{n}_ratio']:.2f} "
                  f"({each}) | {r[f'batch{n}_one_thread_engine_ratio']:.2f} | {1e3 * n / c:.1f} ms |")
    if a.mtp:
        print("(the cluster with MTP on its decode shards; the engine without)")
    if a.phases:
        print("\n| workload | layout | transport | micro-batches | polling (us) | first two tokens: engine | cluster |"
              " decode step after them: engine | cluster | engine / cluster |\n" + "|---" * 10 + "|")
        for n in (1, 32):
            for layout, transport, mb, spin in runs:
                ph = results["clusters"][f"{layout}/{transport}/{mb}/{spin}"]["phases"][n]
                e, c = ph["engine"], ph["cluster"]
                print(f"| batch {n} | {layout} | {transport} | {mb} | {spin if transport == 'sockets' else '-'} | "
                      f"{1e3 * e['first_two_s']:.1f} ms | {1e3 * c['first_two_s']:.1f} ms | "
                      f"{1e3 * e['step_s']:.2f} ms | {1e3 * c['step_s']:.2f} ms | {ph['step_ratio']:.2f} |")
    for layout, transport, mb, spin in runs:
        r = results["clusters"][f"{layout}/{transport}/{mb}/{spin}"]
        print(f"\nwhere the decode shard's step time goes ({layout}, {transport}, {mb} micro-batches, polling {spin}; "
              "batch 1 and 32):")
        for name, value in r["share"].items():
            print(f"- {name}: {value:.0%}")
        print(f"- (expert groups' own compute, summed over groups and both shards: "
              f"{r['time_s']['experts']:.2f} s of {r['time_s']['decode_steps']:.2f} s of decode steps)")
    steal.finish(results, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
