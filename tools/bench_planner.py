"""Benchmark: planning one decode step's dispatch (256 tokens x 8 experts from one source GPU, 256 experts on a
64-GPU placement with 64 redundant slots, h800-mpft with 8 nodes). Prints the median of repeated runs.

    python tools/bench_planner.py
"""
import statistics
import sys
import time

import torch

from moeserve.kernels.model import select_experts
from moeserve.topology.eplb import rebalance_experts
from moeserve.topology.planner import Placement, plan_dispatch
from moeserve.topology.spec import PRESETS


def main() -> int:
    torch.set_num_threads(1)
    spec = PRESETS["h800-mpft"].scaled(8)
    scores = torch.rand(256, 256, generator=torch.Generator().manual_seed(0))
    topk = select_experts(scores, 8, 8, 4)
    weight = torch.bincount(topk.flatten(), minlength=256).float()[None] + 1
    phy2log, _, _ = rebalance_experts(weight, 320, 8, 8, 64)
    placement = Placement(phy2log[0], 5, 8, n_groups=8)
    for _ in range(5):
        plan_dispatch(topk, 3, placement, spec, 7168, max_nodes=4)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        plan_dispatch(topk, 3, placement, spec, 7168, max_nodes=4)
        times.append((time.perf_counter() - start) * 1e3)
    print(f"plan_dispatch, 256 tokens x 8 experts, 64 GPUs: median {statistics.median(times):.2f} ms, "
          f"p90 {sorted(times)[44]:.2f} ms (1 thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
