"""The cluster's front door, used by `Cluster.generate` and by the Serve ingress: checks a request, picks a
prefill shard (prefix-cache affinity: prompts that share their first block go to the same shard; otherwise
the least busy) and a decode shard (the least busy), which the prefill shard hands the sequence and its latent
KV to directly, and streams the tokens back.
A request whose client goes away is aborted on the shard that holds it, so its cache blocks come back.

A request whose shard dies resumes on a live one (or on the dead one's restarted process): its prompt and the tokens
it had already streamed are prefilled again as one prompt, and it goes on with the tokens it had left; the stream
shows neither a token twice nor a gap. Greedy and seeded sampled requests resume exactly (a draw depends on the
seed and the token's position alone: Sequence.draw_generator), and a stop string that spans the point of
resumption, which the new shard cannot see, is found here (ResumedStops)."""
import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

import ray

from moeserve.cluster.engine import RequestOutput, check_request
from moeserve.cluster.sampling_params import SamplingParams
from moeserve.cluster.tokenizer import IncrementalDecoder, Tokenizer
from moeserve.kernels.args import ModelArgs

from .attention_shard import HandedOff, Increment


@dataclass
class Delta:
    """One increment of a streamed request."""
    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]                 # the whole completion so far
    finish_reason: Optional[str] = None
    logprobs: list[float] = field(default_factory=list)          # of the whole completion so far
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # likewise, when asked for
    num_prompt_tokens: int = 0
    kv_bytes: int = 0                    # latent KV handed from the prefill to the decode shard
    final: Optional[RequestOutput] = None

    @property
    def stop_reason(self) -> Union[int, str, None]:
        """The stop token id or stop string that ended the request (vLLM's stop_reason), on its last delta."""
        return self.final.stop_reason if self.final is not None else None


class ShardLost(Exception):
    """The shard that held a request died, or was restarted without it."""


@dataclass
class Progress:
    """What a request had streamed from shards that were lost, which its resumption carries on from."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)

    def add(self, delta: Optional[Delta]) -> None:
        if delta is not None:
            self.token_ids += delta.token_ids
            self.logprobs += delta.logprobs
            self.top_logprobs += delta.top_logprobs

    def rest_of(self, params: SamplingParams) -> SamplingParams:
        return dataclasses.replace(params, max_tokens=params.max_tokens - len(self.token_ids))


class ResumedStops:
    """A resumed attempt's shard sees only the tokens after the point of resumption, so it misses a stop string
    that began before it. This reads the whole completion as the engine does (its text after each token, a trailing
    incomplete character held back) and finds the first token after which the text holds a stop string."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, before: list[int]):
        self.params = params
        self.decoder = IncrementalDecoder(tokenizer)
        self.seen = list(before)
        self.decoder.update(self.seen)

    def first_stop(self, completion: list[int]) -> Optional[tuple[int, str, str]]:
        """(tokens to keep, the text up to where the stop string cuts it, the stop string) for the first new token
        of `completion` (the whole completion so far) that completes a stop string, or None."""
        for token in completion[len(self.seen):]:
            self.seen.append(token)
            text = self.decoder.update(self.seen)
            match = self.params.stop_string_match(text)
            if match is not None:
                return len(self.seen), text[:match[0]], match[1]
        return None


class ClusterClient:
    def __init__(self, args: ModelArgs, tokenizer: Optional[Tokenizer], prefill_shards: list, decode_shards: list,
                 kv_cache_tokens: int, block_size: int, recover_timeout_s: float = 0.0):
        """`recover_timeout_s`: how long a request whose shard died keeps trying to resume (0: it fails)."""
        self.args, self.tokenizer = args, tokenizer
        self.prefill_shards, self.decode_shards = prefill_shards, decode_shards
        self.kv_cache_tokens, self.block_size = kv_cache_tokens, block_size
        self.outstanding_prefill = [0] * len(prefill_shards)
        self.outstanding_decode = [0] * len(decode_shards)
        self.kv_transfer_bytes = 0
        self._ids = itertools.count()
        self._queues: dict[int, dict[str, asyncio.Queue]] = {}   # shard -> request -> its outputs
        self._pollers: dict[int, asyncio.Task] = {}
        self._acked: dict[int, int] = {}                          # shard -> last output number taken
        self._incarnations: dict[int, str] = {}                   # shard -> the process that numbered them
        self.recover_timeout_s = recover_timeout_s
        self.resumed = 0                                          # requests resumed after losing their shard
        self._batches: dict[tuple, tuple[list, asyncio.Future]] = {}  # (shard, method) -> this loop turn's calls
        self._sending: set[asyncio.Task] = set()                  # their calls in flight (held: not collected)
        self.client_id = uuid.uuid4().hex      # shards keep each client's outputs apart

    def check(self, tokens: list[int], params: SamplingParams) -> None:
        check_request(self.args, tokens, params, self.kv_cache_tokens, has_tokenizer=self.tokenizer is not None)

    def new_id(self) -> str:
        return f"req-{self.client_id[:8]}-{next(self._ids)}"  # unique across clients of the same shards

    def pick_prefill(self, tokens: list[int]) -> int:
        """Prompts that share their first block land on the same shard, where its prefix cache holds them,
        unless that shard has twice the outstanding work of the least busy one."""
        n = len(self.prefill_shards)
        if len(tokens) >= self.block_size:
            digest = hashlib.blake2b(str(tokens[:self.block_size]).encode(), digest_size=8).digest()
            preferred = int.from_bytes(digest, "little") % n
            if self.outstanding_prefill[preferred] <= 2 * min(self.outstanding_prefill) + 1:
                return preferred
        return min(range(n), key=lambda i: self.outstanding_prefill[i])

    def pick_decode(self) -> int:
        return min(range(len(self.decode_shards)), key=lambda i: self.outstanding_decode[i])

    # ---- one long-poll loop per shard, fanning each request's outputs out to its queue ----------------------

    def _subscribe(self, shard, request_id: str) -> asyncio.Queue:
        queue = asyncio.Queue()
        key = id(shard)
        self._queues.setdefault(key, {})[request_id] = queue
        task = self._pollers.get(key)
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            # a context of its own: the loop outlives the request that started it (Ray Serve cancels the calls
            # a cancelled request made)
            self._pollers[key] = loop.create_task(self._poll_loop(shard, key), context=contextvars.Context())
        return queue

    def _unsubscribe(self, shard, request_id: str) -> None:
        self._queues.get(id(shard), {}).pop(request_id, None)

    async def _poll_loop(self, shard, key: int) -> None:
        queues = self._queues[key]

        def fail_all(error: Exception) -> None:
            for queue in queues.values():
                queue.put_nowait(error)
            queues.clear()
            self._acked.pop(key, None)

        while queues:
            try:
                incarnation, outputs = await shard.poll.remote(self.client_id, self._acked.get(key, 0), 1.0)
            except ray.exceptions.TaskCancelledError:  # nothing is lost: the next poll brings the same outputs
                continue
            except ray.exceptions.RayActorError as e:  # the shard died: its requests resume elsewhere, or fail
                self._incarnations.pop(key, None)
                fail_all(ShardLost(f"{type(e).__name__}: {e}"))
                return
            except Exception as e:  # noqa: BLE001  (every request waiting on the shard fails, none hangs)
                fail_all(e)
                return
            if self._incarnations.setdefault(key, incarnation) != incarnation:  # restarted without our requests
                self._incarnations[key] = incarnation
                fail_all(ShardLost("the shard was restarted"))
                return
            ready: dict[str, list] = {}
            for number, request_id, item in outputs:
                if number > self._acked.get(key, 0):
                    ready.setdefault(request_id, []).append(item)
            if outputs:
                self._acked[key] = max(self._acked.get(key, 0), outputs[-1][0])
            for request_id, items in ready.items():
                if request_id in queues:
                    queues[request_id].put_nowait(items)

    # ---- adds and hand-offs: those of one event-loop turn go to their shard in one call ----------------------

    async def _coalesced(self, shard, method: str, request: tuple) -> None:
        """Call `shard.<method>` (add_many) with this request and every other of the same event-loop turn (a
        `generate` of many prompts, requests that reached a Serve replica together) in one call: they join the
        same step there. One by one, the first would
        start a step alone and the rest would wait for it to end."""
        key = (id(shard), method)
        loop = asyncio.get_running_loop()
        if key not in self._batches:
            self._batches[key] = ([], loop.create_future())
            loop.call_soon(self._send_batch, shard, method, key)  # after the turn's other tasks queued theirs
        batch, errors = self._batches[key]
        batch.append(request)
        index = len(batch) - 1
        error = (await asyncio.shield(errors))[index]  # shielded: one cancelled request leaves the others be
        if error is not None:
            raise error

    def _send_batch(self, shard, method: str, key: tuple) -> None:
        batch, errors = self._batches.pop(key)

        async def send():
            try:
                errors.set_result(await getattr(shard, method).remote(batch))
            except ray.exceptions.RayActorError as e:  # the shard died: the batch's requests resume, or fail
                errors.set_exception(ShardLost(f"{type(e).__name__}: {e}"))
            except Exception as e:  # noqa: BLE001  (every request of the batch fails with it)
                errors.set_exception(e)
        task = asyncio.ensure_future(send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    @staticmethod
    async def _next(queue: asyncio.Queue) -> list:
        """The request's next outputs; a shard that lost it (it is gone, or its step failed) raises here."""
        items = await queue.get()
        if isinstance(items, Exception):
            raise items
        for item in items:
            if isinstance(item, Exception):
                raise item
        return items

    async def stream(self, tokens: list[int], params: SamplingParams, request_id: Optional[str] = None,
                     trace: Optional[dict] = None, increments: bool = True) -> AsyncIterator[Delta]:
        """Prefill, hand off, decode (see `_attempt`); a request whose shard dies resumes (see the module's
        docstring) for up to `recover_timeout_s`."""
        rid = request_id or self.new_id()
        done, deadline = Progress(), None
        for attempt in itertools.count():
            last = None
            stops = ResumedStops(self.tokenizer, params, done.token_ids) \
                if attempt and params.stop and self.tokenizer is not None else None
            try:
                resumed_id = rid if attempt == 0 else f"{rid}-resumed-{attempt}"
                async with contextlib.aclosing(self._attempt(tokens + done.token_ids, done.rest_of(params), resumed_id,
                                                             trace, increments or stops is not None)) as deltas:
                    async for delta in deltas:
                        last = delta
                        if not attempt:
                            yield delta
                            continue
                        joined = self._joined(rid, tokens, params, done, delta)
                        stop = stops.first_stop(joined.token_ids) if stops is not None else None  # every step's
                        if stop is not None and (joined.finish_reason, stop[0]) != ("stop", len(joined.token_ids)):
                            # the request ends here, where its shard did not see it; closing the attempt aborts it
                            yield self._stopped(tokens, params, joined, *stop)
                            return
                        if increments or joined.finish_reason is not None:
                            yield joined
                return
            except ShardLost as e:
                deadline = deadline or time.monotonic() + self.recover_timeout_s
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"request {rid}: its shard was lost and it could not resume within "
                                       f"{self.recover_timeout_s:g} s (failures.recover_timeout_s): {e}") from None
                done.add(last)
                self.resumed += 1
                await asyncio.sleep(min(0.5, 0.05 * 2 ** attempt))  # a restarted shard takes a moment to come back

    @staticmethod
    def _stopped(prompt: list[int], params: SamplingParams, joined: Delta, keep: int, text: str, stop: str) -> Delta:
        """`joined` cut after its first `keep` completion tokens and finished by the stop string `stop`, as the
        engine reports one (the text cut where the stop string starts, or ends with include_stop_str_in_output). Cut
        before the attempt's final output, it has no prompt log-probabilities: those come with the final output
        only."""
        final = joined.final
        token_ids, logprobs, top = joined.token_ids[:keep], joined.logprobs[:keep], joined.top_logprobs[:keep]
        output = RequestOutput(
            request_id=joined.request_id, prompt_token_ids=list(prompt), token_ids=token_ids, text=text,
            finish_reason="stop", stop_reason=stop, logprobs=logprobs if params.logprobs is not None else None,
            top_logprobs=top if params.logprobs else None,
            prompt_logprobs=final.prompt_logprobs[:len(prompt)] if final and final.prompt_logprobs else None)
        new = joined.new_token_ids[:max(0, keep - (len(joined.token_ids) - len(joined.new_token_ids)))]
        return Delta(joined.request_id, new, token_ids, "stop", logprobs, top, joined.num_prompt_tokens,
                     joined.kv_bytes, output)

    def _joined(self, rid: str, prompt: list[int], params: SamplingParams, done: Progress, delta: Delta) -> Delta:
        """A resumed attempt's delta as the request's own: its prompt, and the completion from the first token."""
        final = delta.final
        if final is not None:
            token_ids = done.token_ids + final.token_ids
            text, stop_reason = None, final.stop_reason
            if self.tokenizer is not None:
                text = self.tokenizer.decode(params.text_token_ids(token_ids, final.finish_reason,
                                                                   self.args.eos_token_id))
                match = params.stop_string_match(text)  # the whole text's: the shard saw only the attempt's
                if match is not None:
                    text, stop_reason = text[:match[0]], match[1]
            final = dataclasses.replace(
                final, request_id=rid, prompt_token_ids=list(prompt), token_ids=token_ids, text=text,
                stop_reason=stop_reason,
                logprobs=done.logprobs + final.logprobs if final.logprobs is not None else None,
                top_logprobs=done.top_logprobs + final.top_logprobs if final.top_logprobs is not None else None,
                prompt_logprobs=final.prompt_logprobs[:len(prompt)] if final.prompt_logprobs is not None else None)
        return Delta(rid, delta.new_token_ids, done.token_ids + delta.token_ids, delta.finish_reason,
                     done.logprobs + delta.logprobs, done.top_logprobs + delta.top_logprobs, len(prompt),
                     delta.kv_bytes, final)

    async def _attempt(self, tokens: list[int], params: SamplingParams, rid: str, trace: Optional[dict],
                       increments: bool) -> AsyncIterator[Delta]:
        """Prefill, hand off, decode; yields the first token as soon as the prefill shard has it, then each
        decode step's tokens, or with `increments` False only the final output (a caller that waits for the
        whole completion spares the decode shard an output per request per step, and itself a poll per step).
        The prefilled sequence, latent KV included, goes from the prefill shard straight to the decode shard
        picked here; only a notice of it comes this way. `trace` is a W3C trace-context carrier the shards
        parent their spans on. A lost shard raises ShardLost."""
        p, d = self.pick_prefill(tokens), self.pick_decode()
        prefill, decode = self.prefill_shards[p], self.decode_shards[d]
        self.outstanding_prefill[p] += 1
        self.outstanding_decode[d] += 1
        item, done = None, False
        try:
            # listening to both before anything is sent: the decode shard's first outputs may come before the
            # prefill shard's notice is read
            queue, decode_queue = self._subscribe(prefill, rid), self._subscribe(decode, rid)
            try:
                await self._coalesced(prefill, "add_many", (rid, tokens, params, trace, self.client_id, d,
                                                            increments))
                item = (await self._next(queue))[-1]
            finally:
                self.outstanding_prefill[p] -= 1
                self._unsubscribe(prefill, rid)
                if item is None:  # cancelled while prefilling
                    prefill.abort.remote(rid)
            if isinstance(item, RequestOutput):  # finished with its first token
                done = True
                yield Delta(rid, item.token_ids, item.token_ids, item.finish_reason, item.logprobs or [],
                            item.top_logprobs or [], len(item.prompt_token_ids), final=item)
                return
            notice: HandedOff = item
            first = notice.token_ids[notice.num_prompt_tokens:]
            self.kv_transfer_bytes += notice.kv_bytes
            yield Delta(rid, first, first, None, list(notice.logprobs), list(notice.top_logprobs),
                        notice.num_prompt_tokens, kv_bytes=notice.kv_bytes)
            completion, logprobs, top_logprobs = list(first), list(notice.logprobs), list(notice.top_logprobs)
            while not done:
                for out in await self._next(decode_queue):
                    if isinstance(out, Increment):  # running: only the new tokens came
                        completion += out.new_token_ids
                        logprobs += out.logprobs
                        top_logprobs += out.top_logprobs
                        yield Delta(rid, out.new_token_ids, list(completion), None, list(logprobs),
                                    list(top_logprobs), notice.num_prompt_tokens)
                        continue
                    done = True
                    yield Delta(rid, out.new_token_ids, out.token_ids, out.finish_reason, out.logprobs or [],
                                out.top_logprobs or [], notice.num_prompt_tokens, final=out)
        finally:
            self.outstanding_decode[d] -= 1
            self._unsubscribe(decode, rid)
            if not done:
                decode.abort.remote(rid)

    async def generate_one(self, tokens: list[int], params: SamplingParams) -> RequestOutput:
        final = None
        async for delta in self.stream(tokens, params, increments=False):
            final = delta.final or final
        return final

    def generate(self, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestOutput]:
        """Run requests concurrently to completion (from synchronous code)."""
        async def run_all():
            return await asyncio.gather(*(self.generate_one(t, p) for t, p in requests))
        outs = asyncio.run(run_all())
        if self.tokenizer is not None:
            for out in outs:
                if out.text is None:
                    out.text = self.tokenizer.decode(out.token_ids)
        return list(outs)
