"""The real server (Ray Serve over the local cluster, demo model) through the clients users already have: the
official `openai` client, a gRPC client from stubs generated from the repository's proto, and raw HTTP for
the bad inputs. Outputs at temperature 0 equal the single-process engine's."""
import http.client
import json
import os
import threading
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
grpc = pytest.importorskip("grpc")
openai = pytest.importorskip("openai")

from moeserve.actors.serve import Server  # noqa: E402
from moeserve.cluster import LLM, ClusterConfig, SamplingParams  # noqa: E402
from moeserve.cluster.api.stubs import GenerationStub, pb2  # noqa: E402

HTTP_PORT, GRPC_PORT, MAX_PENDING = 18431, 19431, 3
MODEL = "moeserve-demo"


@pytest.fixture(scope="module")
def server():
    exact = ClusterConfig(dispatch_dtype="float32", combine_dtype="float32")  # FP8 payloads shift near-ties
    s = Server(exact, http_port=HTTP_PORT, grpc_port=GRPC_PORT, max_pending=MAX_PENDING).start()
    yield s
    s.stop()


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
                 "moeserve_mtp_acceptance", "moeserve_expert_tokens", "moeserve_internode_bytes"):
        assert name in text, name


def test_grpc_unary_and_stream_equal_the_engine(server, engine):
    stub = GenerationStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
    expected = greedy(engine, "def main(", 14)
    response = stub.Generate(pb2.GenerateRequest(prompt="def main(", max_tokens=14))
    assert response.text == expected.text and list(response.token_ids) == expected.token_ids
    assert response.usage.completion_tokens == 14 and response.finish_reason == expected.finish_reason
    chunks = list(stub.GenerateStream(pb2.GenerateRequest(prompt="def main(", max_tokens=14)))
    assert "".join(c.text for c in chunks) == expected.text
    assert sum((list(c.token_ids) for c in chunks), []) == expected.token_ids
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb2.GenerateRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.value.details()


@pytest.mark.parametrize("body, status, message", [
    (b'{"model": "moeserve-demo", "prompt": ', 400, "not valid JSON"),
    (b'{"model": "moeserve-demo", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "moeserve-demo"}', 400, "prompt"),
    (b'{"model": "moeserve-demo", "prompt": "x", "max_tokens": 100000}', 400, "exceed the model's context"),
    (b'{"model": "moeserve-demo", "prompt": "x", "temperature": -1}', 400, "temperature must be >= 0"),
    (b'{"model": "gpt-5", "prompt": "x"}', 404, "does not exist"),
    (b'{"model": "moeserve-demo", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'{"model": "moeserve-demo", "prompt": "' + b"a" * (1 << 20) + b'"}', 413, "exceeds"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, body, status, message):
    code, payload = post("/v1/completions", body)
    assert code == status and message in payload["error"]["message"]
    code, payload = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode())
    assert code == 200 and payload["usage"]["completion_tokens"] == 2


def test_a_full_queue_answers_429(server):
    body = json.dumps({"model": MODEL, "prompt": "def f(", "max_tokens": 300, "temperature": 0,
                       "ignore_eos": True, "stream": True})

    def hold():  # a long streamed request, read to its end
        conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
        conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        conn.getresponse().read()
    holders = [threading.Thread(target=hold) for _ in range(MAX_PENDING + 2)]
    for t in holders:
        t.start()
    deadline, code = time.time() + 60, None
    while time.time() < deadline:  # once the others are in flight, one more is refused
        code, payload = post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode())
        if code == 429:
            break
        time.sleep(0.05)
    for t in holders:
        t.join()
    assert code == 429 and "limit" in payload["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server):
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=60)
    conn.request("POST", "/v1/completions", headers={"content-type": "application/json"},
                 body=json.dumps({"model": MODEL, "prompt": "def f(", "max_tokens": 400, "ignore_eos": True,
                                  "stream": True}))
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
