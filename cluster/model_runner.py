"""Runs padded batches of sequences through the model over the paged latent cache, and the MTP module
over the positions a step made valid.

With `micro_batches` > 1 a batch is cut into that many micro-batches of rows that run in threads of their own
(DeepSeek-V3's decode overlap): while one waits for its routed experts on other processes, another computes
its attention. Rows never interact, so the outputs are those of one big batch."""
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F

from moeserve.kernels.cache import PagedLatentCache
from moeserve.kernels.model import MoE, MLAForm, Transformer, cheaper_mla_form


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (tokens [B, S], valid [B, S])."""
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # one tensor, not B
    valid = torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]
    return tokens, valid


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache, micro_batches: int = 1):
        self.model = model
        self.cache = cache
        self.micro_batches = micro_batches
        self.pool = ThreadPoolExecutor(micro_batches, thread_name_prefix="micro-batch") if micro_batches > 1 \
            else None
        self.moe_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.expert_load = {name: torch.zeros(model.args.n_routed_experts, dtype=torch.long)
                            for name, _ in self.moe_layers}

    def _inputs(self, block_tables, starts, rows):
        tokens, valid = _pad(rows)
        positions = (torch.tensor(starts)[:, None] + torch.arange(tokens.shape[1])).masked_fill(~valid, 0)
        return tokens, positions, valid, self.cache.view(block_tables, positions, valid)

    def form_for(self, starts: list[int], rows: list[list[int]]) -> MLAForm:
        """The cheaper MLA form for rows of tokens at positions starts[b]..., as the padded batch runs them."""
        return cheaper_mla_form(self.model.args, max(map(len, rows)), max(st + len(r) for st, r in zip(starts, rows)))

    def _count_load(self) -> None:
        for name, moe in self.moe_layers:
            self.expert_load[name] += moe.take_load()

    def _split(self, run: Callable, B: int, *per_row) -> torch.Tensor:
        """run(micro_batch, *per_row) -> [b, S_b, ...] over micro-batches of the B rows (each per-row argument, a
        list or a tensor, sliced along its first dimension), joined into [B, S, ...] with each part padded to the
        widest."""
        n = min(self.micro_batches, B)
        if n == 1:
            return run(0, *per_row)
        bounds = [B * i // n for i in range(n + 1)]

        def part(i: int) -> torch.Tensor:
            with torch.inference_mode():
                return run(i, *(rows[bounds[i]:bounds[i + 1]] for rows in per_row))

        parts = list(self.pool.map(part, range(n)))
        width = max(p.shape[1] for p in parts)
        return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])

    @torch.inference_mode()
    def forward(self, block_tables: list[list[int]], starts: list[int], rows: list[list[int]],
                form: MLAForm) -> torch.Tensor:
        """Row b's tokens at positions starts[b]... -> hidden states [B, S, dim] (padding rows are junk)."""
        def run(micro_batch, block_tables, starts, rows):
            tokens, positions, valid, view = self._inputs(block_tables, starts, rows)
            return self.model(tokens, positions, cache=view, form=form, valid=valid, micro_batch=micro_batch)

        h = self._split(run, len(rows), block_tables, starts, rows)
        self._count_load()
        return h

    @torch.inference_mode()
    def draft_logits(self, block_tables: list[list[int]], starts: list[int], next_tokens: list[list[int]],
                     h: torch.Tensor) -> torch.Tensor:
        """MTP logits [B, S, V] from hidden states h [B, >=S, dim] at positions starts[b]... and the tokens
        that follow them; also writes those positions into the MTP layer of the cache."""
        form = self.form_for(starts, next_tokens)

        def run(micro_batch, block_tables, starts, next_tokens, h):
            tokens, positions, valid, view = self._inputs(block_tables, starts, next_tokens)
            return self.model.mtp_forward(h[:, :tokens.shape[1]], tokens, positions, cache=view, form=form,
                                          valid=valid, micro_batch=micro_batch)

        logits = self._split(run, len(next_tokens), block_tables, starts, next_tokens, h)
        self._count_load()
        return logits
