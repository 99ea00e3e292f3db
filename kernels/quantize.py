"""Writing an FP8 checkpoint from a BF16/FP32 one, in DeepSeek-V3's released layout.

The linear weights of the decoder layers (attention projections, dense FFN, shared and routed experts)
become e4m3 with a `weight_scale_inv` per 128x128 block. Embeddings, the output heads, norms, the router
(`mlp.gate`) and MTP's `eh_proj` stay in their source dtype, as in DeepSeek's own FP8 release.
Each source shard becomes one target shard of the same name, so memory stays at one shard.
"""
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from .checkpoint import SCALE_SUFFIX, Checkpoint
from .errors import CheckpointError
from .fp8 import FP8_DTYPE, weight_quant

_KEEP = ("mlp.gate.weight", "eh_proj.weight", "shared_head.head.weight", "embed_tokens.weight", "norm.weight")


def is_quantized_weight(name: str, tensor: torch.Tensor) -> bool:
    return (name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2
            and not name.endswith(_KEEP))


def quantize_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128),
                        progress: Optional[Callable[[str], None]] = None) -> Path:
    ckpt = Checkpoint(src)
    dst = Path(dst)
    if dst.resolve() == ckpt.path.resolve():
        raise CheckpointError(f"{dst}: the output directory must differ from the input")
    dst.mkdir(parents=True, exist_ok=True)
    shards = ckpt.shards()
    files = list(shards)
    weight_map = {}
    for i, (file, names) in enumerate(shards.items(), 1):
        out = {}
        for name in names:
            tensor = ckpt.raw(name)
            if tensor.dtype == FP8_DTYPE:
                raise CheckpointError(f"{ckpt.path}: {name!r} is already FP8; quantize a BF16 or FP32 checkpoint")
            if is_quantized_weight(name, tensor):
                out[name], out[name + SCALE_SUFFIX] = weight_quant(tensor, block)
            else:
                out[name] = tensor.contiguous()
        save_file(out, str(dst / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in out})
        if progress:
            progress(f"[{i}/{len(files)}] {file}: {sum(t.dtype == FP8_DTYPE for t in out.values())} FP8 weights")
    config = json.loads((ckpt.path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if len(files) > 1 or (ckpt.path / "model.safetensors.index.json").exists():
        index = {"metadata": {"total_size": sum((dst / f).stat().st_size for f in files)}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for extra in ckpt.path.iterdir():  # tokenizer, generation config, chat template
        if extra.is_file() and extra.suffix in (".json", ".jinja", ".txt", ".model") and not (dst / extra.name).exists():
            shutil.copy2(extra, dst / extra.name)
    return dst
