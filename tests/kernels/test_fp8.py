"""FP8 e4m3 block quantisation and FP8 checkpoints."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeserve.kernels.checkpoint import Checkpoint
from moeserve.kernels.fp8 import FP8_DTYPE, act_dequant, act_quant, weight_dequant, weight_quant
from moeserve.kernels.load import load_model
from moeserve.kernels.quantize import quantize_checkpoint
from tests.tiny import rel_err

E4M3_REL_STEP = 2 ** -3  # 3 mantissa bits: neighbouring normal values differ by at most 1/8 relative


def slow_dequant(weight, scale_inv, block):
    out = torch.empty(weight.shape)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            out[i, j] = weight[i, j].float() * scale_inv[i // block[0], j // block[1]]
    return out


@pytest.mark.parametrize("shape", [(128, 256), (200, 77), (5, 300)])
def test_weight_dequant_is_fp8_times_block_scale_with_ragged_edges(shape):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=g) * 3).to(FP8_DTYPE)
    block = (128, 128)
    scale_inv = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=g) + 0.1
    assert torch.equal(weight_dequant(weight, scale_inv, block), slow_dequant(weight, scale_inv, block))


def test_weight_quant_uses_amax_over_448_per_block_and_round_trips_within_fp8_precision():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    q, scale_inv = weight_quant(w)
    assert q.dtype == FP8_DTYPE and scale_inv.shape == (3, 2)
    assert torch.allclose(scale_inv[2, 1], w[256:, 128:].abs().max() / 448)
    back = weight_dequant(q, scale_inv)
    bound = scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] * 448 * E4M3_REL_STEP / 2
    assert ((back - w).abs() <= torch.maximum(w.abs() * E4M3_REL_STEP / 2, bound / 64)).all()
    # values already on the fp8 grid times the block scale come back exactly
    assert torch.equal(weight_dequant(*weight_quant(back)), back)


def test_weight_dequant_rejects_a_scale_of_the_wrong_shape():
    with pytest.raises(ValueError, match="expected \\(2, 1\\)"):
        weight_dequant(torch.zeros(200, 100).to(FP8_DTYPE), torch.ones(1, 1))


def test_activation_quant_one_scale_per_1x128_tile_including_a_ragged_tile():
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    q, scale = act_quant(x)
    assert q.shape == x.shape and scale.shape == (4, 3)
    assert torch.allclose(scale[:, 2], x[:, 256:].abs().amax(dim=-1) / 448)
    assert (q.float().abs().amax(dim=-1) <= 448).all()
    back = act_dequant(q, scale)
    tile_amax = scale.repeat_interleave(128, -1)[:, :300] * 448
    assert ((back - x).abs() <= torch.maximum(x.abs(), tile_amax / 64) * E4M3_REL_STEP / 2).all()


def write_dequantised_copy(fp8_dir, out_dir):
    """The FP8 checkpoint's weights dequantised to fp32 under their HF names, read back by transformers."""
    ckpt = Checkpoint(fp8_dir)
    save_file({name: t.contiguous() for name, t in ckpt.tensors(dtype=torch.float32)}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    (out_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["v3", "v2-lite"])
def test_fp8_checkpoint_equals_transformers_on_the_dequantised_weights(checkpoints, name, tmp_path):
    import transformers
    src, _ = checkpoints(name)
    fp8_dir = quantize_checkpoint(src, tmp_path / "fp8")
    write_dequantised_copy(fp8_dir, (tmp_path / "deq").mkdir() or tmp_path / "deq")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    ours = load_model(fp8_dir, dtype=torch.float32)
    tokens = torch.randint(0, ours.args.vocab_size, (2, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(tokens)), ref(tokens).logits) < 1e-5


def test_fp8_checkpoint_layout_matches_deepseeks_release(checkpoints, tmp_path):
    src, _ = checkpoints("v3")
    fp8_dir = quantize_checkpoint(src, tmp_path / "fp8")
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    with safe_open(str(fp8_dir / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        assert f.get_slice("model.layers.2.mlp.experts.3.up_proj.weight_scale_inv").get_shape() == [1, 1]
    fp8 = {n for n, d in dtypes.items() if d == "F8_E4M3"}
    assert "model.layers.0.self_attn.kv_b_proj.weight" in fp8
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in fp8
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in fp8
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.mlp.gate.weight",
                 "model.layers.2.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert dtypes[kept] == "F32"
    assert all(n + "_scale_inv" in dtypes for n in fp8)


def test_quantize_refuses_an_fp8_checkpoint(checkpoints, tmp_path):
    from moeserve.kernels.errors import CheckpointError
    fp8_dir = quantize_checkpoint(checkpoints("v2-lite")[0], tmp_path / "fp8")
    with pytest.raises(CheckpointError, match="already FP8"):
        quantize_checkpoint(fp8_dir, tmp_path / "again")
