"""`moeserve serve` (the default configuration) losing processes under load: an expert group, then the decode shard,
killed by SIGKILL while 8 requests stream. Every stream completes with the single-process engine's text, later
requests are served, and the server's status route and `moeserve status` show the recoveries."""
import json
import os
import signal
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from moeserve.actors.cli import main as cli  # noqa: E402
from moeserve.actors.serve import Server  # noqa: E402
from moeserve.cluster import LLM, ClusterConfig, SamplingParams  # noqa: E402

HTTP_PORT, GRPC_PORT = 18531, 19531
MODEL, TOKENS = "moeserve-demo", 300
PROMPTS = ["def fibonacci(", "import numpy as np\n", "class Stack:\n", "def quicksort(xs):\n", "# read a file\n",
           "for i in range(10):\n", "def add(a, b):\n", "x = [1, 2, 3]\n"]


@pytest.fixture(scope="module")
def server():
    s = Server(ClusterConfig(), http_port=HTTP_PORT, grpc_port=GRPC_PORT, max_pending=64).start()
    yield s
    s.stop()


def wait_for(condition, timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def test_an_expert_group_then_the_decode_shard_killed_under_8_streams(server, capsys):
    """Two rounds of 8 streams: an expert group killed under the first, the decode shard under the second (each
    once every stream has its first tokens, so that every stream is running at the kill)."""
    engine = LLM()
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in engine.generate(PROMPTS, params)]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="unused", max_retries=0)
    cluster = server.cluster
    recovered = []
    for victim in ("expert-group-1", "decode-0"):
        texts, errors = [None] * len(PROMPTS), []
        started = [threading.Event() for _ in PROMPTS]

        def stream(i: int) -> None:
            try:
                parts = []
                for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=TOKENS,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                       timeout=300):
                    parts.append(chunk.choices[0].text)
                    started[i].set()
                texts[i] = "".join(parts)
            except Exception as e:  # noqa: BLE001  (counted below)
                errors.append(e)
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        wait_for(lambda: all(e.is_set() for e in started), 120)
        assert all(t.is_alive() for t in threads), "the streams ended before the kill: make them longer"
        os.kill(cluster.where[victim]["pid"], signal.SIGKILL)
        recovered.append(wait_for(lambda: len(cluster.recoveries) == len(recovered) + 1, 120))
        for t in threads:
            t.join(300)
        assert not errors and texts == expected  # 8 of 8, the engine's text
    out = client.completions.create(model=MODEL, prompt="def f(", max_tokens=20, temperature=0)
    assert out.choices[0].text == engine.generate(["def f("], SamplingParams(max_tokens=20, temperature=0))[0].text

    wait_for(lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/v1/cluster").read())
             ["failures_survived"] == 2, 10)
    status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/v1/cluster").read())
    assert [e["lost"] for e in status["recoveries"]] == [["expert-group-1"], ["decode-0"]]
    assert {a["name"]: a["state"] for a in status["actors"]} == {name: "alive" for name in cluster.where}
    pids = {a["name"]: a["pid"] for a in status["actors"]}
    assert pids["decode-0"] == cluster.where["decode-0"]["pid"]  # the restarted process
    capsys.readouterr()
    assert cli(["status", "--url", f"http://127.0.0.1:{HTTP_PORT}"]) == 0
    table = capsys.readouterr().out
    assert "2 failures survived" in table and "recovered decode-0" in table
    row = next(line.split() for line in table.splitlines() if line.startswith("decode-0 "))
    assert row[:2] + row[4:] == ["decode-0", "decode-shard", str(pids["decode-0"]), "alive"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/metrics").read().decode()
    assert "moeserve_failures_survived 2.0" in metrics
    assert 'moeserve_actors{role="expert-group",state="alive"} 4.0' in metrics
    with capsys.disabled():
        print(f"\nkilled, then recovered (seconds from SIGKILL): expert group {recovered[0]:.2f}, decode shard "
              f"{recovered[1]:.2f}; the recoveries themselves {[e['recovered_s'] for e in cluster.recoveries]} s")
