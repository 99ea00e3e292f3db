"""The cost model: KV-cache bytes, compute and parameters per token, and the communication-bound decode TPOT of
DeepSeek's expert-parallel inference model, for any DeepSeek (MLA + MoE) or dense GQA/MHA config.

Conventions (stated because the published figures depend on them):
- KV cache: bytes per token over all layers, BF16 unless a quantised cache is asked for. MLA caches
  kv_lora_rank + qk_rope_head_dim values per layer; GQA caches 2 x kv_heads x head_dim.
- Training compute per token: 6 x (parameters a token passes through, excluding the input embedding and
  counting only the activated experts) + causal attention, 3 x (2 x layers x heads x (qk_dim + v_dim) x seq)
  / 2 (forward and backward, half the positions under the causal mask), at sequence length 4096. This is the
  config-exact count; it gives DeepSeek-V3's 250 and V2's 155 GFLOPs.
- The paper's dense figures (394 GFLOPs for Qwen-2.5-72B, 2,448 for LLaMA-3.1-405B) follow instead the classic
  estimate 6 x (12 x layers x hidden^2 + vocab x hidden) (Kaplan et al.'s 12 L d^2 non-embedding parameters of
  a transformer with a 4d FFN and full multi-head attention, plus the head), which ignores GQA, the real FFN
  width and attention over the sequence. Both are reported.
- TPOT (decode, expert parallel, one expert per GPU): each MoE layer dispatches `tokens_per_device` x
  `experts_per_token` hidden vectors in FP8 (1 byte per value) and combines them in BF16 (2 bytes), over
  the GPU's scale-out link; two micro-batches overlap compute with communication, so a layer costs twice
  the communication time and compute hides behind it: TPOT = 2 x layers x (1 + 2) x tokens x experts x
  hidden / bandwidth.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .spec import TopologySpec

MODELS_DIR = Path(__file__).parent / "models"
MODEL_PRESETS = {p.stem: p for p in sorted(MODELS_DIR.glob("*.json"))}


@dataclass
class Architecture:
    name: str
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int          # GQA/MHA head size (qk); for MLA: qk_nope + qk_rope
    v_head_dim: int
    inter: int             # dense FFN width
    dense_layers: int
    moe_inter: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    experts_per_token: int = 0
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: int = 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "Architecture":
        def need(key):
            if key not in config:
                raise ValueError(f"{name}: config is missing {key!r}")
            return config[key]
        layers, hidden, heads = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads")
        common = dict(name=name, layers=layers, hidden=hidden, vocab=need("vocab_size"), heads=heads,
                      inter=need("intermediate_size"))
        if config.get("kv_lora_rank"):
            return cls(**common, kv_heads=heads, head_dim=need("qk_nope_head_dim") + need("qk_rope_head_dim"),
                       v_head_dim=need("v_head_dim"), dense_layers=config.get("first_k_dense_replace", 0),
                       moe_inter=need("moe_intermediate_size"), routed_experts=need("n_routed_experts"),
                       shared_experts=config.get("n_shared_experts") or 0,
                       experts_per_token=need("num_experts_per_tok"), q_lora_rank=config.get("q_lora_rank"),
                       kv_lora_rank=config["kv_lora_rank"], qk_rope_head_dim=config["qk_rope_head_dim"])
        head_dim = config.get("head_dim") or hidden // heads
        return cls(**common, kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
                   v_head_dim=head_dim, dense_layers=layers)

    # ---- parameters -------------------------------------------------------------------------------------
    def attention_params(self) -> int:
        d, h = self.hidden, self.heads
        if self.is_mla:
            qk = self.head_dim
            q = d * self.q_lora_rank + self.q_lora_rank * h * qk if self.q_lora_rank else d * h * qk
            return q + d * (self.kv_lora_rank + self.qk_rope_head_dim) + \
                self.kv_lora_rank * h * (self.head_dim - self.qk_rope_head_dim + self.v_head_dim) + h * self.v_head_dim * d
        return d * h * self.head_dim + 2 * d * self.kv_heads * self.head_dim + h * self.v_head_dim * d

    def params(self, active: bool) -> int:
        """Parameters excluding the input embedding, including the output head; `active` counts the experts
        one token uses."""
        moe_layers = self.layers - self.dense_layers
        experts = self.experts_per_token if active else self.routed_experts
        ffn = self.dense_layers * 3 * self.hidden * self.inter + \
            moe_layers * 3 * self.hidden * self.moe_inter * (experts + self.shared_experts)
        gates = moe_layers * self.hidden * self.routed_experts
        return self.layers * self.attention_params() + ffn + gates + self.vocab * self.hidden

    # ---- per-token costs -----------------------------------------------------------------------------------
    def kv_bytes_per_token(self, bytes_per_value: float = 2.0, kv_heads: Optional[int] = None,
                           window: Optional[int] = None, context: Optional[int] = None) -> float:
        """MLA: latent + rope key; otherwise K and V of kv_heads (pass kv_heads to price MHA/GQA/MQA). With a
        sliding window over a longer context, the per-token share is window / context."""
        if self.is_mla and kv_heads is None:
            values = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            values = (kv_heads or self.kv_heads) * (self.head_dim + self.v_head_dim)
        share = min(1.0, window / context) if window and context else 1.0
        return values * self.layers * bytes_per_value * share

    def train_flops_per_token(self, seq_len: int = 4096) -> float:
        attention = 2 * self.layers * self.heads * (self.head_dim + self.v_head_dim) * seq_len
        return 6 * self.params(active=True) + 3 * attention / 2

    def classic_train_flops_per_token(self) -> float:
        """6 x (12 x layers x hidden^2 + vocab x hidden): the dense-model convention of the paper's 394 and 2,448."""
        return 6 * (12 * self.layers * self.hidden ** 2 + self.vocab * self.hidden)


def load_architecture(name_or_path: str) -> Architecture:
    path = MODEL_PRESETS.get(name_or_path) or Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {name_or_path!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a config.json")
    return Architecture.from_config(json.loads(path.read_text()), name=path.stem if path.stem != "config" else
                                    path.parent.name)


def decode_tpot_ms(hidden: int, layers: int, tokens_per_device: int, experts_per_token: int,
                   link_gbps: float, dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                   micro_batches: int = 2) -> float:
    """The paper's communication-bound TPOT: micro_batches x layers x (dispatch + combine bytes per value)
    x tokens x experts x hidden / bandwidth."""
    per_layer_s = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden / (link_gbps * 1e9)
    return micro_batches * layers * per_layer_s * 1e3


def scale_out_gbps(spec: TopologySpec) -> float:
    """The link a GPU's dispatch traffic leaves on: its NIC across nodes, NVLink within one NVLink domain."""
    return spec.intra_node_gbps if spec.nodes == 1 else spec.nic_gbps


def cost_report(arch: Architecture, spec: TopologySpec, tokens_per_device: int = 32,
                hidden_override: Optional[int] = None, seq_len: int = 4096) -> dict:
    experts = arch.experts_per_token + arch.shared_experts if arch.routed_experts else 1
    hidden = hidden_override or arch.hidden
    tpot = decode_tpot_ms(hidden, arch.layers, tokens_per_device, experts, scale_out_gbps(spec))
    bf16 = arch.kv_bytes_per_token(2)
    alternatives = {
        "mha_bf16": arch.kv_bytes_per_token(2, kv_heads=arch.heads),
        **({"gqa8_bf16": arch.kv_bytes_per_token(2, kv_heads=8)} if arch.heads > 8 else {}),
        "mqa_bf16": arch.kv_bytes_per_token(2, kv_heads=1),
        "this_cache_fp8": arch.kv_bytes_per_token(1),
        "this_cache_int4": arch.kv_bytes_per_token(0.5),
        "this_cache_sliding_4k_of_32k": arch.kv_bytes_per_token(2, window=4096, context=32768),
    }
    return {
        "model": arch.name, "topology": spec.name,
        "attention": "MLA" if arch.is_mla else ("MHA" if arch.kv_heads == arch.heads else f"GQA-{arch.kv_heads}"),
        "kv_bytes_per_token": bf16, "kv_bytes_per_token_alternatives": alternatives,
        "total_params": arch.params(active=False) + arch.vocab * arch.hidden,
        "active_params": arch.params(active=True),
        "train_gflops_per_token": arch.train_flops_per_token(seq_len) / 1e9, "seq_len": seq_len,
        "train_gflops_per_token_classic": arch.classic_train_flops_per_token() / 1e9,
        "tpot_ms": tpot, "tokens_per_s": 1e3 / tpot,
        "tpot_assumptions": {"tokens_per_device": tokens_per_device, "experts_per_token": experts,
                             "hidden": hidden, "link_gbps": scale_out_gbps(spec), "dispatch": "fp8 (1 B)",
                             "combine": "bf16 (2 B)", "micro_batches": 2, "layers": arch.layers},
    }
