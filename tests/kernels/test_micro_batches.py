"""Micro-batches run by turns (model.by_turns): each MoE layer's tokens leave for the experts before the other
micro-batch's attention runs, and the outputs are those of one batch. The experts are local, behind a transport
that yields where a remote one does (combine, before it waits for the replies)."""
import torch

from moeserve.kernels.load import load_model
from moeserve.kernels.model import MoE, by_turns


class Logged:
    """An MoE layer's experts as a remote transport would run them, every dispatch and every combine's wait for the
    replies written to a log as (call, layer, micro-batch)."""

    def __init__(self, experts, layer: int, log: list):
        self.experts, self.layer, self.log = experts, layer, log

    def dispatch(self, x, indices, weights, micro_batch=0):
        self.log.append(("dispatch", self.layer, micro_batch))
        return micro_batch, self.experts.dispatch(x, indices, weights, micro_batch)

    def combine(self, handle):
        micro_batch, inner = handle
        yield  # the tokens are with the experts
        self.log.append(("combine", self.layer, micro_batch))
        return (yield from self.experts.combine(inner))


def test_two_micro_batches_overlap_each_layer_and_equal_one_batch(checkpoints):
    model = load_model(checkpoints("v3")[0], dtype=torch.float32)
    log = []
    moes = [(i, m) for i, m in enumerate(model.layers) if isinstance(m.ffn, MoE)]
    for i, layer in moes:
        layer.ffn.__dict__["experts"] = Logged(layer.ffn.experts, i, log)  # beside nn.Module's registry
    tokens = torch.randint(2, 200, (5, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = model(tokens)
        log.clear()
        parts = by_turns([model.steps(tokens[:3], micro_batch=0), model.steps(tokens[3:], micro_batch=1)])
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)
    # micro-batch 1 sends each layer's tokens before micro-batch 0 waits for that layer's experts, and micro-batch 0
    # sends the next layer's before micro-batch 1 waits: the one's expert work overlaps the other's attention
    expected = []
    for (i, _), nxt in zip(moes, moes[1:] + [None]):
        expected += [("dispatch", i, 1), ("combine", i, 0)] + ([("dispatch", nxt[0], 0)] if nxt else []) + \
            [("combine", i, 1)]
    assert log == [("dispatch", moes[0][0], 0)] + expected
