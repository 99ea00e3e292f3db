"""The MTP module against a slow reference written from DeepSeek-V3's equations (section 2.2):
h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)],  h_i^1 = TRM(h'_{1:T}),  P_{i+2} = OutHead(h_i^1),
with transformers' own decoder layer as TRM. transformers builds no MTP module, so the test writes one into
the checkpoint, under DeepSeek's names at layer index num_hidden_layers, in a second shard."""
import pytest
import torch

from moeserve.kernels.cache import LatentCache
from moeserve.kernels.load import load_model
from tests.tiny import CONFIGS, add_mtp_shard, rel_err, write_checkpoint


def rms_norm(x, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.fixture(scope="module")
def with_mtp(tmp_path_factory):
    path, ref = write_checkpoint(tmp_path_factory.mktemp("mtp"), CONFIGS["v3"])
    layer, own = add_mtp_shard(path, ref)
    return path, ref, layer, own


def reference_mtp_logits(ref, layer, own, h, next_tokens):
    S = next_tokens.shape[1]
    e = rms_norm(ref.model.embed_tokens(next_tokens), own["enorm.weight"])
    x = torch.cat([e, rms_norm(h, own["hnorm.weight"])], dim=-1) @ own["eh_proj.weight"].T
    positions = torch.arange(S)[None]
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    x = layer(x, attention_mask=mask, position_ids=positions,
              position_embeddings=ref.model.rotary_emb(x, positions))
    return rms_norm(x, own["shared_head.norm.weight"]) @ ref.lm_head.weight.T


def test_mtp_logits_match_the_papers_equations(with_mtp):
    path, ref, layer, own = with_mtp
    model = load_model(path, dtype=torch.float32)
    assert len(model.mtp) == 1
    tokens = torch.randint(0, model.args.vocab_size, (2, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = ref.model(tokens).last_hidden_state  # the main model's final-normed hidden states
        expected = reference_mtp_logits(ref, layer, own, h[:, :-1], tokens[:, 1:])
        actual = model.mtp_forward(model(tokens)[:, :-1], tokens[:, 1:])
    assert rel_err(actual, expected) < 1e-4


def test_mtp_decoding_over_its_own_cache_equals_the_full_pass(with_mtp):
    model = load_model(with_mtp[0], dtype=torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = LatentCache(model.args, batch=1, max_len=20, dtype=torch.float32, n_layers=model.args.n_layers + 1)
    with torch.no_grad():
        h = model(tokens)
        full = model.mtp_forward(h[:, :-1], tokens[:, 1:])
        first = model.mtp_forward(h[:, :12], tokens[:, 1:13], cache=cache.view())
        steps = [model.mtp_forward(h[:, i:i + 1], tokens[:, i + 1:i + 2], torch.tensor([[i]]), cache=cache.view())
                 for i in range(12, 19)]
    assert rel_err(torch.cat([first] + steps, dim=1), full) < 1e-5


def test_checkpoint_without_mtp_weights_loads_without_the_module(checkpoints):
    model = load_model(checkpoints("v3")[0], dtype=torch.float32)
    assert len(model.mtp) == 0
    with pytest.raises(RuntimeError, match="no MTP module"):
        model.mtp_forward(torch.zeros(1, 1, model.args.dim), torch.zeros(1, 1, dtype=torch.long))
