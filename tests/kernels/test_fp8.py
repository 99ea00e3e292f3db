"""FP8 e4m3 block quantisation and FP8 checkpoints."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeserve.kernels.checkpoint import Checkpoint
from moeserve.kernels.checkpoint import hf_to_local
from moeserve.kernels.fp8 import (FP8_DTYPE, FP8Linear, act_dequant, act_quant, fp8_block_linear, weight_dequant,
                                  weight_quant)
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


def slow_fp8_linear(x, weight, scale_inv, block=(128, 128)):
    """DeepSeek-V3's FP8 linear, spelled out: each activation value and each weight value dequantised from
    its own tile's or block's scale, then an fp32 product."""
    xq, sx = act_quant(x, block[1])
    return act_dequant(xq, sx, block[1]) @ slow_dequant(weight, scale_inv, block).t()


@pytest.mark.parametrize("shape", [(5, 192, 80), (3, 80, 192), (7, 640, 300), (1, 128, 128), (9, 1152, 256)])
def test_block_scaled_gemm_equals_the_dequantised_product_on_ragged_shapes(shape):
    """K/128 of 1.5, 0.6, 5, 1 and 9 tiles (not multiples of 4); N ragged against the 128-row blocks."""
    M, K, N = shape
    g = torch.Generator().manual_seed(K)
    x = torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g) * 4  # columns of different ranges
    weight, scale_inv = weight_quant(torch.randn(N, K, generator=g) * 0.05)
    expected = slow_fp8_linear(x, weight, scale_inv)
    layer = FP8Linear(K, N)
    layer.weight.data, layer.weight_scale_inv.data = weight, scale_inv
    for y in (fp8_block_linear(x, weight, scale_inv), layer(x)):
        # the same e4m3 products, summed per K tile before scaling rather than after: fp32 rounding apart
        assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("M", [1, 5, 16])
def test_rows_padded_for_cublas_are_zero_rows_that_change_no_product(M):
    """On GPUs the e4m3 rows go to cuBLASLt in multiples of 16 (it refused one row on an H200): the padding is zero
    rows with scale 1, and the real rows' product is the unpadded one (to fp32 rounding: a product of more rows may
    sum in another order)."""
    from moeserve.kernels.fp8 import _rows_padded, _scaled_mm_per_k_tile
    g = torch.Generator().manual_seed(M)
    xq, sx = act_quant(torch.randn(M, 384, generator=g))
    weight, scale_inv = weight_quant(torch.randn(200, 384, generator=g) * 0.05)
    pq, ps = _rows_padded(xq, sx, 16)
    assert pq.shape == (16, 384) and pq.dtype == FP8_DTYPE and ps.shape == (16, 3)
    assert torch.equal(act_dequant(pq, ps)[:M], act_dequant(xq, sx))
    assert not act_dequant(pq, ps)[M:].any() and torch.equal(ps[M:], torch.ones(16 - M, 3))
    padded = _scaled_mm_per_k_tile(pq, ps, weight, scale_inv, (128, 128))
    plain = _scaled_mm_per_k_tile(xq, sx, weight, scale_inv, (128, 128))
    assert (padded[:M] - plain).abs().max() <= 1e-6 * plain.abs().max()
    assert not padded[M:].any()


def storage_bytes(model):
    """Bytes of the distinct tensors a model holds (one shared by two modules counts once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_an_fp8_checkpoint_stays_fp8_in_memory():
    from moeserve.cluster.llm import DEMO_MODEL_FP8
    ckpt = Checkpoint(DEMO_MODEL_FP8)
    stored = sum(ckpt.raw(n).nbytes for n in ckpt._file_of)
    resident = load_model(DEMO_MODEL_FP8, dtype=torch.bfloat16, fp8_resident=True)
    dequantised = load_model(DEMO_MODEL_FP8, dtype=torch.bfloat16)
    fp8_layers = [m for m in resident.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == sum(ckpt.raw(n).dtype == FP8_DTYPE for n in ckpt.names())
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_layers)
    assert abs(storage_bytes(resident) - stored) <= 0.1 * stored, (storage_bytes(resident), stored)
    assert storage_bytes(dequantised) > 1.4 * stored


def fp8_reference(path):
    """The FP8 checkpoint dequantised at load, each quantised linear layer's input passed through 1x128 e4m3
    tiles by a hook: an independent statement of what FP8 compute is. Unfolded MLA, and experts one at a time
    (under grad mode, which the packed paths leave alone), so that every such layer runs as a module."""
    from moeserve.kernels.model import MLA
    model = load_model(path, dtype=torch.float32)
    ckpt = Checkpoint(path)
    quantised = {hf_to_local(n, ckpt.args.n_layers).removesuffix(".weight") for n in ckpt.names()
                 if ckpt.raw(n).dtype == FP8_DTYPE}
    for name, module in model.named_modules():
        if isinstance(module, MLA):
            module.folded = None
        if name in quantised:
            module.register_forward_pre_hook(lambda m, args: (act_dequant(*act_quant(args[0])),))
    return model


def test_fp8_compute_equals_the_fp8_reference_and_how_far_it_moves_the_model():
    from moeserve.cluster.llm import DEMO_MODEL_FP8
    resident = load_model(DEMO_MODEL_FP8, dtype=torch.float32, fp8_resident=True)
    tokens = torch.randint(2, 4000, (3, 24), generator=torch.Generator().manual_seed(0))
    reference = fp8_reference(DEMO_MODEL_FP8)
    with torch.enable_grad():
        expected = reference.logits(reference(tokens))
    with torch.inference_mode():
        got = resident.logits(resident(tokens))
        dense = load_model(DEMO_MODEL_FP8, dtype=torch.float32)
        plain = dense.logits(dense(tokens)).log_softmax(-1)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()  # 1.2e-6 measured: fp32 rounding
    # against the load-time-dequantised model (activations unquantised): the greedy token's log-probability
    # moved by at most 0.39 (mean 0.05) on these 72 positions, and 96% of greedy tokens agree
    chosen = plain.argmax(-1, keepdim=True)
    moved = (got.log_softmax(-1).gather(-1, chosen) - plain.gather(-1, chosen)).abs()
    assert moved.max() < 0.6 and moved.mean() < 0.1, (moved.max(), moved.mean())
    assert (got.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9
