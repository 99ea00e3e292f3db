"""Benchmark: a rebalance on a skewed workload, on the default layout (four expert groups over two simulated nodes,
four redundant slots), demo model.

    python tools/bench_rebalance.py [--requests 32] [--max-tokens 64] [--json out.json]

The workload: prompts built from a handful of repeated source lines, so that routing concentrates on the few
experts those tokens prefer. Three phases with the same workload (new prompts each time, same lengths): before
(the placement EPLB made from uniform load at start), during (the rebalance runs while the requests decode), and
after. Reports each phase's tokens/s, the per-group load max/mean of every MoE layer under the placement in force
(measured from the tokens the shards routed in that phase), the experts moved, and the longest decode step of the
phase against the mean step of the phase before (the aim: no step longer than twice an ordinary one).
"""
import argparse
import random
import sys
import threading
import time
from pathlib import Path

import ray
import torch

from bench_engine import StealMeter  # same folder

from moeserve.actors.cluster import Cluster
from moeserve.cluster import DEMO_MODEL, ClusterConfig, SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.topology.eplb import gpu_imbalance

LINES = ["        self.assertEqual(result, expected)\n", "        self.assertTrue(result)\n",
         "        return self._value\n", "        self._value = value\n"]


def skewed_prompts(tokenizer: Tokenizer, n: int, rng: random.Random) -> list[list[int]]:
    return [tokenizer.encode("".join(rng.choice(LINES) for _ in range(rng.randint(3, 8)))) for _ in range(n)]


def measured(cluster: Cluster) -> tuple[list[float], torch.Tensor]:
    """The tokens per expert routed since the last call [layers, E], and per MoE layer their per-group load
    max/mean under the placement now."""
    layers = sorted(cluster.phy2log)
    load = cluster.measured_load(layers)
    current = torch.tensor([cluster.phy2log[layer] for layer in layers])
    counts = torch.zeros_like(load, dtype=torch.long).scatter_add_(1, current, torch.ones_like(current))
    ratios = gpu_imbalance(load, current, counts, cluster.config.topology_spec.num_gpus).tolist()
    return [round(x, 3) for x in ratios], load


def decode_steps(cluster: Cluster) -> tuple[float, int]:
    stats = [s for s in cluster.stats()["shards"] if s["role"] == "decode"]
    return sum(s["step_s"] for s in stats), sum(s["engine"]["steps"] for s in stats)


def longest_step(cluster: Cluster) -> float:
    return max(ray.get([s.take_longest_step.remote() for s in cluster.decode_shards]))


def phase(cluster: Cluster, prompts, params, during=None) -> dict:
    """Run the workload (calling `during` once the requests decode); tokens/s, mean and longest decode step."""
    longest_step(cluster)
    step_s, steps = decode_steps(cluster)
    outcome = {}
    start = time.perf_counter()
    worker = threading.Thread(target=lambda: outcome.update(outs=cluster.generate(prompts, params)))
    worker.start()
    if during is not None:
        time.sleep(0.5)
        outcome["during"] = during()
    worker.join()
    elapsed = time.perf_counter() - start
    step_s2, steps2 = decode_steps(cluster)
    ratios, load = measured(cluster)
    return {"tokens_per_s": sum(len(o.token_ids) for o in outcome["outs"]) / elapsed,
            "mean_step_ms": 1e3 * (step_s2 - step_s) / max(1, steps2 - steps),
            "longest_step_ms": 1e3 * longest_step(cluster), "imbalance": ratios, "load": load,
            "rebalance": outcome.get("during")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(a.seed)
    tok = Tokenizer(DEMO_MODEL)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
    steal = StealMeter()
    with Cluster(ClusterConfig(rebalance={"auto": False})) as cluster:
        print("warming up ...", file=sys.stderr, flush=True)
        cluster.generate(skewed_prompts(tok, a.requests, rng), params)
        measured(cluster)  # every phase measures its own window
        results = {}
        for name in ("before", "during", "after"):
            print(f"{name} ...", file=sys.stderr, flush=True)
            # the rebalance plans on the load the phase before measured, the way the watcher plans on its interval
            during = (lambda: cluster.rebalance(results["before"]["load"])) if name == "during" else None
            results[name] = phase(cluster, skewed_prompts(tok, a.requests, rng), params, during)
    move = results["during"]["rebalance"]
    print("| phase | tokens/s | per-group max/mean by MoE layer | mean step | longest step |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['imbalance']} | {r['mean_step_ms']:.1f} ms | "
              f"{r['longest_step_ms']:.1f} ms |")
    ordinary = results["before"]["mean_step_ms"]
    print(f"\nrebalance: {move['moved_experts']} experts moved (version {move['version']}); measured max/mean "
          f"{move['imbalance_before']} -> {move['imbalance_after']}; longest step during the move "
          f"{results['during']['longest_step_ms']:.1f} ms = {results['during']['longest_step_ms'] / ordinary:.2f}x "
          f"the mean step before ({ordinary:.1f} ms); longest step before "
          f"{results['before']['longest_step_ms'] / ordinary:.2f}x")
    for r in results.values():
        del r["load"]
    steal.finish(results, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
