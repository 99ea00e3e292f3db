"""Model arguments, read from a Hugging Face `config.json` of a DeepSeek-V3 or DeepSeek-V2 checkpoint.

Names follow DeepSeek-V3's reference `model.py` (`dim`, `n_dense_layers`, `n_activated_experts`, ...);
`from_config` maps the Hugging Face keys onto them and says which key is at fault when one is wrong.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# Behaviour that a config may leave out: the defaults of DeepSeek's own release for each generation.
_DEFAULTS = {
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    "deepseek_v2": {"topk_method": "greedy", "scoring_func": "softmax"},
}

# Keys without which the shapes of the weights are unknown; their absence is an error, never a guess.
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)
_REQUIRED_FOR_MOE = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")


@dataclass
class ModelArgs:
    model_type: Literal["deepseek_v3", "deepseek_v2"] = "deepseek_v3"
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    moe_layer_freq: int = 1
    n_heads: int = 128
    # moe
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = "noaux_tc"
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    norm_topk_prob: bool = True
    route_scale: float = 2.5
    # mla
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # rope (YaRN when rope_type == "yarn")
    max_seq_len: int = 163840
    rope_theta: float = 10000.0
    rope_type: Literal["default", "yarn"] = "yarn"
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    # multi-token prediction
    n_mtp_layers: int = 1
    # fp8 block size of the stored weights, None for a BF16/FP32 checkpoint
    weight_block_size: Optional[tuple[int, int]] = None
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the compressed KV latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """MTP blocks (layer_id >= n_layers) are always MoE, as in DeepSeek-V3's release."""
        return layer_id >= self.n_dense_layers and (layer_id >= self.n_layers or layer_id % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d) times YaRN's attention-temperature correction mscale(factor, mscale_all_dim)^2."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's scale on the rotated q/k parts: mscale(s, mscale) / mscale(s, mscale_all_dim), which is 1 for
        DeepSeek's own configs (the temperature then lives entirely in `softmax_scale`)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.mscale) / yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return yarn_mscale(self.rope_factor)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of latent KV cache one token occupies over all main-model layers."""
        return self.latent_dim * self.n_layers * torch.empty((), dtype=dtype).element_size()

    def to_config(self) -> dict[str, Any]:
        """The Hugging Face config.json that `from_config` reads back into these args."""
        config = {
            "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "intermediate_size": self.inter_dim, "moe_intermediate_size": self.moe_inter_dim,
            "num_hidden_layers": self.n_layers, "first_k_dense_replace": self.n_dense_layers,
            "moe_layer_freq": self.moe_layer_freq, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts, "num_experts_per_tok": self.n_activated_experts,
            "n_group": self.n_expert_groups, "topk_group": self.n_limited_groups, "topk_method": self.topk_method,
            "scoring_func": self.score_func, "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.route_scale, "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank, "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim,
            "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "num_nextn_predict_layers": self.n_mtp_layers,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "hidden_act": "silu", "attention_bias": False,
        }
        if self.rope_type == "yarn":
            config["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor, "beta_fast": self.beta_fast,
                                      "beta_slow": self.beta_slow, "mscale": self.mscale,
                                      "mscale_all_dim": self.mscale_all_dim,
                                      "original_max_position_embeddings": self.original_seq_len}
        if self.weight_block_size:
            config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": list(self.weight_block_size)}
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; a checkpoint directory must contain config.json")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_config(config)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelArgs":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        defaults = _DEFAULTS[model_type]

        def need(key):
            if key not in config:
                raise ConfigError(f"missing key {key!r} (required for model_type {model_type})")
            return config[key]

        for key in _REQUIRED:
            need(key)
        n_layers = int(need("num_hidden_layers"))
        n_dense = int(config.get("first_k_dense_replace", 0))
        has_moe = n_dense < n_layers or config.get("num_nextn_predict_layers", 0)
        if has_moe:
            for key in _REQUIRED_FOR_MOE:
                need(key)
        n_routed = int(config.get("n_routed_experts") or 0)
        n_groups = int(config.get("n_group") or 1)
        rope = _rope_from_config(config)
        args = cls(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            dim=int(config["hidden_size"]),
            inter_dim=int(config["intermediate_size"]),
            moe_inter_dim=int(config.get("moe_intermediate_size") or 0),
            n_layers=n_layers,
            n_dense_layers=n_dense,
            moe_layer_freq=int(config.get("moe_layer_freq", 1)),
            n_heads=int(config["num_attention_heads"]),
            n_routed_experts=n_routed,
            n_shared_experts=int(config.get("n_shared_experts") or 0),
            n_activated_experts=int(config.get("num_experts_per_tok") or 0),
            n_expert_groups=n_groups,
            n_limited_groups=int(config.get("topk_group") or n_groups),
            topk_method=config.get("topk_method") or defaults["topk_method"],
            score_func=config.get("scoring_func") or defaults["scoring_func"],
            norm_topk_prob=bool(config.get("norm_topk_prob", model_type == "deepseek_v3")),
            route_scale=float(config.get("routed_scaling_factor", 1.0)),
            q_lora_rank=config["q_lora_rank"] or None,
            kv_lora_rank=int(config["kv_lora_rank"]),
            qk_nope_head_dim=int(config["qk_nope_head_dim"]),
            qk_rope_head_dim=int(config["qk_rope_head_dim"]),
            v_head_dim=int(config["v_head_dim"]),
            max_seq_len=int(config.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            n_mtp_layers=int(config.get("num_nextn_predict_layers", 0)),
            weight_block_size=_block_size_from_config(config.get("quantization_config")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=_first(config.get("eos_token_id")),
            **rope,
        )
        args.validate()
        return args

    def validate(self) -> None:
        """Shapes that cannot hold together raise here, naming the config keys involved."""
        positive = {"vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                    "num_attention_heads": self.n_heads, "kv_lora_rank": self.kv_lora_rank,
                    "qk_rope_head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"scoring_func {self.score_func!r} is not one of 'softmax', 'sigmoid'")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"topk_method {self.topk_method!r} is not one of greedy, group_limited_greedy, noaux_tc")
        if self.n_routed_experts == 0:
            return
        if self.n_routed_experts % self.n_expert_groups:
            raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group "
                              f"({self.n_expert_groups})")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ConfigError(f"topk_group ({self.n_limited_groups}) must be between 1 and n_group "
                              f"({self.n_expert_groups})")
        per_group = self.n_routed_experts // self.n_expert_groups
        reachable = self.n_routed_experts if self.topk_method == "greedy" else self.n_limited_groups * per_group
        if not 1 <= self.n_activated_experts <= reachable:
            raise ConfigError(f"num_experts_per_tok ({self.n_activated_experts}) must be between 1 and the "
                              f"{reachable} experts that topk_group x experts-per-group can reach")
        if self.topk_method == "noaux_tc" and self.n_expert_groups > 1 and per_group < 2:
            raise ConfigError("topk_method noaux_tc scores a group by its top-2 experts: n_routed_experts / "
                              "n_group must be at least 2")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 for a context stretched s times."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _first(value):
    return value[0] if isinstance(value, list) else value


def _rope_from_config(config: dict) -> dict:
    """Both the released form (`rope_theta` + `rope_scaling`) and the newer `rope_parameters` form."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} is not supported; DeepSeek checkpoints use 'yarn' or none")
    out = {"rope_theta": theta, "rope_type": rope_type}
    if rope_type == "yarn":
        max_pos = int(config.get("max_position_embeddings", 4096))
        original = params.get("original_max_position_embeddings")
        if original is None:
            raise ConfigError("missing key 'original_max_position_embeddings' in rope_scaling (needed for YaRN)")
        factor = params.get("factor") or max_pos / original
        out.update(rope_factor=float(factor), original_seq_len=int(original),
                   beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                   mscale=float(params.get("mscale") or 0), mscale_all_dim=float(params.get("mscale_all_dim") or 0))
    return out


def _block_size_from_config(quant: Optional[dict]) -> Optional[tuple[int, int]]:
    if not quant:
        return None
    method, fmt = quant.get("quant_method"), quant.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise ConfigError(f"quantization_config {{quant_method: {method!r}, fmt: {fmt!r}}} is not supported; "
                          "moeserve reads FP8 e4m3 block-scaled checkpoints")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size must be [rows, cols], got {block!r}")
    return (block[0], block[1])
