"""The collective transport, both halves: dispatch and combine as point-to-point messages of torch.distributed
(gloo on the CPU) between an attention shard and the expert groups, in the wire format of `wire.py`.

One process group spans every expert group (ranks 0..G-1, and G..2G-1 for the prefill shards' own groups when they
do not share the decode shards') and attention shard (ranks after them). Each shard talks to its pool of groups
over a subgroup per micro-batch (itself and the groups), so two shards' or two micro-batches' messages never
interleave, and each expert group serves each such subgroup from a thread of its own.

Every receive names its sender, as NCCL requires (it has no receive-from-anyone): on a shard's subgroup a group
takes dispatches from exactly one sender, fixed by the topology (`request_sender`): the shard, for a group on the
shard's node or the relay of its node, or else the relay of its node, which forwards them; replies go back the
way the dispatch came. Pings and the stop travel the same way, relays passing them on.

Why torch.distributed and not Ray's collective library (`ray.util.collective`): its gloo backend (Ray 2.60) puts
every process in one world (a named group always spans all of it), sends only blocking and on that world rather
than the named group, and meets through a TCP store that listens on every interface; the transport needs a
subgroup per shard and micro-batch, non-blocking sends and a rendezvous that can stay on a private file. Its
NCCL backend (cupy) is what the latent-KV hand-off uses between GPUs (`kv_transfer.py`).

Why point-to-point and not `all_to_all_single`: only the groups a layer's tokens reach take part, and on a
2-core machine a 5-rank gloo all_to_all of 40 bytes took 2.9 ms against 1.0 ms for a star of sends and
receives reaching the same four peers (measured with torch 2.13).
"""
import contextlib
import os
import socket
import struct
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from moeserve.topology.planner import request_sender
from moeserve.topology.spec import TopologySpec

from . import wire
from .transport import DispatchHandle, ExpertRouter, ExpertTransport, Sent, answer_of, reply_to

PING_EVERY_S = 60.0   # an idle shard pings its groups this often, well within the collective timeout
# A message's first part: up to this many bytes of it. A second part costs a round trip about 0.3 ms more on a
# 2-core machine, so the first part holds a decode step's float32 dispatch or reply of up to 80 rows of the demo
# model (0.77 KB a row).
FIRST_BYTES = 65536


class Outbox:
    """Sends that have not completed yet; their buffers must live until they do. A message of up to FIRST_BYTES
    goes as it is, into the receiver's buffer of FIRST_BYTES (gloo takes a shorter message into a longer receive);
    a longer one as FIRST_BYTES and then the rest (its header says how long the message is): one send, not a size
    and then a body, for all but large (prefill) messages. Sending 64 KB for every message cost a round trip
    25-110 us more than each message at its length (dispatches of 1 and 32 rows of the demo model, 2 cores)."""

    def __init__(self, timeout: timedelta):
        self.pending = []
        self.timeout = timeout  # a send the receiver has not taken in this long fails

    def send(self, body: bytes, dst: int, group) -> None:
        if isinstance(group, SocketGroup):  # written at once: nothing stays pending
            group.send(body, dst, self.timeout)
            return
        view = memoryview(body)
        parts = [view[:FIRST_BYTES]] + ([view[FIRST_BYTES:]] if len(body) > FIRST_BYTES else [])
        for part in parts:
            t = torch.frombuffer(bytearray(part), dtype=torch.uint8)
            self.pending.append((t, dist.isend(t, dst, group=group)))

    def flush(self) -> None:
        for _, work in self.pending:
            work.wait(self.timeout)
        self.pending.clear()


def receive(group, src: int, timeout: timedelta) -> bytes:
    """The next message from global rank `src` on `group`, waiting up to `timeout`; WireError if what arrives is
    not one."""
    if isinstance(group, SocketGroup):
        return group.receive(src, timeout)
    first = torch.empty(FIRST_BYTES, dtype=torch.uint8)
    _recv(first, group, src, timeout)
    raw = memoryview(first.numpy())
    n = wire.message_bytes(raw)
    if n <= FIRST_BYTES:
        return bytes(raw[:n])
    rest = torch.empty(n - FIRST_BYTES, dtype=torch.uint8)
    _recv(rest, group, src, timeout)
    return bytes(raw) + rest.numpy().tobytes()


def _recv(t: torch.Tensor, group, src: int, timeout: timedelta) -> None:
    """dist.recv with a timeout of its own: a group's timeout is also how long it waits for its members to connect
    as it forms (see join)."""
    group = group or dist.group.WORLD
    group.recv([t], dist.get_group_rank(group, src), 0).wait(timeout)


# ---- the same on one machine, without gloo: a Unix socket per pair of members ------------------------------------

FRAME = struct.Struct("<Q")       # each message's length, before it
HELLO = struct.Struct("<qq")      # a new connection's first bytes: the subgroup's index, the connecting member's rank


class SocketGroup:
    """One subgroup's members on one machine, reached over a Unix socket each: a message is its length and its
    bytes, and a receive waits in the kernel, after polling for up to `spin_s`. gloo makes each message a
    rendezvous that an I/O thread of its own carries in each process, which a decode step pays for at every layer
    where a few cores are shared (tools/bench_split.py measures it)."""

    def __init__(self, conns: dict[int, socket.socket], spin_s: float = 0.0):
        self.conns = conns  # global rank -> the connection to it
        self.spin_s = spin_s

    def send(self, body: bytes, dst: int, timeout: timedelta) -> None:
        conn = self.conns[dst]
        try:
            conn.settimeout(timeout.total_seconds())
            conn.sendall(FRAME.pack(len(body)) + body if len(body) <= FIRST_BYTES else FRAME.pack(len(body)))
            if len(body) > FIRST_BYTES:
                conn.sendall(body)
        except TimeoutError as e:
            raise RuntimeError(f"sending to rank {dst}: timed out after {timeout}") from e
        except OSError as e:  # gloo's words for a lost peer, which the transport's recovery looks for
            raise RuntimeError(f"sending to rank {dst}: connection reset by peer ({e})") from e

    def receive(self, src: int, timeout: timedelta) -> bytearray:
        conn = self.conns[src]
        try:
            if self.spin_s:
                _poll(conn, self.spin_s)
            conn.settimeout(timeout.total_seconds())
            body = _read(conn, FRAME.unpack(_read(conn, FRAME.size))[0])
        except TimeoutError as e:
            raise RuntimeError(f"receiving from rank {src}: timed out after {timeout}") from e
        except OSError as e:
            raise RuntimeError(f"receiving from rank {src}: connection reset by peer ({e})") from e
        if wire.message_bytes(body) != len(body):
            raise wire.WireError(f"{len(body)} bytes, but the header counts {wire.message_bytes(body)}")
        return body

    def close(self) -> None:
        """Close the connections; a thread waiting on one of them wakes to its end."""
        for conn in self.conns.values():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def _poll(conn: socket.socket, spin_s: float) -> None:
    """Return once `conn` has bytes (or its peer's end) to read, or after `spin_s`, having asked it in a loop
    meanwhile instead of sleeping: on a CPU a process that sleeps between a decode step's layers runs its next
    work slower (tools/bench_handover.py)."""
    conn.settimeout(0.0)  # non-blocking: with a timeout, each call would first wait in poll(2) for bytes to come
    probe = bytearray(1)
    deadline = time.perf_counter() + spin_s
    while time.perf_counter() < deadline:
        try:
            conn.recv_into(probe, 1, socket.MSG_PEEK)
            return
        except BlockingIOError:
            continue


def _read(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise RuntimeError("connection closed by peer")
        got += k
    return buf


# A receive over sockets polls this long before it sleeps, where it polls at all (spin_seconds): longer than a
# decode shard's own work between two MoE layers on a CPU (0.3-1 ms on the demo model), so that an expert group
# polls from one dispatch to the next, and the shard through most replies.
AUTO_SPIN_US = 2000


def spin_seconds(spin_us: Optional[int], takers: int, cores: int) -> float:
    """How long a receive over sockets polls before it sleeps: `spin_us` (collective_spin_us), or for None,
    AUTO_SPIN_US where the machine has a core for each of the `takers` (the processes that take turns in a decode
    step: the decode shards and their expert groups), else 0: a process that polls takes the core that the one it
    waits for needs (on 2 cores, the default layout's six processes polling ran at less than half speed)."""
    if spin_us is not None:
        return spin_us * 1e-6
    return AUTO_SPIN_US * 1e-6 if takers <= cores else 0.0


_open_sockets: list[SocketGroup] = []   # this process's subgroups of the last join over sockets


def join_sockets(base: str, rank: int, subgroups: list[list[int]], rendezvous_s: float,
                 spin_s: float = 0.0) -> list[SocketGroup]:
    """This member's connections in each subgroup (its members' global ranks): it listens at `base`-rank, connects
    to each lower-ranked member of its subgroups and takes the higher-ranked ones' connections, each named by its
    first bytes. The sockets live in `base`'s directory, which only this user can reach. Its receives poll for up
    to `spin_s` before they sleep."""
    path = f"{base}-{rank}"
    if len(path.encode()) > 100:
        raise ValueError(f"{path}: too long for a Unix socket's path (100 bytes); use a shorter temp directory")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1024)
    conns: list[dict[int, socket.socket]] = [{} for _ in subgroups]
    deadline = time.monotonic() + rendezvous_s
    try:
        for i, members in enumerate(subgroups):
            for peer in (m for m in members if rank in members and m < rank):
                conns[i][peer] = _connect(f"{base}-{peer}", deadline)
                conns[i][peer].sendall(HELLO.pack(i, rank))
        expected = sum(m > rank for members in subgroups if rank in members for m in members)
        for _ in range(expected):
            listener.settimeout(max(deadline - time.monotonic(), 0.001))
            conn, _ = listener.accept()
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            i, peer = HELLO.unpack(_read(conn, HELLO.size))
            conns[i][peer] = conn
    except (OSError, RuntimeError) as e:  # RuntimeError: a peer that closed its connection before its first bytes
        for c in conns:
            SocketGroup(c).close()
        raise RuntimeError(f"member {rank}: the others did not all meet within {rendezvous_s:g} s ({e}); "
                           "collective_backend sockets needs every actor on one machine") from e
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return [SocketGroup(c, spin_s) for c in conns]


def _connect(path: str, deadline: float) -> socket.socket:
    """A connection to the member listening at `path`, trying until `deadline` (it may not listen yet)."""
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# ---- the process group ------------------------------------------------------------------------------------------

def join(init_method: str, rank: int, world_size: int, pools: dict[int, tuple[int, int]], n_groups: int,
         micro_batches: int, rendezvous_s: float, spin_s: float = 0.0) -> dict[tuple[int, int], Any]:
    """Enter the cluster's process group (every member calls this at once; again after a member was replaced,
    leaving the old group). `pools` maps each shard's rank to (the rank of the first of the `n_groups` expert
    groups it uses, its GPU slot). Returns the subgroups by (shard rank, micro-batch). Every member creates all of
    them, in the same order, as torch.distributed requires. The members wait `rendezvous_s` for each other (one that
    died meanwhile never comes: the join fails, to be tried again with its replacement), also as they connect in
    each subgroup. gloo takes a group's timeout for that and for its messages alike, so the messages' own timeout
    is given to each send's and receive's wait instead (Outbox, receive). Over sockets (init_method unix://), the
    receives poll for up to `spin_s` before they sleep (see `spin_seconds`)."""
    for group in _open_sockets:
        group.close()
    _open_sockets.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    else:
        # torch names each group by a count that a failed join advanced too, and a replacement member starts from
        # 0: with names that differ, the next join's members would wait for each other under different keys
        distributed_c10d._world.group_count = 0
    members = {(shard, m): [shard] + list(range(first, first + n_groups))
               for shard, (first, _) in sorted(pools.items()) for m in range(micro_batches)}
    if init_method.startswith("unix://"):
        groups = join_sockets(init_method[len("unix://"):], rank, list(members.values()), rendezvous_s, spin_s)
        _open_sockets.extend(groups)
        return {key: group for key, group in zip(members, groups) if rank in members[key]}
    rendezvous = timedelta(seconds=rendezvous_s)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=rendezvous)
    return {key: dist.new_group(ranks, timeout=rendezvous) for key, ranks in members.items()}


def free_address(host: str) -> str:
    """host:port for the process group's rendezvous across machines: a port free on this machine. (A cluster
    on one machine meets through a file in its private directory instead: torch's TCP rendezvous listens on
    every interface.)"""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


# ---- the shard's side -------------------------------------------------------------------------------------------

class ShardLink:
    """One micro-batch's subgroup of an attention shard: its MoE layers' transports send and receive on it."""

    def __init__(self, spec: TopologySpec, src_gpu: int, n_groups: int, timeout_s: float):
        self.spec, self.src_gpu, self.n_groups = spec, src_gpu, n_groups
        self.group = None          # the subgroup, once the shard has joined
        self.first_rank = 0        # the global rank of expert group 0 of the shard's pool
        self.timeout = timedelta(seconds=timeout_s)  # a message not answered in this long: a lost peer
        self.outbox = Outbox(self.timeout)
        self.last_message = time.monotonic()

    def send(self, body: bytes, group_id: int) -> None:
        self.outbox.send(body, self.first_rank + group_id, self.group)
        self.last_message = time.monotonic()

    def receive(self, group_id: int) -> wire.Reply:
        return answer_of(receive(self.group, self.first_rank + group_id, self.timeout))

    def _to_first_hops(self, message) -> None:
        """A control message to every live group the shard reaches directly; relays pass it on to the rest."""
        body = wire.encode(message)
        for g in range(self.n_groups):
            if request_sender(self.spec, self.src_gpu, g) is None:
                try:
                    self.send(body, g)
                    self.outbox.flush()
                except RuntimeError:  # a lost group: its replacement joins the next process group
                    self.outbox.pending.clear()

    def ping_if_idle(self) -> None:
        """Keep the groups' receives from timing out while no request comes."""
        if self.group is not None and time.monotonic() - self.last_message > PING_EVERY_S:
            self._to_first_hops(wire.Ping())

    def stop(self) -> None:
        """End the groups' threads that serve this link."""
        if self.group is not None:
            self._to_first_hops(wire.Stop())


class CollectiveExpertTransport(ExpertTransport):
    """Every route is one message to its group, on the link of the dispatch's micro-batch; combine receives the
    replies in route order."""

    def __init__(self, layer_id: int, router: ExpertRouter, links: list[ShardLink]):
        super().__init__(layer_id, router)
        self.links = links

    def _send(self, sent: list[Sent], micro_batch: int) -> None:
        link = self.links[micro_batch]
        for s in sent:
            link.send(wire.encode(s.message), s.route.target)

    def _replies(self, handle: DispatchHandle) -> list[wire.Reply]:
        link = self.links[handle.micro_batch]
        replies = [link.receive(s.route.target) for s in handle.sent]
        link.outbox.flush()
        return replies

    def _abandon(self, handle: DispatchHandle) -> None:
        self.links[handle.micro_batch].outbox.pending.clear()


# ---- the expert group's side ------------------------------------------------------------------------------------

class CollectiveGroupServer:
    """Serves the subgroups of the shards whose pool this group is in, a thread each."""

    def __init__(self, group_id: int, compute: Callable, spec: TopologySpec, n_groups: int, first_rank: int):
        self.group_id, self.compute, self.spec = group_id, compute, spec
        self.n_groups, self.first_rank = n_groups, first_rank

    def join(self, init_method: str, world_size: int, micro_batches: int,
             pools: dict[int, tuple[int, int]], timeout_s: float, rendezvous_s: float, spin_s: float = 0.0) -> None:
        """Enter the process group (with every other member at once), then serve (`pools`, `rendezvous_s`,
        `spin_s`: see `join`); a message not answered in `timeout_s` is taken for a lost peer."""
        subgroups = join(init_method, self.first_rank + self.group_id, world_size, pools, self.n_groups,
                         micro_batches, rendezvous_s, spin_s)
        for (shard, m), group in subgroups.items():
            first, src_gpu = pools[shard]
            if first != self.first_rank:
                continue
            relay = request_sender(self.spec, src_gpu, self.group_id)
            sender = shard if relay is None else first + relay
            passes_on = [first + g for g in range(self.n_groups) if request_sender(self.spec, src_gpu, g) ==
                         self.group_id]
            threading.Thread(target=self._serve, args=(group, sender, passes_on, timedelta(seconds=timeout_s)),
                             daemon=True, name=f"serve-{shard}-{m}").start()

    def _serve(self, group, sender: int, passes_on: list[int], timeout: timedelta) -> None:
        """Answer `sender`'s dispatches on `group` until it says stop (or sends nothing for `timeout`); pass pings
        and the stop on to the groups this one relays to."""
        outbox = Outbox(timeout)
        relays_to = [rank - self.first_rank for rank in passes_on]

        def ask(gid: int, message: wire.Dispatch) -> int:
            outbox.send(wire.encode(message), self.first_rank + gid, group)
            return gid

        def answer(gid: int) -> wire.Reply:
            return answer_of(receive(group, self.first_rank + gid, timeout))

        while True:
            try:
                body = receive(group, sender, timeout)
                kind = wire.read_header(body)[1]
            except wire.WireError as e:  # a sender out of step with the format: say so, keep serving
                print(f"expert group {self.group_id}: refused a message: {e}", file=sys.stderr, flush=True)
                outbox.send(wire.encode(wire.Error(f"expert group {self.group_id}: {e}")), sender, group)
                outbox.flush()
                continue
            except RuntimeError:  # the sender is gone (its replacement meets us in the next process group)
                return
            if kind in (wire.PING, wire.STOP):
                for peer in passes_on:
                    try:
                        outbox.send(body, peer, group)
                        outbox.flush()
                    except RuntimeError:  # a lost peer of the node
                        outbox.pending.clear()
                if kind == wire.STOP:
                    return
                continue
            try:
                outbox.send(reply_to(self.group_id, body, self.compute, ask, answer, relays_to), sender, group)
                outbox.flush()
            except RuntimeError:  # the sender is gone
                return
