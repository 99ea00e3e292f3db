"""Write an untrained model of DeepSeek-V3's architecture at sizes of your choice: the demo model's shapes with
wider layers and more experts, weights drawn as the demo's training starts them (normal, std 0.02), the demo's
tokenizer. For benchmarks that need more compute per layer than the 5.56M-parameter demo model gives (its decode
step is mostly fixed per-layer costs); its text is noise.

    python tools/random_model.py --out /tmp/moeserve-47m                       # hidden 512, 32 experts of 256
    python tools/random_model.py --out /tmp/moeserve-big --dim 1024 --inter-dim 2816 --moe-inter-dim 512 --experts 64
    python tools/bench_cluster.py --model /tmp/moeserve-47m --transport sockets --layout one-group default
"""
import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

from train_demo import demo_args, init_weights  # same folder

from moeserve.cluster import DEMO_MODEL
from moeserve.kernels.args import ModelArgs
from moeserve.kernels.checkpoint import save_checkpoint
from moeserve.kernels.model import Transformer


def scaled_args(dim: int, inter_dim: int, moe_inter_dim: int, experts: int, activated: int, groups: int,
                limited_groups: int) -> ModelArgs:
    """The demo model's args with these widths and experts; the heads and low-rank widths grow with dim (a head per
    128 of it, q_lora_rank dim / 2, kv_lora_rank dim / 4, none below the demo's)."""
    demo = demo_args(vocab_size=4096)
    return dataclasses.replace(
        demo, dim=dim, inter_dim=inter_dim, moe_inter_dim=moe_inter_dim, n_routed_experts=experts,
        n_activated_experts=activated, n_expert_groups=groups, n_limited_groups=limited_groups,
        n_heads=max(demo.n_heads, dim // 128), q_lora_rank=max(demo.q_lora_rank, dim // 2),
        kv_lora_rank=max(demo.kv_lora_rank, dim // 4), n_mtp_layers=0)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, 1 or more")
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory to write (created; files in it replaced)")
    p.add_argument("--dim", type=positive, default=512, help="hidden size (demo: 192)")
    p.add_argument("--inter-dim", type=positive, default=1408, help="the dense layer's width (demo: 512)")
    p.add_argument("--moe-inter-dim", type=positive, default=256, help="each expert's width (demo: 80)")
    p.add_argument("--experts", type=positive, default=32, help="routed experts per MoE layer (demo: 16)")
    p.add_argument("--activated", type=positive, default=8, help="routed experts per token (demo: 4)")
    p.add_argument("--groups", type=positive, default=8, help="expert groups of the group-limited routing (demo: 4)")
    p.add_argument("--limited-groups", type=positive, default=4, help="groups a token may route to (demo: 2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.experts % a.groups or a.limited_groups > a.groups:
        p.error(f"--experts ({a.experts}) must split evenly into --groups ({a.groups}), and --limited-groups "
                f"({a.limited_groups}) must be at most --groups")
    if a.activated > a.experts // a.groups * a.limited_groups:
        p.error(f"--activated ({a.activated}) must be at most the experts of --limited-groups groups "
                f"({a.experts // a.groups * a.limited_groups})")
    args = scaled_args(a.dim, a.inter_dim, a.moe_inter_dim, a.experts, a.activated, a.groups, a.limited_groups)
    torch.manual_seed(a.seed)
    model = Transformer(args)
    init_weights(model)
    save_checkpoint(model, args, a.out, torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEMO_MODEL / name, a.out / name)
    params = sum(t.numel() for t in model.parameters())
    print(f"wrote {a.out}: {params / 1e6:.1f}M parameters, hidden {a.dim}, {a.experts} experts of {a.moe_inter_dim} "
          f"({a.activated} per token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
