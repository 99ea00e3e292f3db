"""Tiny random DeepSeek checkpoints written by `transformers`, the oracle every model test compares against."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

V3_LIKE = dict(  # groups, sigmoid scores, aux-loss-free bias, q_lora, first_k_dense_replace 2, ragged hidden
    model_type="deepseek_v3", vocab_size=211, hidden_size=72, intermediate_size=88, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1, n_group=4, topk_group=2,
    num_experts_per_tok=4, first_k_dense_replace=2, kv_lora_rank=24, q_lora_rank=40, qk_rope_head_dim=8,
    qk_nope_head_dim=12, v_head_dim=10, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=512,
    rms_norm_eps=1e-6, num_nextn_predict_layers=1,
)
V2_LITE_LIKE = dict(  # no q_lora, softmax scores, greedy top-k, every layer MoE
    model_type="deepseek_v2", vocab_size=197, hidden_size=60, intermediate_size=80, moe_intermediate_size=20,
    num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    first_k_dense_replace=0, kv_lora_rank=20, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=12, routed_scaling_factor=1.0, norm_topk_prob=False, topk_method="greedy",
    max_position_embeddings=512, rms_norm_eps=1e-6,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def hf_model(config: dict, seed: int = 0):
    """A transformers model with every weight random at a scale that makes routing and attention matter."""
    import transformers
    config = dict(config)
    model_type = config.pop("model_type")
    cls_cfg, cls_model = {
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    model = cls_model(cls_cfg(**config)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def write_checkpoint(path: Path, config: dict, seed: int = 0, dtype=torch.float32):
    """Save a transformers model as a Hugging Face checkpoint; return (path, model)."""
    model = hf_model(config, seed)
    model.to(dtype).save_pretrained(path)
    return Path(path), model.float()

CONFIGS = {
    "v3": V3_LIKE,
    "v3-dense0-yarn": {**V3_LIKE, "first_k_dense_replace": 0, "rope_parameters": YARN},
    "v2-lite": V2_LITE_LIKE,
    "v2-grouped-yarn": {**V2_LITE_LIKE, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                        "first_k_dense_replace": 1, "num_hidden_layers": 3, "q_lora_rank": 32,
                        "rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}},
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, over the whole tensor."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def add_mtp_shard(path, ref, seed=7):
    """Append MTP layer `num_hidden_layers` as `mtp.safetensors` and index both shards; return its weights."""
    import transformers
    config = ref.config
    config._attn_implementation = "eager"
    L, D = config.num_hidden_layers, config.hidden_size
    torch.manual_seed(seed)
    layer = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(config, layer_idx=L).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
        layer.mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(config.n_routed_experts))
    own = {"enorm.weight": 1 + 0.1 * torch.randn(D), "hnorm.weight": 1 + 0.1 * torch.randn(D),
           "eh_proj.weight": torch.randn(D, 2 * D) * (2 * D) ** -0.5,
           "shared_head.norm.weight": 1 + 0.1 * torch.randn(D)}  # embed_tokens and head shared with the main model
    tensors = {f"model.layers.{L}.{k}": v for k, v in own.items()}
    I = config.moe_intermediate_size
    for name, value in layer.state_dict().items():
        if name == "mlp.experts.gate_up_proj":
            for e in range(value.shape[0]):
                tensors[f"model.layers.{L}.mlp.experts.{e}.gate_proj.weight"] = value[e, :I].clone()
                tensors[f"model.layers.{L}.mlp.experts.{e}.up_proj.weight"] = value[e, I:].clone()
        elif name == "mlp.experts.down_proj":
            for e in range(value.shape[0]):
                tensors[f"model.layers.{L}.mlp.experts.{e}.down_proj.weight"] = value[e].clone()
        else:
            tensors[f"model.layers.{L}.{name}"] = value.clone()
    save_file(tensors, str(path / "mtp.safetensors"), metadata={"format": "pt"})
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    weight_map.update({k: "mtp.safetensors" for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return layer, own


def random_experts(n: int, dim: int, inter: int, generator: torch.Generator):
    """LocalExperts of n experts with weights drawn from `generator` (N(0, 0.3^2))."""
    from moeserve.kernels.experts import LocalExperts
    experts = LocalExperts(n, dim, inter)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return experts
