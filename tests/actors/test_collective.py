"""The data plane's wire format: every message kind survives encoding bit for bit, nothing that is not the format
is read (a pickle, truncated or padded bytes, counts that do not add up), and an expert group's error comes back
as an error, not a hang. Also the senders a receiver names: who sends each group a shard's dispatches; and a
process group formed again with a fresh member after one died as it formed."""
import os
import pickle
import time
from typing import Any, Callable

import pytest
import torch

from moeserve.actors import wire
from moeserve.actors.transport import answer_of, reply_to, serve_dispatch
from moeserve.kernels.fp8 import act_quant
from moeserve.topology.planner import request_sender
from moeserve.topology.spec import PRESETS, TopologySpec


def dispatch_message(dtype, n=5, dim=256, relay=True) -> wire.Dispatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    payload = wire.Payload(*act_quant(x)) if dtype == torch.float8_e4m3fn else wire.Payload(x.to(dtype))
    work = {2: wire.Assignments(torch.tensor([0, 4, 4], dtype=torch.int32), torch.tensor([7, 1, 3], dtype=torch.int32),
                                torch.rand(3, generator=g)),
            3: wire.Assignments(torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32), torch.empty(0))}
    return wire.Dispatch(layer=3, payload=payload, work=work, combine_dtype=torch.bfloat16, relay=relay, version=7)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaNs and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.mark.parametrize("dtype, dim", [(torch.float32, 256), (torch.bfloat16, 256), (torch.float8_e4m3fn, 256),
                                        (torch.float8_e4m3fn, 131)])  # FP8 rows of an odd width: the rest unaligned
def test_a_dispatch_survives_the_wire_bit_for_bit(dtype, dim):
    message = dispatch_message(dtype, dim=dim)
    body = wire.encode(message)
    assert isinstance(body, bytes) and wire.message_bytes(body) == len(body)
    back = wire.decode(body)
    assert isinstance(back, wire.Dispatch)
    assert (back.layer, back.relay, back.combine_dtype, back.version) == (3, True, torch.bfloat16, 7)
    assert same(back.payload.x, message.payload.x)
    assert (back.payload.scale is None) == (message.payload.scale is None)
    if message.payload.scale is not None:
        assert same(back.payload.scale, message.payload.scale)
    assert sorted(back.work) == [2, 3]
    for g in (2, 3):
        for name in ("rows", "expert_ids", "weights"):
            assert same(getattr(back.work[g], name), getattr(message.work[g], name))


def test_a_dispatch_with_no_rows_and_the_other_kinds_survive_too():
    empty = wire.Dispatch(0, wire.Payload(torch.empty(0, 64)), {}, torch.float32)
    back = wire.decode(wire.encode(empty))
    assert back.payload.x.shape == (0, 64) and back.work == {}
    y = torch.tensor([[1.5, -0.0, float("inf")], [float("nan"), 2.0, -3.0]], dtype=torch.bfloat16)
    reply = wire.decode(wire.encode(wire.Reply(y, forwarded=12345)))
    assert same(reply.y, y) and reply.forwarded == 12345
    assert wire.decode(wire.encode(wire.Error("expert group 2: KeyError: 5 ✓"))).message == "expert group 2: KeyError: 5 ✓"
    assert isinstance(wire.decode(wire.encode(wire.Ping())), wire.Ping)
    assert isinstance(wire.decode(wire.encode(wire.Stop())), wire.Stop)


def corrupt(body: bytes, word: int, value: int) -> bytes:
    raw = bytearray(body)
    raw[8 * word:8 * word + 8] = value.to_bytes(8, "little", signed=True)
    return bytes(raw)


def test_anything_that_is_not_the_wire_format_is_refused():
    body = wire.encode(dispatch_message(torch.float32))
    not_messages = {
        "a pickle of the same message": pickle.dumps(dispatch_message(torch.float32)),
        "a pickle bomb's opening": b"\x80\x05cos\nsystem\n" + b"\0" * 200,
        "empty": b"",
        "truncated header": body[:50],
        "truncated body": body[:-1],
        "one byte too many": body + b"\0",
        "another magic": corrupt(body, 0, 0x1234),
        "unknown kind": corrupt(body, 1, 9),
        "body longer than sent": corrupt(body, 2, len(body)),
        "more rows than the body holds": corrupt(body, 5, 6),
        "unknown dtype": corrupt(body, 7, 7),
        "fp8 rows without scales": corrupt(body, 7, 2),
        "assignments that do not add up": corrupt(body, 10, 4),
        "negative rows": corrupt(body, 5, -1),
    }
    for what, raw in not_messages.items():
        with pytest.raises(wire.WireError):
            wire.decode(raw)
            pytest.fail(what)
    table_at = wire.HEADER_BYTES + 5 * 256 * 4
    bad_row = bytearray(body)
    bad_row[table_at + 16:table_at + 20] = (99).to_bytes(4, "little")  # first assignment's row: past the payload
    with pytest.raises(wire.WireError, match="outside the payload"):
        wire.decode(bytes(bad_row))
    for at, value, match in [(table_at + 28, -1, "names expert -1"),  # first assignment's expert id
                             (table_at, -2, "names a group outside")]:  # the work table's first group
        bad = bytearray(body)
        bad[at:at + 4] = value.to_bytes(4, "little", signed=True)
        with pytest.raises(wire.WireError, match=match):
            wire.decode(bytes(bad))
    with pytest.raises(TypeError):
        wire.encode({"op": "compute"})


@pytest.mark.parametrize("assignments", [3, 300])  # a decode step's few (up to wire.FEW), and a prompt's many
def test_the_first_and_the_last_assignment_are_checked_against_the_payload_and_the_experts(assignments):
    rows = torch.arange(assignments, dtype=torch.int32) % 5
    experts = torch.arange(assignments, dtype=torch.int32) % 16
    message = wire.Dispatch(1, wire.Payload(torch.randn(5, 8)),
                            {0: wire.Assignments(rows, experts, torch.rand(assignments))}, torch.float32)
    assert same(wire.decode(wire.encode(message)).work[0].rows, rows)
    at = wire.HEADER_BYTES + 5 * 8 * 4 + 8  # the rows, after the payload and the one-group work table
    for index in (0, assignments - 1):
        for offset, value, match in [(0, 5, "outside the payload"), (0, -1, "outside the payload"),
                                     (4 * assignments, -3, "names expert -3"),
                                     (4 * assignments, wire.MAX_EXPERTS, f"names expert {wire.MAX_EXPERTS}")]:
            bad = bytearray(wire.encode(message))
            where = at + offset + 4 * index
            bad[where:where + 4] = value.to_bytes(4, "little", signed=True)
            with pytest.raises(wire.WireError, match=match):
                wire.decode(bytes(bad))


def test_an_expert_groups_error_is_raised_at_the_shard_and_junk_is_answered_with_one():
    def compute(layer, payload, work, version):
        raise KeyError(5)
    message = dispatch_message(torch.float32, relay=False)
    message.work = {2: message.work[2]}
    body = reply_to(2, wire.encode(message), compute, None, None)
    with pytest.raises(RuntimeError, match="expert group 2: KeyError: 5"):
        answer_of(body)
    with pytest.raises(RuntimeError, match="expert group 2: WireError"):
        answer_of(reply_to(2, pickle.dumps({"op": "compute"}), compute, None, None))


def test_work_for_other_groups_is_forwarded_only_by_a_relay_and_only_to_its_peers():
    """A dispatch that is not a relay's may carry only the receiver's own work, and a relay forwards only to the
    groups it relays to; either is refused (an error reply) before anything is computed or forwarded."""
    done = []

    def compute(layer, payload, work, version):
        done.append("computed")
        return torch.zeros(len(payload), payload.x.shape[1])

    def ask(gid, part):
        done.append(f"forwarded to {gid}")
        return gid

    message = dispatch_message(torch.float32, relay=False)  # work for groups 2 and 3, sent to group 2
    with pytest.raises(RuntimeError, match=r"not a relay's, carries the work of groups \[3\]"):
        answer_of(reply_to(2, wire.encode(message), compute, ask, None, relays_to=[3]))
    message.relay = True
    with pytest.raises(RuntimeError, match=r"relays to groups \[1\], not to \[3\]"):
        answer_of(reply_to(2, wire.encode(message), compute, ask, None, relays_to=[1]))
    assert done == []
    reply = answer_of(reply_to(2, wire.encode(message), compute, ask, lambda gid: wire.Reply(torch.zeros(0, 256)),
                               relays_to=[3]))
    assert reply.y.shape == (5, 256) and done == ["forwarded to 3", "computed"]


def test_a_relay_sums_its_own_work_and_its_peers():
    """serve_dispatch against a direct sum: the relay computes its own rows, forwards each peer only the rows that
    peer needs, and adds the partial outputs per row."""
    message = dispatch_message(torch.float32)
    message.work = {1: message.work[2], 2: wire.Assignments(torch.tensor([1, 2], dtype=torch.int32),
                                                           torch.tensor([5, 6], dtype=torch.int32),
                                                           torch.tensor([0.5, 0.25]))}
    message.combine_dtype = torch.float32

    def compute(layer, payload, work, version=0):  # expert e multiplies by e: easy to sum by hand
        y = torch.zeros(len(payload), payload.x.shape[1])
        y.index_add_(0, work.rows.long(), payload.x[work.rows.long()] * (work.expert_ids.float() * work.weights)[:, None])
        return y
    asked = {}

    def ask(gid, part):
        asked[gid] = wire.decode(wire.encode(part))
        return gid

    reply = serve_dispatch(1, compute, message, ask, lambda gid: wire.Reply(compute(0, asked[gid].payload,
                                                                                    asked[gid].work[gid])),
                           relays_to=[2])
    x = message.payload.x
    expected = torch.zeros_like(x)
    for g in (1, 2):
        w = message.work[g]
        for r, e, wt in zip(w.rows.tolist(), w.expert_ids.tolist(), w.weights.tolist()):
            expected[r] += x[r] * e * wt
    torch.testing.assert_close(reply.y, expected)
    assert list(asked) == [2] and torch.equal(asked[2].payload.x, x[[1, 2]])  # only the rows peer 2 needs
    assert asked[2].version == 7  # planned against the same placement version
    assert reply.forwarded == 2 * 256 * 4 * 2  # two rows there, their two partial rows back


def test_every_group_has_one_named_sender_per_shard():
    """Each group takes a shard's dispatches from the shard (its own node, or the relay of its node) or from the
    relay of its node, never from two senders; with a plane down the relay index moves to a live plane."""
    spec = PRESETS["cpu-local"]  # two nodes of two GPUs, planes 0 and 1
    assert [request_sender(spec, 0, g) for g in range(4)] == [None, None, None, 2]
    assert [request_sender(spec, 1, g) for g in range(4)] == [None, None, 3, None]
    down = TopologySpec(**{**spec.model_dump(), "planes_down": [1]})
    assert [request_sender(down, 1, g) for g in range(4)] == [None, None, None, 2]


def two_ranks(target: Callable, *args) -> tuple[Any, list]:
    """Run `target(rank, *args, out)` in two processes of their own (a gloo failure aborts its process, not the
    test's): what one of them put in the queue `out` (None after 60 s), and their exit codes."""
    import queue

    import torch.multiprocessing as mp
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    ranks = [spawn.Process(target=target, args=(rank, *args, out)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        received = out.get(timeout=60)
    except queue.Empty:
        received = None
    for process in ranks:
        process.join(30)
        if process.is_alive():
            process.kill()
    return received, [process.exitcode for process in ranks]


def _echo_messages(rank: int, init_method: str, bodies: list[bytes], echoed) -> None:
    """Rank 1 sends each body through an Outbox; rank 0 receives them with `receive` and puts what came in `echoed`
    (a queue)."""
    from datetime import timedelta

    import torch.distributed as dist

    from moeserve.actors.collective import Outbox, receive
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        if rank == 1:
            outbox = Outbox(timedelta(seconds=30))
            for body in bodies:
                outbox.send(body, 0, None)
            outbox.flush()
        else:
            echoed.put([receive(None, 1, timedelta(seconds=30)) for _ in bodies])
    finally:
        dist.destroy_process_group()


def messages_around_the_first_part() -> list[bytes]:
    """Messages just under, at and over FIRST_BYTES, several times it, and a dispatch."""
    from moeserve.actors.collective import FIRST_BYTES
    sizes = (200, FIRST_BYTES - 1, FIRST_BYTES, FIRST_BYTES + 1, 3 * FIRST_BYTES + 5)
    empty = len(wire.encode(wire.Error("")))
    bodies = [wire.encode(wire.Error("abcdefghij"[n % 10] * (n - empty))) for n in sizes]  # of exactly these sizes
    bodies.insert(2, wire.encode(dispatch_message(torch.float32, n=40)))
    assert [len(b) for b in bodies[:2] + bodies[3:]] == list(sizes)
    return bodies


def test_messages_of_one_part_and_of_two_arrive_whole_and_in_order(tmp_path):
    """The collective transport sends a message as a first part of FIRST_BYTES and, for a longer one, a second part
    with the rest: messages of sizes around that arrive byte for byte between two processes of a gloo group, one
    after another."""
    bodies = messages_around_the_first_part()
    assert two_ranks(_echo_messages, f"file://{tmp_path / 'rendezvous'}", bodies) == (bodies, [0, 0])


def _over_sockets(rank: int, base: str, spin_s: float, sent: list, got) -> None:
    """Both ranks join over Unix sockets (rank 1 a shard, rank 0 its one expert group), their receives polling for
    up to `spin_s` before they sleep. Rank 1 sends each of `sent` (bytes; a float: sleep that many seconds first;
    None: die there without a word, as a killed process); rank 0 receives a message for each of `sent` that is not
    a float and puts in `got` each message, or the error its receive raised, with the seconds it took."""
    from datetime import timedelta

    from moeserve.actors.collective import Outbox, join, receive
    group = join(f"unix://{base}", rank, 2, {1: (0, 0)}, 1, 1, 20.0, spin_s)[1, 0]
    if rank == 1:
        outbox = Outbox(timedelta(seconds=30))
        for body in sent:
            if body is None:
                os._exit(0)
            if isinstance(body, float):
                time.sleep(body)
                continue
            outbox.send(body, 0, group)
        outbox.flush()
        time.sleep(1)  # what it sent is read before its connections close
        return
    results = []
    for _ in [body for body in sent if not isinstance(body, float)]:
        start = time.monotonic()
        try:
            results.append((bytes(receive(group, 1, timedelta(seconds=30))), time.monotonic() - start))
        except (RuntimeError, wire.WireError) as e:
            results.append((e, time.monotonic() - start))
    got.put(results)


# receives that sleep at once, and receives that poll first (collective_spin_us) for long enough to see every
# message of a test arrive, or the peer's end
SPIN_S = [0.0, 0.5]


@pytest.mark.parametrize("spin_s", SPIN_S)
def test_messages_arrive_whole_and_in_order_over_sockets(tmp_path, spin_s):
    """The collective transport over Unix sockets (`collective_backend: sockets`): messages of every size, one after
    another, byte for byte."""
    bodies = messages_around_the_first_part()
    results, exit_codes = two_ranks(_over_sockets, str(tmp_path / "c"), spin_s, bodies)
    assert [body for body, _ in results] == bodies and exit_codes == [0, 0]


@pytest.mark.parametrize("spin_s", SPIN_S)
def test_over_sockets_junk_is_refused_and_the_next_message_still_arrives(tmp_path, spin_s):
    """A message that is not the wire format is refused (WireError) without losing the stream: each message is
    framed by its length, so the next one arrives whole."""
    from moeserve.actors.collective import FIRST_BYTES
    junk = [pickle.dumps({"op": "compute"}), b"", b"\0" * (2 * FIRST_BYTES)]
    ping = wire.encode(wire.Ping())
    results, exit_codes = two_ranks(_over_sockets, str(tmp_path / "c"), spin_s, junk + [ping])
    assert all(isinstance(error, wire.WireError) for error, _ in results[:-1]), results
    assert results[-1][0] == ping and exit_codes == [0, 0]


@pytest.mark.parametrize("spin_s", SPIN_S)
def test_over_sockets_a_dead_peer_is_an_error_at_once_not_a_timeout(tmp_path, spin_s):
    """A member that dies (here before it sends) closes its connections: the receive waiting on it fails at once,
    in the words the transport's recovery takes for a lost peer, instead of waiting out its timeout (30 s)."""
    from moeserve.actors.transport import peer_died
    results, _ = two_ranks(_over_sockets, str(tmp_path / "c"), spin_s, [None])
    (error, waited), = results
    assert isinstance(error, RuntimeError) and peer_died(error), error
    assert waited < 5


def test_over_sockets_a_receive_that_polled_in_vain_sleeps_until_the_message_comes(tmp_path):
    """A receive polls for up to its spin time, then waits in the kernel for the rest of its timeout: a message
    sent long after the polling ended still arrives whole."""
    ping = wire.encode(wire.Ping())
    results, exit_codes = two_ranks(_over_sockets, str(tmp_path / "c"), 0.05, [1.0, ping])
    (body, waited), = results
    assert body == ping and waited >= 0.9 and exit_codes == [0, 0]


def test_receives_poll_only_where_each_process_of_a_decode_step_has_a_core():
    """collective_spin_us: a value is taken as it is; null polls where the machine has a core for each decode shard
    and expert group, and never where they outnumber the cores (polling would take the core of the process waited
    for)."""
    from moeserve.actors.collective import AUTO_SPIN_US, spin_seconds
    assert spin_seconds(0, takers=2, cores=16) == 0.0 and spin_seconds(300, takers=6, cores=2) == 300e-6
    assert spin_seconds(None, takers=2, cores=2) == AUTO_SPIN_US * 1e-6 > 0
    assert spin_seconds(None, takers=5, cores=2) == 0.0


def _join_after_a_failed_join(rank: int, rendezvous: list[str], got) -> None:
    """Rank 0 (an expert group) first joins a group whose other member never comes, as when it died; then it joins
    the next one with rank 1, a fresh process as a replacement is, which joins only that one. Rank 1 sends its rank
    over their subgroup, rank 0 puts what it received in `got`."""
    import torch.distributed as dist

    from moeserve.actors.collective import join
    pools = {1: (0, 0)}  # shard rank 1 uses the one expert group from rank 0
    if rank == 0:
        try:
            join(rendezvous[0], 0, 2, pools, 1, 1, 1.0)
            got.put("formed without its second member")
            return
        except RuntimeError:
            pass  # nobody came within the rendezvous timeout
    subgroups = join(rendezvous[1], rank, 2, pools, 1, 1, 20.0)
    message = torch.tensor([rank + 1.0])
    if rank == 1:
        dist.send(message, 0, group=subgroups[1, 0])
    else:
        dist.recv(message, 1, group=subgroups[1, 0])
        got.put(message.item())
    dist.destroy_process_group()


def test_a_member_whose_join_failed_joins_the_next_group_with_a_fresh_replacement(tmp_path):
    """A recovery forms the process group again when a member died as it formed: the members that waited for it
    (until the rendezvous timeout) must then meet its replacement, a process that never joined before, under the
    same group names (torch counts a failed group as formed). Each rank a process of its own."""
    rendezvous = [f"file://{tmp_path / 'first'}", f"file://{tmp_path / 'second'}"]
    assert two_ranks(_join_after_a_failed_join, rendezvous) == (2.0, [0, 0])


def _die_after_the_rendezvous(rank: int, rendezvous: str, waited) -> None:
    """Rank 1 enters the process group and dies before the subgroups form; rank 0, in `join` with a rendezvous
    timeout of 2 s, puts in `waited` how long it waited before the join failed."""
    from datetime import timedelta

    import torch.distributed as dist

    from moeserve.actors.collective import join
    if rank == 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=1, world_size=2, timeout=timedelta(seconds=30))
        os._exit(0)  # gone without a word, as a killed process
    start = time.monotonic()
    try:
        join(rendezvous, 0, 2, {1: (0, 0)}, 1, 1, 2.0)
        waited.put("formed without its second member")
    except RuntimeError:
        waited.put(time.monotonic() - start)


def test_a_member_dying_as_the_subgroups_form_fails_the_join_within_the_rendezvous_timeout(tmp_path):
    """The members wait for each other only the rendezvous timeout as the subgroups form too, not a message's
    timeout (minutes): a recovery then forms the group again with the dead member's replacement in time."""
    waited, exit_codes = two_ranks(_die_after_the_rendezvous, f"file://{tmp_path / 'rendezvous'}")
    assert isinstance(waited, float) and 2.0 <= waited < 10.0
    assert exit_codes == [0, 0]


def _send_later_than_the_rendezvous(rank: int, rendezvous: str, got) -> None:
    """Both ranks join with a rendezvous timeout of 5 s; rank 1 sends a ping 7 s later, which rank 0 receives and
    puts in `got`."""
    from datetime import timedelta

    import torch.distributed as dist

    from moeserve.actors.collective import Outbox, join, receive
    group, timeout = join(rendezvous, rank, 2, {1: (0, 0)}, 1, 1, 5.0)[1, 0], timedelta(seconds=60)
    if rank == 1:
        time.sleep(7)
        outbox = Outbox(timeout)
        outbox.send(wire.encode(wire.Ping()), 0, group)
        outbox.flush()
    else:
        got.put(receive(group, 1, timeout))
    dist.destroy_process_group()


def test_a_message_waits_its_own_timeout_not_the_rendezvous_timeout(tmp_path):
    """A receive waits up to the collective timeout (an idle expert group waits for the next dispatch), however
    short the rendezvous timeout that the subgroups were formed with."""
    assert two_ranks(_send_later_than_the_rendezvous, f"file://{tmp_path / 'rendezvous'}") == \
        (wire.encode(wire.Ping()), [0, 0])
