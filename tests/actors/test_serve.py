"""The real server (Ray Serve over the local cluster, demo model) through the clients users already have: the
official `openai` client, a gRPC client from stubs generated from the repository's proto, and raw HTTP for
the bad inputs. Outputs at temperature 0 equal the single-process engine's."""
import asyncio
import contextlib
import http.client
import json
import os
import threading
import time

import pytest

grpc = pytest.importorskip("grpc")
openai = pytest.importorskip("openai")

from moeserve.actors.serve import Server  # noqa: E402
from moeserve.cluster import LLM, ClusterConfig, SamplingParams  # noqa: E402
from moeserve.cluster.api.stubs import GenerationStub, pb2  # noqa: E402
from moeserve.kernels.errors import InputError  # noqa: E402
from tests import fuzz, netstat  # noqa: E402

HTTP_PORT, GRPC_PORT, MAX_PENDING = 18431, 19431, 3
MODEL = "moeserve-demo"


@pytest.fixture(scope="module")
def server():
    # the default configuration, as `moeserve serve` runs it: its text must be the engine's
    s = Server(ClusterConfig(), http_port=HTTP_PORT, grpc_port=GRPC_PORT, max_pending=MAX_PENDING).start()
    private = s.cluster.private_dir
    yield s
    s.stop()
    assert not os.path.exists(private), "stopping leaves nothing behind in the temp directory"


@pytest.fixture(scope="module")
def engine():
    return LLM()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="unused", max_retries=0)


def post(path: str, body: bytes, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
    conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def greedy(engine, prompt, n):
    return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0))[0]


def test_completions_stream_and_not_equal_the_engine(client, engine):
    expected = greedy(engine, "def fibonacci(", 20)
    out = client.completions.create(model=MODEL, prompt="def fibonacci(", max_tokens=20, temperature=0)
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.completions.create(model=MODEL, prompt="def fibonacci(", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_an_empty_text_prompt_is_the_engines_bos_alone(client, engine):
    """As the engine (and vLLM) take it: the tokenizer's BOS token is the whole prompt, over HTTP and gRPC (where
    the prompt set to "" is told from one left unset)."""
    expected = greedy(engine, "", 12)
    assert expected.prompt_token_ids == [engine.tokenizer.bos_token_id]
    for prompt in ("", [""]):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == expected.text and out.usage.prompt_tokens == 1
    stub = GenerationStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
    response = stub.Generate(pb2.GenerateRequest(prompt="", max_tokens=12, temperature=0))
    assert response.text == expected.text and response.usage.prompt_tokens == 1


def test_token_id_prompts(client, engine):
    ids = engine.tokenizer.encode("import os\n")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(engine, ids, 12).text


def test_chat_stream_and_not_equal_the_engine(client, engine):
    messages = [{"role": "user", "content": "class Stack:"}]
    ids = engine.tokenizer.apply_chat_template(messages)
    expected = greedy(engine, ids, 16)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == expected.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.text


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for name in ("moeserve_ttft_seconds", "moeserve_tpot_seconds", "moeserve_queue_length",
                 "moeserve_running_sequences", "moeserve_kv_cache_usage", "moeserve_prefix_cache_hit_rate",
                 "moeserve_mtp_acceptance", "moeserve_expert_tokens", "moeserve_internode_bytes",
                 "moeserve_placement_version"):
        assert name in text, name


def test_grpc_unary_and_stream_equal_the_engine(server, engine):
    stub = GenerationStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
    expected = greedy(engine, "def main(", 14)
    response = stub.Generate(pb2.GenerateRequest(prompt="def main(", max_tokens=14, temperature=0))
    assert response.text == expected.text and list(response.token_ids) == expected.token_ids
    assert response.usage.completion_tokens == 14 and response.finish_reason == expected.finish_reason
    chunks = list(stub.GenerateStream(pb2.GenerateRequest(prompt="def main(", max_tokens=14, temperature=0)))
    assert "".join(c.text for c in chunks) == expected.text
    assert sum((list(c.token_ids) for c in chunks), []) == expected.token_ids
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb2.GenerateRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "neither prompt nor" in err.value.details()


@pytest.mark.parametrize("body, status, message", [
    (b'{"model": "moeserve-demo", "prompt": ', 400, "not valid JSON"),
    (b'{"model": "moeserve-demo", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "moeserve-demo"}', 400, "prompt"),
    (b'{"model": "moeserve-demo", "prompt": "x", "max_tokens": 100000}', 400, "exceed the model's context"),
    (b'{"model": "moeserve-demo", "prompt": "x", "temperature": -1}', 400, "temperature must be >= 0"),
    (b'{"model": "gpt-5", "prompt": "x"}', 404, "does not exist"),
    (b'{"model": "moeserve-demo", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'{"model": "moeserve-demo", "prompt": "' + b"a" * (1 << 20) + b'"}', 413, "exceeds"),
    (b'{"model": "moeserve-demo", "prompt": []}', 400, "prompt is empty"),
    (b'{"model": "moeserve-demo", "prompt": "x", "temperature": NaN}', 400, "NaN is not a JSON number"),
    (b'{"model": "moeserve-demo", "prompt": "x", "temperature": 1e-310}', 400, "use 0 for greedy"),
    (b'{"model": "moeserve-demo", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b'}', 400, "nested too deeply"),
    (b'{"model": "moeserve-demo", "prompt": "\\ud800"}', 400, "not valid Unicode"),
    (b'{"model": "moeserve-demo", "prompt": "x", "presence_penalty": 0.5}', 400, "presence_penalty is not supported"),
    (b'{"model": "moeserve-demo", "prompt": "x", "best_of": 3}', 400, "best_of is not supported"),
    (b'{"model": "moeserve-demo", "prompt": "x", "logit_bias": {"7": 100}}', 400, "logit_bias is not supported"),
    (b'{"model": "moeserve-demo", "prompt": "x", "stop_token_ids": [99999]}', 400, "stop token id 99999 is outside"),
    (b'{"model": "moeserve-demo", "prompt": "x", "stop_token_ids": ["7"]}', 400, "stop_token_ids"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, body, status, message):
    code, payload = post("/v1/completions", body)
    assert code == status and message in payload["error"]["message"]
    code, payload = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode())
    assert code == 200 and payload["usage"]["completion_tokens"] == 2


def test_chat_refuses_what_it_would_ignore_and_takes_the_values_that_change_nothing(client, engine):
    messages = [{"role": "user", "content": "def f("}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for extra in ({"tools": tools}, {"response_format": {"type": "json_object"}}, {"frequency_penalty": 1.0}):
        with pytest.raises(openai.BadRequestError, match=f"{next(iter(extra))} is not supported"):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **extra)
    harmless = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, tools=[],
                                              tool_choice="none", response_format={"type": "text"},
                                              presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u")
    ids = engine.tokenizer.apply_chat_template(messages)
    assert harmless.choices[0].message.content == greedy(engine, ids, 8).text
    # OpenAI's newer name for the system message is the system message
    system = [{"role": "system", "content": "Write Python."}, *messages]
    developer = client.chat.completions.create(model=MODEL, messages=[{**system[0], "role": "developer"}, *messages],
                                               max_tokens=8, temperature=0)
    assert developer.choices[0].message.content == greedy(engine, engine.tokenizer.apply_chat_template(system), 8).text


def test_top_k_extension_cuts_the_draw(client, engine):
    # top_k 1 leaves one token to draw from: any seed and temperature give the argmax, the engine's greedy text
    texts = {client.completions.create(model=MODEL, prompt="import", max_tokens=12, temperature=1.5, seed=seed,
                                       extra_body={"top_k": 1}).choices[0].text for seed in (0, 1)}
    assert texts == {greedy(engine, "import", 12).text}
    code, payload = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "top_k": -2}).encode())
    assert code == 400 and "top_k" in payload["error"]["message"]


def test_stop_token_ids_and_include_stop_str_in_output_give_the_engines_text(server, client, engine):
    """vLLM's extensions, over HTTP (streamed and not) and gRPC: the text the engine reports with the same settings,
    which leaves the stop token's text out unless asked to keep it."""
    prompt = "def fibonacci("
    free = greedy(engine, prompt, 16).token_ids
    stop = next(t for i, t in enumerate(free) if i >= 2 and free.index(t) == i and engine.tokenizer.decode([t]).strip())
    stub = GenerationStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
    texts = set()
    for include in (False, True):
        expected = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop],
                                                            include_stop_str_in_output=include))[0]
        assert expected.token_ids[-1] == stop and expected.finish_reason == "stop"
        extra = {"stop_token_ids": [stop], "include_stop_str_in_output": include}
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body=extra)
        assert (out.choices[0].text, out.choices[0].finish_reason) == (expected.text, "stop")
        assert out.choices[0].stop_reason == stop  # vLLM's field: the stop token that ended it
        assert out.usage.completion_tokens == len(expected.token_ids)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                stream=True, extra_body=extra))
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert [c.choices[0].stop_reason for c in chunks] == [None] * (len(chunks) - 1) + [stop]
        request = pb2.GenerateRequest(prompt=prompt, max_tokens=16, temperature=0, **extra)
        response = stub.Generate(request)
        assert response.text == expected.text and list(response.token_ids) == expected.token_ids
        assert response.WhichOneof("stop_reason") == "stop_token_id" and response.stop_token_id == stop
        streamed = list(stub.GenerateStream(request))
        assert "".join(c.text for c in streamed) == expected.text
        assert [c.WhichOneof("stop_reason") for c in streamed] == [None] * (len(streamed) - 1) + ["stop_token_id"]
        texts.add(expected.text)
    assert len(texts) == 2


def test_stop_reason_names_the_stop_string_and_is_null_at_the_length(server, client, engine):
    """vLLM's stop_reason over HTTP (completions and chat, streamed and not) and gRPC: the stop string that ended
    the request, and null (no field over gRPC) for one that ran to max_tokens."""
    prompt, stop = "def fibonacci(", "):\n"
    assert stop in greedy(engine, prompt, 16).text
    messages = [{"role": "user", "content": prompt}]
    chat_text = greedy(engine, engine.tokenizer.apply_chat_template(messages), 16).text
    stub = GenerationStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
    for stops, reason in (([stop], stop), ([], None)):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stops)
        assert (out.choices[0].finish_reason, out.choices[0].stop_reason) == ("length" if reason is None else
                                                                              "stop", reason)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                stop=stops, stream=True))
        assert chunks[-1].choices[0].stop_reason == reason
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              stop=stops)
        assert chat.choices[0].stop_reason == (stop if stops and stop in chat_text else None)
        request = pb2.GenerateRequest(prompt=prompt, max_tokens=16, temperature=0, stop=stops)
        response = stub.Generate(request)
        assert (response.stop_string if reason else response.WhichOneof("stop_reason")) == reason
        assert list(stub.GenerateStream(request))[-1].WhichOneof("stop_reason") == (reason and "stop_string")


def test_n_choices_draw_as_requests_of_their_own(client, engine):
    """Choice i of a seeded request for n is the engine's request with seed + i, streamed or not; usage counts
    every choice's tokens."""
    kw = dict(max_tokens=10, temperature=0.8, top_p=0.95)
    expected = [engine.generate(["def add("], SamplingParams(seed=5 + i, ignore_eos=True, **kw))[0] for i in range(3)]
    assert len({e.text for e in expected}) > 1
    out = client.completions.create(model=MODEL, prompt="def add(", n=3, seed=5, extra_body={"ignore_eos": True}, **kw)
    assert [(c.index, c.text) for c in out.choices] == [(i, e.text) for i, e in enumerate(expected)]
    assert out.usage.completion_tokens == 30 and out.usage.prompt_tokens == len(expected[0].prompt_token_ids)
    chunks = list(client.completions.create(model=MODEL, prompt="def add(", n=3, seed=5, stream=True,
                                            extra_body={"ignore_eos": True}, **kw))
    texts = ["", "", ""]
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [e.text for e in expected]
    assert sum(c.choices[0].finish_reason is not None for c in chunks) == 3
    assert chunks[-1].usage.completion_tokens == 30 and all(c.usage is None for c in chunks[:-1])


def test_n_greedy_chat_choices_are_the_engines_text(client, engine):
    messages = [{"role": "user", "content": "import"}]
    expected = greedy(engine, engine.tokenizer.apply_chat_template(messages), 8).text
    out = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=8, temperature=0)
    assert [(c.index, c.message.content) for c in out.choices] == [(0, expected), (1, expected)]
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=8, temperature=0,
                                                stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert texts == {0: expected, 1: expected}
    code, payload = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "n": MAX_PENDING + 1}).encode())
    assert code == 400 and "--max-pending" in payload["error"]["message"]


def test_bench_serve_runs_its_requests_to_their_length_and_refuses_bad_settings(server, capsys):
    from moeserve.actors import bench_serve, cli
    url = f"http://127.0.0.1:{HTTP_PORT}"
    assert cli.main(["bench", "serve", "--url", url, "--requests", "4", "--clients", str(MAX_PENDING),
                     "--rate", "50", "--max-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["requests_sent"], report["completed"], report["errors"]) == (4, 4, 0)
    assert report["output_tokens_per_s"] * report["wall_s"] == pytest.approx(4 * 6)
    assert 0 < report["ttft_s"]["p50"] <= report["e2e_s"]["p50"] and report["tpot_s"]["p50"] > 0
    settings = dict(url=url, requests=2, clients=1, rate=1.0, max_tokens=2, duration=10.0)
    for bad, message in (({"clients": 0}, "--clients must be at least 1"), ({"rate": 0.0}, "--rate must be"),
                         ({"url": "http://192.0.2.1:8000"}, "not a loopback address")):
        with pytest.raises(InputError, match=message):
            bench_serve.run(**{**settings, **bad})


def test_merged_choices_arrive_as_they_come_and_end_together():
    """The merge of a request's choices: every item once, tagged with its run, in the order they were made; the
    first error ends every run (their `finally` runs, as a request's abort does); closing early closes them all."""
    from moeserve.actors.serve import merged

    async def run(name, delays, fail_after=None):
        try:
            for k, delay in enumerate(delays):
                await asyncio.sleep(delay)
                if k == fail_after:
                    raise ValueError(f"{name} failed")
                log.append((name, k))
                yield f"{name}{k}"
        finally:
            log.append((name, "closed"))

    async def collect(runs, stop_after=None):
        """The items, and which runs had closed by the time the merge ended (not later, when asyncio.run
        cancels what is left)."""
        got = []
        try:
            async with contextlib.aclosing(merged(runs)) as items:
                async for item in items:
                    got.append(item)
                    if len(got) == stop_after:
                        break
        finally:
            closed.extend(sorted(name for name, k in log if k == "closed"))
        return got

    log, closed = [], []
    got = asyncio.run(collect([run("a", [0.03, 0.03]), run("b", [0.01, 0.04]), run("c", [0.05])]))
    made = [(name, k) for name, k in log if k != "closed"]
    assert got == [("abc".index(name), f"{name}{k}") for name, k in made] and len(got) == 5
    assert closed == ["a", "b", "c"]
    log, closed = [], []
    with pytest.raises(ValueError, match="b failed"):
        asyncio.run(collect([run("a", [0.01] * 100), run("b", [0.02, 0.02], fail_after=1)]))
    assert closed == ["a", "b"] and len(log) < 20
    log, closed = [], []
    assert len(asyncio.run(collect([run("a", [0.01] * 100), run("b", [0.01] * 100)], stop_after=3))) == 3
    assert closed == ["a", "b"] and len(log) < 20
    log, closed = [], []
    assert asyncio.run(collect([run("a", [0, 0])])) == [(0, "a0"), (0, "a1")] and closed == ["a"]


def test_a_full_queue_answers_429(server):
    body = json.dumps({"model": MODEL, "prompt": "def f(", "max_tokens": 300, "temperature": 0,
                       "ignore_eos": True, "stream": True})

    refused = []  # (status, body) of every 429, whoever met it

    def hold():  # a long streamed request, read to its end
        conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
        conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        answer = response.read()
        if response.status == 429:  # the limit was already reached (requests of an earlier test still ending)
            refused.append(json.loads(answer))
    holders = [threading.Thread(target=hold) for _ in range(MAX_PENDING + 2)]
    for t in holders:
        t.start()
    deadline = time.time() + 60
    while time.time() < deadline and not refused:  # once the others are in flight, one more is refused
        code, payload = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode())
        if code == 429:
            refused.append(payload)
        time.sleep(0.05)
    for t in holders:
        t.join()
    # MAX_PENDING + 2 streams for a limit of MAX_PENDING: someone met the limit, and was told so
    assert refused and all("limit" in payload["error"]["message"] for payload in refused)


def test_malformed_http_bodies_get_a_4xx_never_a_500_or_silence(server, engine):
    """A seeded fuzz of both endpoints from a grammar of the API; afterwards the server still serves the
    engine's text."""
    answers = {}
    for path, body, what in fuzz.http_cases(seed=16, n=300):
        code, payload = post(path, body)  # a dropped connection raises here
        assert 400 <= code < 500 and payload["error"]["message"], (what, code, payload)
        answers[code] = answers.get(code, 0) + 1
    assert set(answers) <= {400, 404, 413} and answers[400] > 200
    out = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="unused", max_retries=0) \
        .completions.create(model=MODEL, prompt="def fibonacci(", max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy(engine, "def fibonacci(", 12).text


def test_malformed_grpc_messages_get_invalid_argument(server, engine):
    channel = grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}")
    raw = {"unary": channel.unary_unary("/moeserve.v1.Generation/Generate"),
           "stream": channel.unary_stream("/moeserve.v1.Generation/GenerateStream")}
    for i, (body, what) in enumerate(fuzz.grpc_cases(seed=16, n=100, pb2=pb2)):
        kind = "unary" if i % 2 else "stream"
        try:
            reply = raw[kind](body, timeout=60)
            code, details = grpc.StatusCode.OK, list(reply) if kind == "stream" else reply
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, kind, code, details)
    stub = GenerationStub(channel)
    response = stub.Generate(pb2.GenerateRequest(prompt="def main(", max_tokens=10, temperature=0))
    assert response.text == greedy(engine, "def main(", 10).text


def test_grpc_and_http_share_defaults_and_are_counted(server, client):
    """A request that leaves temperature, top_p and max_tokens out samples alike over both protocols (same seed,
    same tokens), and both protocols' requests are counted."""
    http = client.completions.create(model=MODEL, prompt="import os\n", seed=7, extra_body={"ignore_eos": True})
    stub = GenerationStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
    rpc = stub.Generate(pb2.GenerateRequest(prompt="import os\n", seed=7, ignore_eos=True))
    assert rpc.usage.completion_tokens == http.usage.completion_tokens == 256
    assert rpc.text == http.choices[0].text
    conn = http_client()
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'moeserve_requests_total{endpoint="grpc_generate",status="OK"}' in text


def http_client():
    return http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)


def engine_logprobs(engine, tokens, n, k):
    out = engine.generate([tokens], SamplingParams(max_tokens=n, temperature=0, logprobs=k))[0]
    return out, [engine.tokenizer.decode([t], skip_special_tokens=False) for t in out.token_ids]


def test_openai_client_reads_completion_logprobs_streamed_and_not(client, engine):
    expected, texts = engine_logprobs(engine, engine.tokenizer.encode("def fibonacci("), 8, 3)
    out = client.completions.create(model=MODEL, prompt="def fibonacci(", max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == texts
    assert lp.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    for i, top in enumerate(lp.top_logprobs):
        alternatives = {engine.tokenizer.decode([t], skip_special_tokens=False): v
                        for t, v in expected.top_logprobs[i].items()}
        assert top == pytest.approx({**alternatives, texts[i]: expected.logprobs[i]}, abs=1e-4)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt="def fibonacci(", max_tokens=8, temperature=0, logprobs=3, stream=True)]
    assert sum((c.tokens for c in streamed if c), []) == texts
    assert sum((c.token_logprobs for c in streamed if c), []) == pytest.approx(expected.logprobs, abs=1e-4)
    for got, want in zip(sum((c.top_logprobs for c in streamed if c), []), lp.top_logprobs, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_openai_client_reads_chat_logprobs_streamed_and_not(client, engine):
    messages = [{"role": "user", "content": "class Stack:"}]
    expected, texts = engine_logprobs(engine, engine.tokenizer.apply_chat_template(messages), 8, 2)

    def check(content):  # the engine's, within float tolerance: another batch may sum in another order
        assert [c.token for c in content] == texts
        assert [c.logprob for c in content] == pytest.approx(expected.logprobs, abs=1e-4)
        assert [c.bytes for c in content] == [list(t.encode()) for t in texts]
        for c, top in zip(content, expected.top_logprobs):
            assert [a.logprob for a in c.top_logprobs] == pytest.approx(list(top.values()), abs=1e-4)
            assert [a.token for a in c.top_logprobs] == [engine.tokenizer.decode([t], skip_special_tokens=False)
                                                         for t in top]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2)
    check(out.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    check(sum((c.choices[0].logprobs.content for c in stream if c.choices and c.choices[0].logprobs), []))


def test_the_local_cluster_listens_on_loopback_only_and_keeps_its_files_private(server):
    sockets = netstat.listening(os.getpid())
    assert len(sockets) > 10  # Ray's servers, every actor's, the proxies: found, not missed
    assert [s for s in sockets if not netstat.is_loopback(s[2])] == []
    private = server.cluster.private_dir
    assert os.stat(private).st_mode & 0o777 == 0o700 and os.stat(private).st_uid == os.getuid()
    assert os.path.isdir(os.path.join(private, "ray"))  # Ray's own tree (world-writable) sits inside it


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server, n):
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
    conn.request("POST", "/v1/completions", headers={"content-type": "application/json"},
                 body=json.dumps({"model": MODEL, "prompt": "def f(", "max_tokens": 400, "ignore_eos": True,
                                  "stream": True, "n": n}))
    response = conn.getresponse()
    response.readline()  # the first event arrived: the request is decoding
    conn.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = server.cluster.stats()["shards"]
        if all(s["engine"]["running"] == 0 and s["engine"]["kv_cache_usage"] == 0 for s in stats):
            break
        time.sleep(0.2)
    assert all(s["engine"]["running"] == 0 and s["engine"]["kv_cache_usage"] == 0 for s in stats)


def test_trace_context_survives_the_trip_into_another_process():
    """The carrier the ingress hands the shards names the same trace, with the request span as parent."""
    from opentelemetry.sdk.trace import TracerProvider
    from moeserve.actors import tracing
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    span = TracerProvider().get_tracer("t").start_span("request", context=tracing.context_of(incoming))
    carrier = tracing.carrier_of(span)
    assert carrier["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert carrier["traceparent"].split("-")[2] == format(span.get_span_context().span_id, "016x")


def test_requests_with_a_traceparent_header_are_served(server):
    code, payload = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 3}).encode(),
                         headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert code == 200 and payload["usage"]["completion_tokens"] == 3
