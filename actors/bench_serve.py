"""`moeserve bench serve`: a load test of a running server over its OpenAI-compatible streaming API.

Requests arrive as a Poisson process (--rate per second), at most --clients at a time, --requests in all, and
the run stops at --duration seconds whatever is left. Each request is greedy and generates exactly --max-tokens
(EOS ignored), so that runs compare equal work. Only loopback addresses are accepted: this measures a server on
this machine. Reports TTFT, TPOT and end-to-end latency percentiles and throughput.
"""
import http.client
import ipaddress
import json
import random
import socket
import statistics
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from moeserve.kernels.errors import InputError


@dataclass
class Sample:
    ttft: float
    tpot: Optional[float]
    e2e: float
    tokens: int


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def _prompts(n: int, rng: random.Random) -> list[str]:
    """Lines of the standard library's source, 1 to 12 of them, as varied prompts."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = []
    while len(out) < n:
        lines = rng.choice(files).read_text(errors="replace").splitlines()
        if len(lines) > 20:
            start = rng.randrange(len(lines) - 12)
            out.append("\n".join(lines[start:start + rng.randint(1, 12)]) + "\n")
    return out


def _one(host: str, port: int, model: str, prompt: str, max_tokens: int) -> Sample:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=300)
    # ignore_eos: every request generates max_tokens, so that runs compare equal work
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"][0]["text"]:
            first = time.perf_counter()
        if "usage" in chunk:
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    first = first or end
    return Sample(first - start, (end - first) / (tokens - 1) if tokens > 1 else None, end - start, tokens)


def run(url: str, requests: int, clients: int, rate: float, max_tokens: int, duration: float, seed: int = 0) -> dict:
    for name, value in (("requests", requests), ("clients", clients), ("max_tokens", max_tokens)):
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name, value in (("rate", rate), ("duration", duration)):
        if not value > 0:
            raise InputError(f"--{name} must be a positive number, got {value}")
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 8000
    if not _loopback(host):
        raise InputError(f"{host} is not a loopback address; bench serve only loads a server on this machine")
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
    except OSError as e:
        raise InputError(f"no moeserve server at {url} ({e}); start one with `moeserve serve`") from None
    rng = random.Random(seed)
    prompts = _prompts(requests, rng)
    arrivals = [0.0]
    for _ in range(requests - 1):
        arrivals.append(arrivals[-1] + rng.expovariate(rate))
    samples: list[Sample] = []
    errors: list[str] = []
    slots = threading.Semaphore(clients)
    lock = threading.Lock()
    start = time.perf_counter()

    def worker(prompt):
        try:
            sample = _one(host, port, model, prompt, max_tokens)
            with lock:
                samples.append(sample)
        except Exception as e:  # a failed request is counted, not fatal to the run
            with lock:
                errors.append(str(e))
        finally:
            slots.release()

    threads = []
    for prompt, at in zip(prompts, arrivals):
        wait = start + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        if time.perf_counter() - start > duration:
            break
        slots.acquire()
        threads.append(threading.Thread(target=worker, args=(prompt,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(timeout=max(0.0, duration - (time.perf_counter() - start)) + 60)
    wall = time.perf_counter() - start

    def pct(values):
        values = sorted(v for v in values if v is not None)
        if not values:
            return None
        q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
        return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values)}
    return {"model": model, "requests_sent": len(threads), "completed": len(samples), "errors": len(errors),
            "first_error": errors[0] if errors else None, "clients": clients, "rate_per_s": rate,
            "wall_s": wall, "output_tokens_per_s": sum(s.tokens for s in samples) / wall,
            "requests_per_s": len(samples) / wall,
            "ttft_s": pct([s.ttft for s in samples]), "tpot_s": pct([s.tpot for s in samples]),
            "e2e_s": pct([s.e2e for s in samples])}
