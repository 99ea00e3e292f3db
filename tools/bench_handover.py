"""Benchmark: what handing each MoE layer over to another process costs the hander's own work, without Ray.

    python tools/bench_handover.py                          # a hand-over (0.5 ms of another's work), sleep, spin
    python tools/bench_handover.py --wait pipe --helper-rows 0 5 40   # how the cost grows with the other's work

A decode shard of the cluster waits three times a token (once per MoE layer) while an expert group computes its
experts, and on this 2-core machine its own modules (attention, norms, gates, shared experts) then run slower than
the same modules in the single-process engine. This reproduces that with the engine alone (one torch thread, batch
1, the demo model): after each MoE layer's routed experts it waits, in turns with runs that do not wait, and times
its modules either way. The waits:
- pipe: a message to a second process, which runs `--helper-rows` small products on 8 MB of weights of its own
  (about the work of an expert group's reply) and answers; the engine blocks on the answer;
- sleep: `time.sleep(--wait-ms)`, nobody else running;
- spin: a busy loop of `--wait-ms`, the core never idle.
"Own work" is the token's time minus the waits. Medians over `--rounds` prompts of 32 tokens, 64 new tokens each;
each round runs one prompt without waits and one with.
"""
import argparse
import multiprocessing as mp
import random
import statistics
import sys
import time

import torch

from bench_engine import StealMeter, corpus_prompts  # same folder

from moeserve.cluster import DEMO_MODEL, LLM, SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels import experts as kernels_experts
from moeserve.kernels import model as kernels_model

MODULES = {"attention": kernels_model.MLA, "norms": kernels_model.RMSNorm, "gates": kernels_model.Gate,
           "shared/dense FFN": kernels_experts.MLP}
NEW_TOKENS = 64


def helper(conn, rows: int) -> None:
    """The other process: per message received, `rows` products of a normed row with one of 16 [192, 640] weights,
    then an answer."""
    torch.set_num_threads(1)
    weights = [torch.randn(192, 640) for _ in range(16)]
    x, norm = torch.randn(1, 192), torch.ones(192)
    while conn.recv_bytes() == b"g":
        for i in range(rows):
            torch.nn.functional.rms_norm(x, (192,), norm, 1e-6) @ weights[i % 16]
        conn.send_bytes(b"k")


class Timed:
    """Wraps the model's modules and the routed experts: each module's time, and a wait after each MoE layer's
    routed experts while `waiting` is set."""

    def __init__(self, wait):
        self.wait, self.waiting = wait, False
        self.module_s: dict[tuple[bool, str], float] = {}
        self.waited_s = 0.0
        for name, cls in MODULES.items():
            cls.forward = self._timed(cls.forward, name)
        dispatch = kernels_experts.LocalExperts.dispatch

        def dispatch_then_wait(experts, *args, **kwargs):
            y = dispatch(experts, *args, **kwargs)
            if self.waiting:
                start = time.perf_counter()
                self.wait()
                self.waited_s += time.perf_counter() - start
            return y
        kernels_experts.LocalExperts.dispatch = dispatch_then_wait

    def _timed(self, forward, name: str):
        def timed(module, *args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(module, *args, **kwargs)
            finally:
                key = (self.waiting, name)
                self.module_s[key] = self.module_s.get(key, 0.0) + time.perf_counter() - start
        return timed


def waits(kind: str, wait_ms: float, rows: int):
    """The wait of one hand-over, and what to call when done."""
    if kind == "sleep":
        return lambda: time.sleep(wait_ms / 1e3), lambda: None
    if kind == "spin":
        def spin():
            end = time.perf_counter() + wait_ms / 1e3
            while time.perf_counter() < end:
                pass
        return spin, lambda: None
    ours, theirs = mp.Pipe()
    process = mp.get_context("spawn").Process(target=helper, args=(theirs, rows), daemon=True)
    process.start()

    def hand_over():
        ours.send_bytes(b"g")
        ours.recv_bytes()

    def close():
        ours.send_bytes(b"q")
        process.join()
    return hand_over, close


def measure(llm: LLM, timed: Timed, rounds: int, rng: random.Random, tokenizer: Tokenizer) -> dict:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    timed.module_s.clear()
    own = {False: [], True: []}
    waited = []
    for _ in range(rounds):
        for waiting in (False, True):
            timed.waiting, timed.waited_s = waiting, 0.0
            start = time.perf_counter()
            llm.generate(corpus_prompts(tokenizer, 1, rng, 32, 32), params)
            own[waiting].append((time.perf_counter() - start - timed.waited_s) / NEW_TOKENS)
            if waiting:
                waited.append(timed.waited_s / NEW_TOKENS)
    timed.waiting = False
    per_token = {key: s / (rounds * NEW_TOKENS) for key, s in timed.module_s.items()}
    return {"own": own, "waited": statistics.median(waited), "modules": per_token}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="examples:\n" + "\n".join(
        __doc__.split("\n\n")[1].splitlines()), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--wait", nargs="+", choices=("pipe", "sleep", "spin"), default=["pipe", "sleep", "spin"])
    ap.add_argument("--helper-rows", type=int, nargs="+", default=[10],
                    help="the other process's products per hand-over (pipe); 10 is about 0.5 ms here")
    ap.add_argument("--wait-ms", type=float, default=0.5, help="how long a sleep or spin wait lasts")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as each actor of the cluster
    tokenizer, rng = Tokenizer(args.model), random.Random(0)
    llm = LLM(args.model)
    steal = StealMeter()
    runs = [(kind, rows) for kind in args.wait for rows in (args.helper_rows if kind == "pipe" else [None])]
    timed = Timed(wait=None)
    llm.generate(corpus_prompts(tokenizer, 1, rng, 32, 32), SamplingParams(max_tokens=8, temperature=0))
    print("| wait | waited a layer | own work a token, no wait / wait | " + " | ".join(MODULES) + " |")
    print("|---|---|---|" + "---|" * len(MODULES))
    for kind, rows in runs:
        timed.wait, close = waits(kind, args.wait_ms, rows)
        print(f"{kind}{'' if rows is None else f' ({rows} rows)'}...", end="\r", file=sys.stderr, flush=True)
        try:
            r = measure(llm, timed, args.rounds, rng, tokenizer)
        finally:
            close()
        n_moe = sum(isinstance(m, kernels_model.MoE) for m in llm.model.modules())
        cells = [f"{1e3 * r['modules'].get((False, name), 0):.2f} / {1e3 * r['modules'].get((True, name), 0):.2f}"
                 for name in MODULES]
        label = kind if rows is None else f"pipe, {rows} rows"
        own = [f"{1e3 * statistics.median(v):.2f} ({1e3 * min(v):.2f}-{1e3 * max(v):.2f})"
               for v in (r["own"][False], r["own"][True])]
        print(f"| {label} | {1e3 * r['waited'] / n_moe:.2f} ms | {own[0]} / {own[1]} ms | " + " | ".join(cells) + " |")
    print(f"\nown work: medians over {args.rounds} rounds (range); modules: ms a token, no wait / wait, over all "
          f"rounds; {steal.report()}")


if __name__ == "__main__":
    main()
