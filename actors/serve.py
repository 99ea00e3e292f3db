"""The Ray Serve application: one ingress deployment in front of the cluster, speaking OpenAI-compatible HTTP
(`/v1/completions`, `/v1/chat/completions` with SSE streaming, `/v1/models`, `/health`, `/metrics`) and gRPC
(`moeserve.v1.Generation`: `Generate`, `GenerateStream`) through Ray Serve's gRPC proxy.

The ingress validates and tokenises (chat template included), refuses work past its queue limit with 429 /
RESOURCE_EXHAUSTED, streams tokens as the decode shard accepts them, aborts a request whose client goes away,
records Prometheus metrics and OpenTelemetry spans: the trace context comes from the HTTP `traceparent` header or
gRPC metadata and travels on into the shards, which add prefill and decode spans with sampled step events
(dispatch and combine time).
"""
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import AsyncIterator, Optional, Union

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from moeserve.cluster.api import defaults
from moeserve.cluster.api import openai_schema as oa
from moeserve.cluster.api import stubs  # also registers the message classes gRPC requests unpickle into
from moeserve.cluster.config import ClusterConfig
from moeserve.cluster.llm import encode_prompt
from moeserve.cluster.sampling_params import SamplingParams
from moeserve.cluster.tokenizer import IncrementalDecoder, Tokenizer
from moeserve.kernels.args import ModelArgs
from moeserve.kernels.errors import ConfigError, InputError

from . import tracing
from .client import ClusterClient, Delta
from .cluster import LOCAL_ONLY_ENV, Cluster

MAX_BODY_BYTES = 1 << 20
GRPC_SERVICER = "moeserve.cluster.api.stubs.add_GenerationServicer_to_server"
app = FastAPI(title="moeserve", docs_url=None, redoc_url=None)


def bind_grpc_host() -> None:
    """Worker setup hook: Ray Serve's gRPC proxy binds [::] (every interface); bind MOESERVE_GRPC_HOST instead.
    On a cluster that stays on this machine, a replica's internal gRPC server (also [::]) binds 127.0.0.1."""
    host = os.environ.get("MOESERVE_GRPC_HOST")
    if host:
        from ray.serve._private import default_impl
        add_grpc_address = default_impl.add_grpc_address

        def on_host(server, address):
            return add_grpc_address(server, address.replace("[::]", host, 1))
        default_impl.add_grpc_address = on_host
    if os.environ.get(LOCAL_ONLY_ENV) == "0":
        from ray.serve._private import replica
        add_port = replica.add_port_to_grpc_server

        def on_loopback(server, address):
            return add_port(server, address.replace("[::]", "127.0.0.1", 1))
        replica.add_port_to_grpc_server = on_loopback


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("moeserve_ttft_seconds", "time to first token", registry=r, buckets=buckets)
        self.tpot = Histogram("moeserve_tpot_seconds", "time per output token after the first", registry=r,
                              buckets=buckets)
        self.requests = Counter("moeserve_requests", "requests by endpoint (HTTP and gRPC) and outcome",
                                ["endpoint", "status"], registry=r)
        self.queue = Gauge("moeserve_queue_length", "requests waiting in the shards' queues", registry=r)
        self.inflight = Gauge("moeserve_inflight_requests", "requests the ingress is serving", registry=r)
        self.running = Gauge("moeserve_running_sequences", "sequences in the shards' running batches", registry=r)
        self.kv_usage = Gauge("moeserve_kv_cache_usage", "fraction of latent-cache blocks in use", ["shard"],
                              registry=r)
        self.prefix_hits = Gauge("moeserve_prefix_cache_hit_rate", "prompt tokens served from the prefix cache",
                                 ["shard"], registry=r)
        self.mtp = Gauge("moeserve_mtp_acceptance", "accepted MTP drafts / proposed", registry=r)
        self.expert_tokens = Gauge("moeserve_expert_tokens", "tokens routed to each expert", ["layer", "expert"],
                                   registry=r)
        self.plane_bytes = Gauge("moeserve_internode_bytes", "bytes sent between nodes, by plane", ["plane"],
                                 registry=r)
        self.placement = Gauge("moeserve_placement_version", "the expert placement version the shards plan against "
                               "(each rebalance adds one)", registry=r)
        self.actors = Gauge("moeserve_actors", "the cluster's actors by role and state", ["role", "state"],
                            registry=r)
        self.recovered = Gauge("moeserve_failures_survived", "dead actors brought back into the layout",
                               registry=r)
        self.imbalance = Gauge("moeserve_expert_imbalance", "per-group load max/mean of the worst MoE layer at "
                               "the last rebalance, before and after it", ["when"], registry=r)

    def update(self, shards: list[dict], status: dict) -> None:
        self.recovered.set(status.get("failures_survived", 0))
        counts: dict[tuple[str, str], int] = {}
        for actor in status.get("actors", []):
            key = (actor["role"], actor["state"])
            counts[key] = counts.get(key, 0) + 1
        self.actors.clear()
        for (role, state), n in counts.items():
            self.actors.labels(role, state).set(n)
        last = status.get("last_rebalance") or {}
        for when in ("before", "after"):
            if last.get(f"imbalance_{when}"):
                self.imbalance.labels(when).set(max(last[f"imbalance_{when}"]))
        self.queue.set(sum(s["engine"]["waiting"] for s in shards))
        self.placement.set(min(s["placement_version"] for s in shards))
        self.running.set(sum(s["engine"]["running"] for s in shards))
        proposed = sum(s["engine"]["drafts_proposed"] for s in shards)
        self.mtp.set(sum(s["engine"]["drafts_accepted"] for s in shards) / proposed if proposed else 0.0)
        planes: dict[int, int] = {}
        experts: dict[tuple[int, int], int] = {}
        for s in shards:
            name = f"{s['role']}-{s['shard']}"
            self.kv_usage.labels(name).set(s["engine"]["kv_cache_usage"])
            self.prefix_hits.labels(name).set(s["engine"]["prefix_cache_hit_rate"])
            for p, b in enumerate(s["links"]["per_plane"]):
                planes[p] = planes.get(p, 0) + b
            for layer, load in s["tokens_per_expert"].items():
                for e, n in enumerate(load):
                    experts[(layer, e)] = experts.get((layer, e), 0) + n
        for p, b in planes.items():
            self.plane_bytes.labels(str(p)).set(b)
        for (layer, e), n in experts.items():
            self.expert_tokens.labels(str(layer), str(e)).set(n)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


class Admission:
    """One accepted request's place in the ingress's count of requests in flight; released once, when the
    request ends, or when it is dropped unstarted (a stream whose client left before its body ran)."""

    def __init__(self, ingress: "Ingress"):
        self.ingress = ingress
        ingress.inflight += 1
        ingress.metrics.inflight.set(ingress.inflight)

    def release(self) -> None:
        if self.ingress is not None:
            self.ingress.inflight -= 1
            self.ingress.metrics.inflight.set(self.ingress.inflight)
            self.ingress = None

    def __del__(self):
        self.release()


def grpc_stop_reason(stop_reason: Union[int, str, None]) -> dict:
    """The proto's `stop_reason` oneof: the stop token id or the stop string, or neither."""
    if stop_reason is None:
        return {}
    return {"stop_token_id": stop_reason} if isinstance(stop_reason, int) else {"stop_string": stop_reason}


def _error(status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None):
    return JSONResponse(oa.error_body(message, kind, code=code), status_code=status)


async def merged(runs: list) -> AsyncIterator[tuple]:
    """(i, item) from several async iterators as their items come (one alone is read directly). The first error
    of any ends all of them; so does closing this (their requests end, as a closed stream's does)."""
    if len(runs) == 1:
        async with contextlib.aclosing(runs[0]) as run:
            async for item in run:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, run) -> None:
        try:
            async with contextlib.aclosing(run):
                async for item in run:
                    queue.put_nowait((i, item, None))
            queue.put_nowait((i, None, None))
        except Exception as e:
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        for _ in range(len(runs)):
            while True:
                i, item, error = await queue.get()
                if error is not None:
                    raise error
                if item is None:
                    break  # run i ended
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# Serve pickles the class by value when it is decorated: whatever its methods use is defined above it.
@serve.deployment(max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, model_name: str, max_pending: int, shards: Optional[tuple] = None,
                 controller=None):
        """`shards`: (prefill, decode) actors of a cluster started beside Serve (`moeserve serve`), and `controller`
        its controller actor; without them (a RayService) this replica starts the cluster itself, in the Ray
        cluster it runs in, and it lives as long as the replica does."""
        cfg = ClusterConfig(**config)
        self.cluster = None
        if shards is None:  # a replica that restarts finds its cluster running and attaches to it
            self.cluster = Cluster(cfg, name=f"moeserve-{model_name}").start()
            shards, controller = (self.cluster.prefill_shards, self.cluster.decode_shards), self.cluster.controller
        self.controller = controller
        prefill_shards, decode_shards = shards
        self.args = ModelArgs.from_file(cfg.model)
        self.tokenizer = Tokenizer(cfg.model) if Tokenizer.exists(cfg.model) else None
        self.model_name = model_name
        self.shards = prefill_shards + decode_shards
        self.client = ClusterClient(self.args, self.tokenizer, prefill_shards, decode_shards,
                                    cfg.engine.kv_cache_tokens, cfg.engine.block_size,
                                    cfg.failures.recover_timeout_s if cfg.failures.restart else 0.0)
        self.max_pending = max_pending
        self.inflight = 0
        self.metrics = Metrics()
        self.tracer = tracing.tracer()

    # ---- the common path ------------------------------------------------------------------------------------

    def _admit(self, n: int = 1) -> list["Admission"]:
        """Count a request's n choices in flight from the moment it is accepted (a stream's body runs later, so
        counting there would let a burst of streams past the limit); all of them or none."""
        if n > self.max_pending:
            raise InputError(f"n={n} choices exceed the server's limit of {self.max_pending} requests in flight "
                             "(--max-pending); ask for fewer")
        if self.inflight + n > self.max_pending:
            raise OverflowError(f"the server is at its limit of {self.max_pending} requests in flight; retry later")
        return [Admission(self) for _ in range(n)]

    async def _deltas(self, tokens: list[int], params: SamplingParams, carrier: dict, admission: "Admission",
                      increments: bool = True) -> AsyncIterator[tuple]:
        """(delta, text added) for each step, or without `increments` for the first token and the end (a
        response that is not streamed needs no more); times TTFT/TPOT; one span per request with child spans.
        Releases the request's admission when it ends."""
        from opentelemetry import trace
        ctx = tracing.context_of(carrier)
        start = time.perf_counter()
        first_at, n_tokens, text_sent, completion = None, 0, 0, []
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        with self.tracer.start_as_current_span("request", context=ctx) as span:
            span.set_attribute("moeserve.prompt_tokens", len(tokens))
            phase = self.tracer.start_span("queue_and_prefill", context=trace.set_span_in_context(span))
            try:
                async for delta in self.client.stream(tokens, params, trace=tracing.carrier_of(span),
                                                      increments=increments):
                    if first_at is None:
                        first_at = time.perf_counter()
                        self.metrics.ttft.observe(first_at - start)
                        phase.end()
                        with self.tracer.start_span("kv_transfer", context=trace.set_span_in_context(span)) as kv:
                            kv.set_attribute("moeserve.kv_bytes", delta.kv_bytes)
                        phase = self.tracer.start_span("decode", context=trace.set_span_in_context(span))
                    completion = delta.token_ids
                    n_tokens = len(completion)
                    text = self._text(delta, decoder)
                    stable = len(text) if delta.finish_reason else max(len(text) - params.stop_hold, text_sent)
                    added, text_sent = text[text_sent:stable], max(text_sent, stable)
                    yield delta, added
            finally:
                phase.end()
                admission.release()
                if first_at is not None and n_tokens > 1:
                    self.metrics.tpot.observe((time.perf_counter() - first_at) / (n_tokens - 1))
                span.set_attribute("moeserve.completion_tokens", n_tokens)

    @staticmethod
    def _text(delta: Delta, decoder: Optional[IncrementalDecoder]) -> str:
        """The completion's text so far: decoding only the newest tokens each step (decoding the whole
        completion every step would make a long stream quadratic)."""
        if delta.final is not None and delta.final.text is not None:
            return delta.final.text  # stop strings already cut
        return decoder.update(delta.token_ids, final=delta.finish_reason is not None) if decoder is not None else ""

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer is not None else str(token)

    def _logprobs(self, chat: bool, params: SamplingParams, token_ids: list[int], logprobs: list[float],
                  top: Optional[list]) -> Optional[dict]:
        """OpenAI's logprobs object for these tokens (the last len(token_ids) of the request's), or None when the
        request asked for none."""
        if params.logprobs is None or not token_ids:
            return None
        n = len(token_ids)
        make = oa.chat_logprobs if chat else oa.completion_logprobs
        return make(self._token_text, token_ids, logprobs[-n:], top[-n:] if top else None)

    async def _body(self, request: Request):
        """The request body, or an error response: a body over MAX_BODY_BYTES is refused from its declared
        length before it is read, or once reading passes the limit."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return None, _error(413, f"request body of {declared} bytes exceeds {MAX_BODY_BYTES}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return None, _error(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks), None

    async def _parse(self, request: Request, schema):
        body, error = await self._body(request)
        if error is not None:
            return None, error
        try:
            data = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
        except UnicodeDecodeError:
            return None, _error(400, "request body is not valid UTF-8")
        except RecursionError:
            return None, _error(400, "request body is nested too deeply")
        except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers of more digits than Python reads
            return None, _error(400, f"request body is not valid JSON: {e}")
        if not isinstance(data, dict):
            return None, _error(400, "request body must be a JSON object")
        try:
            parsed = schema(**data)
        except RecursionError:
            return None, _error(400, "request body is nested too deeply")
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(x) for x in first["loc"])  # empty for a check of the whole body
            message = first["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's refusal
            return None, _error(400, f"{field}: {message}" if field else message)
        if parsed.model != self.model_name:
            return None, _error(404, f"model {parsed.model!r} does not exist; this server serves "
                                     f"{self.model_name!r}", code="model_not_found")
        return parsed, None

    def _chat_tokens(self, messages: list) -> list[int]:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer, so no chat template: use /v1/completions with token ids")
        return self.tokenizer.apply_chat_template([m.as_template_input() for m in messages])

    async def _serve(self, request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        parsed, error = await self._parse(request, oa.ChatCompletionRequest if chat else oa.CompletionRequest)
        if error is not None:
            self.metrics.requests.labels(endpoint, str(error.status_code)).inc()
            return error
        try:
            if chat:
                tokens = self._chat_tokens(parsed.messages)
                params = parsed.sampling_params(self._default_max_tokens(tokens))
            else:
                tokens = encode_prompt(self.tokenizer, parsed.prompt_value())
                params = parsed.sampling_params(self._default_max_tokens(tokens), parsed.logprobs)
            self.client.check(tokens, params)
            choices = oa.choice_params(params, parsed.n)
            admissions = self._admit(len(choices))
        except InputError as e:
            self.metrics.requests.labels(endpoint, "400").inc()
            return _error(400, str(e))
        except OverflowError as e:
            self.metrics.requests.labels(endpoint, "429").inc()
            return _error(429, str(e), kind="rate_limit_error")
        rid = oa.completion_id("chatcmpl" if chat else "cmpl")
        carrier = dict(request.headers)
        self.metrics.requests.labels(endpoint, "200").inc()
        runs = [self._deltas(tokens, p, carrier, a, increments=parsed.stream) for p, a in zip(choices, admissions)]
        if parsed.stream:
            return StreamingResponse(self._sse(runs, tokens, params, rid, chat, admissions),
                                     media_type="text/event-stream")
        texts, finals = [""] * len(runs), [None] * len(runs)
        async for i, (delta, added) in merged(runs):
            texts[i], finals[i] = texts[i] + added, delta
        make = oa.chat_choice if chat else oa.completion_choice
        return oa.response(
            rid, self.model_name, chat,
            [make(i, text, final.finish_reason, self._logprobs(chat, params, final.token_ids, final.logprobs,
                                                                final.top_logprobs), final.stop_reason)
             for i, (text, final) in enumerate(zip(texts, finals))],
            oa.usage(len(tokens), sum(len(final.token_ids) for final in finals)))

    def _default_max_tokens(self, tokens: list[int]) -> int:
        return defaults.max_tokens(len(tokens), self.args.max_seq_len)

    async def _sse(self, runs: list, tokens: list[int], params: SamplingParams, rid: str, chat: bool,
                   admissions: list["Admission"]):
        """The events of a streamed request: each choice's chunks as its steps come, and `usage` (every choice's
        tokens) on the chunk that finishes the last choice."""
        try:
            if chat:
                for i in range(len(runs)):
                    yield oa.sse_event(oa.chat_chunk(rid, self.model_name, {"role": "assistant", "content": ""},
                                                     index=i))
            unfinished, completion_tokens = len(runs), 0
            async for i, (delta, added) in merged(runs):
                if delta.finish_reason is not None:
                    unfinished, completion_tokens = unfinished - 1, completion_tokens + len(delta.token_ids)
                use = oa.usage(len(tokens), completion_tokens) if not unfinished else None
                lp = self._logprobs(chat, params, delta.new_token_ids, delta.logprobs, delta.top_logprobs)
                if chat:
                    yield oa.sse_event(oa.chat_chunk(rid, self.model_name, {"content": added} if added else {},
                                                     delta.finish_reason, use, lp, index=i,
                                                     stop_reason=delta.stop_reason))
                else:
                    yield oa.sse_event(oa.completion_chunk(rid, self.model_name, added, delta.finish_reason, use, lp,
                                                           index=i, stop_reason=delta.stop_reason))
            yield "data: [DONE]\n\n"
        finally:
            for admission in admissions:  # a stream whose client left before it began never ran `_deltas`
                admission.release()

    # ---- HTTP routes ----------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "moeserve"}]}

    @app.get("/health")
    async def health(self):
        return {"status": "ok", "inflight": self.inflight}

    @app.get("/v1/cluster")
    async def cluster_status(self):
        """The live cluster: every actor (role, node, process, state), the placement version, the last
        rebalance, the recoveries (`Cluster.status`)."""
        return {**(await self.controller.status.remote()), "inflight": self.inflight}

    @app.get("/metrics")
    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        self.metrics.update(list(await asyncio.gather(*[s.stats.remote() for s in self.shards])),
                            await self.controller.status.remote())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- gRPC -----------------------------------------------------------------------------------------------

    def _grpc_request(self, request, grpc_context, endpoint: str):
        """(tokens, params, admission) of a valid request, or Nones with the status set on the context."""
        code = grpc.StatusCode.INVALID_ARGUMENT
        try:
            if isinstance(request, stubs.UnreadableRequest):
                raise InputError(request.reason)
            has_text = request.HasField("prompt")
            if has_text and request.prompt_token_ids:
                raise InputError("give prompt or prompt_token_ids, not both")
            if not has_text and not request.prompt_token_ids:
                raise InputError("neither prompt nor prompt_token_ids is given")
            tokens = encode_prompt(self.tokenizer, request.prompt if has_text else list(request.prompt_token_ids))

            def given(name):
                return getattr(request, name) if request.HasField(name) else None
            params = defaults.sampling_params(
                max_tokens=given("max_tokens"), default_max_tokens=self._default_max_tokens(tokens),
                temperature=given("temperature"), top_p=given("top_p"), seed=given("seed"), top_k=request.top_k,
                stop=list(request.stop), ignore_eos=request.ignore_eos, stop_token_ids=list(request.stop_token_ids),
                include_stop_str_in_output=request.include_stop_str_in_output)
            self.client.check(tokens, params)
            admission, = self._admit()
            self.metrics.requests.labels(endpoint, "OK").inc()
            return tokens, params, admission
        except InputError as e:
            grpc_context.set_details(str(e))
        except OverflowError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            grpc_context.set_details(str(e))
        grpc_context.set_code(code)
        self.metrics.requests.labels(endpoint, code.name).inc()
        return None, None, None

    async def Generate(self, request, grpc_context=None):
        tokens, params, admission = self._grpc_request(request, grpc_context, "grpc_generate")
        if tokens is None:
            return stubs.pb2.GenerateResponse()
        text, final = "", None
        async for delta, added in self._deltas(tokens, params, dict(grpc_context.invocation_metadata() or []),
                                               admission, increments=False):
            text, final = text + added, delta
        n = len(final.token_ids)
        return stubs.pb2.GenerateResponse(text=text, token_ids=final.token_ids, finish_reason=final.finish_reason,
                                          request_id=final.request_id, **grpc_stop_reason(final.stop_reason),
                                          usage=stubs.pb2.Usage(prompt_tokens=len(tokens), completion_tokens=n,
                                                                total_tokens=len(tokens) + n))

    async def GenerateStream(self, request, grpc_context=None):
        tokens, params, admission = self._grpc_request(request, grpc_context, "grpc_generate_stream")
        if tokens is None:  # a stream's status travels with an exception; Serve keeps the code set above
            raise InputError(grpc_context.details())
        async for delta, added in self._deltas(tokens, params, dict(grpc_context.invocation_metadata() or []),
                                               admission):
            n = len(delta.token_ids)
            usage = stubs.pb2.Usage(prompt_tokens=len(tokens), completion_tokens=n, total_tokens=len(tokens) + n) \
                if delta.finish_reason else None
            yield stubs.pb2.GenerateChunk(text=added, token_ids=delta.new_token_ids,
                                          finish_reason=delta.finish_reason or "", usage=usage,
                                          request_id=delta.request_id, **grpc_stop_reason(delta.stop_reason))


# ---- running it -------------------------------------------------------------------------------------------------

def build_app(args: dict) -> serve.Application:
    """The Serve application by import path, `moeserve.actors.serve:build_app` (a RayService's serveConfigV2, as the
    Helm chart renders it): the cluster YAML from `args["config"]` or $MOESERVE_CONFIG, validated as
    `ClusterConfig`; the ingress replica starts the shards and expert groups in the Ray cluster Serve runs in.
    args: config (path), model_name (default: the checkpoint directory's name), max_pending (default 256)."""
    path = args.get("config") or os.environ.get("MOESERVE_CONFIG")
    if not path:
        raise ConfigError("no cluster config: give the application args {config: PATH} or set MOESERVE_CONFIG")
    config = ClusterConfig.from_yaml(path)
    name = args.get("model_name") or os.path.basename(os.path.normpath(config.model))
    return Ingress.bind(config.model_dump(), name, int(args.get("max_pending", 256)))


class Server:
    """`moeserve serve`: the cluster, Ray Serve's HTTP and gRPC proxies, and the ingress; `stop` drains first."""

    def __init__(self, config: ClusterConfig, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000,
                 max_pending: int = 256, model_name: Optional[str] = None):
        self.config, self.host, self.http_port, self.grpc_port = config, host, http_port, grpc_port
        self.max_pending = max_pending
        self.model_name = model_name or os.path.basename(os.path.normpath(config.model))
        self.cluster = Cluster(config)

    def start(self) -> "Server":
        os.environ["MOESERVE_GRPC_HOST"] = self.host  # read by the gRPC proxy's setup hook
        self.cluster.start(runtime_env={"worker_process_setup_hook": "moeserve.actors.serve.bind_grpc_host",
                                        "env_vars": {"MOESERVE_GRPC_HOST": self.host, **tracing.forwarded_env()}})
        serve.start(http_options={"host": self.host, "port": self.http_port},
                    grpc_options={"port": self.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]})
        c = self.cluster
        ingress = Ingress.bind(self.config.model_dump(), self.model_name, self.max_pending,
                               (c.prefill_shards, c.decode_shards), c.controller)
        serve.run(ingress, name="moeserve", route_prefix="/")
        return self

    def inflight(self) -> int:
        handle = serve.get_app_handle("moeserve")
        try:
            return handle.health.remote().result(timeout_s=5)["inflight"]
        except Exception:  # the ingress is already gone: nothing in flight there
            return 0

    def stop(self, drain_s: float = 30.0) -> None:
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and self.inflight() > 0:
            time.sleep(0.2)
        serve.shutdown()
        self.cluster.shutdown()


def run_forever(server: Server) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"HTTP  http://{server.host}:{server.http_port}/v1  (OpenAI-compatible; model {server.model_name!r})")
    print(f"gRPC  {server.host}:{server.grpc_port}  (moeserve.v1.Generation)")
    print("moeserve ready", flush=True)
    stop.wait()
    print("draining in-flight requests, then stopping ...", file=sys.stderr, flush=True)
    server.stop()
