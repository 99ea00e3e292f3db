"""Naive and absorbed MLA agree; the latent cache holds exactly (kv_lora_rank + qk_rope_head_dim) per token per layer."""
from pathlib import Path

import pytest
import torch

from moeserve.kernels.args import ModelArgs
from moeserve.kernels.cache import LatentCache
from moeserve.kernels.load import load_model
from moeserve.kernels.model import rows_pay
from tests.tiny import rel_err

V3_CONFIG = Path(__file__).parents[1] / "data" / "deepseek_v3_config.json"


@pytest.mark.parametrize("name", ["v3-dense0-yarn", "v2-lite"])
def test_naive_equals_absorbed_over_a_cache(checkpoints, name):
    """Prefill 20 tokens, then decode 3 steps for 2 rows at different positions, both forms on the same cache."""
    model = load_model(checkpoints(name)[0], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (2, 20), generator=g)
    cache = LatentCache(model.args, batch=2, max_len=32, dtype=torch.float32)
    with torch.no_grad():
        naive = model(prompt, cache=cache.view(), form="naive")
        absorbed = model(prompt, cache=cache.view(), form="absorbed")
        assert rel_err(absorbed, naive) < 1e-5
        positions = torch.tensor([[20], [20]])
        for step in range(3):
            token = torch.randint(0, model.args.vocab_size, (2, 1), generator=g)
            naive = model(token, positions + step, cache=cache.view(), form="naive")
            absorbed = model(token, positions + step, cache=cache.view(), form="absorbed")
            assert rel_err(absorbed, naive) < 1e-5


def test_the_cheaper_form_is_naive_for_prompt_chunks_and_absorbed_for_decoding():
    """Multiply-adds of each form counted by hand for DeepSeek-V3 (128 heads, kv_lora_rank 512, nope 128, rope 64,
    v 128): per cached position naive decompresses 512 x 128 x 256 = 16.8M, absorbed scores each query token
    at 128 x (2 x 512 + 64) = 139K per position."""
    from moeserve.kernels.model import cheaper_mla_form
    args = ModelArgs.from_file(V3_CONFIG)
    assert cheaper_mla_form(args, new=1, cached=4096) == "absorbed"        # decoding
    assert cheaper_mla_form(args, new=2, cached=4096) == "absorbed"        # decoding with an MTP draft
    assert cheaper_mla_form(args, new=4096, cached=4096) == "naive"        # a whole prompt
    assert cheaper_mla_form(args, new=512, cached=8192) == "naive"         # a chunk after a long prefix
    # the crossing: naive = L x 16.8M + S x L x 128 x 320, absorbed = S x 16.8M + S x L x 139K
    assert cheaper_mla_form(args, new=64, cached=4096) == "absorbed"
    assert cheaper_mla_form(args, new=256, cached=4096) == "naive"


@pytest.mark.parametrize("name", ["v3-dense0-yarn", "v2-lite"])
def test_folded_projections_equal_the_einsums(checkpoints, name):
    """The absorbed form with wkv_b folded into the query projection and wo (as load_model does for small models)
    gives what the unfolded absorbed form gives, prefill and decoding, with and without q_lora (v2-lite)."""
    model = load_model(checkpoints(name)[0], dtype=torch.float32)
    attns = [layer.attn for layer in model.layers]
    assert all(a.folded is not None for a in attns)  # a tiny model: folding pays
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12), generator=g)
    caches = [LatentCache(model.args, batch=2, max_len=16, dtype=torch.float32) for _ in range(2)]
    with torch.no_grad():
        def run(tokens, positions, cache, folded):
            for a, f in zip(attns, folded):
                a.folded = f
            return model(tokens, positions, cache=cache.view(), form="absorbed")
        folded = [a.folded for a in attns]
        for positions in (torch.arange(10).expand(2, -1), torch.tensor([[10], [10]]), torch.tensor([[11], [11]])):
            step = tokens.gather(1, positions)
            assert rel_err(run(step, positions, caches[0], folded), run(step, positions, caches[1], [None] * 4)) < 1e-5


def test_folding_pays_for_the_demo_model_only():
    """Extra multiply-adds per token of folded projections, counted by hand. DeepSeek-V3: query 1536 x 128 x
    (512 + 64) plus output 128 x 512 x 7168, against 1536 x 128 x 192 + 128 x 128 x 512 x 2 + 128 x 128 x 7168:
    411M more. The demo model: 96 x 4 x 80 + 4 x 64 x 192 against 96 x 4 x 48 + 4 x 32 x 64 x 2 + 4 x 32 x 192:
    20,480 more, under FOLD_MAX_EXTRA_MACS."""
    from moeserve.cluster import DEMO_MODEL
    from moeserve.kernels.model import FOLD_MAX_EXTRA_MACS, folding_pays
    assert not folding_pays(ModelArgs.from_file(V3_CONFIG))
    assert folding_pays(ModelArgs.from_file(Path(DEMO_MODEL) / "config.json"))
    assert 20_480 <= FOLD_MAX_EXTRA_MACS < 411_000_000


def test_decode_over_cache_equals_full_recompute(checkpoints):
    model = load_model(checkpoints("v3")[0], dtype=torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    cache = LatentCache(model.args, batch=1, max_len=16, dtype=torch.float32)
    with torch.no_grad():
        full = model(tokens)
        model(tokens[:, :10], cache=cache.view())
        steps = [model(tokens[:, i:i + 1], torch.tensor([[i]]), cache=cache.view()) for i in range(10, 16)]
    assert rel_err(torch.cat(steps, dim=1), full[:, 10:]) < 1e-5


def test_deepseek_v3_latent_cache_is_70272_bytes_per_token_in_bf16():
    args = ModelArgs.from_file(V3_CONFIG)
    assert args.latent_dim == 576
    assert args.kv_cache_bytes_per_token(torch.bfloat16) == 70_272
    assert args.kv_cache_bytes_per_token(torch.float32) == 140_544


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_allocated_cache_bytes_equal_the_formula(checkpoints, dtype):
    args = load_model(checkpoints("v3")[0], dtype=torch.float32).args
    cache = LatentCache(args, batch=3, max_len=50, dtype=dtype)
    element = torch.empty((), dtype=dtype).element_size()
    assert cache.nbytes / (3 * 50) == (args.kv_lora_rank + args.qk_rope_head_dim) * args.n_layers * element
    assert cache.nbytes / (3 * 50) == args.kv_cache_bytes_per_token(dtype)


@pytest.mark.parametrize("name", ["v3-dense0-yarn", "v2-lite"])
def test_a_packed_batch_equals_each_row_alone(checkpoints, name):
    """Rows of 5, 17 and 11 tokens in one padded batch, run packed (only valid tokens through the layers), give
    each row's hidden states and MTP logits as the row run alone, and padding comes out zero."""
    model = load_model(checkpoints(name)[0], dtype=torch.float32, with_mtp=name.startswith("v3"))
    g = torch.Generator().manual_seed(1)
    lengths = [5, 17, 11]
    tokens = torch.randint(0, model.args.vocab_size, (3, max(lengths)), generator=g)
    valid = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        packed = model(tokens, valid=valid)
        alone = [model(tokens[b:b + 1, :n])[0] for b, n in enumerate(lengths)]
        for b, n in enumerate(lengths):
            assert rel_err(packed[b, :n], alone[b]) < 1e-5
            assert not packed[b, n:].any()
        if len(model.mtp):
            nxt = torch.randint(0, model.args.vocab_size, tokens.shape, generator=g)
            drafted = model.mtp_forward(packed, nxt, valid=valid)
            for b, n in enumerate(lengths):
                assert rel_err(drafted[b, :n], model.mtp_forward(alone[b][None], nxt[b:b + 1, :n])[0]) < 1e-5


def test_ragged_prompts_attend_row_by_row_and_even_ones_padded():
    """A batch of one long prompt and short ones would attend the long one's square for every row; prompts of one
    length waste nothing padded, and a row of its own costs calls. The demo model (4 heads, scores and values 48
    wide); one of its layers measured on the CPU, row by row against padded: 0.86 against 1.78 ms for the first
    batch, 1.45 against 1.79 for the second, 1.26 against 0.94 for four prompts of 128, 3.30 against 0.62 for 32 of
    16."""
    pair = 4 * 2 * 48
    assert rows_pay([(0, 200), (0, 20), (0, 20), (0, 20)], S=200, L=200, pair_macs=pair)
    assert rows_pay([(0, 196), (0, 54), (0, 195), (0, 67)], S=196, L=196, pair_macs=pair)
    assert not rows_pay([(0, 128)] * 4, S=128, L=128, pair_macs=pair)
    assert not rows_pay([(0, 16)] * 32, S=16, L=16, pair_macs=pair)
    assert not rows_pay(None, S=200, L=200, pair_macs=pair)  # rows not known on the host
