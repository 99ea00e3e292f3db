"""Reading Hugging Face DeepSeek checkpoints: safetensors, sharded or not, BF16/FP32 or FP8 block-scaled.

Files are memory-mapped and tensors read one at a time, so a process that needs a slice of the model
(the attention side, or a few routed experts) reads only that slice: `Checkpoint.tensors(select=...)`
filters by the checkpoint's own tensor names. Every file's header is checked against its size before
any tensor is mapped, so a truncated download is an error message, not a bus error.

Glossary:
- HF name: the tensor's name in the checkpoint (`model.layers.3.mlp.experts.17.up_proj.weight`).
- local name: the module path in `kernels.model` (`layers.3.ffn.experts.17.w3.weight`), in the names of
  DeepSeek-V3's reference model.
"""
import json
import re
import struct
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .args import ModelArgs
from .errors import CheckpointError
from .fp8 import FP8_DTYPE, weight_dequant

SCALE_SUFFIX = "_scale_inv"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# (HF segment, local segment): one table read both ways, so names map back for error messages.
_SEGMENTS = [
    ("self_attn.q_proj", "attn.wq"), ("self_attn.q_a_proj", "attn.wq_a"),
    ("self_attn.q_a_layernorm", "attn.q_norm"), ("self_attn.q_b_proj", "attn.wq_b"),
    ("self_attn.kv_a_proj_with_mqa", "attn.wkv_a"), ("self_attn.kv_a_layernorm", "attn.kv_norm"),
    ("self_attn.kv_b_proj", "attn.wkv_b"), ("self_attn.o_proj", "attn.wo"),
    ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"), ("mlp", "ffn"),
    ("shared_head.norm", "norm"), ("shared_head.head", "head"), ("embed_tokens", "embed"),
]
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def hf_to_local(name: str, n_layers: int) -> str:
    """`model.layers.{i}.…` -> `layers.{i}.…`; layers at index >= n_layers are MTP modules -> `mtp.{k}.…`."""
    if name == "lm_head.weight":
        return "head.weight"
    name = name.removeprefix("model.")
    for hf, local in _SEGMENTS:
        name = re.sub(rf"(^|\.){re.escape(hf)}(?=\.|$)", rf"\g<1>{local}", name)
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        own = rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "norm", "head", "embed")
        name = f"mtp.{k}.{rest}" if own else f"mtp.{k}.block.{rest}"
    return name


def local_to_hf(name: str, n_layers: int) -> str:
    """Inverse of `hf_to_local`."""
    if name == "head.weight":
        return "lm_head.weight"
    m = re.match(r"^mtp\.(\d+)\.(block\.)?(.*)$", name)
    if m:
        name = f"layers.{n_layers + int(m.group(1))}.{m.group(3)}"
        if not m.group(2):  # the MTP module's own norm/head live under shared_head in the release
            name = re.sub(r"^(layers\.\d+\.)(norm|head)\.", r"\1shared_head.\2.", name)
    for hf, local in _SEGMENTS:  # same order: specific entries (ffn.gate.bias) before general (ffn)
        if local in ("norm", "head"):
            continue
        name = re.sub(rf"(^|\.){re.escape(local)}(?=\.|$)", rf"\g<1>{hf}", name)
    return "model." + name


def routed_expert_of(name: str) -> Optional[tuple[int, int]]:
    """(layer, expert) for a routed expert's tensor, None for everything else."""
    m = _EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_safetensors(path: Path) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file); "
                                  "the file is corrupt or truncated: re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download it") from None
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= d
            width = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}; re-download it") from None
        if stop - begin != count * width:
            raise CheckpointError(f"{path}: tensor {name!r} has {stop - begin} bytes for shape {info['shape']}")
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: file is {size} bytes but its header describes {8 + n + end}; "
                              "the shard is truncated or corrupt: re-download it")
    return list(header)


class Checkpoint:
    """A checkpoint directory: `config.json` plus `model.safetensors` or shards listed by
    `model.safetensors.index.json`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; pass a checkpoint directory with config.json "
                                  "and *.safetensors")
        self.args = ModelArgs.from_file(self.path)
        self._file_of = self._index()
        self._handles: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
            files = sorted(set(weight_map.values()))
            for file in files:
                if not (self.path / file).is_file():
                    raise CheckpointError(f"{self.path / file}: shard listed in {index.name} is missing; "
                                          "download every shard")
                names = set(_check_safetensors(self.path / file))
                absent = [k for k, v in weight_map.items() if v == file and k not in names]
                if absent:
                    raise CheckpointError(f"{self.path / file}: index lists {absent[0]!r} in this shard but the "
                                          "shard does not hold it")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        return {name: f.name for f in files for name in _check_safetensors(f)}

    def shards(self) -> dict[str, list[str]]:
        """Shard file -> the HF names it holds, scale tensors included."""
        out: dict[str, list[str]] = {}
        for name, file in self._file_of.items():
            out.setdefault(file, []).append(name)
        return dict(sorted(out.items()))

    def names(self, select: Optional[Callable[[str], bool]] = None) -> list[str]:
        """HF names of the weights (scale tensors excluded), filtered by `select`."""
        return [n for n in self._file_of if not n.endswith(SCALE_SUFFIX) and (select is None or select(n))]

    def is_fp8(self, name: str) -> bool:
        """Whether a weight is stored as e4m3 (read from the file's header, not its data)."""
        return self._handle(self._file_of[name]).get_slice(name).get_dtype() == "F8_E4M3"

    def fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An e4m3 weight as stored and its `weight_scale_inv`, checked against each other."""
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self._file_of:
            raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has no {scale_name!r}")
        weight, scale = self.raw(name), self.raw(scale_name)
        block = self.args.weight_block_size or (128, 128)
        expected = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{self.path}: {scale_name} has shape {tuple(scale.shape)}, expected {expected} for "
                                  f"a {tuple(weight.shape)} weight in {block[0]}x{block[1]} blocks")
        return weight, scale.float()

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (FP8 stays FP8)."""
        return self._handle(self._file_of[name]).get_tensor(name)

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # safetensors raises its own error type for bad files
                raise CheckpointError(f"{self.path / file}: cannot open ({e}); re-download it") from None
        return self._handles[file]

    def tensor(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One weight, FP8 blocks dequantised exactly (fp8 x scale_inv), cast to `dtype` if given."""
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: checkpoint has no tensor {name!r}")
        t = self.raw(name)
        if t.dtype == FP8_DTYPE:
            t = weight_dequant(*self.fp8(name), self.args.weight_block_size or (128, 128), torch.float32)
        return t if dtype is None else t.to(dtype)

    def tensors(self, select: Optional[Callable[[str], bool]] = None,
                dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every weight `select` accepts, read lazily one at a time."""
        for name in self.names(select):
            yield name, self.tensor(name, dtype)


def save_checkpoint(model: torch.nn.Module, args: ModelArgs, path: str | Path, dtype: torch.dtype = torch.bfloat16,
                    skip: Callable[[str], bool] = lambda local: False) -> Path:
    """Write `model` as a Hugging Face checkpoint (config.json + model.safetensors) under DeepSeek's names.
    The aux-loss-free gate bias stays fp32. `skip(local_name)` leaves tensors out (shared MTP embed/head)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for local, tensor in model.state_dict().items():
        if skip(local):
            continue
        keep_fp32 = local.endswith("gate.bias")
        tensors[local_to_hf(local, args.n_layers)] = tensor.detach().to(torch.float32 if keep_fp32 else dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {**args.to_config(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
