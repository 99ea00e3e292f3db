"""Building a `Transformer` from a checkpoint without holding two copies of the weights.

The model is built on the meta device, then each tensor is read from the memory-mapped checkpoint,
checked against the module's shape and assigned in place. A process that holds only some routed experts
(an expert group) or none (an attention shard) builds its transports with `make_experts` and reads only
the tensors its modules have.
"""
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import SCALE_SUFFIX, Checkpoint, hf_to_local, local_to_hf, routed_expert_of
from .errors import CheckpointError, InputError
from .experts import ExpertTransport
from .fp8 import FP8Linear
from .model import MLA, Gate, Transformer, folding_pays
from .rope import rope_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by config name
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" is the GPU where torch sees one, else the CPU; "cuda" without a GPU is refused with what to do."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in DEVICES[1:]:
        raise InputError(f"device must be one of {list(DEVICES)} (or cuda:N), got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but torch sees no GPU here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda is not None}); use device 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A compute dtype by config name; "auto" is bfloat16 on GPUs and float32 on CPUs (the fastest on each)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
_MTP_SHARED = ("embed.weight", "head.weight")  # an MTP module may leave these out: the main model's serve


def load_model(checkpoint: Checkpoint | str | Path, dtype: torch.dtype = torch.bfloat16, with_mtp: bool = True,
               make_experts: Optional[Callable[[int], ExpertTransport]] = None,
               device: str | torch.device = "cpu", fp8_resident: bool = False) -> Transformer:
    """Load a DeepSeek-V3/V2 checkpoint into a `Transformer` in `dtype` on `device`, each tensor read from the
    checkpoint straight to the device. FP8 weights are dequantised into `dtype`, or with `fp8_resident` stay
    e4m3 with their block scales (`FP8Linear`: half the bytes of BF16). `with_mtp` loads the MTP module when the
    checkpoint has one."""
    device = resolve_device(device)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    args = ckpt.args
    n_layers = args.n_layers
    mtp_stored = any(hf_to_local(n, n_layers).startswith("mtp.") for n in ckpt.names())
    with torch.device("meta"):
        model = Transformer(args, make_experts, with_mtp=with_mtp and mtp_stored and args.n_mtp_layers > 0)
        fp8 = keep_fp8(model, ckpt) if fp8_resident else set()
    expected = model.state_dict()
    state = {}
    for name in ckpt.names():
        local = hf_to_local(name, n_layers)
        if local not in expected:
            if routed_expert_of(name) or local.startswith("mtp."):
                continue  # an expert this process does not hold, or an MTP module not asked for
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} does not belong to a {args.model_type} model "
                                  "with this config.json")
        target = expected[local]
        if local in fp8:
            state[local], state[local + SCALE_SUFFIX] = (t.to(device) for t in ckpt.fp8(name))
            continue
        tensor = ckpt.tensor(name, target.dtype if local.endswith("gate.bias") else dtype)
        if tensor.shape != target.shape:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json "
                                  f"implies {tuple(target.shape)}")
        state[local] = tensor.to(device)
    for local in expected:
        if local in state:
            continue
        shared = local.split(".", 2)[-1] if local.startswith("mtp.") else None
        if shared in _MTP_SHARED and shared in state:
            state[local] = state[shared]  # DeepSeek's release stores copies; share one
            continue
        raise CheckpointError(f"{ckpt.path}: checkpoint is missing tensor {local_to_hf(local, n_layers)!r}")
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = rope_inv_freq(args).to(device)
    if device.type == "cpu":
        check_cpu_dtype(dtype)
    column_major(model)
    if folding_pays(args) and not fp8:  # folding would make dense copies of FP8 weights
        for module in model.modules():
            if isinstance(module, MLA):
                module.fold_absorbed()
    return model.eval().requires_grad_(False)  # serving never needs gradients


def keep_fp8(model: Transformer, ckpt: Checkpoint) -> set[str]:
    """Turn every linear layer whose checkpoint weight is e4m3 into an `FP8Linear` (on the meta device, before
    loading); returns the local names of those weights."""
    kept = set()
    for name in ckpt.names():
        local = hf_to_local(name, ckpt.args.n_layers)
        path = local.removesuffix(".weight")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # not held by this process (an expert elsewhere, an MTP module not asked for)
        if isinstance(module, nn.Linear) and ckpt.is_fp8(name):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    FP8Linear(module.in_features, module.out_features, ckpt.args.weight_block_size or (128, 128)))
            kept.add(local)
    return kept


def column_major(model: nn.Module) -> None:
    """Store every linear weight [out, in] transposed in memory: an [in, out] tensor seen through `.t()`, so the
    values and shapes stay and only the layout changes. MKL's products of a 32-token batch with such weights ran
    15-35% faster on the CPU (the demo model's LM head 356 -> 259 us). A weight shared by two modules stays one."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, Gate)) and module.weight.device.type == "cpu":
            weight = module.weight
            if weight.data_ptr() not in moved:
                moved[weight.data_ptr()] = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)
            module.weight = moved[weight.data_ptr()]


_PROBE = ("import torch; x = torch.randn(512, 192, dtype={0}); w = torch.randn(512, 192, dtype={0}); "
          "torch.nn.functional.linear(x, w).sum()")


def check_cpu_dtype(dtype: torch.dtype) -> None:
    """Refuse, with what to do, a 16-bit compute dtype whose CPU matmuls kill the process. Some virtual machines
    report AMX but do not run its instructions: oneDNN's bfloat16 kernels then die of SIGILL (measured on a
    Firecracker VM with torch 2.13). Probed once per process, in a child process, and only for 16-bit types."""
    if dtype in (torch.bfloat16, torch.float16) and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        _probe_cpu_matmul(str(dtype))


@functools.lru_cache(maxsize=None)
def _probe_cpu_matmul(dtype: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE.format(dtype)], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return  # no verdict: go on
    if done.returncode == -signal.SIGILL:
        raise InputError(f"{dtype.removeprefix('torch.')} matmuls crash on this CPU (illegal instruction: it "
                         "reports AMX, which this machine does not run). Use dtype float32, or start with "
                         "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 set in the environment, which keeps oneDNN off AMX")
