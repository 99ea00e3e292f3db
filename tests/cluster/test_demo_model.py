"""The shipped demo model: a real DeepSeek-V3-layout checkpoint that transformers reads the same way we do."""
import json

import torch

from moeserve.cluster import DEMO_MODEL, DEMO_MODEL_FP8, LLM, SamplingParams
from moeserve.kernels.load import load_model
from tests.tiny import rel_err


def test_demo_model_matches_transformers():
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    ours = load_model(DEMO_MODEL, dtype=torch.float32)
    tokens = torch.randint(0, ours.args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(tokens)), ref(tokens).logits) < 1e-4
    assert len(ours.mtp) == 1 and ours.args.n_routed_experts == 16 and ours.args.topk_method == "noaux_tc"


def test_fp8_demo_model_stays_close_to_bf16():
    bf16, fp8 = load_model(DEMO_MODEL, torch.float32), load_model(DEMO_MODEL_FP8, torch.float32)
    tokens = torch.randint(0, bf16.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = bf16.logits(bf16(tokens)), fp8.logits(fp8(tokens))
    assert rel_err(b, a) < 0.1  # e4m3 weights carry 3 mantissa bits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_demo_model_completes_code_and_its_bias_balanced_the_experts():
    out = LLM().generate(["def fibonacci("], SamplingParams(max_tokens=24, temperature=0))[0]
    assert out.text and len(out.token_ids) > 0
    log = json.loads((DEMO_MODEL / "training_log.json").read_text())
    imbalance = log["final"]["expert_imbalance"]
    assert imbalance["with_bias"] < imbalance["without_bias"]


def test_a_streamed_stop_string_never_shows_and_the_increments_add_up_to_the_text():
    """The demo model writes "name):\n   ..." after "def fibonacci(": the stop string "):\n" spans two tokens, so
    the characters "):" must wait a step before they are known not to begin it."""
    llm = LLM()
    params = SamplingParams(max_tokens=24, temperature=0, stop=["):\n"])
    chunks = list(llm.stream("def fibonacci(", params))
    final = chunks[-1]
    assert final.finish_reason == "stop" and final.text == "name"
    assert "".join(c.new_text for c in chunks) == final.text


def test_a_stop_token_ends_the_request_and_only_its_text_is_left_out_unless_asked_for():
    """As vLLM reports them: the stop token is in token_ids, and the text is that of the tokens before it; with
    include_stop_str_in_output, of all of them. A stop string is then kept in the text too. The reference is the
    tokenizer's decode of the greedy tokens of the same prompt run without a stop."""
    llm = LLM()
    tok = llm.tokenizer
    prompt = "def fibonacci("
    free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    # the first token, after the second, whose first occurrence it is and that has text of its own
    k = next(i for i, t in enumerate(free) if i >= 2 and free.index(t) == i and tok.decode([t]).strip())
    for include in (False, True):
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[free[k]],
                                include_stop_str_in_output=include)
        out = llm.generate([prompt], params)[0]
        assert out.token_ids == free[:k + 1] and out.finish_reason == "stop"
        assert out.text == tok.decode(free[:k + include])
        assert "".join(c.new_text for c in llm.stream(prompt, params)) == out.text
    params = SamplingParams(max_tokens=24, temperature=0, stop=["):\n"], include_stop_str_in_output=True)
    chunks = list(llm.stream(prompt, params))
    assert chunks[-1].text == "name):\n" and "".join(c.new_text for c in chunks) == chunks[-1].text


def test_stop_reason_names_the_stop_token_or_string_that_ended_the_request():
    """vLLM's stop_reason: the stop token id or the stop string that ended a request; None when it ran to its
    length, or ended at the end-of-sequence token (which vLLM checks first, even when it is also a stop token)."""
    llm = LLM()
    prompt = "def fibonacci("
    free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    k = next(i for i, t in enumerate(free) if i >= 2 and free.index(t) == i)
    cases = [(dict(stop_token_ids=[free[k]], max_tokens=24), free[k]),
             (dict(stop=["zzz", "):\n"], max_tokens=24), "):\n"),
             (dict(stop_token_ids=[free[k]], max_tokens=k), None)]  # it runs to its length first
    for extra, expected in cases:
        params = SamplingParams(temperature=0, ignore_eos=True, **extra)
        out = llm.generate([prompt], params)[0]
        streamed = list(llm.stream(prompt, params))
        assert out.stop_reason == expected and type(out.stop_reason) is type(expected)
        assert out.finish_reason == ("length" if expected is None else "stop")
        assert streamed[-1].stop_reason == expected and all(o.stop_reason is None for o in streamed[:-1])
    eos = llm.engine.args.eos_token_id
    assert SamplingParams(stop_token_ids=[eos]).stop_reason(eos, eos) is None
    assert SamplingParams(stop_token_ids=[eos], ignore_eos=True).stop_reason(eos, eos) == eos
