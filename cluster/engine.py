"""The single-process engine: continuous batching over a paged latent KV cache, with MTP speculation.

One step is schedule() -> execute() -> update(): the scheduler picks decoding sequences and prefill chunks,
the model runner computes them, and the engine samples, verifies MTP drafts, appends tokens, and retires
finished sequences. Requests may be added between any two steps.

MTP speculation: after the main model computes position i and the next token t_{i+1} is chosen, the MTP
module drafts t_{i+2} from h_i and t_{i+1}. The next step feeds [t_{i+1}, draft] together; the main model's
logits at i+1 verify the draft (the target's token there must equal it: greedy, the argmax; sampled, the draw
with the noise the draft was drawn with, see kernels.sampling.draw), so the output is exactly what decoding without
MTP would produce, and an accepted draft yields two tokens in one step.
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq, Union

import torch

from moeserve.kernels.cache import PagedLatentCache
from moeserve.kernels.errors import InputError
from moeserve.kernels.experts import LocalExperts, holds_fp8_experts, moe_kernel, resolve_moe_kernel
from moeserve.kernels.generate import check_prompt
from moeserve.kernels.load import resolve_device
from moeserve.kernels.mla_decode import decode_kernel
from moeserve.kernels.model import MoE, Transformer
from moeserve.kernels.sampling import draw, greedy_tokens, sampling_probs, sampling_probs_rows

from .block_manager import BlockManager
from .model_runner import DecodeGraphs, ModelRunner
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Draft, Sequence, SequenceStatus
from .tokenizer import IncrementalDecoder


@dataclass
class EngineConfig:
    device: str = "auto"                    # auto (a GPU where torch sees one, else the CPU), cpu, cuda, cuda:N
    block_size: int = 16
    kv_cache_tokens: Optional[int] = None   # capacity of the latent cache, in tokens; None: CPU_KV_CACHE_TOKENS on
                                            # a CPU, on a GPU what kv_cache_memory_fraction of its free memory holds
    kv_cache_memory_fraction: float = 0.8   # of the device memory free once the weights are loaded
    max_num_seqs: int = 64                  # sequences decoding at once
    max_num_batched_tokens: int = 1024      # tokens per step: decodes first, prefill chunks get the rest (a larger
                                            # budget prefills a burst in fewer steps; a step that carries a chunk
                                            # makes the running sequences wait longer)
    mtp: bool = False                       # MTP speculative decoding (needs the checkpoint's MTP module)
    prefix_caching: bool = True
    micro_batches: int = 1                  # micro-batches per step that overlap attention with remote experts
    mla_decode: str = "auto"                # decode attention: gather, paged (torch), triton; auto: triton on GPUs
    moe_kernel: str = "auto"                # routed experts: grouped (torch._grouped_mm), triton (fused kernel); auto:
                                            # triton for FP8 experts on GPUs, else grouped
    cuda_graphs: Optional[bool] = None      # decode steps replayed as CUDA graphs, one per batch-size bucket; None:
                                            # wherever they can run (GPUs, the Triton paged decode, local experts)

CPU_KV_CACHE_TOKENS = 32768
# why a sampled request ends when its draw fails (kernels.sampling.draw's -1)
NO_DISTRIBUTION = "no distribution to sample from: after temperature, top-k and top-p the logits are NaN or have no mass"


def cuda_graphs_refusal(config: EngineConfig, device: torch.device, decode, model: Transformer) -> Optional[str]:
    """Why decode steps cannot be captured as CUDA graphs as configured; None where they can."""
    if device.type != "cuda":
        return f"cuda_graphs needs a GPU (the engine is on {device}); CPUs have no graphs"
    if decode is None or config.mla_decode == "paged":
        return ("cuda_graphs needs the Triton paged MLA decode (mla_decode 'triton', or 'auto' where triton imports): "
                "the gather path's shapes follow each step's history, and the torch recurrence visits every column "
                "of the full-width block tables")
    if any(isinstance(m, MoE) and not isinstance(m.experts, LocalExperts) for m in model.modules()):
        return "cuda_graphs needs the experts in this process: remote expert groups answer over the network"
    fp8_experts = holds_fp8_experts(model)
    grouped = resolve_moe_kernel(config.moe_kernel, device, fp8_experts) == "grouped"
    if model.embed.weight.dtype == torch.float32 and grouped:
        return ("cuda_graphs with float32 weights needs moe_kernel 'triton': torch's grouped product on CUDA takes "
                "BF16, and its float32 stand-in reads the row counts back to the host")
    if fp8_experts and grouped:
        return ("cuda_graphs with FP8 experts needs moe_kernel 'triton': one at a time, FP8 experts read their row "
                "counts back to the host")
    return None


def check_cuda_graphs(config: EngineConfig, device: torch.device, decode, model: Transformer) -> None:
    """Raise InputError where decode steps cannot be captured as CUDA graphs as configured."""
    refusal = cuda_graphs_refusal(config, device, decode, model)
    if refusal is not None:
        raise InputError(refusal)


def kv_cache_tokens_that_fit(config: EngineConfig, device: torch.device, bytes_per_token: int,
                             most: int) -> int:
    """The latent cache's capacity: as configured, else on a GPU `kv_cache_memory_fraction` of its free memory
    (in whole blocks, at most `most` tokens), on a CPU CPU_KV_CACHE_TOKENS."""
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    if device.type != "cuda":
        return CPU_KV_CACHE_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    tokens = min(int(free * config.kv_cache_memory_fraction) // bytes_per_token, most)
    if tokens < config.block_size:
        raise InputError(f"the GPU has {free / 2**30:.1f} GiB free once the weights are loaded: no room for a KV "
                         "cache (use more GPUs, FP8 weights, or set kv_cache_tokens)")
    return tokens // config.block_size * config.block_size


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: Optional[str]
    finish_reason: Optional[str]            # "stop", "length", "error" (see `error`), or None while running
    stop_reason: Union[int, str, None] = None  # as vLLM's: the stop token id or stop string that ended it, else None
    logprobs: Optional[list[float]] = None  # of each chosen token
    top_logprobs: Optional[list[dict[int, float]]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    new_token_ids: list[int] = field(default_factory=list)  # since the previous output of this request
    new_text: str = ""
    num_cached_tokens: int = 0
    drafts_proposed: int = 0
    drafts_accepted: int = 0
    decode_steps: int = 0
    error: Optional[str] = None             # with finish_reason "error": what failed, for this request alone

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def acceptance_rate(self) -> float:
        return self.drafts_accepted / self.drafts_proposed if self.drafts_proposed else 0.0


def check_request(args, prompt: list[int], params: SamplingParams, cache_tokens: int, has_tokenizer: bool) -> None:
    """Every reason a request can never be served, as an InputError naming it."""
    params.validate()
    check_prompt(prompt, args.vocab_size, args.max_seq_len, params.max_tokens)
    bad = [t for t in params.stop_token_ids if not 0 <= t < args.vocab_size]
    if bad:
        raise InputError(f"stop token id {bad[0]} is outside the vocabulary [0, {args.vocab_size}): it could never "
                         "be generated")
    if len(prompt) + params.max_tokens + 1 > cache_tokens:
        raise InputError(f"the request needs {len(prompt) + params.max_tokens + 1} tokens of KV cache; the "
                         f"engine holds {cache_tokens} (raise kv_cache_tokens)")
    if params.stop and not has_tokenizer:
        raise InputError("stop strings need a tokenizer; this model has none (use stop_token_ids)")


@dataclass
class PrefilledSequence:
    """A prompt computed by a prefill shard, on its way to a decode shard: its latent KV (all cache layers,
    positions 0..P-1, nothing else), the first generated token, and the sampler's seed."""
    request_id: str
    token_ids: list[int]                 # prompt + the first generated token
    num_prompt_tokens: int
    params: SamplingParams
    latent: torch.Tensor                 # [cache layers, P, kv_lora_rank + qk_rope_head_dim]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    prompt_logprobs: list[Optional[float]]
    draft: Optional[Draft]
    seed: Optional[int]                  # the sampler's (Sequence.draw_generator), None when greedy
    num_cached_tokens: int = 0

    @property
    def kv_bytes(self) -> int:
        return self.latent.numel() * self.latent.element_size()


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(), tokenizer=None):
        self.model = model
        self.args = model.args
        self.config = config
        self.tokenizer = tokenizer
        if config.mtp and not len(model.mtp):
            raise InputError("mtp=True needs a checkpoint with an MTP module (num_nextn_predict_layers >= 1)")
        self.device = model.embed.weight.device
        if config.device != "auto" and resolve_device(config.device).type != self.device.type:
            raise InputError(f"EngineConfig.device is {config.device!r} but the model is on {self.device}; load it "
                             "there (load_model(device=...)) or leave device 'auto'")
        n_layers = self.args.n_layers + (1 if config.mtp else 0)
        per_token = n_layers * self.args.latent_dim * model.embed.weight.element_size()
        tokens = kv_cache_tokens_that_fit(config, self.device, per_token, config.max_num_seqs * self.args.max_seq_len)
        num_blocks = tokens // config.block_size
        self.cache = PagedLatentCache(self.args, num_blocks, config.block_size, model.embed.weight.dtype, n_layers,
                                      self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        decode = decode_kernel(config.mla_decode, self.device, config.block_size)
        self.runner = ModelRunner(model, self.cache, config.micro_batches, decode)
        routed = moe_kernel(config.moe_kernel, self.device, holds_fp8_experts(model))
        for _, moe in self.runner.moe_layers:
            if isinstance(moe.experts, LocalExperts):
                moe.experts.routed = routed
        if config.cuda_graphs:
            check_cuda_graphs(config, self.device, decode, model)
        if config.cuda_graphs or (config.cuda_graphs is None and
                                  cuda_graphs_refusal(config, self.device, decode, model) is None):
            self.runner.graphs = DecodeGraphs(self.runner, config.max_num_seqs, capture=True)
        self.requests: dict[str, Sequence] = {}
        self._emitted: dict[str, tuple[int, int]] = {}  # request -> (tokens, text chars) already reported
        self.num_steps = 0
        self.num_decode_tokens = 0
        self.drafts_proposed = 0
        self.drafts_accepted = 0

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams,
                    request_id: Optional[str] = None) -> str:
        """Queue a request; a request that can never be served raises InputError and changes nothing."""
        prompt = list(prompt_token_ids)
        self.check(prompt, params)
        if request_id is not None and request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        seq = Sequence(prompt, params, request_id, self.device)
        self.requests[seq.request_id] = seq
        self._emitted[seq.request_id] = (0, 0)
        self.scheduler.add(seq)
        return seq.request_id

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InputError if this engine could never serve the request (changes nothing)."""
        check_request(self.args, prompt, params, self.block_manager.block_size * len(self.block_manager.blocks),
                      has_tokenizer=self.tokenizer is not None)

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its blocks return to the cache at once."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)
            self._emitted.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -------------------------------------------------------------------------------------

    def step(self, finished_only: bool = False, text: bool = True) -> list[RequestOutput]:
        """Run one step; return an output for every request that produced tokens or finished, or with
        `finished_only` for the finished ones alone (a caller waiting for whole completions saves building
        and detokenising an increment per request per step). Without `text`, unfinished outputs carry no
        text (a caller that streams token ids only saves detokenising every step)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        touched = []
        if batch.decodes:
            self._run_decodes(batch.decodes)
            touched += batch.decodes
        if batch.prefills:
            self._run_prefills(batch.prefills)
            touched += [seq for seq, _ in batch.prefills]
        self.num_steps += 1
        outputs = []
        for seq in touched:
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            else:
                self.block_manager.seal_full_blocks(seq)
                if finished_only:
                    continue
            out = self._output(seq, text or seq.finish_reason is not None)
            if out.new_token_ids or out.finished:
                outputs.append(out)
            if out.finished:
                self.requests.pop(seq.request_id, None)
                self._emitted.pop(seq.request_id, None)
        return outputs

    def _run_decodes(self, seqs: list[Sequence]) -> None:
        starts = [len(s) - 1 for s in seqs]
        rows = [[s.token_ids[-1]] + ([s.draft.token] if s.draft else []) for s in seqs]
        form = "absorbed"
        h = self.runner.forward([s.block_table for s in seqs], starts, rows, form)
        logits = self.model.logits(h)  # [B, S, V]
        chosen = self._choose(seqs, logits)  # [B][S]
        drafting = []
        for b, seq in enumerate(seqs):
            n = len(seq)
            if seq.finish_reason is not None:  # its draw failed
                continue
            accepted, alive = self._alone(seq, (0, False), self._verify_and_append, seq,
                                          logits[b] if seq.params.needs_logits else None, chosen[b])
            seq.num_computed_tokens = n + accepted
            seq.num_steps += 1
            if alive and self.config.mtp:
                drafting.append((b, seq, n - 1, 1 + accepted))
        self._draft(drafting, h)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor, verifying: bool = True) -> list[list[int]]:
        """The tokens [B][S] a step chooses from logits [B, S, V], read back to the host in one copy: the argmax
        everywhere, and for each sampled row a draw at each of its positions (with a draft it is `verifying`, the
        draft's position and the one after). Each draw is raced with its position's noise (Sequence.draw_generator),
        so at a draft's position it is the token the draft must equal. A row whose draw fails ends with the error
        (see _alone)."""
        draws = [(b, s) for b, seq in enumerate(seqs) if not seq.params.greedy
                 for s in range(1 + (verifying and seq.draft is not None))]
        if not draws:
            return greedy_tokens(logits)
        chosen = logits.argmax(dim=-1)
        rows, positions = [b for b, _ in draws], [s for _, s in draws]
        params = [seqs[b].params for b in rows]
        try:
            drawn = draw(sampling_probs_rows(logits[rows, positions], [p.temperature for p in params],
                                             [p.top_k for p in params], [p.top_p for p in params]),
                         (seqs[b].draw_generator(len(seqs[b]) + s) for b, s in draws))
        except Exception:  # noqa: BLE001  (row by row below, so that only the rows at fault fail)
            drawn = torch.stack([self._draw_alone(seqs[b], logits[b, s], len(seqs[b]) + s) for b, s in draws])
        chosen[rows, positions] = drawn
        chosen = chosen.tolist()
        for b, s in draws:
            if chosen[b][s] < 0 and seqs[b].finish_reason is None:
                seqs[b].finish_reason, seqs[b].error = "error", NO_DISTRIBUTION
        return chosen

    def _draw_alone(self, seq: Sequence, logits: torch.Tensor, index: int) -> torch.Tensor:
        """The draw of token `index` from logits [V] (-1 where it fails: the sequence then ends with the error)."""
        p = seq.params
        token = self._alone(seq, None, lambda: draw(sampling_probs(logits, p.temperature, p.top_k, p.top_p)[None],
                                                    [seq.draw_generator(index)])[0])
        return token if token is not None else torch.tensor(-1, device=logits.device)

    def _verify_and_append(self, seq: Sequence, logits: Optional[torch.Tensor], chosen: list[int]) -> tuple[int, bool]:
        """Append this step's tokens from logits [S, V] (chosen [S]: the argmax, or a sampled row's draws; logits
        None when the request needs no more than those); returns (draft accepted 0/1, still running)."""
        if logits is None:
            logits = [None, None]
        draft, seq.draft = seq.draft, None
        n_before = len(seq)
        if draft is None:
            alive = self._append(seq, chosen[0], logits[0])
            self.num_decode_tokens += len(seq) - n_before
            return 0, alive
        seq.drafts_proposed += 1
        self.drafts_proposed += 1
        if chosen[0] != draft.token:  # the target's token at the draft's position (drawn with the draft's noise)
            alive = self._append(seq, chosen[0], logits[0])
            self.num_decode_tokens += len(seq) - n_before
            return 0, alive
        seq.drafts_accepted += 1
        self.drafts_accepted += 1
        alive = self._append(seq, draft.token, logits[0]) and self._append(seq, chosen[1], logits[1])
        self.num_decode_tokens += len(seq) - n_before
        return 1, alive

    def _run_prefills(self, items: list[tuple[Sequence, int]]) -> None:
        starts = [seq.num_computed_tokens for seq, _ in items]
        rows = [seq.token_ids[start:start + n] for (seq, n), start in zip(items, starts)]
        form = self.runner.form_for(starts, rows)
        h = self.runner.forward([seq.block_table for seq, _ in items], starts, rows, form)
        for b, ((seq, n), start) in enumerate(zip(items, starts)):
            if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens:
                self._record_prompt_logprobs(seq, start, self.model.logits(h[b, :n]))
            seq.num_computed_tokens = start + n
        # prompts complete in this step choose their first token together: one read back for all of them
        done = [b for b, (seq, _) in enumerate(items) if not seq.is_prefilling]
        if done:
            last = self.model.logits(h[done, [items[b][1] - 1 for b in done]])[:, None]  # [R, 1, V]
            chosen = self._choose([items[b][0] for b in done], last, verifying=False)
        first = {b: (last[r, 0], chosen[r][0]) for r, b in enumerate(done)} if done else {}
        drafting = []
        for b, ((seq, n), start) in enumerate(zip(items, starts)):
            alive = seq.finish_reason is None
            if b in first and alive:
                logits, token = first[b]
                alive = self._alone(seq, False, self._append, seq, token, logits)
            if alive and self.config.mtp:
                drafting.append((b, seq, start, min(n, len(seq) - start - 1)))
        self._draft([d for d in drafting if d[3] > 0], h)

    def _record_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """logits [n, V] at positions start.. predict prompt tokens start+1..; the first token has none."""
        if start == 0:
            seq.prompt_logprobs.append(None)
        logprobs = logits.log_softmax(dim=-1)
        for j in range(logits.shape[0]):
            target = start + j + 1
            if target < seq.num_prompt_tokens:
                seq.prompt_logprobs.append(logprobs[j, seq.token_ids[target]].item())

    def _draft(self, drafting: list[tuple[int, Sequence, int, int]], h: torch.Tensor) -> None:
        """Run MTP over each sequence's newly valid positions [start, start + n); draft from the last, as `_choose`
        chooses (a sampled draft raced with its position's noise), the drafts read back in one copy."""
        if not drafting:
            return
        rows = torch.tensor([b for b, _, _, _ in drafting], device=h.device)
        logits = self.runner.draft_logits([s.block_table for _, s, _, _ in drafting], [st for _, _, st, _ in drafting],
                                          [s.token_ids[st + 1:st + 1 + n] for _, s, st, n in drafting], h[rows])
        # a middle prefill chunk fills the MTP cache and drafts nothing yet
        drafters = [r for r, (_, seq, _, _) in enumerate(drafting) if not seq.is_prefilling]
        seqs = [drafting[r][1] for r in drafters]
        for seq, tokens in zip(seqs, self._choose(seqs, logits[drafters, None], verifying=False) if seqs else []):
            if seq.finish_reason is None:
                seq.draft = Draft(tokens[0])

    @staticmethod
    def _alone(seq: Sequence, failed, work, *args):
        """work(*args) for one sequence of the batch; if it raises (a sampler that cannot draw from its
        distribution, say), that sequence ends with the error and `failed` is returned: the rest of the batch
        goes on."""
        try:
            return work(*args)
        except Exception as e:  # noqa: BLE001  (reported on this request's output)
            seq.finish_reason, seq.error = "error", f"{type(e).__name__}: {e}"
            return failed

    # ---- tokens ---------------------------------------------------------------------------------------

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Append one token; record its log-probability; return False once the sequence has finished."""
        p = seq.params
        seq.token_ids.append(token)
        if p.logprobs is not None:
            logprobs = logits.float().log_softmax(dim=-1)
            seq.logprobs.append(logprobs[token].item())
            if p.logprobs > 0:
                top = logprobs.topk(p.logprobs)
                seq.top_logprobs.append(dict(zip(top.indices.tolist(), top.values.tolist())))
        if p.stops_on(token, self.args.eos_token_id):
            seq.finish_reason, seq.stop_reason = "stop", p.stop_reason(token, self.args.eos_token_id)
        elif p.stop and self._match_stop_string(seq):
            seq.finish_reason = "stop"
        elif seq.num_completion_tokens >= p.max_tokens:
            seq.finish_reason = "length"
        return seq.finish_reason is None

    def _text(self, seq: Sequence) -> str:
        if seq.text_decoder is None:
            seq.text_decoder = IncrementalDecoder(self.tokenizer)
        ids = seq.params.text_token_ids(seq.completion_token_ids, seq.finish_reason, self.args.eos_token_id)
        return seq.text_decoder.update(ids, final=seq.finish_reason is not None)

    def _match_stop_string(self, seq: Sequence) -> bool:
        match = seq.params.stop_string_match(self._text(seq))
        if match is not None:
            seq.stop_text_len, seq.stop_reason = match
        return match is not None

    def _output(self, seq: Sequence, with_text: bool = True) -> RequestOutput:
        tokens_sent, text_sent = self._emitted.get(seq.request_id, (0, 0))
        completion = seq.completion_token_ids
        text = new_text = None
        if self.tokenizer is not None and with_text:
            text = self._text(seq)  # a trailing partial UTF-8 character waits until the sequence finishes
            if seq.stop_text_len is not None:
                text = text[:seq.stop_text_len]
            elif seq.finish_reason is None:
                # the last characters may yet begin a stop string (cut from the text): they wait for the next step
                text = text[:max(len(text) - seq.params.stop_hold, text_sent)]
            new_text = text[text_sent:]
            text_sent = max(text_sent, len(text))
        self._emitted[seq.request_id] = (len(completion), text_sent)
        p = seq.params
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens], token_ids=completion,
            text=text, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if p.logprobs is not None else None,
            top_logprobs=list(seq.top_logprobs) if p.logprobs else None,
            prompt_logprobs=list(seq.prompt_logprobs) if p.prompt_logprobs is not None else None,
            new_token_ids=completion[tokens_sent:], new_text=new_text or "", num_cached_tokens=seq.num_cached_tokens,
            drafts_proposed=seq.drafts_proposed, drafts_accepted=seq.drafts_accepted, decode_steps=seq.num_steps,
            error=seq.error)

    # ---- prefill/decode disaggregation ---------------------------------------------------------------------

    def prefilled(self) -> list[Sequence]:
        """Running sequences whose prompt is computed and which have their first token."""
        return [s for s in self.scheduler.running if not s.is_prefilling and s.finish_reason is None]

    def take_prefilled(self, seq: Sequence) -> PrefilledSequence:
        """Remove a prefilled sequence from this engine, with its latent KV, to continue on another engine."""
        P = seq.num_computed_tokens
        latent = self.cache.kv[:, self._slots(seq.block_table, P)].clone()
        out = PrefilledSequence(
            request_id=seq.request_id, token_ids=list(seq.token_ids), num_prompt_tokens=seq.num_prompt_tokens,
            params=seq.params, latent=latent, logprobs=list(seq.logprobs), top_logprobs=list(seq.top_logprobs),
            prompt_logprobs=list(seq.prompt_logprobs), draft=seq.draft,
            seed=seq.seed,
            num_cached_tokens=seq.num_cached_tokens)
        self.abort(seq.request_id)
        return out

    def add_prefilled(self, pre: PrefilledSequence) -> str:
        """Continue a sequence prefilled elsewhere: its latents go into this cache, and it joins the running
        batch at once; with no room it waits and is recomputed here from its tokens."""
        if pre.request_id in self.requests:
            raise InputError(f"request id {pre.request_id!r} is already in use")
        seq = Sequence(pre.token_ids, pre.params, pre.request_id, self.device)
        seq.num_prompt_tokens = pre.num_prompt_tokens
        seq.logprobs, seq.top_logprobs = list(pre.logprobs), list(pre.top_logprobs)
        seq.prompt_logprobs, seq.num_cached_tokens = list(pre.prompt_logprobs), pre.num_cached_tokens
        seq.seed = pre.seed
        self.requests[seq.request_id] = seq
        # the prefill side reported the tokens it generated; outputs here carry only what comes after
        self._emitted[seq.request_id] = (len(pre.token_ids) - pre.num_prompt_tokens, 0)
        P = pre.latent.shape[1]
        layers_match = pre.latent.shape[0] == self.cache.kv.shape[0]
        if layers_match and self.block_manager.can_allocate(seq) and len(self.scheduler.running) < self.config.max_num_seqs:
            self.block_manager.allocate(seq, use_prefix_cache=False)
            self.cache.kv[:, self._slots(seq.block_table, P)] = pre.latent.to(self.cache.kv)  # its device and dtype
            seq.num_computed_tokens = seq.prefill_target = P
            seq.draft = pre.draft
            seq.status = SequenceStatus.RUNNING
            self.scheduler.running.append(seq)
        else:
            self.scheduler.add(seq)  # recomputed from its tokens when room frees up
        return seq.request_id

    def _slots(self, block_table: list[int], n: int) -> torch.Tensor:
        bs = self.cache.block_size
        positions = torch.arange(n, device=self.device)
        return torch.tensor(block_table, dtype=torch.long, device=self.device)[positions // bs] * bs + positions % bs

    # ---- reporting ------------------------------------------------------------------------------------

    def stats(self) -> dict:
        bm = self.block_manager
        used = len(bm.blocks) - bm.num_free_blocks
        return {
            "steps": self.num_steps,
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": bm.prefix_hit_rate,
            "drafts_proposed": self.drafts_proposed,
            "drafts_accepted": self.drafts_accepted,
            "kv_cache_usage": used / len(bm.blocks),
            "kv_cache_bytes_per_token": self.cache.bytes_per_token,
            "expert_load": {name: load.tolist() for name, load in self.runner.expert_load.items()},
        }
