"""Our DeepSeek model against transformers' DeepseekV3/V2ForCausalLM on the same checkpoint, in float32."""
import pytest
import torch

from moeserve.kernels.generate import generate
from moeserve.kernels.load import load_model
from tests.tiny import CONFIGS, rel_err

PROMPT_LEN = 37


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_prompt_logits_match_transformers(checkpoints, name, form):
    path, ref = checkpoints(name)
    ours = load_model(path, dtype=torch.float32)
    tokens = torch.randint(0, ours.args.vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        actual = ours.logits(ours(tokens, form=form))
    assert rel_err(actual, expected) < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_match_transformers_for_32_steps(checkpoints, name):
    path, ref = checkpoints(name)
    ours = load_model(path, dtype=torch.float32)
    prompt = torch.randint(0, ours.args.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2))
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = ref.generate(prompt[None], max_new_tokens=32, do_sample=False, pad_token_id=0)[0, PROMPT_LEN:]
    actual = generate(ours, [prompt.tolist()], max_tokens=32)[0].token_ids
    assert actual == expected.tolist()


def test_batched_decode_of_mixed_lengths_equals_one_at_a_time(checkpoints):
    """Rows at different positions share a decode step; each must equal its own solo run."""
    path, _ = checkpoints("v3")
    ours = load_model(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, ours.args.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 11)]
    together = generate(ours, prompts, max_tokens=12)
    for prompt, out in zip(prompts, together):
        assert out.token_ids == generate(ours, [prompt], max_tokens=12)[0].token_ids
