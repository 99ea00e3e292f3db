"""Record a model's own routing as a trace for `moeserve simulate --trace FILE`: the top-k expert ids its gate
chooses for every token of some text, at one MoE layer, saved as a [tokens, k] int tensor (.pt).

    python tools/record_routing.py --out demo-routing.pt            # the demo model on held-out stdlib files
    moeserve simulate --model cluster/models/moeserve-demo --topology cpu-local --trace demo-routing.pt \\
        --groups 4 --max-nodes 2 --redundant 4 --tokens 256
"""
import argparse
import sys
from pathlib import Path

import torch

from moeserve.cluster import DEMO_MODEL
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels.load import load_model
from train_demo import corpus_files  # same folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL)
    p.add_argument("--layer", type=int, default=None, help="MoE layer (default: the first)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    model = load_model(a.model, torch.float32, with_mtp=False)
    tok = Tokenizer(a.model)
    layer = a.layer if a.layer is not None else next(i for i in range(model.args.n_layers)
                                                     if model.args.is_moe_layer(i))
    chosen = []
    model.layers[layer].ffn.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[1]))
    files = corpus_files()[::50]  # the files the demo model's training held out
    seen = 0
    with torch.inference_mode():
        for f in files:
            ids = tok.encode(f.read_text(errors="replace"))[:512]
            model(torch.tensor([ids]))
            seen += len(ids)
            if seen >= a.tokens:
                break
    trace = torch.cat(chosen)[:a.tokens]
    torch.save(trace, a.out)
    print(f"wrote {a.out}: {tuple(trace.shape)} expert ids from layer {layer}; tokens per expert "
          f"{torch.bincount(trace.flatten(), minlength=model.args.n_routed_experts).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
