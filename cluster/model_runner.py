"""Runs padded batches of sequences through the model over the paged latent cache, and the MTP module
over the positions a step made valid."""
import torch

from moeserve.kernels.cache import PagedLatentCache
from moeserve.kernels.model import MoE, MLAForm, Transformer


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (tokens [B, S], valid [B, S])."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[b, :len(r)] = True
    return tokens, valid


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model = model
        self.cache = cache
        self.moe_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        self.expert_load = {name: torch.zeros(model.args.n_routed_experts, dtype=torch.long)
                            for name, _ in self.moe_layers}

    def _inputs(self, block_tables, starts, rows):
        tokens, valid = _pad(rows)
        positions = (torch.tensor(starts)[:, None] + torch.arange(tokens.shape[1])).masked_fill(~valid, 0)
        return tokens, positions, self.cache.view(block_tables, positions, valid)

    def _count_load(self) -> None:
        for name, moe in self.moe_layers:
            if getattr(moe, "last_load", None) is not None:
                self.expert_load[name] += moe.last_load
                moe.last_load = None

    @torch.inference_mode()
    def forward(self, block_tables: list[list[int]], starts: list[int], rows: list[list[int]],
                form: MLAForm) -> torch.Tensor:
        """Row b's tokens at positions starts[b]... -> hidden states [B, S, dim] (padding rows are junk)."""
        tokens, positions, view = self._inputs(block_tables, starts, rows)
        h = self.model(tokens, positions, cache=view, form=form)
        self._count_load()
        return h

    @torch.inference_mode()
    def draft_logits(self, block_tables: list[list[int]], starts: list[int], next_tokens: list[list[int]],
                     h: torch.Tensor) -> torch.Tensor:
        """MTP logits [B, S, V] from hidden states h [B, >=S, dim] at positions starts[b]... and the tokens
        that follow them; also writes those positions into the MTP layer of the cache."""
        tokens, positions, view = self._inputs(block_tables, starts, next_tokens)
        form = "naive" if max(starts) == 0 else "absorbed"
        logits = self.model.mtp_forward(h[:, :tokens.shape[1]], tokens, positions, cache=view, form=form)
        self._count_load()
        return logits
