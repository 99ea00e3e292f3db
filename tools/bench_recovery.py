"""Benchmark: how long a SIGKILLed actor costs the requests that run through it, on the default layout (one prefill
and one decode shard, four expert groups, collective transport), demo model.

    python tools/bench_recovery.py [--repeats 3] [--requests 8] [--max-tokens 400] [--sampled] [--json out.json]
    python tools/bench_recovery.py --second-at-join decode-0     # a second death during the first's recovery

For each victim (an expert group, the decode shard) and each repeat: `--requests` greedy requests (with
`--sampled`, every other one sampled with a seed of its own) stream from one client; once every one has its first
tokens, the victim's process is killed. Reports, per kill: the time from the SIGKILL until the cluster's recovery is
done (Ray restarted the process, the live layout reloaded, the process group formed anew), the longest gap between
two tokens any stream saw, and whether every request completed with the tokens of an undisturbed run of the same
workload (measured first, on the same cluster). Medians and ranges over the repeats.

With `--second-at-join NAME`, only expert group 1 is killed, and each time the actor NAME too, by the controller,
just as the recovery is about to form the process group anew: the other members then wait for it until
`failures.rendezvous_timeout_s`, and the same recovery brings both back.
"""
import argparse
import asyncio
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from bench_engine import StealMeter  # same folder

from moeserve.actors import cluster as cluster_module
from moeserve.actors.cluster import Cluster
from moeserve.actors.controller import Controller
from moeserve.cluster import ClusterConfig, SamplingParams


def workload(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 200, (int(torch.randint(8, 64, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


async def streams(cluster: Cluster, prompts, params: list, started: threading.Event) -> tuple[list, float]:
    """Every request's tokens, and the longest gap between two tokens any stream saw (after its first)."""
    gaps, first = [0.0], set()

    async def one(i: int) -> list[int]:
        last, tokens = None, []
        async for delta in cluster.client.stream(prompts[i], params[i]):
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last, tokens = now, delta.token_ids
            first.add(i)
            if len(first) == len(prompts):
                started.set()
        return tokens
    outs = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return outs, max(gaps)


def killing_at_join(first: str, second: str) -> type:
    """A controller that SIGKILLs `second` whenever a recovery that brings `first` back is about to form the
    process group (once a recovery: `second` is then recovering too)."""
    class KillingAtJoin(Controller):
        def _join_collective(self, pids):
            if self.states.get(first) == "recovering" and self.states.get(second) == "alive":
                os.kill(self.where[second]["pid"], signal.SIGKILL)
            return super()._join_collective(pids)
    return KillingAtJoin


def kill_once(cluster: Cluster, victim: str, prompts, params, expected) -> dict:
    started, outcome = threading.Event(), {}
    runner = threading.Thread(target=lambda: outcome.update(r=asyncio.run(streams(cluster, prompts, params,
                                                                                  started))))
    runner.start()
    started.wait(120)
    recovered = len(cluster.recoveries)
    killed_at = time.monotonic()
    os.kill(cluster.where[victim]["pid"], signal.SIGKILL)
    while len(cluster.recoveries) == recovered:
        time.sleep(0.01)
    recovery_s = time.monotonic() - killed_at
    runner.join()
    outs, gap = outcome["r"]
    return {"victim": victim, "recovered_s": recovery_s, "longest_gap_s": gap, "identical": outs == expected,
            "resumed_requests": cluster.client.resumed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--sampled", action="store_true",
                   help="every other request sampled (temperature 0.8, top-p 0.95, a seed of its own), not greedy")
    p.add_argument("--second-at-join", metavar="NAME",
                   help="kill expert-group-1 only, and this actor (expert-group-2, decode-0, prefill-0, ...) as its "
                        "recovery forms the process group")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    victims = ["expert-group-1"] if a.second_at_join else ["expert-group-1", "decode-0"]
    if a.second_at_join:
        cluster_module.Controller = killing_at_join("expert-group-1", a.second_at_join)
    params = [SamplingParams(max_tokens=a.max_tokens, temperature=0.8 if a.sampled and i % 2 else 0, top_p=0.95,
                             seed=i, ignore_eos=True) for i in range(a.requests)]
    prompts = workload(a.requests, 0)
    steal = StealMeter()
    results = {"kills": []}
    with Cluster(ClusterConfig(rebalance={"auto": False})) as cluster:
        print("an undisturbed run ...", file=sys.stderr, flush=True)
        done = threading.Event()
        expected, undisturbed_gap = asyncio.run(streams(cluster, prompts, params, done))
        results["undisturbed_longest_gap_s"] = undisturbed_gap
        if a.second_at_join and a.second_at_join not in cluster.where:
            p.error(f"--second-at-join: no actor {a.second_at_join}; the actors are {', '.join(cluster.where)}")
        for victim in victims:
            for r in range(a.repeats):
                print(f"killing {victim} ({r + 1}/{a.repeats}) ...", file=sys.stderr, flush=True)
                results["kills"].append(kill_once(cluster, victim, prompts, params, expected))
    print("| killed | recovered after the SIGKILL | longest gap between two tokens | requests identical |\n"
          "|---|---|---|---|")
    for victim in victims:
        runs = [k for k in results["kills"] if k["victim"] == victim]
        rec, gap = [k["recovered_s"] for k in runs], [k["longest_gap_s"] for k in runs]
        killed = f"{victim}, then {a.second_at_join} as its recovery forms the group" if a.second_at_join else victim
        print(f"| {killed} | {statistics.median(rec):.2f} s ({min(rec):.2f}-{max(rec):.2f}) | "
              f"{statistics.median(gap):.2f} s ({min(gap):.2f}-{max(gap):.2f}) | "
              f"{sum(k['identical'] for k in runs)} of {len(runs)} runs |")
    print(f"\nundisturbed: longest gap {undisturbed_gap:.3f} s; {a.requests} requests of {a.max_tokens} tokens"
          f"{', every other one sampled' if a.sampled else ''}, {a.repeats} kills each")
    steal.finish(results, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
