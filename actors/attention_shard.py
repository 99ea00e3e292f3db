"""The attention-shard actor: embedding, attention, dense FFN, shared experts, gates, norms, LM head and MTP
module, with its own paged latent cache and engine; the routed experts live in the expert groups and are
reached through the configured transport (`collective.py` or `transport.py`). A `prefill` shard computes prompts
and hands each sequence, latent KV included, straight to its decode shard; a `decode` shard runs the
continuous-batching loop in a thread of its own."""
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import ray
import torch

from moeserve.cluster.config import ClusterConfig
from moeserve.cluster.engine import Engine, EngineConfig, PrefilledSequence, RequestOutput
from moeserve.cluster.sampling_params import SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels.args import ModelArgs
from moeserve.kernels.errors import InputError
from moeserve.kernels.load import DTYPES, load_model, resolve_device
from moeserve.topology.planner import Placement
from moeserve.topology.spec import TopologySpec

from . import collective, kv_transfer, tracing
from .transport import ExpertRouter, RayExpertTransport, Recovery, payload_dtype

STEP_EVENT_EVERY = 8  # decode steps between step events on a request's span


@dataclass
class Increment:
    """A decode step's new tokens for one running request, as a decode shard sends them to its client: the
    whole completion (and its log-probabilities) travels once, in the final RequestOutput, not every step."""
    new_token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]


@dataclass
class HandedOff:
    """A prefill shard's last word on a request: its prompt is computed and the sequence, latent KV included, has
    gone straight to the decode shard the client picked; the client gets the first token (and its
    log-probabilities) from here."""
    token_ids: list[int]                 # prompt + the first generated token
    num_prompt_tokens: int
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    kv_bytes: int


def increment_of(out: RequestOutput) -> Increment:
    new = out.new_token_ids
    return Increment(new, out.logprobs[len(out.logprobs) - len(new):] if out.logprobs else [],
                     out.top_logprobs[len(out.top_logprobs) - len(new):] if out.top_logprobs else [])


class AttentionShardWorker:
    def __init__(self, role: str, shard_id: int, config: dict, phy2log: dict[int, list[int]], groups: list,
                 src_gpu: int, prefill_shards: list = ()):
        cfg = ClusterConfig(**config)
        torch.set_num_threads(cfg.ray.threads_per_actor)
        self.role, self.shard_id, self.src_gpu = role, shard_id, src_gpu
        spec = cfg.topology_spec
        args = ModelArgs.from_file(cfg.model)
        self.spec, self.n_expert_groups = spec, args.n_expert_groups
        compute = DTYPES[cfg.dtype]
        failures = cfg.failures
        # a step whose experts fail waits for the cluster's recovery only where the cluster recovers
        self.recovery = Recovery(max(5.0, 4 * failures.health_interval_s) if failures.restart else 0.0,
                                 failures.recover_timeout_s)
        self.rendezvous_timeout_s = failures.rendezvous_timeout_s
        combine = compute if cfg.combine_dtype == "auto" else payload_dtype(cfg.combine_dtype, compute)
        self.router = ExpertRouter(self._placements(phy2log), spec, src_gpu, args.dim, cfg.max_nodes,
                                   payload_dtype(cfg.dispatch_dtype, compute), combine, self.recovery)
        self.links = [collective.ShardLink(spec, src_gpu, len(groups), failures.collective_timeout_s)
                      for _ in range(cfg.engine.micro_batches)] \
            if cfg.transport == "collective" else []
        self.groups = list(groups)  # the ray transport's, changed in place when the expert groups are scaled
        self.phy2log = phy2log      # the placement planned against (with router.version)
        self.told: Optional[tuple[int, dict[int, list[int]]]] = None  # the last set_placement's, switched to at
                                                                       # the next step
        if self.links:
            def make_experts(layer):
                return collective.CollectiveExpertTransport(layer, self.router, self.links)
        else:
            def make_experts(layer):
                return RayExpertTransport(layer, self.router, self.groups)
        # on a GPU Ray gave this shard, else the CPU
        self.device = resolve_device(cfg.devices.attention) if ray.get_gpu_ids() else torch.device("cpu")
        fp8 = self.device.type == "cuda" if cfg.fp8_resident is None else cfg.fp8_resident
        model = load_model(cfg.model, dtype=DTYPES[cfg.dtype], with_mtp=cfg.mtp, make_experts=make_experts,
                           device=self.device, fp8_resident=fp8)
        tokenizer = Tokenizer(cfg.model) if Tokenizer.exists(cfg.model) else None
        settings = cfg.engine.model_dump()
        prefill_budget = settings.pop("prefill_max_num_batched_tokens")
        if role == "prefill":
            settings["max_num_batched_tokens"] = prefill_budget
        self.engine = Engine(model, EngineConfig(mtp=cfg.mtp, **settings), tokenizer)
        self.kv_transfer = cfg.kv_transfer
        self.kv_sender = kv_transfer.NcclSender() if role == "prefill" else None
        self.kv_receiver = kv_transfer.NcclReceiver(list(prefill_shards)) if role == "decode" else None
        # The engine belongs to the loop thread. Other threads (actor calls: add, submit, abort, poll) never wait
        # for a step: they hand engine changes over through the inbox and take outputs from the outboxes, under
        # `mail`, held only for that. (Behind one lock held through whole steps, a hand-off waits several steps
        # to join the batch, and the batch runs smaller for it.)
        self.decode_shards: list = []            # a prefill shard's: where it hands its sequences (set_decode_shards)
        self.handoffs: dict[str, tuple] = {}     # request -> (decode shard, increments, trace), until handed off
        self.lock = threading.Lock()             # the engine's: the loop holds it through a step, stats() to read
        self.mail = threading.Condition()        # the inbox, the outboxes and `requests`
        self.inbox: list[tuple[str, Callable[[], None]]] = []   # (request, engine change), applied between steps
        self.requests: dict[str, str] = {}       # request -> the client its outputs go to (until it ends)
        self.streaming: set[str] = set()         # running requests whose clients take each step's tokens (loop's)
        self.outboxes: dict[str, list[tuple[int, str, object]]] = {}  # client -> (number, request, output)
        self.last_heard: dict[str, float] = {}   # client -> when it last called (monotonic seconds)
        self.polling: dict[str, int] = {}        # client -> its polls waiting here now
        self.client_timeout_s = cfg.ray.client_timeout_s
        self.sequence = 0
        self.kv_bytes_received = 0
        self.kv_bytes_sent = 0
        self.step_s = 0.0
        self.longest_step_s = 0.0                # since the last take_longest_step()
        self.controller_notes: dict = {}         # the controller's history, kept for a restarted controller
        self.spans: dict = {}
        self.steps_traced = 0
        self.stopped = False
        # a shard Ray restarted after it died takes requests once the cluster has brought it up to the live
        # placement and process group (`resume`); the first incarnation, at once
        self.serving = threading.Event()
        self.incarnation = os.urandom(8).hex()   # a client that sees it change knows the shard lost its requests
        self.serve_wait_s = failures.recover_timeout_s
        # asked once: the answer holds for this process's life, and each asking reads the GCS's actor table (the
        # controller's health check asks `ready` every health_interval_s)
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if not self.restarted:
            self.serving.set()
        threading.Thread(target=self._loop, daemon=True, name=f"{role}-{shard_id}").start()

    def _placements(self, phy2log: dict[int, list[int]]) -> dict[int, Placement]:
        slots_per_gpu = len(next(iter(phy2log.values()))) // self.spec.num_gpus
        return {layer: Placement(torch.tensor(p), slots_per_gpu, self.spec.gpus_per_node, self.n_expert_groups)
                for layer, p in phy2log.items()}

    def set_placement(self, version: int, phy2log: dict[int, list[int]]) -> None:
        """Plan dispatches against placement `version` from the next step on (the expert groups hold it already);
        `placement_version` tells when the switch is made."""
        placements = self._placements(phy2log)

        def change():
            self.router.switch(version, placements)
            self.phy2log = phy2log
        with self.mail:
            self.inbox.append(("", change))
            self.told = (version, phy2log)
            self.mail.notify_all()

    def set_layout(self, version: int, phy2log: dict[int, list[int]], spec: dict, groups: list) -> None:
        """Another number of expert groups (`spec`'s GPU slots, `groups` their actors) and placement `version`
        over them, from the next MoE layer on; only while quiesced (`Cluster.scale_experts`), so no layer in
        flight sees the change."""
        if not self.recovery.recovering:
            raise RuntimeError("set_layout while MoE layers may be in flight: quiesce first")
        self.spec = TopologySpec(**spec)
        self.router.spec = self.spec
        self.router.switch(version, self._placements(phy2log))
        self.phy2log = phy2log
        for link in self.links:
            link.spec, link.n_groups = self.spec, self.spec.num_gpus
        self.groups[:] = groups

    def layout(self) -> tuple[int, dict[int, list[int]], dict]:
        """The placement version planned against (or told, when the next step switches to a newer one), its experts
        per slot and the node count (a restarted controller's view of the cluster)."""
        version, phy2log = self.router.version, self.phy2log
        if self.told is not None and self.told[0] > version:
            version, phy2log = self.told
        return version, phy2log, self.spec.model_dump()

    def placement_version(self) -> int:
        return self.router.version

    def remember(self, notes: dict) -> None:
        """Keep the controller's history (its recoveries, the processes they brought back), which a controller
        Ray restarted reads back with `notes` (Controller._rebuild)."""
        self.controller_notes = notes

    def notes(self) -> dict:
        return self.controller_notes

    def take_longest_step(self) -> float:
        """The longest step since the last call, in seconds (a benchmark's view of a stall)."""
        longest, self.longest_step_s = self.longest_step_s, 0.0
        return longest

    def set_decode_shards(self, decode_shards: list) -> None:
        self.decode_shards = decode_shards

    def check_kv_transfer(self) -> None:
        if self.kv_transfer == "nccl":
            kv_transfer.check_nccl()

    def send_kv(self, request_id: str, group_name: str) -> None:
        """Send a parked latent to the decode shard pulling it (prefill role, NCCL transfer)."""
        self.kv_sender.send(request_id, group_name)

    def join_collective(self, init_method: str, world_size: int, rank: int, pools: dict, spin_s: float = 0.0) -> None:
        """Enter the process group of the collective transport (with every other member at once; again after a
        recovery); `pools`: shard rank -> (rank of its pool's first expert group, its GPU slot); `spin_s`: how long
        a receive over sockets polls (see collective.join)."""
        subgroups = collective.join(init_method, rank, world_size, pools, self.links[0].n_groups, len(self.links),
                                    self.rendezvous_timeout_s, spin_s)
        for m, link in enumerate(self.links):
            link.group, link.first_rank = subgroups[rank, m], pools[rank][0]
            link.outbox.pending.clear()

    # ---- recovery: the cluster's calls while it brings a lost actor back -----------------------------------

    def quiesce(self) -> bool:
        """Hold every new MoE layer back until `resume`; True once none is in flight. (The process group is then
        formed anew: leaving the old one closes its connections, which ends the expert groups' threads that
        served this shard's links.)"""
        return self.recovery.quiesce()

    def resume(self) -> None:
        """Recovery done: held and failed layers (re)send, and a restarted shard starts taking requests."""
        self.recovery.resume()
        self.serving.set()

    def _wait_serving(self) -> None:
        if not self.serving.wait(self.serve_wait_s):
            raise RuntimeError(f"{self.role} shard {self.shard_id} was restarted and not brought back within "
                               f"{self.serve_wait_s:g} s")

    def ready(self) -> dict:
        context = ray.get_runtime_context()
        return {"role": self.role, "shard": self.shard_id, "gpu_slot": self.src_gpu, "pid": os.getpid(),
                "host": socket.gethostname(), "ray_node": context.get_node_id(),
                "restarted": self.restarted, "nccl_ib_hca": os.environ.get("NCCL_IB_HCA"),
                "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "device": str(self.device)}

    # ---- requests in ----------------------------------------------------------------------------------------

    def add(self, request_id: str, tokens: list[int], params: SamplingParams, trace: dict | None = None,
            client: str = "", decode_shard: int = 0, increments: bool = True) -> None:
        """Queue a prompt (prefill role: once computed, the sequence goes straight to decode shard
        `decode_shard`, which sends `client` each step's tokens, or with `increments` False the final output
        alone); `client` polls here for the first token. A request that can never be served raises InputError."""
        self.engine.check(tokens, params)  # reads only the engine's fixed settings: safe beside a step
        if self.role == "prefill" and not 0 <= decode_shard < len(self.decode_shards):
            raise InputError(f"decode shard {decode_shard} does not exist (there are {len(self.decode_shards)})")

        def change():
            self.engine.add_request(tokens, params, request_id=request_id)
            self.handoffs[request_id] = (decode_shard, increments, trace)
            self._open_span(request_id, "prefill", trace, prompt_tokens=len(tokens))
        self._hand_over(request_id, client, change)

    def add_many(self, requests: list[tuple]) -> list[Exception | None]:
        """`add` for a client's requests of the same moment, each (request_id, tokens, params, trace, client,
        decode_shard, increments): they share a prefill step. Returns each one's error, or None."""
        self._wait_serving()
        return self._all_at_once(self.add, requests)

    def submit_many(self, requests: list[tuple]) -> list[Exception | None]:
        """`submit` for hand-offs of the same moment (a prefill shard's step), each (pre, trace, source, client,
        increments): they join the same decode step. A request refused here gets its error in its client's
        outbox (the client waits on this shard for it); also returns each one's error, or None."""
        self._wait_serving()
        pulled = [(self._attached(pre, source), trace, source, *rest) for pre, trace, source, *rest in requests]
        errors = self._all_at_once(self.submit, pulled)  # NCCL pulls done first, outside `mail`
        with self.mail:
            for (pre, _, _, client, _), error in zip(pulled, errors):
                if error is not None:
                    self.requests.setdefault(pre.request_id, client)
                    self._send(pre.request_id, error, last=True)
            self.mail.notify_all()
        return errors

    def _all_at_once(self, call: Callable, requests: list[tuple]) -> list[Exception | None]:
        """call(*request) for each, under `mail`: the loop takes the inbox under it, so not before the last is in."""
        errors = []
        with self.mail:
            for request in requests:
                try:
                    call(*request)
                    errors.append(None)
                except InputError as e:
                    errors.append(e)
        return errors

    def _attached(self, pre: PrefilledSequence, source: int) -> PrefilledSequence:
        """The sequence with its latent here: if it stayed on the prefill shard's GPU, pulled over NCCL."""
        return self.kv_receiver.attach(pre, source, self.shard_id) if pre.latent.is_meta else pre

    def submit(self, pre: PrefilledSequence, trace: dict | None = None, source: int = 0, client: str = "",
               increments: bool = True) -> None:
        """Continue a prefilled sequence here (decode role); `source` is the prefill shard that computed it,
        `client` polls for its outputs: each step's new tokens (`increments`), or the final output alone."""
        pre = self._attached(pre, source)

        def change():
            self.engine.add_prefilled(pre)
            if increments:
                self.streaming.add(pre.request_id)
            self._open_span(pre.request_id, "decode", trace, kv_bytes=pre.kv_bytes)
            self.kv_bytes_received += pre.kv_bytes
        self._hand_over(pre.request_id, client, change)

    def _hand_over(self, request_id: str, client: str, change: Callable[[], None]) -> None:
        """Register the request's client and leave `change` for the loop, which makes it before its next step."""
        with self.mail:
            if request_id in self.requests:
                raise InputError(f"request id {request_id!r} is already in use on this shard")
            self.requests[request_id] = client
            self.last_heard[client] = time.monotonic()
            self.inbox.append((request_id, change))
            self.mail.notify_all()

    # ---- results out ----------------------------------------------------------------------------------------

    def poll(self, client: str, acked: int, timeout: float = 1.0) -> tuple[str, list[tuple[int, str, object]]]:
        """Every output for `client`'s requests after sequence number `acked`, as (number, request, output):
        per step one per running request (decode), or each request's hand-off or final output (prefill);
        waits up to `timeout` for the first. Outputs up to `acked` are dropped: a reply lost on the way (the
        caller gave up waiting) is sent again by the next poll. One call per shard and client brings the whole
        batch, so the Ray calls per step do not grow with the batch. Returned with this process's incarnation: a
        shard Ray restarted has none of its predecessor's requests, and numbers its outputs from 1 again."""
        with self.mail:
            self.last_heard[client] = time.monotonic()
            outbox = [entry for entry in self.outboxes.get(client, []) if entry[0] > acked]
            self.outboxes[client] = outbox
            self.polling[client] = self.polling.get(client, 0) + 1  # a client waiting in a poll is not silent
            try:
                self.mail.wait_for(lambda: self.outboxes.get(client), timeout)
            finally:
                self.polling[client] -= 1
                self.last_heard[client] = time.monotonic()
            return self.incarnation, list(self.outboxes.get(client, []))

    def _send(self, request_id: str, item, last: bool) -> None:
        """Queue `item` for the request's client (the caller holds `mail`); `last`: the request ends here
        (finished, handed off, failed)."""
        client = self.requests.get(request_id)
        if client is not None:
            self.sequence += 1
            self.outboxes.setdefault(client, []).append((self.sequence, request_id, item))
            if last:
                del self.requests[request_id]

    def _forget_silent_clients(self) -> None:
        """A client that has stopped polling is gone (its process died; a live one polls every second or so while
        it has requests here): abort its requests, which would otherwise run to their end into an outbox nobody
        reads, and keep only one error per request for it. The caller holds `mail`."""
        now = time.monotonic()
        for client in [c for c, t in self.last_heard.items()
                       if now - t > self.client_timeout_s and not self.polling.get(c)]:
            del self.last_heard[client]
            self.outboxes.pop(client, None)
            error = RuntimeError(f"{self.role} shard {self.shard_id}: aborted: this client had not polled for "
                                 f"{self.client_timeout_s:g} s (ray.client_timeout_s)")
            for request_id in [r for r, c in self.requests.items() if c == client]:
                self._send(request_id, error, last=True)
                self.inbox.append((request_id, self._aborting(request_id)))

    def _fail_all(self, error: Exception) -> list[tuple[str, object, bool]]:
        """A step failed: every request here gets the error (its client raises it) and is dropped, and the
        shard serves on; nothing waits for an answer that will not come."""
        message = f"{self.role} shard {self.shard_id}: {type(error).__name__}: {error}"
        with self.mail:
            request_ids = list(self.requests)
        for request_id in request_ids:
            self.engine.abort(request_id)
            self._close_span(request_id, "error")
        self.streaming.clear()
        self.handoffs.clear()
        return [(request_id, RuntimeError(message), True) for request_id in request_ids]

    def abort(self, request_id: str) -> None:
        """The client went away: free the sequence and its cache blocks (between two steps)."""
        with self.mail:
            self.requests.pop(request_id, None)
            self.inbox.append((request_id, self._aborting(request_id)))
            self.mail.notify_all()

    def _aborting(self, request_id: str) -> Callable[[], None]:
        """The engine change that ends a request here: its sequence, cache blocks and parked latent freed."""
        def change():
            self.engine.abort(request_id)
            self.streaming.discard(request_id)
            self.handoffs.pop(request_id, None)
            if self.kv_sender is not None:
                self.kv_sender.drop(request_id)
            self._close_span(request_id, "aborted")
        return change

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

    def _loop(self) -> None:
        while True:
            with self.mail:
                self._forget_silent_clients()
                if not self.mail.wait_for(lambda: self.inbox or self.stopped or self.engine.has_unfinished(),
                                          collective.PING_EVERY_S / 2):
                    for link in self.links:
                        link.ping_if_idle()
                    continue
                inbox, self.inbox = self.inbox, []
                stopped = self.stopped
            if stopped:
                for link in self.links:
                    link.stop()
                return
            with self.lock:
                outputs = self._apply(inbox)
                try:
                    if self.engine.has_unfinished():
                        outputs += self._step()
                except Exception as e:  # noqa: BLE001  (reported to every client, then the loop goes on)
                    traceback.print_exc()
                    outputs += self._fail_all(e)
            with self.mail:
                for request_id, item, last in outputs:
                    self._send(request_id, item, last)
                if outputs:  # only clients' polls wait on mail: a step with nothing for them wakes none
                    self.mail.notify_all()

    def _apply(self, inbox: list[tuple[str, Callable[[], None]]]) -> list[tuple[str, object, bool]]:
        """Make the engine changes handed over since the last step; one that fails ends its request with the error."""
        failed = []
        for request_id, change in inbox:
            try:
                change()
            except Exception as e:  # noqa: BLE001  (the request's client gets it)
                failed.append((request_id, e, True))
        return failed

    def _step(self) -> list[tuple[str, object, bool]]:
        """One engine step; returns what goes to the clients, as (request, output, last)."""
        start = time.perf_counter()
        d0, c0 = self.router.counters.dispatch_s, self.router.counters.combine_s
        # Clients get token ids each step, text at the end; when no request here streams (a prefill shard's never
        # do), only finished requests' outputs are built at all.
        outputs = self.engine.step(text=False, finished_only=not (self.streaming or self.spans))
        took = time.perf_counter() - start
        self.step_s += took
        self.longest_step_s = max(self.longest_step_s, took)
        if self.spans:
            self._trace_step(outputs, self.router.counters.dispatch_s - d0, self.router.counters.combine_s - c0)
        sent = []
        for out in outputs:
            if out.finished:
                self.handoffs.pop(out.request_id, None)  # finished at its first token: nothing to hand off
                failed = out.error and RuntimeError(f"{self.role} shard {self.shard_id}: request failed: {out.error}")
                sent.append((out.request_id, failed or out, True))
                self.streaming.discard(out.request_id)
            elif out.request_id in self.streaming:
                sent.append((out.request_id, increment_of(out), False))
        if self.role == "prefill":
            self._hand_off(sent)
        return sent

    def _hand_off(self, sent: list) -> None:
        """Send each sequence whose prompt is computed straight to its decode shard (one call per shard for the
        step's sequences); its client gets a HandedOff notice, without the latent."""
        batches: dict[int, list] = {}
        ready = self.engine.prefilled()
        with self.mail:
            clients = {seq.request_id: self.requests.get(seq.request_id, "") for seq in ready}
        for seq in ready:
            pre = self.engine.take_prefilled(seq)
            rid = pre.request_id
            decode, increments, trace = self.handoffs.pop(rid)
            self.kv_bytes_sent += pre.kv_bytes
            notice = HandedOff(list(pre.token_ids), pre.num_prompt_tokens, list(pre.logprobs),
                               list(pre.top_logprobs), pre.kv_bytes)
            if self.kv_transfer == "nccl":
                pre = self.kv_sender.detach(pre)
            self._close_span(rid, "handed_off")
            batches.setdefault(decode, []).append((pre, trace, self.shard_id, clients[rid], increments))
            sent.append((rid, notice, True))
        for decode, batch in batches.items():
            self.decode_shards[decode].submit_many.remote(batch)

    def stop(self) -> None:
        with self.mail:
            self.stopped = True
            self.mail.notify_all()

    def stats(self) -> dict:
        with self.lock:
            return {**self.ready(), "engine": self.engine.stats(), "links": self.router.counters.as_dict(),
                    "step_s": self.step_s, "placement_version": self.router.version,
                    "tokens_per_expert": self.engine.stats()["expert_load"],
                    "kv_bytes_sent": self.kv_bytes_sent, "kv_bytes_received": self.kv_bytes_received}
