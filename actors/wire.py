"""The data plane's one wire format, for every transport: a fixed header of int64 counts, then fixed-layout
tensors. Nothing else crosses: no pickle, no Python objects, so a receiver only ever turns counted bytes into
tensors, and anything that is not this format is refused (WireError) before a byte of it is used.

    header   16 x int64: MAGIC, kind, body bytes, then the kind's counts (below)
    DISPATCH layer, relay, rows N, dim, payload dtype, scale columns C, work groups W, assignments A, combine dtype,
             placement version
             body: rows [N, dim] (float32 / bfloat16, or FP8 e4m3 as uint8) | FP8 only: 1x128 scales fp32 [N, C]
                   | work table int32 [W, 2] (group, its assignments) | rows int32 [A] | logical expert ids int32 [A]
                   | gate weights fp32 [A]     (assignments of the work groups in table order)
    REPLY    rows N, dim, dtype, bytes the sender forwarded inside its node (a relay's), body: rows [N, dim]
    ERROR    body: the error's text, UTF-8
    PING, STOP: no body

Glossary: a *payload* is the token rows one message carries; an *assignment* is one (row, expert, weight) a
group computes; a *relay* message carries, besides the relay's own work, the work of the other groups of its
node, which it forwards to them.
"""
import math
import struct
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

MAGIC = 0x4D4F455345525631  # "MOESERV1"
HEADER_WORDS = 16
HEADER_BYTES = 8 * HEADER_WORDS
DISPATCH, REPLY, ERROR, PING, STOP = 1, 2, 3, 4, 5
MAX_ROWS, MAX_DIM, MAX_GROUPS, MAX_EXPERTS = 1 << 24, 1 << 16, 1 << 16, 1 << 20
TILE = 128

DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float8_e4m3fn}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class WireError(ValueError):
    """Bytes that are not a message of this format."""


@dataclass
class Payload:
    """Token rows as they travel: x [N, dim] in the compute dtype, or FP8 (x float8_e4m3fn with `scale` [N, dim /
    128] fp32, one per 1x128 tile)."""
    x: torch.Tensor
    scale: Optional[torch.Tensor] = None

    def rows(self, index: torch.Tensor) -> "Payload":
        return Payload(self.x[index], None if self.scale is None else self.scale[index])

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + (0 if self.scale is None else self.scale.numel() * 4)

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Assignments:
    """What one group computes of a payload: row r (index into the payload), logical expert e, gate weight w."""
    rows: torch.Tensor        # [A] int32
    expert_ids: torch.Tensor  # [A] int32
    weights: torch.Tensor     # [A] float32

    def __len__(self) -> int:
        return self.rows.shape[0]


@dataclass
class Dispatch:
    layer: int
    payload: Payload
    work: dict[int, Assignments]     # group id -> its assignments
    combine_dtype: torch.dtype
    relay: bool = False
    version: int = 0                 # the placement version the routes were planned against


@dataclass
class Reply:
    y: torch.Tensor                  # [N, dim] summed expert outputs of the dispatch's rows
    forwarded: int = 0               # tensor bytes the replying relay moved inside its node, both ways


@dataclass
class Error:
    message: str


@dataclass
class Ping:
    pass


@dataclass
class Stop:
    pass


Message = Union[Dispatch, Reply, Error, Ping, Stop]


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):  # NumPy has no such types: their bytes
        t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int16)
    return t.numpy().tobytes()


def _column(parts: list[torch.Tensor], dtype: np.dtype) -> bytes:
    """One field of every work group's assignments, in table order, as `dtype`'s bytes."""
    if not parts:
        return b""
    # one group's (a decode step's usual message): nothing to concatenate
    column = parts[0].numpy() if len(parts) == 1 else np.concatenate([t.numpy() for t in parts])
    return column.astype(dtype, copy=False).tobytes()


_HEADER = struct.Struct(f"<{HEADER_WORDS}q")


def _header(kind: int, body: int, *counts: int) -> bytes:
    words = (MAGIC, kind, body, *counts)
    return _HEADER.pack(*words, *(0,) * (HEADER_WORDS - len(words)))


def encode(message: Message) -> bytes:
    if isinstance(message, Dispatch):
        p = message.payload
        N, dim = p.x.shape
        groups = sorted(message.work)
        work = [message.work[g] for g in groups]
        table = np.array([[g, len(w)] for g, w in zip(groups, work)], dtype="<i4").reshape(-1, 2)
        parts = [_raw(p.x)] + ([_raw(p.scale.float())] if p.scale is not None else []) + [table.tobytes()]
        parts += [_column([w.rows for w in work], "<i4"), _column([w.expert_ids for w in work], "<i4"),
                  _column([w.weights for w in work], "<f4")]
        body = b"".join(parts)
        return _header(DISPATCH, len(body), message.layer, int(message.relay), N, dim, DTYPE_CODES[p.x.dtype],
                       0 if p.scale is None else p.scale.shape[1], len(groups), sum(len(w) for w in work),
                       DTYPE_CODES[message.combine_dtype], message.version) + body
    if isinstance(message, Reply):
        N, dim = message.y.shape
        body = _raw(message.y)
        return _header(REPLY, len(body), N, dim, DTYPE_CODES[message.y.dtype], message.forwarded) + body
    if isinstance(message, Error):
        body = message.message.encode("utf-8", "replace")
        return _header(ERROR, len(body), len(body)) + body
    if isinstance(message, Ping):
        return _header(PING, 0)
    if isinstance(message, Stop):
        return _header(STOP, 0)
    raise TypeError(f"not a data-plane message: {type(message).__name__}")


def read_header(buf) -> tuple[int, ...]:
    """The header's words; WireError unless the bytes start with one."""
    if len(buf) < HEADER_BYTES:
        raise WireError(f"{len(buf)} bytes: shorter than a header")
    words = _HEADER.unpack_from(buf)
    if words[0] != MAGIC:
        raise WireError("not a moeserve data-plane message (bad magic)")
    if words[1] not in (DISPATCH, REPLY, ERROR, PING, STOP) or not 0 <= words[2] <= MAX_ROWS * MAX_DIM * 8:
        raise WireError(f"bad header: kind {words[1]}, body {words[2]} bytes")
    return words


def message_bytes(buf) -> int:
    """The whole message's length, from its header."""
    return HEADER_BYTES + read_header(buf)[2]


# the NumPy type that holds each dtype's bytes
_NUMPY = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.uint8: np.uint8, torch.int32: np.int32}


class _Reader:
    """Arrays taken one after another from a message's body, as views into one writable copy of it (a copy per
    array cost more than the rest of decoding a decode step's dispatch). NumPy's views, as the counts are checked
    in NumPy: an op on a few numbers costs a microsecond there and several in torch."""

    def __init__(self, body: memoryview):
        self.body, self.at = bytearray(body), 0

    def array(self, dtype, shape: tuple) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        if self.at + n > len(self.body):
            raise WireError("body shorter than its counts")
        at, self.at = self.at, self.at + n
        if at % dtype.itemsize:  # after FP8 rows of an odd width: a copy of its own, aligned
            return np.frombuffer(bytearray(self.body[at:at + n]), dtype=dtype).reshape(shape)
        return np.frombuffer(self.body, dtype=dtype, count=n // dtype.itemsize, offset=at).reshape(shape)

    def tensor(self, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        return torch.from_numpy(self.array(_NUMPY[dtype], shape)).view(dtype)

    def done(self) -> None:
        if self.at != len(self.body):
            raise WireError(f"{len(self.body) - self.at} bytes past the counted body")


# Up to this many numbers, their least and greatest come faster through a Python list than from two NumPy
# reductions (one thread: 0.4 us for 4, 1.5 for 64, 2.9 for 128, against 1.6 us at any of those lengths).
FEW = 64


def _bounds(a: np.ndarray) -> tuple[int, int]:
    """The least and the greatest of a non-empty array (a decode step's few numbers through a Python list)."""
    if len(a) <= FEW:
        values = a.tolist()
        return min(values), max(values)
    return int(a.min()), int(a.max())


def _dtype(code: int, allowed: tuple) -> torch.dtype:
    if code not in DTYPES or DTYPES[code] not in allowed:
        raise WireError(f"dtype code {code} is not one of {allowed}")
    return DTYPES[code]


def _count(value, limit: int, what: str) -> int:
    if not 0 <= value <= limit:
        raise WireError(f"{what} {value} is out of range [0, {limit}]")
    return int(value)


def decode(buf) -> Message:
    """The message of `encode`'s bytes (any bytes-like object); WireError for anything else."""
    buf = memoryview(buf).cast("B")
    words = read_header(buf)
    kind, size = words[1], words[2]
    if len(buf) != HEADER_BYTES + size:
        raise WireError(f"{len(buf)} bytes, but the header counts {HEADER_BYTES + size}")
    r = _Reader(buf[HEADER_BYTES:])
    if kind == DISPATCH:
        layer, relay = _count(words[3], 1 << 20, "layer"), bool(words[4])
        N, dim = _count(words[5], MAX_ROWS, "rows"), _count(words[6], MAX_DIM, "dim")
        dtype = _dtype(words[7], (torch.float32, torch.bfloat16, torch.float8_e4m3fn))
        C, W, A = _count(words[8], MAX_DIM, "scale columns"), _count(words[9], MAX_GROUPS, "groups"), \
            _count(words[10], MAX_ROWS * 64, "assignments")
        if (dtype == torch.float8_e4m3fn) != (C > 0) or (C and C != -(-dim // TILE)):
            raise WireError(f"{C} scale columns do not fit {dtype} rows of {dim}")
        x = r.tensor(torch.uint8 if dtype == torch.float8_e4m3fn else dtype, (N, dim))
        payload = Payload(x.view(torch.float8_e4m3fn), r.tensor(torch.float32, (N, C))) if C else Payload(x)
        table = r.array(np.int32, (W, 2))
        rows, experts = r.array(np.int32, (2, A))  # the rows, then the expert ids
        weights = r.array(np.float32, (A,))
        r.done()
        groups, counts = table[:, 0].tolist(), table[:, 1].tolist()
        if any(c < 0 for c in counts) or sum(counts) != A:
            raise WireError("the work table does not add up to its assignments")
        if A:
            lowest, highest = _bounds(rows)
            if not 0 <= lowest <= highest < N:
                raise WireError("an assignment names a row outside the payload")
            lowest, highest = _bounds(experts)
            if not 0 <= lowest <= highest < MAX_EXPERTS:
                raise WireError(f"an assignment names expert {lowest if lowest < 0 else highest}")
        if W and not 0 <= min(groups) <= max(groups) < MAX_GROUPS:
            raise WireError("the work table names a group outside [0, MAX_GROUPS)")
        if len(set(groups)) != W:
            raise WireError("a group appears twice in the work table")
        work, at = {}, 0
        for g, c in zip(groups, counts):
            work[g] = Assignments(*(torch.from_numpy(a[at:at + c]) for a in (rows, experts, weights)))
            at += c
        return Dispatch(layer, payload, work, _dtype(words[11], (torch.float32, torch.bfloat16)), relay,
                        _count(words[12], 1 << 40, "placement version"))
    if kind == REPLY:
        N, dim = _count(words[3], MAX_ROWS, "rows"), _count(words[4], MAX_DIM, "dim")
        y = r.tensor(_dtype(words[5], (torch.float32, torch.bfloat16)), (N, dim))
        r.done()
        return Reply(y, _count(words[6], 1 << 62, "forwarded bytes"))
    if kind == ERROR:
        text = r.array(np.uint8, (_count(words[3], size, "length"),)).tobytes().decode("utf-8", "replace")
        r.done()
        return Error(text)
    r.done()
    return Ping() if kind == PING else Stop()
