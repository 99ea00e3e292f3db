"""Train moeserve's demo model: a small DeepSeek-V3-architecture model on the source of the Python standard
library of the interpreter running this script, a corpus every machine has without a download.

The architecture is DeepSeek-V3's in miniature: MLA, a dense first layer, shared + fine-grained routed
experts with group-limited sigmoid routing, the aux-loss-free bias updated after every step as in the paper
(b_i += gamma * sign(mean_load - load_i)), and one MTP module trained with the MTP loss (weight lambda).
The tokenizer is a byte-level BPE trained with `tokenizers`. The result is written in DeepSeek's Hugging
Face layout, in BF16, and converted to FP8 with `moeserve quantize`.

    python tools/train_demo.py --minutes 30          # writes cluster/models/moeserve-demo{,-fp8}
"""
import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeserve.kernels.args import ModelArgs
from moeserve.kernels.checkpoint import save_checkpoint
from moeserve.kernels.model import MoE, Transformer
from moeserve.kernels.quantize import quantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def demo_args(vocab_size: int) -> ModelArgs:
    return ModelArgs(
        model_type="deepseek_v3", vocab_size=vocab_size, dim=192, inter_dim=512, moe_inter_dim=80,
        n_layers=4, n_dense_layers=1, n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, topk_method="noaux_tc", score_func="sigmoid", norm_topk_prob=True,
        route_scale=2.5, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_seq_len=2048, rope_theta=10000.0, rope_type="default", n_mtp_layers=1, bos_token_id=0, eos_token_id=1,
    )


def corpus_files() -> list[Path]:
    """The standard library's own modules, tests and bundled applications left out, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")
    return sorted(p for p in stdlib.rglob("*.py") if not set(p.relative_to(stdlib).parts) & set(skip))


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
              "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def init_weights(model: Transformer) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("enorm.weight") or name.endswith("hnorm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("gate.bias"):
            torch.nn.init.zeros_(p)
            p.requires_grad_(False)  # moved by the balancing rule, not by gradients
        else:
            torch.nn.init.normal_(p, std=0.02)


def moe_layers(model: Transformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_bias(model: Transformer, gamma: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of underloaded experts, lower overloaded."""
    for moe in moe_layers(model):
        load = moe.take_load().float()
        moe.gate.bias += gamma * torch.sign(load.mean() - load)


def losses(model: Transformer, batch: torch.Tensor):
    """Next-token loss of the main model and the MTP loss (predict t_{i+2} from h_i and t_{i+1})."""
    h = model(batch[:, :-1])
    main = F.cross_entropy(model.logits(h).flatten(0, 1), batch[:, 1:].flatten())
    mtp_logits = model.mtp_forward(h[:, :-1], batch[:, 1:-1])
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), batch[:, 2:].flatten())
    return main, mtp


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor) -> dict:
    """Validation losses, expert load imbalance (max/mean over experts, per layer, averaged) with the learned
    bias and with it zeroed, and teacher-forced MTP top-1 accuracy."""
    model.eval()
    main, mtp = losses(model, windows)
    imbalance = {}
    for label, zero_bias in (("with_bias", False), ("without_bias", True)):
        saved = [m.gate.bias.clone() for m in moe_layers(model)]
        if zero_bias:
            for m in moe_layers(model):
                m.gate.bias.zero_()
        for m in moe_layers(model):
            m.take_load()
        model(windows[:, :-1])
        loads = [m.take_load().float() for m in moe_layers(model)[:-1]]  # main-model layers
        imbalance[label] = float(np.mean([(l.max() / l.mean()).item() for l in loads]))
        for m, b in zip(moe_layers(model), saved):
            m.gate.bias.copy_(b)
    model.train()
    return {"val_loss": main.item(), "val_mtp_loss": mtp.item(), "expert_imbalance": imbalance}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "cluster" / "models" / "moeserve-demo")
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget (default 30)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mtp-weight", type=float, default=0.3, help="lambda of the MTP loss (DeepSeek-V3: 0.3)")
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="bias update speed gamma (DeepSeek-V3: 0.001)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="continue training this checkpoint (its tokenizer is kept)")
    p.add_argument("--warmup", type=int, default=100)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)

    files = corpus_files()
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    val_ids = set(range(0, len(texts), 50))  # every 50th file is held out
    t0 = time.time()
    if a.resume:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(a.resume / "tokenizer.json"))
    else:
        tokenizer = train_tokenizer([t for i, t in enumerate(texts) if i not in val_ids], a.vocab)
    write_tokenizer(tokenizer, a.out)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    streams = {"train": [], "val": []}
    for i, text in enumerate(texts):
        streams["val" if i in val_ids else "train"].append([bos] + tokenizer.encode(text).ids + [eos])
    data = {k: torch.tensor(np.concatenate(v).astype(np.int64)) for k, v in streams.items()}
    print(f"corpus: {len(files)} files, {len(data['train']):,} train / {len(data['val']):,} val tokens; "
          f"tokenizer {time.time() - t0:.0f}s", flush=True)

    args = demo_args(tokenizer.get_vocab_size())
    model = Transformer(args)
    init_weights(model)
    if a.resume:  # the stored weights (BF16) over the fresh ones
        from moeserve.kernels.load import load_model
        stored = load_model(a.resume, dtype=torch.float32).state_dict()
        model.load_state_dict({k: v for k, v in stored.items() if k in model.state_dict()}, strict=False)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("mtp.0.embed", "mtp.0.head")))
    print(f"model: {n_params / 1e6:.2f}M parameters (MTP embedding and head shared)", flush=True)
    # MTP embedding and output head are the main model's, as in DeepSeek-V3
    model.mtp[0].embed = model.embed
    model.mtp[0].head = model.head
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(a.seed)
    L = a.seq_len + 1

    def batch_from(stream, n):
        starts = torch.randint(0, len(stream) - L, (n,), generator=gen)
        return torch.stack([stream[s:s + L] for s in starts.tolist()])

    val_windows = batch_from(data["val"], 32)
    budget = a.minutes * 60
    warmup = a.warmup
    log, step, start = [], 0, time.time()
    first = evaluate(model, val_windows)
    print(f"step 0: {first}", flush=True)
    est_steps = None
    while time.time() - start < budget:
        elapsed = time.time() - start
        if step == 20:
            est_steps = int(budget / (elapsed / 20))
        progress = min(1.0, elapsed / budget)
        lr = a.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        main_loss, mtp_loss = losses(model, batch_from(data["train"], a.batch))
        opt.zero_grad(set_to_none=True)
        (main_loss + a.mtp_weight * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        update_bias(model, a.bias_gamma)
        step += 1
        if step % 25 == 0:
            entry = {"step": step, "tokens": step * a.batch * a.seq_len, "seconds": round(time.time() - start, 1),
                     "loss": round(main_loss.item(), 4), "mtp_loss": round(mtp_loss.item(), 4), "lr": lr}
            if step % 250 == 0:
                entry.update(evaluate(model, val_windows))
            log.append(entry)
            print(json.dumps(entry), f"(~{est_steps} steps planned)", flush=True)
    final = evaluate(model, val_windows)
    print(f"final after {step} steps: {final}", flush=True)

    model.mtp[0].embed = torch.nn.Embedding(args.vocab_size, args.dim)  # untie before saving: stored once
    model.mtp[0].head = torch.nn.Linear(args.dim, args.vocab_size, bias=False)
    save_checkpoint(model, args, a.out, torch.bfloat16,
                    skip=lambda name: name in ("mtp.0.embed.weight", "mtp.0.head.weight"))
    (a.out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}) + "\n")
    report = {"steps": step, "tokens": step * a.batch * a.seq_len, "minutes": round((time.time() - start) / 60, 1),
              "parameters": n_params, "corpus_files": len(files), "python": sys.version.split()[0],
              "initial": first, "final": final, "log": log, "settings": {k: str(v) for k, v in vars(a).items()}}
    if a.resume and (a.resume / "training_log.json").is_file():  # keep the earlier run's curve in front
        report["previous"] = json.loads((a.resume / "training_log.json").read_text())
    (a.out / "training_log.json").write_text(json.dumps(report, indent=1) + "\n")
    fp8 = quantize_checkpoint(a.out, a.out.with_name(a.out.name + "-fp8"))
    (fp8 / "training_log.json").unlink(missing_ok=True)
    print(f"wrote {a.out} and {fp8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
