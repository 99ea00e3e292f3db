"""What serving on a GPU needs, checked on the CPU: every tensor an engine step makes names its device, and a
decode step reads the device back to the host at most once (its chosen tokens), never per layer."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from moeserve.cluster import LLM, Engine, EngineConfig, SamplingParams
from moeserve.kernels.errors import InputError
from moeserve.kernels.load import load_model, resolve_device, resolve_dtype

# torch functions that make a tensor from nothing: without `device=` they land on the CPU, wherever the model is
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.scalar_tensor,
             torch.empty_strided}
# reads of a tensor's values by the host: on a GPU each waits for the device to finish its queue
# (under inference mode, which the engine's steps run in, int() and bool() of a tensor reach the dispatch mode as
# aten::item and aten::is_nonzero, not decomposed into _local_scalar_dense)
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::_unique2",
            "aten::unique_consecutive", "aten::unique_dim", "aten::unique_dim_consecutive"}
SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item}


class FactoriesNameTheirDevice(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            raise AssertionError(f"{func.__name__} without device= inside Engine.step")
        return func(*args, **kwargs)


class HostReads(TorchFunctionMode):
    """Counts the host's reads of tensor values: the methods here, the aten ops through a dispatch mode."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops = self._Ops(self)

    class _Ops(TorchDispatchMode):
        def __init__(self, outer):
            super().__init__()
            self.outer = outer

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in SYNC_OPS:
                self.outer.count += 1
            return func(*args, **(kwargs or {}))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_METHODS:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.ops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.ops.__exit__(*exc)


MIXED = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
         SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
         SamplingParams(max_tokens=12, temperature=1.0, top_k=20, ignore_eos=True),
         SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=["\n\n"])]


@pytest.fixture(scope="module")
def demo():
    return LLM(device="cpu")


@pytest.mark.parametrize("mtp", [False, True])
def test_every_tensor_an_engine_step_makes_names_its_device(demo, mtp, monkeypatch):
    llm = LLM(device="cpu", mtp=True) if mtp else demo
    real = Engine.step

    def checked(self, *args, **kwargs):
        with FactoriesNameTheirDevice():
            return real(self, *args, **kwargs)
    monkeypatch.setattr(Engine, "step", checked)
    prompts = ["def fibonacci(", "import os\n", "class Stack:", "x = [i for i in"]
    outs = llm.generate(prompts * 2, MIXED * 2)
    assert all(o.finish_reason for o in outs) and not any(o.error for o in outs)
    assert not mtp or sum(o.drafts_proposed for o in outs) > 0
    # the mode sees what it must: a factory call without a device inside it fails
    with pytest.raises(AssertionError, match="arange without device"), FactoriesNameTheirDevice():
        torch.arange(3)


def test_a_decode_step_reads_the_device_once_and_no_layer_reads_it(demo):
    engine = demo.engine
    ids = [engine.add_request(demo.encode(p), params)
           for p, params in zip(["def main(", "for i in range(", "return x +", "# sort the"], MIXED)]
    engine.step()  # the prompts, in one prefill step
    assert all(not engine.requests[r].is_prefilling for r in ids)
    counts = []
    while engine.has_unfinished():
        with HostReads() as reads:
            outputs = engine.step()
        counts.append(reads.count)
        assert outputs  # every step was a decode step of the four requests
    assert len(counts) == 11 and max(counts) <= 1, counts
    # the counter sees a per-layer read where there is one, in inference mode as outside it
    for inference in (False, True):
        with torch.inference_mode(inference), HostReads() as reads:
            x = torch.randn(4, 3)
            x.nonzero(), int(x.max()), bool(x.any()), x.tolist()
        assert reads.count == 4, inference


def test_device_and_dtype_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(InputError, match="device must be one of"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="dtype must be"):
        resolve_dtype("float64", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="sees no GPU"):
            LLM(device="cuda")


def test_an_engine_refuses_a_model_on_another_device(checkpoints):
    model = load_model(checkpoints("v3")[0], dtype=torch.float32, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(InputError, match="cuda"):  # no GPU here, or the model is not on it
        Engine(model, EngineConfig(device="cuda"))


def test_a_decode_step_with_mtp_reads_the_device_twice_and_no_layer_reads_it():
    """With MTP a step reads the verified tokens, then the next drafts (they come from the positions the verification
    accepted): two reads for the whole batch, greedy and sampled alike, not one per sequence."""
    llm = LLM(device="cpu", mtp=True)
    engine = llm.engine
    for prompt, params in zip(["def main(", "for i in range(", "return x +", "# sort the"], MIXED):
        engine.add_request(llm.encode(prompt), params)
    engine.step()
    counts = []
    while engine.has_unfinished():
        with HostReads() as reads:
            engine.step()
        counts.append(reads.count)
    assert engine.drafts_proposed > 0 and len(counts) >= 4 and max(counts) <= 2, counts
