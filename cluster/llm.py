"""The public Python API: `LLM(model=...).generate(prompts, SamplingParams(...))`, and `stream` for servers."""
from pathlib import Path
from typing import Iterator, Optional, Sequence as Seq, Union

from moeserve.kernels.errors import InputError
from moeserve.kernels.load import load_model, resolve_device, resolve_dtype

from .engine import Engine, EngineConfig, RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

DEMO_MODEL = Path(__file__).parent / "models" / "moeserve-demo"
DEMO_MODEL_FP8 = Path(__file__).parent / "models" / "moeserve-demo-fp8"
Prompt = Union[str, Seq[int]]


def encode_prompt(tokenizer: Optional[Tokenizer], prompt: Prompt) -> list[int]:
    """A prompt is text (needs the tokenizer) or token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputError("this model has no tokenizer.json: give prompts as token ids")
        return tokenizer.encode(prompt)
    return list(prompt)


def as_requests(prompts: Union[Prompt, Seq[Prompt]], params: Union[SamplingParams, Seq[SamplingParams], None],
                tokenizer: Optional[Tokenizer]) -> list[tuple[list[int], SamplingParams]]:
    """`generate`'s arguments as (token ids, params) pairs: one prompt or many, one SamplingParams for all or
    one per prompt."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        try:
            requests.append((encode_prompt(tokenizer, prompt), p))
        except InputError as e:
            raise InputError(f"prompt {i}: {e}") from None
    return requests


class LLM:
    """A model in this process behind the continuous-batching engine.

    `model` is a checkpoint directory (default: the demo model shipped with moeserve); `device` where it runs
    ("auto": a GPU where torch sees one, else the CPU; "cpu"; "cuda"); `dtype` the compute dtype ("auto":
    bfloat16 on a GPU, float32 on a CPU, the fastest on each); `mtp` turns on MTP speculative decoding; other
    keyword arguments are `EngineConfig` fields (kv_cache_tokens, max_num_seqs, max_num_batched_tokens, ...).
    Weights are read from the checkpoint straight to the device. An FP8 checkpoint's weights stay e4m3 and compute
    in FP8 with `fp8_resident` (default: on a GPU; on a CPU they are dequantised, as the CPU's FP8 products are an
    emulation, slower than the dequantised ones)."""

    def __init__(self, model: Optional[Union[str, Path]] = None, dtype: str = "auto", mtp: bool = False,
                 device: str = "auto", fp8_resident: Optional[bool] = None, **engine_config):
        path = Path(model) if model is not None else DEMO_MODEL
        where = resolve_device(device)
        resident = where.type == "cuda" if fp8_resident is None else fp8_resident
        self.model = load_model(path, dtype=resolve_dtype(dtype, where), with_mtp=mtp, device=where,
                                fp8_resident=resident)
        self.tokenizer = Tokenizer(path) if Tokenizer.exists(path) else None
        self.engine = Engine(self.model, EngineConfig(device=device, mtp=mtp, **engine_config), self.tokenizer)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the order of the prompts. A prompt is text or token ids.
        Every request is checked before any runs, so a bad one raises InputError and nothing is queued."""
        requests, ids = as_requests(prompts, params, self.tokenizer), []
        try:
            for tokens, p in requests:
                ids.append(self.engine.add_request(tokens, p))
        except InputError as e:
            for rid in ids:
                self.engine.abort(rid)
            raise InputError(f"prompt {len(ids)}: {e}") from None
        finished = {}
        while len(finished) < len(ids):
            for out in self.engine.step(finished_only=True):
                finished[out.request_id] = out
        return [finished[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> Iterator[RequestOutput]:
        """Yield an output each step this request produces tokens: `new_token_ids` and `new_text` are the
        increment, the rest is the whole so far. Other requests in the engine advance meanwhile."""
        rid = self.engine.add_request(self.encode(prompt), params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)
