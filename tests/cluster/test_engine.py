"""The continuous-batching engine against the plain generation loop, token for token (greedy, float32)."""
import random

import pytest
import torch

from moeserve.cluster import LLM, Engine, EngineConfig, SamplingParams
from moeserve.cluster.model_runner import COUNT_LOAD_EVERY, ModelRunner
from moeserve.cluster.sequence import Draft
from moeserve.kernels import model as model_module
from moeserve.kernels.errors import InputError
from moeserve.kernels.generate import generate
from moeserve.kernels.load import load_model

GREEDY = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)


def random_prompts(lengths, vocab=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def run_staggered(engine, prompts, params, arrivals):
    """Add prompt i before step arrivals[i]; step until everything finishes; outputs in prompt order."""
    ids, done, step = {}, {}, 0
    while len(done) < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                ids[engine.add_request(prompts[i], params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
    return [done[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints("v3")[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(model):
    prompts = random_prompts([3, 41, 17, 9, 28, 60])
    return prompts, [g.token_ids for g in generate(model, prompts, GREEDY.max_tokens)]


def test_mixed_lengths_arriving_at_different_steps_equal_the_plain_loop(model, reference):
    prompts, expected = reference
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=2048, max_num_batched_tokens=24))
    outs = run_staggered(engine, prompts, GREEDY, arrivals=[0, 0, 2, 3, 3, 7])
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)


def test_prompt_chunks_attending_row_by_row_equal_the_plain_loop(model, reference, monkeypatch):
    """Prompt attention one row at a time (every padded prompt batch here, whatever it saves), with rows that start
    at position 0 (causal) and rows that continue a chunk over cached positions (masked; these chunks run in the
    naive form here, which they would at larger sizes)."""
    prompts, expected = reference
    monkeypatch.setattr(model_module, "ROW_CALL_MACS", 0)
    monkeypatch.setattr(ModelRunner, "form_for", lambda self, starts, rows: "naive")
    spans = []
    rows = model_module.MLA._naive_rows
    monkeypatch.setattr(model_module.MLA, "_naive_rows", lambda self, q, latent, mask, s: spans.extend(s) or
                        rows(self, q, latent, mask, s))
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=2048, max_num_batched_tokens=24))
    outs = run_staggered(engine, prompts, GREEDY, arrivals=[0] * len(prompts))
    assert [o.token_ids for o in outs] == expected
    assert any(start == 0 for start, _ in spans) and any(start > 0 for start, _ in spans)


def test_expert_loads_count_every_token_the_model_routed(model):
    """The engine's tokens per expert equal the gate's choices over a cache-free forward of each finished sequence
    (each token but the last went through the model once), over more steps than a count waits for."""
    prompts = random_prompts([5, 23, 11], seed=3)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=1024, max_num_batched_tokens=16))
    outs = run_staggered(engine, prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                         arrivals=[0, 0, 5])
    assert engine.num_steps > COUNT_LOAD_EVERY
    loads = engine.stats()["expert_load"]
    routed = {}
    hooks = [moe.gate.register_forward_hook(lambda m, i, out, name=name: routed.setdefault(name, []).append(out[1]))
             for name, moe in engine.runner.moe_layers]
    try:
        with torch.no_grad():
            for prompt, out in zip(prompts, outs):
                model(torch.tensor([prompt + out.token_ids[:-1]]))
    finally:
        for hook in hooks:
            hook.remove()
    for name, _ in engine.runner.moe_layers:
        expected = torch.bincount(torch.cat(routed[name]).flatten(), minlength=model.args.n_routed_experts) \
            if name in routed else torch.zeros(model.args.n_routed_experts, dtype=torch.long)  # the MTP layer's
        assert loads[name] == expected.tolist(), name


def test_preemption_under_a_small_cache_loses_nothing(model, reference):
    prompts, expected = reference
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=128, max_num_batched_tokens=64))
    outs = run_staggered(engine, prompts, GREEDY, arrivals=[0] * len(prompts))
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert engine.block_manager.num_free_blocks == 32  # every block came back


def test_a_prompt_preempted_halfway_through_its_prefill_computes_the_rest_when_it_returns(model):
    """A prompt's blocks enter the prefix cache as they are allocated, before they are computed. Here the long
    prompt is preempted (the short request's next block needs the room) after 28 of its 60 tokens: when it
    returns it reuses the 7 blocks it filled, and computes the others rather than reading them as cached."""
    short, long = random_prompts([20, 60], seed=7)
    expected = [g.token_ids for g in generate(model, [short, long], 12)]
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=84, max_num_batched_tokens=8))
    preempted, preempt = [], engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: preempted.append((seq.num_computed_tokens, len(seq))) or preempt(seq)
    outs = run_staggered(engine, [short, long], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                         arrivals=[0, 3])
    assert preempted == [(28, 60)]
    assert [o.token_ids for o in outs] == expected
    assert outs[1].num_cached_tokens == 28


@pytest.mark.parametrize("seed", range(24))
def test_a_seeded_fuzz_of_arrivals_shared_prefixes_preemptions_and_aborts_equals_the_plain_loop(model, seed):
    """Requests that repeat or extend each other's prompts (prefix-cache hits), arrive at random steps, run in a
    cache barely larger than the longest one (preemptions) with small and large step budgets (chunked prefill), some
    aborted on the way: every request that finishes has the plain loop's tokens, and every block comes back. (Before
    the cache dropped the blocks a preempted or aborted prompt never filled, 9 of these 24 seeds changed a request's
    tokens.)"""
    rng = random.Random(seed)
    bases = random_prompts([rng.randint(5, 40) for _ in range(4)], seed=seed)
    prompts = []
    for i in range(8):
        base, tail = rng.choice(bases), random_prompts([rng.randint(1, 50)], seed=1000 * seed + i)[0]
        prompts.append(rng.choice([base, base[:rng.randint(1, len(base))] + tail, tail]))
    max_tokens = [rng.randint(1, 20) for _ in prompts]
    expected = [g.token_ids[:n] for g, n in zip(generate(model, prompts, max(max_tokens)), max_tokens)]
    block = rng.choice([2, 4, 8])
    cache = max(len(p) + n + 1 for p, n in zip(prompts, max_tokens)) + block + rng.randint(0, 60)
    engine = Engine(model, EngineConfig(block_size=block, kv_cache_tokens=cache,
                                        max_num_batched_tokens=rng.choice([4, 8, 16, 64])))
    arrivals = sorted(rng.randint(0, 15) for _ in prompts)
    aborts = {i: rng.randint(0, 20) for i in range(len(prompts)) if rng.random() < 0.2}
    ids, done = {}, {}
    for step in range(10_000):
        if len(done) == len(prompts):
            break
        for i in (i for i, at in enumerate(arrivals) if at == step):
            params = SamplingParams(max_tokens=max_tokens[i], temperature=0, ignore_eos=True)
            ids[i] = engine.add_request(prompts[i], params)
        for i in (i for i, at in aborts.items() if at == step and i in ids and i not in done):
            engine.abort(ids[i])
            done[i] = None
        for out in engine.step():
            i = next(i for i, rid in ids.items() if rid == out.request_id)
            if out.finished and i not in done:
                done[i] = out.token_ids
    assert len(done) == len(prompts) and all(done[i] in (None, expected[i]) for i in range(len(prompts)))
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


def test_prefix_cache_reuses_a_shared_system_prompt_without_changing_outputs(model):
    system = random_prompts([32], seed=5)[0]
    prompts = [system + tail for tail in random_prompts([5, 9, 3], seed=6)]
    expected = [g.token_ids for g in generate(model, prompts, GREEDY.max_tokens)]
    engine = Engine(model, EngineConfig(block_size=8, kv_cache_tokens=1024))
    first = run_staggered(engine, prompts[:1], GREEDY, [0])
    rest = run_staggered(engine, prompts[1:], GREEDY, [0, 0])
    assert [o.token_ids for o in first + rest] == expected
    assert [o.num_cached_tokens for o in rest] == [32, 32]
    assert engine.stats()["prefix_cache_hit_rate"] == pytest.approx(64 / sum(map(len, prompts)))


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_mtp_speculation_leaves_greedy_output_unchanged(mtp_checkpoint, micro_batches):
    """...also when each step runs as micro-batches of rows by turns."""
    llm = LLM(mtp_checkpoint, mtp=True, kv_cache_tokens=1024, block_size=4, micro_batches=micro_batches)
    prompts = random_prompts([6, 30, 13])
    expected = [g.token_ids for g in generate(llm.model, prompts, GREEDY.max_tokens)]
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert all(o.drafts_proposed > 0 for o in outs)


class OracleDrafts(Engine):
    """Replaces every MTP draft with the correct token (or always a wrong one): exercises acceptance of
    two tokens per step, and rejection, through the same cache bookkeeping."""

    def __init__(self, model, config, truth, wrong=False):
        super().__init__(model, config)
        self.truth, self.wrong = truth, wrong

    def _draft(self, drafting, h):
        super()._draft(drafting, h)
        for _, seq, _, _ in drafting:
            if seq.draft is not None:
                right = self.truth[tuple(seq.token_ids[:seq.num_prompt_tokens])]
                c = seq.num_completion_tokens
                token = right[c] if c < len(right) else 0
                seq.draft = Draft((token + 1) % 211 if self.wrong else token)


class RecordedDrafts(Engine):
    """Records every greedy draft with the length of its sequence when it was drafted."""

    def __init__(self, model, config):
        super().__init__(model, config)
        self.drafted = []

    def _draft(self, drafting, h):
        super()._draft(drafting, h)
        self.drafted += [(seq.request_id, len(seq), seq.draft.token) for _, seq, _, _ in drafting if seq.draft]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_each_draft_is_the_mtp_modules_prediction_over_the_whole_sequence(mtp_checkpoint, micro_batches):
    """A draft made when a sequence holds n tokens is MTP's prediction of token n from the main model's hidden state
    at position n - 2 and token n - 1: the argmax of the MTP module run without a cache over the finished sequence
    (the reference), within float32 ties. Prompts arrive at different steps, so drafts follow prefills and decode
    steps that accepted or rejected the draft before."""
    model = load_model(mtp_checkpoint, dtype=torch.float32)
    prompts = random_prompts([6, 30, 13], seed=4)
    engine = RecordedDrafts(model, EngineConfig(mtp=True, block_size=4, kv_cache_tokens=1024,
                                                micro_batches=micro_batches))
    outs = run_staggered(engine, prompts, GREEDY, [0, 1, 3])
    sequences = {o.request_id: torch.tensor(p + o.token_ids)[None] for p, o in zip(prompts, outs)}
    checked = 0
    with torch.no_grad():
        for request_id, n, token in engine.drafted:
            seq = sequences[request_id]
            if n >= seq.shape[1]:
                continue  # drafted at the last token: never verified, and past what the reference knows
            logits = model.mtp_forward(model(seq[:, :n])[:, :-1], seq[:, 1:n])[0, -1]
            assert logits[token] >= logits.max() - 1e-4, (request_id, n)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("wrong", [False, True])
def test_accepted_and_rejected_drafts_keep_the_output_exact(mtp_checkpoint, wrong):
    model = load_model(mtp_checkpoint, dtype=torch.float32)
    prompts = random_prompts([6, 30, 13], seed=3)
    truth = {tuple(p): g.token_ids for p, g in zip(prompts, generate(model, prompts, GREEDY.max_tokens))}
    engine = OracleDrafts(model, EngineConfig(mtp=True, block_size=4, kv_cache_tokens=1024), truth, wrong)
    outs = run_staggered(engine, prompts, GREEDY, [0, 1, 1])
    assert [o.token_ids for o in outs] == [truth[tuple(p)] for p in prompts]
    rates = [o.acceptance_rate for o in outs]
    assert all(r == 0 for r in rates) if wrong else all(r == 1 for r in rates)
    if not wrong:  # two tokens per decode step, except where max_tokens cuts the pair
        assert all(o.decode_steps <= (GREEDY.max_tokens + 1) // 2 for o in outs)


def test_seeded_sampling_reproduces_with_and_without_company(model):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = random_prompts([12], seed=9)[0]
    alone = run_staggered(Engine(model), [prompt], params, [0])[0].token_ids
    crowd = run_staggered(Engine(model), random_prompts([5, 20], seed=2) + [prompt],
                          SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True),
                          [0, 0, 1])[-1].token_ids
    assert alone == crowd
    other = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=99, ignore_eos=True)
    assert run_staggered(Engine(model), [prompt], other, [0])[0].token_ids != alone


def test_a_seeded_sampled_request_draws_the_same_tokens_with_mtp_and_when_resumed_from_its_own_tokens(
        mtp_checkpoint):
    """Each draw is keyed by the request's seed and the token's position: MTP's drafts, kept or not, leave the
    tokens as the plain decoder draws them, and a request restarted from its prompt and first tokens (what the
    cluster does when a shard dies) draws on exactly as the uninterrupted one."""
    prompts = random_prompts([6, 30, 13, 21])
    params = [SamplingParams(max_tokens=24, temperature=t, top_p=p, top_k=k, seed=seed, ignore_eos=True)
              for t, p, k, seed in ((0.7, 1.0, 0, 1), (1.0, 0.9, 0, 2), (1.3, 1.0, 20, 3), (0.5, 0.8, 5, -4))]
    plain = [o.token_ids for o in LLM(mtp_checkpoint, kv_cache_tokens=1024, block_size=4).generate(prompts, params)]
    mtp = LLM(mtp_checkpoint, mtp=True, kv_cache_tokens=1024, block_size=4)
    outs = mtp.generate(prompts, params)
    assert [o.token_ids for o in outs] == plain
    assert sum(o.drafts_accepted for o in outs) > 0 and sum(o.drafts_proposed - o.drafts_accepted for o in outs) > 0
    resumed = mtp.generate([p + t[:9] for p, t in zip(prompts, plain)],
                           [SamplingParams(**{**vars(q), "max_tokens": 15}) for q in params])
    assert [t[:9] + o.token_ids for t, o in zip(plain, resumed)] == plain
    assert len({tuple(t) for t in plain}) == 4


def test_stop_token_ids_eos_and_max_tokens(model, reference):
    prompts, expected = reference
    target = expected[1]
    stop_at = target[5]
    out = run_staggered(Engine(model), [prompts[1]], SamplingParams(max_tokens=14, temperature=0,
                                                                       stop_token_ids=[stop_at]), [0])[0]
    assert out.token_ids == target[:target.index(stop_at) + 1] and out.finish_reason == "stop"
    out = run_staggered(Engine(model), [prompts[1]], SamplingParams(max_tokens=3, temperature=0), [0])[0]
    assert out.token_ids == target[:3] and out.finish_reason == "length"


def test_logprobs_of_chosen_tokens_and_prompt_match_a_full_forward(model, reference):
    prompts, expected = reference
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=0)
    out = run_staggered(Engine(model, EngineConfig(max_num_batched_tokens=16)), [prompts[1]], params, [0])[0]
    full = torch.tensor([prompts[1] + out.token_ids])
    with torch.no_grad():
        logprobs = model.logits(model(full))[0].log_softmax(-1)
    P = len(prompts[1])
    chosen = [logprobs[P - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(chosen, abs=1e-4)
    assert out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx([logprobs[j - 1, prompts[1][j]].item() for j in range(1, P)],
                                                    abs=1e-4)
    for top, token, lp in zip(out.top_logprobs, out.token_ids, out.logprobs):
        assert len(top) == 3 and top[token] == pytest.approx(lp) and max(top.values()) == pytest.approx(lp)


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "prompt is empty"),
    ([5] * 600, SamplingParams(), "exceed the model's context of 512"),
    ([5], SamplingParams(max_tokens=0), "max_tokens must be a positive integer"),
    ([5], SamplingParams(temperature=-0.5), "temperature must be >= 0"),
    ([5], SamplingParams(top_p=1.5), "top_p must be in \\(0, 1\\]"),
    ([5], SamplingParams(top_p=0), "top_p must be in \\(0, 1\\]"),
    ([999], SamplingParams(), "outside the vocabulary"),
    ([5], SamplingParams(stop_token_ids=[999]), "stop token id 999 is outside the vocabulary"),
    ([5], SamplingParams(include_stop_str_in_output=1), "include_stop_str_in_output must be true or false"),
])
def test_a_bad_request_is_refused_while_the_others_keep_running(model, reference, prompt, params, message):
    prompts, expected = reference
    engine = Engine(model)
    good = engine.add_request(prompts[0], GREEDY)
    engine.step()
    with pytest.raises(InputError, match=message):
        engine.add_request(prompt, params)
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs[good].token_ids == expected[0]


@pytest.mark.parametrize("mtp", [False, True])
def test_a_request_whose_sampling_fails_fails_alone(model, mtp_checkpoint, reference, mtp, monkeypatch):
    """NaN and denormal temperatures (past validation) and an exception in the sampler end their own requests
    with an error; the greedy requests of the same batches finish with the plain loop's tokens."""
    prompts, expected = reference
    if mtp:
        model = load_model(mtp_checkpoint, dtype=torch.float32, with_mtp=True)
        expected = [g.token_ids for g in generate(model, prompts, GREEDY.max_tokens)]
    import moeserve.cluster.engine as engine_module
    real, real_rows = engine_module.sampling_probs, engine_module.sampling_probs_rows

    def injected(logits, temperature, top_k, top_p):
        if top_k == 7:
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_k, top_p)

    def injected_rows(logits, temperature, top_k, top_p):  # a batch with the faulty row fails as a whole
        if 7 in top_k:
            raise RuntimeError("injected sampling failure")
        return real_rows(logits, temperature, top_k, top_p)
    monkeypatch.setattr(engine_module, "sampling_probs", injected)
    monkeypatch.setattr(engine_module, "sampling_probs_rows", injected_rows)
    engine = Engine(model, EngineConfig(mtp=mtp))
    good = [engine.add_request(p, GREEDY) for p in prompts]
    bad = []
    for temperature in (float("nan"), 1e-310, 0.8):
        params = SamplingParams(max_tokens=14, temperature=0.8, top_k=7 if temperature == 0.8 else 0, seed=0)
        bad.append(engine.add_request(prompts[1], params))
        params.temperature = temperature  # after add_request's validation, as a defect past it would
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert [outs[r].token_ids for r in good] == expected
    assert all(outs[r].finish_reason == "error" and outs[r].error for r in bad)
    assert "injected sampling failure" in outs[bad[2]].error
    assert engine.block_manager.num_free_blocks == len(engine.block_manager.blocks)


def test_streamed_increments_add_up_and_abort_frees_blocks(model, reference):
    prompts, expected = reference
    llm = LLM.__new__(LLM)
    llm.model, llm.tokenizer = model, None
    llm.engine = Engine(model, EngineConfig(block_size=4, kv_cache_tokens=512))
    pieces = [out.new_token_ids for out in llm.stream(prompts[2], GREEDY)]
    assert sum(pieces, []) == expected[2] and all(pieces)
    stream = llm.stream(prompts[5], GREEDY)
    next(stream)
    assert llm.engine.block_manager.num_free_blocks < 128
    stream.close()  # the client went away
    assert llm.engine.block_manager.num_free_blocks == 128 and not llm.engine.has_unfinished()


def test_allocated_cache_bytes_per_token_equal_the_formula(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=256))
    a = model.args
    assert engine.stats()["kv_cache_bytes_per_token"] == (a.kv_lora_rank + a.qk_rope_head_dim) * a.n_layers * 4
    assert engine.stats()["kv_cache_bytes_per_token"] == a.kv_cache_bytes_per_token(torch.float32)


@pytest.mark.parametrize("mtp", [False, True])
def test_prefill_on_one_engine_and_decode_on_another_equals_one_engine(mtp_checkpoint, mtp):
    """Only the latent KV (and the first token) moves; the decode engine continues exactly."""
    model = load_model(mtp_checkpoint, dtype=torch.float32)
    prompts = random_prompts([7, 33, 18], seed=11)
    expected = [g.token_ids for g in generate(model, prompts, GREEDY.max_tokens)]
    config = EngineConfig(mtp=mtp, block_size=4, kv_cache_tokens=512)
    prefill, decode = Engine(model, config), Engine(model, config)
    for p in prompts:
        prefill.add_request(p, GREEDY)
    moved = []
    while prefill.has_unfinished():
        prefill.step()
        moved += [prefill.take_prefilled(s) for s in prefill.prefilled()]
    a = model.args
    for pre, p in zip(moved, prompts):
        assert pre.kv_bytes == len(p) * (a.n_layers + mtp) * (a.kv_lora_rank + a.qk_rope_head_dim) * 4
        decode.add_prefilled(pre)
    assert prefill.block_manager.num_free_blocks == 128
    outs = {}
    while decode.has_unfinished():
        outs.update({o.request_id: o for o in decode.step() if o.finished})
    assert [outs[pre.request_id].token_ids for pre in moved] == expected


@pytest.mark.parametrize("mtp", [False, True])
def test_a_hand_off_that_finds_no_room_waits_and_is_recomputed_from_its_tokens(mtp_checkpoint, mtp):
    """A decode engine whose cache is full when a prefilled sequence arrives queues it and recomputes its prompt and
    first token once there is room: its tokens (greedy, and seeded sampled) are those of one engine alone."""
    model = load_model(mtp_checkpoint, dtype=torch.float32)
    config = EngineConfig(mtp=mtp, block_size=4, kv_cache_tokens=96)
    busy, moving = random_prompts([80, 20], seed=12)
    sampled = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    expected = {}
    for name, params in (("greedy", GREEDY), ("sampled", sampled)):
        alone = Engine(model, config)
        expected[name] = run_staggered(alone, [moving], params, [0])[0].token_ids
    assert expected["greedy"] == generate(model, [moving], GREEDY.max_tokens)[0].token_ids
    for name, params in (("greedy", GREEDY), ("sampled", sampled)):
        prefill, decode = Engine(model, config), Engine(model, config)
        occupant = decode.add_request(busy, GREEDY)
        decode.step()  # its 80 prompt tokens take 20 of the 24 blocks: no room for the 21 tokens arriving
        rid = prefill.add_request(moving, params)
        while not prefill.prefilled():
            prefill.step()
        pre = prefill.take_prefilled(prefill.prefilled()[0])
        decode.add_prefilled(pre)
        assert [s.request_id for s in decode.scheduler.waiting] == [rid], "it waits rather than being placed"
        outs = {}
        while decode.has_unfinished():
            outs.update({o.request_id: o for o in decode.step() if o.finished})
        assert outs[rid].token_ids == expected[name] and len(outs[occupant].token_ids) == GREEDY.max_tokens


def test_an_fp8_resident_model_serves_as_its_plain_loop():
    """The engine's paged, packed and batched paths over FP8Linear layers and FP8 experts run one at a time."""
    from moeserve.cluster.llm import DEMO_MODEL_FP8
    llm = LLM(DEMO_MODEL_FP8, device="cpu", dtype="float32", fp8_resident=True, kv_cache_tokens=1024, block_size=8)
    prompts = random_prompts([5, 23, 11], vocab=4000, seed=2)
    expected = [g.token_ids for g in generate(llm.model, prompts, GREEDY.max_tokens)]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
