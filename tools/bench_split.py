"""Benchmark: the engine with its routed experts in other processes and nothing else of the cluster, without Ray.

    python tools/bench_split.py                        # one expert process and four; batch 1 and 32
    python tools/bench_split.py --transport pipe pipe-wire gloo   # what the wire format and gloo add
    python tools/bench_split.py --helpers 1 --spin      # both sides poll instead of sleeping in the kernel

What a split of the engine at its MoE layers costs on this machine, and what the cluster's transport adds to it: the
engine (the demo model) with its routed experts computed by `--helpers` processes that each hold a contiguous block
of them (four blocks of four stand for the default layout's four expert groups, aligned with the model's routing
groups, so a token reaches two of them; one block for the one-group layout). Per MoE layer and process, one message
of the rows it needs and their (row, expert, gate weight) assignments goes over a Unix pipe; the process runs them
the way an expert group does and sends back the weighted sums; the shared expert runs meanwhile, as in the cluster.
Nothing else of the cluster is there: no planner, no wire-format checks, no redundant slots or relay, no Ray, no
controller, prompts and decodes in one process as in the engine (so not an upper bound for the cluster, whose prefill
shard can work beside its decode shard). The workloads are `tools/bench_cluster.py`'s
(one 32-token prompt; 32 prompts of 16-96 tokens at once; 64 new tokens each, tokens/s over the whole call). Each
round runs new prompts on the engine as that benchmark runs it (every torch thread, experts in place), then on a
second instance of the model split (one torch thread in each process, as in each actor of the cluster; an instance
of its own, so that no prefix cache holds the prompts); the ratio is the split run's tokens/s over
the engine's in the same round, medians over `--rounds`.
"""
import argparse
import multiprocessing as mp
import random
import statistics
import struct
import sys
import tempfile
import time
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from bench_engine import StealMeter, corpus_prompts  # same folder

from moeserve.actors import collective, wire
from moeserve.cluster import DEMO_MODEL, LLM, SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels import experts as kernels_experts
from moeserve.kernels import model as kernels_model

NEW_TOKENS = 64
HEADER = struct.Struct("<iii")  # MoE layer, rows, assignments
GLOO_TIMEOUT = timedelta(seconds=60)


def moe_layers(llm: LLM) -> list:
    return [m.experts for m in llm.model.modules() if isinstance(m, kernels_model.MoE)]


def group_product(packed, x, rows, expert_ids, weights):
    """An expert group's product for a message's assignments, chosen as the group chooses it."""
    run = kernels_experts.assignments_runner(packed, len(x), len(expert_ids), kernels_experts.run_assignments_grouped)
    return run(packed, x, rows, expert_ids, weights)


def dispatch_message(p: int, layer: int, x: np.ndarray, rows: np.ndarray, expert_ids: np.ndarray,
                     weights: np.ndarray) -> bytes:
    """The cluster's wire format for one process's share of a layer."""
    work = {p: wire.Assignments(*(torch.from_numpy(a) for a in (rows.astype(np.int32), expert_ids.astype(np.int32),
                                                               weights)))}
    return wire.encode(wire.Dispatch(layer, wire.Payload(torch.from_numpy(x)), work, torch.float32))


class PipeLink:
    """Messages over a Unix pipe per expert process, either a header and the raw arrays or (`wire_format`) the
    cluster's wire format; waits block or spin."""

    def __init__(self, conns: list, spin: bool, wire_format: bool):
        self.conns, self.spin, self.wire_format = conns, spin, wire_format

    def send(self, p: int, layer: int, x: np.ndarray, rows: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray):
        if self.wire_format:
            self.conns[p].send_bytes(dispatch_message(p, layer, x, rows, expert_ids, weights))
            return
        self.conns[p].send_bytes(HEADER.pack(layer, len(x), len(rows)) + x.tobytes() + rows.astype(np.int64).tobytes()
                                 + expert_ids.astype(np.int64).tobytes() + weights.tobytes())

    def reply(self, p: int) -> torch.Tensor:
        body = pipe_receive(self.conns[p], self.spin)
        if self.wire_format:
            return wire.decode(body).y.flatten()
        return torch.frombuffer(bytearray(body), dtype=torch.float32)

    def set_spin(self, on: bool) -> None:
        for conn in self.conns if self.spin else []:
            conn.send_bytes(b"spin" if on else b"block")

    def close(self) -> None:
        for conn in self.conns:
            conn.send_bytes(b"quit")


class GlooLink:
    """The cluster's own collective transport pieces: gloo point-to-point, each message in the wire format, sent
    through `collective.Outbox` and received with `collective.receive` (the main process is rank 0)."""

    def __init__(self, n: int):
        self.n = n
        self.outbox = collective.Outbox(GLOO_TIMEOUT)

    def send(self, p: int, layer: int, x: np.ndarray, rows: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray):
        self.outbox.send(dispatch_message(p, layer, x, rows, expert_ids, weights), p + 1, None)

    def reply(self, p: int) -> torch.Tensor:
        y = wire.decode(collective.receive(None, p + 1, GLOO_TIMEOUT)).y
        self.outbox.flush()
        return y.flatten()

    def set_spin(self, on: bool) -> None:
        pass

    def close(self) -> None:
        for p in range(self.n):
            self.outbox.send(wire.encode(wire.Stop()), p + 1, None)
        self.outbox.flush()
        dist.destroy_process_group()


def pipe_receive(conn, spin: bool) -> bytes:
    if spin:
        while not conn.poll(0):
            pass
    return conn.recv_bytes()


def serve_pipe(conn, layers: list, wire_format: bool) -> None:
    """Answers each message with the rows' weighted sums; waits by spinning only between b"spin" and b"block", so
    that it takes no core while the engine runs."""
    conn.send_bytes(b"ready")
    spin = False
    while (message := pipe_receive(conn, spin)) != b"quit":
        if message in (b"spin", b"block"):
            spin = message == b"spin"
        elif wire_format:
            conn.send_bytes(wire.encode(wire.Reply(answer(wire.decode(message), layers), 0)))
        else:
            layer, n_rows, n = HEADER.unpack_from(message)
            body = torch.frombuffer(bytearray(message[HEADER.size:]), dtype=torch.uint8)
            dim = (body.numel() - 20 * n) // (4 * n_rows)
            x, rest = body[:4 * dim * n_rows].view(torch.float32).view(n_rows, dim), body[4 * dim * n_rows:]
            rows, expert_ids, weights = rest[:8 * n].view(torch.int64), rest[8 * n:16 * n].view(torch.int64), \
                rest[16 * n:].view(torch.float32)
            conn.send_bytes(group_product(layers[layer], x, rows, expert_ids, weights).numpy().tobytes())


def answer(message: wire.Dispatch, layers: list) -> torch.Tensor:
    """The weighted sums of a wire-format dispatch's assignments (one process's: one work group)."""
    (work,) = message.work.values()
    return group_product(layers[message.layer], message.payload.x, work.rows.long(), work.expert_ids.long(),
                           work.weights)


def serve_gloo(layers: list) -> None:
    """The same over GlooLink's messages, until a stop."""
    outbox = collective.Outbox(GLOO_TIMEOUT)
    while not isinstance(message := wire.decode(collective.receive(None, 0, GLOO_TIMEOUT)), wire.Stop):
        outbox.send(wire.encode(wire.Reply(answer(message, layers), 0)), 0, None)
        outbox.flush()


def expert_process(p: int, block: range, model: str, conn, wire_format: bool, rendezvous: Optional[str],
                   world: int) -> None:
    """Holds each layer's experts of `block`, stacked as an expert group stacks its slots, and answers each message
    (rows, and (row, expert, weight) assignments) with the rows' weighted sums, run the way an expert group runs
    them; over its pipe, or over gloo as rank p + 1 where `rendezvous` names the process group's file."""
    torch.set_num_threads(1)
    layers = [kernels_experts.pack_experts([experts[e] for e in block]) for experts in moe_layers(LLM(model))]
    if rendezvous is None:
        serve_pipe(conn, layers, wire_format)
        return
    dist.init_process_group("gloo", init_method=rendezvous, rank=p + 1, world_size=world)
    serve_gloo(layers)
    dist.destroy_process_group()


class SplitExperts:
    """Replaces `LocalExperts.dispatch` and `combine` while `split` is set: each layer's tokens go to the processes
    holding their experts, and the weighted sums come back."""

    def __init__(self, llm: LLM):
        """`llm`: an instance of the model of its own, so that the engine's prefix cache never holds its prompts."""
        self.llm, self.link, self.split = llm, None, False
        self.layer_of = {id(experts): i for i, experts in enumerate(moe_layers(llm))}
        self.n_experts, self.block = llm.model.args.n_routed_experts, 0
        local_dispatch, local_combine = kernels_experts.LocalExperts.dispatch, kernels_experts.LocalExperts.combine
        bench = self

        def dispatch(experts, x, indices, weights, micro_batch=0):
            if not bench.split:
                return "local", local_dispatch(experts, x, indices, weights, micro_batch)
            return "split", bench.send(bench.layer_of[id(experts)], x, indices, weights)

        def combine(experts, handle):
            where, what = handle
            if where == "local":
                return (yield from local_combine(experts, what))
            yield  # the step's other micro-batches run while the experts compute
            return bench.gather(*what)
        kernels_experts.LocalExperts.dispatch, kernels_experts.LocalExperts.combine = dispatch, combine

    def use(self, link, n: int) -> None:
        self.link, self.block = link, self.n_experts // n

    def send(self, layer: int, x, indices, weights):
        """One message to each process that holds any of the tokens' experts: the rows it needs and their
        assignments, numbered within the message (in NumPy, where an op on a few numbers costs a microsecond)."""
        T, k = indices.shape
        rows, expert_ids = np.repeat(np.arange(T), k), indices.numpy().ravel()
        x_rows, weights = x.float().numpy(), weights.float().numpy().ravel()
        if self.block == self.n_experts:
            self.link.send(0, layer, x_rows, rows, expert_ids, weights)
            return x, [(0, None)]
        owner, sent = expert_ids // self.block, []
        for p in np.unique(owner).tolist():
            mine = owner == p
            its_rows, local_row = np.unique(rows[mine], return_inverse=True)
            self.link.send(p, layer, x_rows[its_rows], local_row, expert_ids[mine] - p * self.block, weights[mine])
            sent.append((p, torch.from_numpy(its_rows)))
        return x, sent

    def gather(self, x, sent):
        """The weighted sums of each process the layer went to (None: all of the rows)."""
        y = None
        for p, its_rows in sent:
            reply = self.link.reply(p)
            if its_rows is None:
                return reply.view(x.shape).to(x.dtype)
            y = torch.zeros_like(x) if y is None else y
            y.index_add_(0, its_rows, reply.view(len(its_rows), -1).to(x.dtype))
        return y


def check_same_tokens(engine: LLM, split: SplitExperts, prompts: list) -> None:
    """The split model computes what the engine does (partial sums per process, so the last bits may differ)."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    tokens = []
    for split.split, llm in ((False, engine), (True, split.llm)):
        tokens.append([out.token_ids for out in llm.generate(prompts, params)])
    split.split = False
    if tokens[0] != tokens[1]:
        print("warning: the split model's tokens differ from the engine's", file=sys.stderr)


def start_processes(model: str, n: int, n_experts: int, transport: str, spin: bool, scratch: str):
    """The expert processes, and the link to them."""
    ctx = mp.get_context("spawn")
    pipes = [mp.Pipe() for _ in range(n)] if transport != "gloo" else [(None, None)] * n
    rendezvous = f"file://{scratch}/rendezvous-{n}" if transport == "gloo" else None
    size = n_experts // n
    processes = [ctx.Process(target=expert_process, daemon=True,
                             args=(p, range(p * size, (p + 1) * size), model, theirs, transport == "pipe-wire",
                                   rendezvous, n + 1))
                 for p, (_, theirs) in enumerate(pipes)]
    for process in processes:
        process.start()
    if transport != "gloo":
        for ours, _ in pipes:
            assert ours.recv_bytes() == b"ready"
        return PipeLink([ours for ours, _ in pipes], spin, transport == "pipe-wire"), processes
    dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=n + 1)
    return GlooLink(n), processes


def tokens_per_s(engine: LLM, split: SplitExperts, prompts: list, is_split: bool, engine_threads: int) -> float:
    """Generated tokens/s of the prompts run together to 64 new tokens each, as `tools/bench_cluster.py` measures
    the cluster: on the engine (every torch thread) or split (one thread in each process, as in each actor)."""
    split.split = is_split
    torch.set_num_threads(1 if is_split else engine_threads)
    split.link.set_spin(is_split)
    try:
        start = time.perf_counter()
        llm = split.llm if is_split else engine
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    finally:
        split.split = False
        split.link.set_spin(False)


def measure(engine: LLM, split: SplitExperts, rounds: int, workload, engine_threads: int) -> list[tuple[float, float]]:
    """Per round, new prompts from `workload()`: (engine tokens/s, split tokens/s)."""
    results = []
    for _ in range(rounds):
        prompts = workload()
        results.append(tuple(tokens_per_s(engine, split, prompts, is_split, engine_threads)
                             for is_split in (False, True)))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="examples:\n" + "\n".join(
        __doc__.split("\n\n")[1].splitlines()), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--helpers", type=int, nargs="+", default=[1, 4],
                    help="processes holding the routed experts, each a contiguous block (must divide the experts)")
    ap.add_argument("--batch", type=int, choices=(1, 32), nargs="+", default=[1, 32],
                    help="the workloads of tools/bench_cluster.py: one prompt, or 32 prompts at once")
    ap.add_argument("--transport", choices=("pipe", "pipe-wire", "gloo"), nargs="+", default=["pipe"],
                    help="pipe: raw arrays over a Unix pipe; pipe-wire: the cluster's wire format over the pipe; "
                         "gloo: the wire format over the cluster's own gloo sends and receives")
    ap.add_argument("--spin", action="store_true", help="pipes only: wait by polling in a loop instead of blocking")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if args.spin and "gloo" in args.transport:
        ap.error("--spin needs --transport pipe: a gloo receive cannot be polled")
    engine_threads = torch.get_num_threads()
    tokenizer, rng = Tokenizer(args.model), random.Random(0)
    engine = LLM(args.model)
    n_experts = engine.model.args.n_routed_experts
    for n in args.helpers:
        if n < 1 or n_experts % n:
            ap.error(f"--helpers {n}: must divide the model's {n_experts} routed experts")
    split = SplitExperts(LLM(args.model))
    steal = StealMeter()
    for llm in (engine, split.llm):  # first calls' costs, before anything is timed
        llm.generate(corpus_prompts(tokenizer, 1, rng, 32, 32), SamplingParams(max_tokens=8, temperature=0))
    print(f"| workload | expert processes | transport, wait | engine tokens/s ({engine_threads} threads) "
          "| split tokens/s | split / engine |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for transport in args.transport:
            for n in args.helpers:
                link, processes = start_processes(args.model, n, n_experts, transport, args.spin, scratch)
                try:
                    split.use(link, n)
                    check_same_tokens(engine, split, corpus_prompts(tokenizer, 4, rng, 16, 96))
                    for batch in args.batch:
                        print(f"{transport}, {n} expert processes, batch {batch}...", end="\r", file=sys.stderr,
                              flush=True)
                        workload = (lambda: corpus_prompts(tokenizer, 1, rng, 32, 32)) if batch == 1 else \
                            (lambda: corpus_prompts(tokenizer, 32, rng, 16, 96))
                        runs = measure(engine, split, args.rounds, workload, engine_threads)
                        ratios = [s / e for e, s in runs]
                        wait = "spin" if args.spin else "block"
                        print(f"| {'batch 1' if batch == 1 else '32 concurrent'} | {n} | {transport}, {wait} | "
                              f"{statistics.median(e for e, _ in runs):.0f} | "
                              f"{statistics.median(s for _, s in runs):.0f} | "
                              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
                finally:
                    link.close()
                    for p in processes:
                        p.join()
    print(f"\nmedians over {args.rounds} rounds (range of the ratio); {steal.report()}")


if __name__ == "__main__":
    main()
