"""The cluster's front door, used by `Cluster.generate` and by the Serve ingress: checks a request, picks a
prefill shard (prefix-cache affinity: prompts that share their first block go to the same shard; otherwise
the least busy) and a decode shard (the least busy), hands the latent KV over, and streams the tokens back.
A request whose client goes away is aborted on the shard that holds it, so its cache blocks come back."""
import asyncio
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional


from moeserve.cluster.engine import PrefilledSequence, RequestOutput, check_request
from moeserve.cluster.sampling_params import SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels.args import ModelArgs


@dataclass
class Delta:
    """One increment of a streamed request."""
    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]                 # the whole completion so far
    finish_reason: Optional[str] = None
    logprobs: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    kv_bytes: int = 0                    # latent KV handed from the prefill to the decode shard
    final: Optional[RequestOutput] = None


class ClusterClient:
    def __init__(self, args: ModelArgs, tokenizer: Optional[Tokenizer], prefill_shards: list, decode_shards: list,
                 kv_cache_tokens: int, block_size: int):
        self.args, self.tokenizer = args, tokenizer
        self.prefill_shards, self.decode_shards = prefill_shards, decode_shards
        self.kv_cache_tokens, self.block_size = kv_cache_tokens, block_size
        self.outstanding_prefill = [0] * len(prefill_shards)
        self.outstanding_decode = [0] * len(decode_shards)
        self.kv_transfer_bytes = 0
        self._ids = itertools.count()

    def check(self, tokens: list[int], params: SamplingParams) -> None:
        check_request(self.args, tokens, params, self.kv_cache_tokens, has_tokenizer=self.tokenizer is not None)

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

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

    async def stream(self, tokens: list[int], params: SamplingParams, request_id: Optional[str] = None,
                     trace: Optional[dict] = None) -> AsyncIterator[Delta]:
        """Prefill, hand off, decode; yields the first token as soon as the prefill shard has it. `trace` is a
        W3C trace-context carrier the shards parent their spans on."""
        rid = request_id or self.new_id()
        p = self.pick_prefill(tokens)
        self.outstanding_prefill[p] += 1
        shard = self.prefill_shards[p]
        done = False
        try:
            await shard.add.remote(rid, tokens, params, trace)
            items = []
            while not items:
                items = await shard.poll.remote(rid, 1.0)
        finally:
            self.outstanding_prefill[p] -= 1
            if not items:  # cancelled while prefilling
                shard.abort.remote(rid)
        item = items[-1]
        if isinstance(item, RequestOutput):
            yield Delta(rid, item.token_ids, item.token_ids, item.finish_reason, item.logprobs or [],
                        len(item.prompt_token_ids), final=item)
            return
        pre: PrefilledSequence = item
        first = pre.token_ids[pre.num_prompt_tokens:]
        self.kv_transfer_bytes += pre.kv_bytes
        yield Delta(rid, first, first, None, list(pre.logprobs), pre.num_prompt_tokens, kv_bytes=pre.kv_bytes)
        d = self.pick_decode()
        self.outstanding_decode[d] += 1
        decode = self.decode_shards[d]
        try:
            await decode.submit.remote(pre, trace)
            while not done:
                for out in await decode.poll.remote(rid, 1.0):
                    done = out.finished
                    yield Delta(rid, out.new_token_ids, out.token_ids, out.finish_reason, out.logprobs or [],
                                pre.num_prompt_tokens, final=out if done else None)
        finally:
            self.outstanding_decode[d] -= 1
            if not done:
                decode.abort.remote(rid)

    async def generate_one(self, tokens: list[int], params: SamplingParams) -> RequestOutput:
        final = None
        async for delta in self.stream(tokens, params):
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
