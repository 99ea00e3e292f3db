"""Runs padded batches of sequences through the model over the paged latent cache, and the MTP module
over the positions a step made valid.

With `micro_batches` > 1 a batch is cut into that many micro-batches of rows whose forwards run by turns on one
thread (DeepSeek-V3's decode overlap): each runs until its next MoE layer's tokens have left for the experts on
other processes, then the next computes its attention while they work. Rows never interact, so the outputs are those
of one big batch."""
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from moeserve.kernels.cache import PagedLatentCache
from moeserve.kernels.model import MoE, MLAForm, Packing, Transformer, by_turns, cheaper_mla_form


def _pad(rows: list[list[int]], starts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded host arrays for rows of tokens at positions starts[b]...: (tokens, positions, valid), each
    [B, S]; padding is token 0 at position 0. In NumPy: an array op costs about a microsecond on the host, a torch op
    five or more, and a step builds a dozen."""
    width = max(len(r) for r in rows)
    columns = np.arange(width)
    valid = columns < np.array([len(r) for r in rows])[:, None]
    tokens = np.array(rows, dtype=np.int64) if valid.all() else \
        np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    positions = np.where(valid, np.array(starts)[:, None] + columns, 0)
    return tokens, positions, valid


def to_device_once(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host int64/bool tensors -> the same on `device`, in one host-to-device copy of their concatenation."""
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.flatten().long() for t in tensors]).pin_memory().to(device, non_blocking=True)
    parts = flat.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors)]


# Batch sizes a decode step's CUDA graph is captured for: a step of B sequences replays the smallest bucket of at least
# B, the bucket's other rows padding (token 0 at position 0, written to the scratch block, outputs dropped)
DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class StaticDecode:
    """One bucket's decode step at fixed addresses: the inputs a step copies in, the hidden states it leaves, the
    routing each MoE layer computed (the rows' expert loads are counted from it), and its CUDA graph."""

    def __init__(self, bucket: int, width: int, scratch_slot: int, device: torch.device):
        self.tokens = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(bucket, 1, dtype=torch.long, device=device)
        self.write_slots = torch.full((bucket, 1), scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.full((bucket, width), -1, dtype=torch.int32, device=device)
        self.hidden: Optional[torch.Tensor] = None
        self.routing: dict[str, torch.Tensor] = {}
        self.graph = None


class DecodeGraphs:
    """Decode steps (one new token per sequence) as CUDA graphs, one per batch-size bucket: a step replays the
    model's launches instead of issuing each from Python. A graph replays fixed shapes at fixed addresses, so a step
    is padded to its bucket, its block tables to the most blocks a sequence can have (the paged decode kernel stops
    at each row's own length), and its inputs are copied into the bucket's buffers. Needs the paged MLA decode (the
    gather path's shapes follow the history's length; on GPUs the Triton kernel, as the torch recurrence visits every
    table column) and no host read inside the step (float32 experts on CUDA read their offsets back: BF16, or
    moe_kernel "triton"). Without `capture` (CPUs, which have no graphs) the same static step runs eagerly, which is
    what the tests check there."""

    def __init__(self, runner: "ModelRunner", max_batch: int, capture: bool):
        if runner.decode is None:
            raise ValueError("decode graphs need the paged MLA decode (mla_decode paged or triton), not the gather path")
        self.runner, self.capture = runner, capture
        cache, args = runner.cache, runner.model.args
        self.width = -(-min(args.max_seq_len, cache.num_blocks * cache.block_size) // cache.block_size)
        self.buckets = [b for b in DECODE_BUCKETS if b < max_batch] + [max_batch]
        self.static: dict[int, StaticDecode] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for every bucket's graph

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def forward(self, block_tables: list[list[int]], starts: list[int], tokens: list[int]) -> torch.Tensor:
        """Hidden states [B, 1, dim] for each sequence's token at positions starts[b]."""
        B = len(tokens)
        bucket = self.bucket(B)
        static = self.static.get(bucket)
        first = static is None
        if first:
            static = self.static[bucket] = StaticDecode(bucket, self.width, self.runner.cache.scratch_slot,
                                                        self.runner.device)
        self._copy_inputs(static, block_tables, starts, tokens)
        if not self.capture:
            self._step(static)
        else:
            if first:
                self._capture(static)
            static.graph.replay()  # after a capture too: capturing records the launches, it computes nothing
        for name, moe in self.runner.moe_layers:
            if name in static.routing:
                # the real rows' routing, not the padding's; a copy, as the next replay overwrites the buffer
                moe.loads.append(static.routing[name][:B].clone())
        return static.hidden[:B]

    def _copy_inputs(self, static: StaticDecode, block_tables, starts, tokens) -> None:
        """Built on the host, padded to the bucket and the full table width, copied into the bucket's buffers."""
        bucket, B = static.tokens.shape[0], len(tokens)
        pad = bucket - B
        positions = np.array(starts + [0] * pad)[:, None]
        valid = np.arange(bucket)[:, None] < B
        write, _, table = self.runner.cache.slots(block_tables + [[]] * pad, positions, valid, max(starts) + 1,
                                                  gather=False)
        tables = torch.full((bucket, self.width), -1, dtype=torch.int32, device="cpu")
        tables[:, :table.shape[1]] = table
        host = (torch.tensor(tokens + [0] * pad, device="cpu")[:, None], torch.from_numpy(positions), write, tables)
        for buffer, values in zip((static.tokens, static.positions, static.write_slots, static.tables), host):
            buffer.copy_(values, non_blocking=True)

    def _step(self, static: StaticDecode) -> None:
        """The model over the bucket's buffers; the hidden states and each MoE layer's routing left in `static`."""
        runner = self.runner
        view = runner.cache.view(static.write_slots, None, self.width * runner.cache.block_size, static.tables,
                                 static.positions, runner.decode)
        held = {name: len(moe.loads) for name, moe in runner.moe_layers}
        static.hidden = runner.model(static.tokens, static.positions, cache=view, form="absorbed")
        # the routing of the layers that ran (the MTP layer's did not)
        static.routing = {name: moe.loads.pop() for name, moe in runner.moe_layers if len(moe.loads) > held[name]}

    def _capture(self, static: StaticDecode) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels: neither may happen while capturing),
        then capture one step. The warm-ups write this step's latents to the cache, as the replay after the capture
        does again: the same values to the same slots."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(static)
        torch.cuda.current_stream().wait_stream(side)
        static.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(static.graph, pool=self.pool):
            self._step(static)


# Forward calls between two countings of the experts' loads (each MoE layer keeps its calls' [tokens, topk] ids
# meanwhile)
COUNT_LOAD_EVERY = 32


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache, micro_batches: int = 1, decode=None):
        """`decode`: the paged MLA decode kernel absorbed-form calls run (mla_decode.decode_kernel), or None to
        attend over each row's history gathered out of the pages."""
        self.model = model
        self.cache = cache
        self.decode = decode
        self.micro_batches = micro_batches
        self.moe_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.device = model.embed.weight.device
        self._expert_load = {name: torch.zeros(model.args.n_routed_experts, dtype=torch.long, device=self.device)
                             for name, _ in self.moe_layers}
        self._uncounted = 0  # forward calls whose routing the MoE layers still hold
        for _, moe in self.moe_layers:
            moe.take_load()  # calls made before this runner (another engine's, a plain loop's) are not its load
        self.graphs: Optional[DecodeGraphs] = None  # decode steps of one token per sequence, when set

    def _inputs(self, block_tables, starts, rows, form: MLAForm):
        """The step's inputs built on the host from what the scheduler knows (nothing is read back from the
        device), then copied in one go: tokens, positions [B, S], the cache view, the packing (or None)."""
        tokens, positions, valid = _pad(rows, starts)
        length = max(st + len(r) for st, r in zip(starts, rows))
        paged = self.decode is not None and form == "absorbed"
        write_slots, read_slots, tables = self.cache.slots(block_tables, positions, valid, length, gather=not paged)
        packing = Packing.of_valid(valid, starts) if not valid.all() else None
        host = [torch.from_numpy(tokens), torch.from_numpy(positions), write_slots, tables if paged else read_slots] \
            + ([packing.index] if packing else [])
        tokens, positions, write_slots, slots, *index = to_device_once(host, self.device)
        packing = Packing(index[0], packing.shape, packing.spans) if packing else None
        view = self.cache.view(write_slots, None, length, slots, positions, self.decode) if paged else \
            self.cache.view(write_slots, slots, length)
        return tokens, positions, view, packing

    def form_for(self, starts: list[int], rows: list[list[int]]) -> MLAForm:
        """The cheaper MLA form for rows of tokens at positions starts[b]..., as the padded batch runs them."""
        return cheaper_mla_form(self.model.args, max(map(len, rows)), max(st + len(r) for st, r in zip(starts, rows)))

    @property
    def expert_load(self) -> dict[str, torch.Tensor]:
        """Tokens routed to each expert [E], per MoE layer, over every call so far."""
        self._take_loads()
        return self._expert_load

    def _take_loads(self) -> None:
        for name, moe in self.moe_layers:
            self._expert_load[name] += moe.take_load()
        self._uncounted = 0

    def _count_load(self) -> None:
        """Count the MoE layers' routing every COUNT_LOAD_EVERY calls: a count is a few ops per layer whatever the
        calls it covers (counted every step, about 0.1 ms of a decode step of the demo model)."""
        self._uncounted += 1
        if self._uncounted >= COUNT_LOAD_EVERY:
            self._take_loads()

    def _split(self, steps: Callable, B: int, *per_row) -> torch.Tensor:
        """steps(micro_batch, *per_row) -> a forward's generator of [b, S_b, ...], over micro-batches of the B rows
        (each per-row argument, a list or a tensor, sliced along its first dimension) run by turns; joined into
        [B, S, ...] with each part padded to the widest."""
        n = min(self.micro_batches, B)
        bounds = [B * i // n for i in range(n + 1)]
        parts = by_turns([steps(i, *(rows[bounds[i]:bounds[i + 1]] for rows in per_row)) for i in range(n)])
        if n == 1:
            return parts[0]
        width = max(p.shape[1] for p in parts)
        return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])

    @torch.inference_mode()
    def forward(self, block_tables: list[list[int]], starts: list[int], rows: list[list[int]],
                form: MLAForm) -> torch.Tensor:
        """Row b's tokens at positions starts[b]... -> hidden states [B, S, dim] (padding rows are junk)."""
        def steps(micro_batch, block_tables, starts, rows):
            tokens, positions, view, packing = self._inputs(block_tables, starts, rows, form)
            return self.model.steps(tokens, positions, cache=view, form=form, micro_batch=micro_batch,
                                    packing=packing)

        if self.graphs is not None and form == "absorbed" and all(len(r) == 1 for r in rows) \
                and len(rows) <= self.graphs.buckets[-1]:
            h = self.graphs.forward(block_tables, starts, [r[0] for r in rows])
        else:
            h = self._split(steps, len(rows), block_tables, starts, rows)
        self._count_load()
        return h

    @torch.inference_mode()
    def draft_logits(self, block_tables: list[list[int]], starts: list[int], next_tokens: list[list[int]],
                     h: torch.Tensor) -> torch.Tensor:
        """MTP logits [B, V] at each row's last position, from hidden states h [B, >=S, dim] at positions
        starts[b]... and the tokens that follow them (a draft follows the last); also writes those positions into the
        MTP layer of the cache."""
        form = self.form_for(starts, next_tokens)

        def steps(micro_batch, block_tables, starts, next_tokens, h):
            tokens, positions, view, packing = self._inputs(block_tables, starts, next_tokens, form)
            last = torch.tensor([len(t) - 1 for t in next_tokens], device=self.device)
            logits = yield from self.model.mtp_steps(h[:, :tokens.shape[1]], tokens, positions, cache=view, form=form,
                                                     micro_batch=micro_batch, packing=packing, last=last)
            return logits[:, None]  # [b, 1, V]: _split joins micro-batches as [b, S, ...] along their rows

        logits = self._split(steps, len(next_tokens), block_tables, starts, next_tokens, h)[:, 0]
        self._count_load()
        return logits
