"""The attention-shard actor: embedding, attention, dense FFN, shared experts, gates, norms, LM head and MTP
module, with its own paged latent cache and engine; the routed experts live in the expert groups and are
reached through `RayExpertTransport`. A `prefill` shard computes prompts and hands each sequence's latent KV
to a decode shard; a `decode` shard runs the continuous-batching loop in a thread of its own."""
import os
import socket
import threading
import time

import ray
import torch

from moeserve.cluster.config import ClusterConfig
from moeserve.cluster.engine import Engine, EngineConfig, PrefilledSequence, RequestOutput
from moeserve.cluster.sampling_params import SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels.args import ModelArgs
from moeserve.kernels.load import load_model
from moeserve.topology.planner import Placement

from . import tracing
from .transport import ExpertRouter, RayExpertTransport

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STEP_EVENT_EVERY = 8  # decode steps between step events on a request's span


class AttentionShardWorker:
    def __init__(self, role: str, shard_id: int, config: dict, phy2log: dict[int, list[int]], groups: list,
                 src_gpu: int):
        cfg = ClusterConfig(**config)
        torch.set_num_threads(cfg.ray.threads_per_actor)
        self.role, self.shard_id, self.src_gpu = role, shard_id, src_gpu
        spec = cfg.topology_spec
        slots_per_gpu = len(next(iter(phy2log.values()))) // spec.num_gpus
        args = ModelArgs.from_file(cfg.model)
        placements = {layer: Placement(torch.tensor(p), slots_per_gpu, spec.gpus_per_node, args.n_expert_groups)
                      for layer, p in phy2log.items()}
        self.router = ExpertRouter(placements, groups, spec, src_gpu, args.dim, cfg.max_nodes, cfg.dispatch_dtype,
                                   cfg.combine_dtype)
        model = load_model(cfg.model, dtype=_DTYPES[cfg.dtype], with_mtp=cfg.mtp,
                           make_experts=lambda layer: RayExpertTransport(layer, self.router))
        tokenizer = Tokenizer(cfg.model) if Tokenizer.exists(cfg.model) else None
        self.engine = Engine(model, EngineConfig(mtp=cfg.mtp, **cfg.engine.model_dump()), tokenizer)
        self.lock = threading.Condition()
        self.updates: dict[str, list] = {}       # request -> outputs not yet polled (decode), or its hand-off
        self.kv_bytes_received = 0
        self.kv_bytes_sent = 0
        self.step_s = 0.0
        self.spans: dict = {}
        self.steps_traced = 0
        self.stopped = False
        threading.Thread(target=self._loop, daemon=True, name=f"{role}-{shard_id}").start()

    def ready(self) -> dict:
        return {"role": self.role, "shard": self.shard_id, "gpu_slot": self.src_gpu, "pid": os.getpid(),
                "host": socket.gethostname(), "ray_node": ray.get_runtime_context().get_node_id()}

    # ---- requests in ----------------------------------------------------------------------------------------

    def add(self, request_id: str, tokens: list[int], params: SamplingParams, trace: dict | None = None) -> None:
        """Queue a prompt (prefill role: it is handed off once computed)."""
        with self.lock:
            self.engine.add_request(tokens, params, request_id=request_id)
            self.updates[request_id] = []
            self._open_span(request_id, "prefill", trace, prompt_tokens=len(tokens))
            self.lock.notify_all()

    def submit(self, pre: PrefilledSequence, trace: dict | None = None) -> None:
        """Continue a prefilled sequence here (decode role)."""
        with self.lock:
            self.engine.add_prefilled(pre)
            self._open_span(pre.request_id, "decode", trace, kv_bytes=pre.kv_bytes)
            self.kv_bytes_received += pre.kv_bytes
            self.updates[pre.request_id] = []
            self.lock.notify_all()

    def prefill(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list:
        """Compute the prompts; for each a PrefilledSequence, or its final RequestOutput if it already finished
        (first token a stop token, or max_tokens 1)."""
        for rid, tokens, params in requests:
            self.add(rid, tokens, params)
        return [self.poll(rid, timeout=None)[-1] for rid, _, _ in requests]

    # ---- results out ----------------------------------------------------------------------------------------

    def poll(self, request_id: str, timeout: float | None = 1.0) -> list:
        """Outputs since the last poll (waits up to `timeout` for the first); [] if none came."""
        with self.lock:
            self.lock.wait_for(lambda: self.updates.get(request_id) or request_id not in self.updates, timeout)
            items = self.updates.get(request_id, [])
            if items and (isinstance(items[-1], PrefilledSequence) or items[-1].finished):
                self.updates.pop(request_id)
            elif items:
                self.updates[request_id] = []
            return items

    def wait(self, request_id: str) -> RequestOutput:
        """The finished output of a request (decode role)."""
        while True:
            items = self.poll(request_id, timeout=None)
            if items and items[-1].finished:
                return items[-1]
            if not items:
                raise KeyError(f"unknown request {request_id!r}")

    def abort(self, request_id: str) -> None:
        """The client went away: free the sequence and its cache blocks now."""
        with self.lock:
            self.engine.abort(request_id)
            self.updates.pop(request_id, None)
            self._close_span(request_id, "aborted")
            self.lock.notify_all()

    # ---- tracing: one span per request on this shard, sampled step events with dispatch/combine time ----

    def _open_span(self, request_id: str, name: str, carrier: dict | None, **attributes) -> None:
        if carrier:
            span = tracing.tracer().start_span(name, context=tracing.context_of(carrier))
            for key, value in attributes.items():
                span.set_attribute(f"moeserve.{key}", value)
            self.spans[request_id] = span

    def _close_span(self, request_id: str, outcome: str) -> None:
        span = self.spans.pop(request_id, None)
        if span is not None:
            span.set_attribute("moeserve.outcome", outcome)
            span.end()

    def _trace_step(self, outputs: list, dispatch_s: float, combine_s: float) -> None:
        self.steps_traced += 1
        sampled = self.steps_traced % STEP_EVENT_EVERY == 0
        for out in outputs:
            span = self.spans.get(out.request_id)
            if span is None:
                continue
            if sampled:
                span.add_event("step", {"tokens": len(out.new_token_ids), "dispatch_ms": dispatch_s * 1e3,
                                        "combine_ms": combine_s * 1e3})
            if out.finished:
                self._close_span(out.request_id, out.finish_reason)

    def load(self) -> int:
        return len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)

    def _loop(self) -> None:
        while not self.stopped:
            with self.lock:
                self.lock.wait_for(lambda: self.engine.has_unfinished() or self.stopped)
                if self.stopped:
                    return
                start = time.perf_counter()
                d0, c0 = self.router.counters.dispatch_s, self.router.counters.combine_s
                outputs = self.engine.step()
                self.step_s += time.perf_counter() - start
                if self.spans:
                    self._trace_step(outputs, self.router.counters.dispatch_s - d0, self.router.counters.combine_s - c0)
                for out in outputs:
                    if out.request_id in self.updates and (self.role == "decode" or out.finished):
                        self.updates[out.request_id].append(out)
                if self.role == "prefill":
                    for seq in self.engine.prefilled():
                        pre = self.engine.take_prefilled(seq)
                        self.kv_bytes_sent += pre.kv_bytes
                        self._close_span(pre.request_id, "handed_off")
                        if pre.request_id in self.updates:
                            self.updates[pre.request_id].append(pre)
                self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()

    def stats(self) -> dict:
        with self.lock:
            return {**self.ready(), "engine": self.engine.stats(), "links": self.router.counters.as_dict(),
                    "step_s": self.step_s,
                    "tokens_per_expert": self.engine.stats()["expert_load"],
                    "kv_bytes_sent": self.kv_bytes_sent, "kv_bytes_received": self.kv_bytes_received}
