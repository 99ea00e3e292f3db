"""The data plane's shared half, and the `ray` transport. `ExpertRouter` turns one MoE layer's routing into the
dispatch planner's routes and the wire messages that carry them (`wire.py`), and counts the bytes each moves
per link class and plane; `serve_dispatch` is what an expert group does with a message, over any transport.
Each transport file holds both halves of one transport: the shard's send side and the expert group's serve
side (`RayExpertTransport` and `RayGroupServer` here, the collective ones in `collective.py`).

A layer whose messages fail (a group died: Ray says so, or gloo finds its connection closed, or a relay answers
that a peer of its node did) waits while the cluster recovers (`Recovery`), then dispatches again: the step goes on
as if nothing had happened. The cluster's recovery starts by waiting for every layer in flight to finish or fail.

Per step and layer: the planner picks a replica for each (token, expert); tokens for experts on the shard's
own node go straight to those groups; for every other node the tokens cross once, as one message to the
relay group (same in-node index, the shard's plane), which fans them out inside the node and returns one
summed row per token. Combine waits for the replies and adds them up in route order.
"""
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Generator, Optional

import numpy as np
import ray
import torch

from moeserve.kernels.fp8 import act_quant
from moeserve.topology.planner import Placement, Route, plan_routes, relay_choice
from moeserve.topology.spec import TopologySpec

from . import wire


@dataclass
class LinkCounters:
    """Bytes moved, measured from the tensors of the messages sent and received, and as the planner predicted."""
    inter_node: int = 0
    intra_node: int = 0
    per_plane: list = field(default_factory=list)
    planned_inter_node: int = 0
    planned_intra_node: int = 0
    planned_per_plane: list = field(default_factory=list)
    crossings: int = 0
    naive_crossings: int = 0
    dispatch_s: float = 0.0            # planning, quantising and sending the messages
    send_s: float = 0.0                # of which encoding the messages and handing them to the transport
    combine_s: float = 0.0             # waiting for the experts' replies and summing them

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Sent:
    """One route of a dispatch as it went out: the plan's route and its message."""
    route: Route
    message: wire.Dispatch


@dataclass
class DispatchHandle:
    """What combine needs of a dispatch: the batch's shape, the routes as sent, the micro-batch whose channel
    carries their replies, the transport's own pending state (Ray's object refs; nothing for messages), and what
    it takes to send the layer again after a recovery: its inputs, the recovery epoch it was sent in, and the
    error its sending raised, if it did."""
    tokens: int
    dtype: torch.dtype
    micro_batch: int
    sent: list[Sent]
    device: torch.device = torch.device("cpu")  # where the layer's tokens are (the combined rows go back there)
    pending: Any = None
    inputs: tuple = ()
    epoch: int = 0
    error: Optional[Exception] = None


def peer_died(error: Exception) -> bool:
    """Whether a transport error says a peer's process is gone: Ray's word for an actor, or gloo's for a connection
    (directly, or in a relay's answer)."""
    text = str(error)
    return isinstance(error, ray.exceptions.RayActorError) or "closed by peer" in text or "reset by peer" in text


# A layer that waits for a recovery yields to its step's other micro-batches this often
POLL_S = 0.01


class Recovery:
    """A shard's side of the cluster's recovery from a lost actor. Layers `enter` before they dispatch and `leave`
    once combined or failed; `quiesce` (the cluster's first move) holds new layers back and waits until none is in
    flight; `resume` (its last, once the lost actor is back and the shard's channels are new) lets them go and
    starts a new epoch. A layer that failed waits in `await_recovery` for the epoch to change, and raises its error
    if no recovery begins within `grace_s` (an error that no dead actor explains) or ends within `timeout_s`.

    The step's other micro-batches run on the same thread (model.by_turns) and may have layers in flight, which
    the recovery waits for: a failed layer waits in turns of POLL_S, yielding between them so that they finish or
    fail."""

    def __init__(self, grace_s: float, timeout_s: float):
        self.grace_s, self.timeout_s = grace_s, timeout_s
        self.cond = threading.Condition()
        self.epoch = 0
        self.recovering = False
        self.in_flight = 0

    def enter(self) -> int:
        with self.cond:
            if not self.cond.wait_for(lambda: not self.recovering, self.timeout_s):
                raise TimeoutError(f"the cluster did not recover within {self.timeout_s:g} s")
            self.in_flight += 1
            return self.epoch

    def leave(self) -> None:
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def await_recovery(self, epoch: int, error: Exception) -> Generator[None, None, None]:
        """Wait for the recovery after `error`: up to `grace_s` for it to begin, or, where the error says a peer's
        process is gone (a restart and a recovery will come), as long as a recovery may take; yields every POLL_S."""
        grace = self.timeout_s if self.grace_s and peer_died(error) else self.grace_s
        failed, began = time.monotonic(), None
        while True:
            with self.cond:
                if self.cond.wait_for(lambda: self.epoch != epoch, POLL_S):
                    return
                now = time.monotonic()
                began = now if began is None and self.recovering else began
                if began is None and now - failed > grace:
                    raise error
                if began is not None and now - began > self.timeout_s:
                    raise TimeoutError(f"the cluster did not recover within {self.timeout_s:g} s") from error
            yield

    def quiesce(self) -> bool:
        """Hold new layers back; True once none is in flight (False if some still is after `timeout_s`)."""
        with self.cond:
            self.recovering = True
            return self.cond.wait_for(lambda: self.in_flight == 0, self.timeout_s)

    def resume(self) -> None:
        with self.cond:
            self.epoch += 1
            self.recovering = False
            self.cond.notify_all()


def payload_dtype(dispatch_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """What token rows travel in: "auto" is the experts' compute dtype (exact), else as named."""
    return {"auto": compute_dtype, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16,
            "float32": torch.float32}[dispatch_dtype]


def to_payload(x: torch.Tensor, dtype: torch.dtype) -> wire.Payload:
    if dtype == torch.float8_e4m3fn:
        q, scale = act_quant(x)
        return wire.Payload(q, scale)
    return wire.Payload(x.to(dtype))


class ExpertRouter:
    """What every MoE layer of one attention shard shares: the placement, its own GPU slot, the payload formats
    and the counters."""

    def __init__(self, placements: dict[int, Placement], spec: TopologySpec, src_gpu: int, hidden: int,
                 max_nodes: int, dispatch_dtype: torch.dtype, combine_dtype: torch.dtype, recovery: Recovery):
        self.placements, self.spec, self.src_gpu = placements, spec, src_gpu
        self.recovery = recovery
        self.version = 0               # the placement version every dispatch is planned against (see `switch`)
        self.hidden, self.max_nodes = hidden, max_nodes
        self.dispatch_dtype, self.combine_dtype = dispatch_dtype, combine_dtype
        self.counters = LinkCounters(per_plane=[0] * spec.planes, planned_per_plane=[0] * spec.planes)
        self.lock = threading.Lock()   # the shard's actor calls read the counters from threads of their own
        plane, relay_local, _ = relay_choice(spec, np.array([src_gpu % spec.gpus_per_node]))
        self.plane, self.relay_local = int(plane[0]), int(relay_local[0])  # of our sends
        self.row_bytes = (to_payload(torch.zeros(1, hidden), dispatch_dtype).nbytes,
                          hidden * torch.empty(0, dtype=combine_dtype).element_size())

    def dispatches(self, layer_id: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> list[Sent]:
        """The messages of one layer's dispatch, x [T, dim], indices/weights [T, topk]; counts the planned bytes.
        Messages are built in host memory (the planner reads the routing there): tensors on a GPU come over."""
        x, indices, weights = x.cpu(), indices.cpu(), weights.cpu()
        d_bytes, c_bytes = self.row_bytes
        version, placements = self.version, self.placements  # one version for the whole layer
        routes, planned = plan_routes(indices.numpy(), weights.float().numpy(), self.src_gpu, placements[layer_id],
                                      self.spec, self.max_nodes, d_bytes, c_bytes)
        payload = to_payload(x, self.dispatch_dtype)
        sent = []
        for route in routes:
            part = payload if len(route.rows) == x.shape[0] else payload.rows(torch.from_numpy(route.rows))
            work = {g: wire.Assignments(*(torch.from_numpy(a) for a in assignments))
                    for g, assignments in route.work.items()}
            sent.append(Sent(route, wire.Dispatch(layer_id, part, work, self.combine_dtype, route.relay, version)))
        with self.lock:
            c = self.counters
            c.naive_crossings += planned.naive_sends
            c.planned_inter_node += planned.inter_node
            c.planned_intra_node += planned.intra_node
            for p, b in enumerate(planned.bytes_per_plane):
                c.planned_per_plane[p] += b
            if self.relay_local != self.src_gpu % self.spec.gpus_per_node:
                # our plane is down: each remote-bound token first moves over NVLink to a GPU on a live plane
                c.intra_node += planned.remote_tokens * (d_bytes + c_bytes)
        return sent

    def switch(self, version: int, placements: dict[int, Placement]) -> None:
        """Plan every later dispatch against placement `version`. The shard calls this between two steps, so no
        step mixes versions."""
        self.placements, self.version = placements, version

    def count(self, sent: Sent, reply: wire.Reply) -> None:
        """Measured bytes of one route, both ways, from its message's tensors and its reply's."""
        moved = sent.message.payload.nbytes + reply.y.numel() * reply.y.element_size()
        G = self.spec.gpus_per_node
        with self.lock:
            c = self.counters
            c.intra_node += reply.forwarded
            if sent.route.target // G != self.src_gpu // G:
                c.inter_node += moved
                c.per_plane[self.plane] += moved
                c.crossings += len(sent.route.rows)
            elif sent.route.target != self.src_gpu:
                c.intra_node += moved

    def count_time(self, counter: str, start: float) -> None:
        with self.lock:
            setattr(self.counters, counter, getattr(self.counters, counter) + time.perf_counter() - start)

    def combined(self, handle: DispatchHandle, replies: list[wire.Reply]) -> torch.Tensor:
        """Sum the groups' replies, one per route, into [T, dim]; count what each moved."""
        for sent, reply in zip(handle.sent, replies):
            self.count(sent, reply)
        if len(handle.sent) == 1 and len(handle.sent[0].route.rows) == handle.tokens:  # one route had every token
            return replies[0].y.to(handle.device, handle.dtype)
        y = torch.zeros(handle.tokens, self.hidden, device="cpu")
        for sent, reply in zip(handle.sent, replies):
            y.index_add_(0, torch.from_numpy(sent.route.rows), reply.y.float())
        return y.to(handle.device, handle.dtype)


class ExpertTransport:
    """The shard's side of a transport for one MoE layer: `dispatch` sends the layer's routes, `combine` sums their
    replies; a failure on the way waits for the cluster's recovery and sends the layer again. A transport supplies
    `_send(sent, micro_batch) -> pending` and `_replies(handle) -> [Reply]` in route order."""

    def __init__(self, layer_id: int, router: ExpertRouter):
        self.layer_id, self.router = layer_id, router

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 micro_batch: int = 0) -> DispatchHandle:
        epoch = self.router.recovery.enter()
        start = time.perf_counter()
        handle = DispatchHandle(x.shape[0], x.dtype, micro_batch, [], x.device, inputs=(x, indices, weights),
                                epoch=epoch)
        try:
            handle.sent = self.router.dispatches(self.layer_id, x, indices, weights)
            sending = time.perf_counter()
            handle.pending = self._send(handle.sent, micro_batch)
            self.router.count_time("send_s", sending)
        except Exception as e:  # noqa: BLE001  (a lost peer: combine waits for the recovery and sends again)
            handle.error = e
        self.router.count_time("dispatch_s", start)
        return handle

    def combine(self, handle: DispatchHandle) -> Generator[None, None, torch.Tensor]:
        try:
            yield  # the tokens are with the experts: the step's other micro-batches run meanwhile
        except GeneratorExit:  # the step failed in another micro-batch: this layer is never combined
            self._abandon(handle)
            self.router.recovery.leave()
            raise
        while True:
            start = time.perf_counter()
            try:
                if handle.error is not None:
                    raise handle.error
                y = self.router.combined(handle, self._replies(handle))
                self.router.count_time("combine_s", start)
                return y
            except Exception as e:  # noqa: BLE001  (retried below, or raised if no recovery explains it)
                error = e
                self._abandon(handle)
            finally:
                self.router.recovery.leave()
            yield from self.router.recovery.await_recovery(handle.epoch, error)
            handle = self.dispatch(*handle.inputs, micro_batch=handle.micro_batch)

    def _send(self, sent: list[Sent], micro_batch: int) -> Any:
        raise NotImplementedError

    def _replies(self, handle: DispatchHandle) -> list[wire.Reply]:
        raise NotImplementedError

    def _abandon(self, handle: DispatchHandle) -> None:
        """Forget what a failed layer left pending."""


# ---- the expert group's side, for every transport -------------------------------------------------------------

def serve_dispatch(group_id: int, compute: Callable, message: wire.Dispatch, ask: Callable,
                   answer: Callable, relays_to: Collection[int] = ()) -> wire.Reply:
    """An expert group's answer to a dispatch: its own assignments computed here; as a relay, each other group's
    rows forwarded with ask(group, dispatch) and their partial sums collected with answer(handle). compute(layer,
    payload, assignments, version) -> [N, dim] float32, with the experts of placement `version`. Work for other
    groups comes only in a relay's message, and only for `relays_to` (the groups this one forwards the sender's
    tokens to); anything else is refused before a row is forwarded, since a message sent to a group that does not
    expect it from us would leave its reply unread."""
    others = sorted(set(message.work) - {group_id})
    if others and not message.relay:
        raise wire.WireError(f"a dispatch to group {group_id}, not a relay's, carries the work of groups {others}")
    if set(others) - set(relays_to):
        raise wire.WireError(f"group {group_id} relays to groups {sorted(relays_to)}, not to {others}")
    asked, forwarded, total = [], 0, None
    for gid, work in message.work.items():
        if gid == group_id:
            continue
        needed, local_rows = np.unique(work.rows.numpy(), return_inverse=True)  # each row once per GPU
        needed = torch.from_numpy(needed).long()
        sub = message.payload.rows(needed)
        forwarded += sub.nbytes
        part = wire.Dispatch(message.layer, sub, {gid: wire.Assignments(torch.from_numpy(local_rows.astype(np.int32)),
                                                                        work.expert_ids, work.weights)},
                             message.combine_dtype, version=message.version)
        asked.append((needed, ask(gid, part)))
    own = message.work.get(group_id)
    if own is not None:
        total = compute(message.layer, message.payload, own, message.version)
    for needed, handle in asked:
        reply = answer(handle)
        forwarded += reply.y.numel() * reply.y.element_size()
        if total is None:
            total = torch.zeros(len(message.payload), reply.y.shape[1])
        total.index_add_(0, needed, reply.y.float())
    if total is None:
        raise wire.WireError(f"a dispatch to group {group_id} with no work for it or its node")
    return wire.Reply(total.to(message.combine_dtype), forwarded)


def answer_of(body: bytes) -> wire.Reply:
    """A reply's message, or the error an expert group answered with, raised here."""
    message = wire.decode(body)
    if isinstance(message, wire.Error):
        raise RuntimeError(message.message)
    if not isinstance(message, wire.Reply):
        raise wire.WireError(f"expected a reply, got {type(message).__name__}")
    return message


def reply_to(group_id: int, body: bytes, compute: Callable, ask: Callable, answer: Callable,
             relays_to: Collection[int] = ()) -> bytes:
    """The encoded reply to an encoded dispatch (`serve_dispatch`); anything that fails becomes an Error reply
    (the sender waits for one), and anything that is not a dispatch is refused."""
    try:
        message = wire.decode(body)
        if not isinstance(message, wire.Dispatch):
            raise wire.WireError(f"expected a dispatch, got {type(message).__name__}")
        with torch.inference_mode():
            return wire.encode(serve_dispatch(group_id, compute, message, ask, answer, relays_to))
    except Exception as e:  # noqa: BLE001  (the sender raises it)
        return wire.encode(wire.Error(f"expert group {group_id}: {type(e).__name__}: {e}"))


# ---- the ray transport: every route is one actor call carrying one message ------------------------------------

class RayExpertTransport(ExpertTransport):
    """The shard's side: each route's message is one call of its group's `serve_message`."""

    def __init__(self, layer_id: int, router: ExpertRouter, groups: list):
        super().__init__(layer_id, router)
        self.groups = groups

    def _send(self, sent: list[Sent], micro_batch: int) -> list:
        return [self.groups[s.route.target].serve_message.remote(wire.encode(s.message)) for s in sent]

    def _replies(self, handle: DispatchHandle) -> list[wire.Reply]:
        return [answer_of(body) for body in ray.get(handle.pending)]


class RayGroupServer:
    """The expert group's side: a message in, its reply out; a relay reaches its node's peers by actor calls."""

    def __init__(self, group_id: int, compute: Callable):
        self.group_id, self.compute = group_id, compute
        self.peers: dict[int, Any] = {}

    def serve(self, body: bytes) -> bytes:
        def ask(gid, message):
            return self.peers[gid].serve_message.remote(wire.encode(message))
        return reply_to(self.group_id, body, self.compute, ask, lambda ref: answer_of(ray.get(ref)),
                        set(self.peers) - {self.group_id})
