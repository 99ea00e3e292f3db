"""A layer of one micro-batch fails while the other micro-batch's layers are in flight, on the one thread that runs
both by turns: the recovery (which waits until no layer is in flight) begins at once, and the outputs are those
of one batch."""
import threading
import time

import pytest
import torch

from moeserve.actors.transport import ExpertTransport, Recovery
from moeserve.kernels.load import load_model
from moeserve.kernels.model import MoE, by_turns


class Router:
    """What ExpertTransport needs of a shard's router, for experts in this process."""

    def __init__(self, recovery: Recovery):
        self.recovery = recovery

    def dispatches(self, layer_id, x, indices, weights):
        return []

    def count_time(self, counter, start):
        pass

    def combined(self, handle, replies):
        return replies[0]


class LosesOneReply(ExpertTransport):
    """Experts in this process behind the remote transports' dispatch, combine and recovery; the first combine of
    micro-batch 0 at `lost_layer` fails with `error` (by default a dead peer's), and `lost` tells the cluster."""

    def __init__(self, layer_id: int, router: Router, experts, lost_layer: int, lost: threading.Event,
                 error: str = "Connection closed by peer"):
        super().__init__(layer_id, router)
        self.experts, self.lost_layer, self.lost, self.error = experts, lost_layer, lost, error

    def _send(self, sent, micro_batch):
        return None

    def _replies(self, handle):
        if self.layer_id == self.lost_layer and handle.micro_batch == 0 and not self.lost.is_set():
            self.lost.set()
            raise RuntimeError(self.error)
        x, indices, weights = handle.inputs
        return [self.experts.dispatch(x, indices, weights)]  # local experts compute as they dispatch


def losing_one_reply(model, recovery: Recovery, lost: threading.Event, **kwargs) -> None:
    """Put every MoE layer's experts behind LosesOneReply; the first MoE layer loses the reply."""
    router = Router(recovery)
    moe_layers = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]
    for i in moe_layers:
        ffn = model.layers[i].ffn
        ffn.__dict__["experts"] = LosesOneReply(i, router, ffn.experts, moe_layers[0], lost, **kwargs)


def test_a_lost_reply_of_one_micro_batch_recovers_without_waiting_for_the_other(checkpoints):
    model = load_model(checkpoints("v3")[0], dtype=torch.float32)
    tokens = torch.randint(2, 200, (6, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(tokens)
    recovery, lost = Recovery(grace_s=5.0, timeout_s=5.0), threading.Event()
    losing_one_reply(model, recovery, lost)

    quiesced = {}

    def cluster():  # the controller's part: quiesce the shard, (replace the lost actor,) resume it
        lost.wait(10)
        time.sleep(0.05)  # micro-batch 1 goes on meanwhile and sends its next layer
        start = time.monotonic()
        quiesced["ok"] = recovery.quiesce()
        quiesced["after_s"] = time.monotonic() - start
        recovery.resume()

    thread = threading.Thread(target=cluster)
    thread.start()
    with torch.inference_mode():
        parts = by_turns([model.steps(tokens[:3], micro_batch=0), model.steps(tokens[3:], micro_batch=1)])
    thread.join()
    assert lost.is_set() and quiesced["ok"] and quiesced["after_s"] < 1.0
    assert recovery.in_flight == 0 and recovery.epoch == 1
    assert torch.allclose(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


def test_a_step_that_fails_lets_go_of_the_other_micro_batchs_layer(checkpoints):
    """A cluster that does not recover (no grace: the shards of `failures.restart: false`): micro-batch 0's layer
    raises its error at once, and the layer micro-batch 1 left in flight is let go of, so that a later quiesce does
    not wait for it."""
    model = load_model(checkpoints("v3")[0], dtype=torch.float32)
    recovery, lost = Recovery(grace_s=0.0, timeout_s=5.0), threading.Event()
    losing_one_reply(model, recovery, lost, error="not a peer's error")
    tokens = torch.randint(2, 200, (6, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        try:
            by_turns([model.steps(tokens[:3], micro_batch=0), model.steps(tokens[3:], micro_batch=1)])
        except RuntimeError as e:
            assert "not a peer's error" in str(e)
            # at once, not when the collector finalises the suspended forward (its frame lives in the traceback)
            assert recovery.in_flight == 0
        else:
            pytest.fail("the step did not fail")
