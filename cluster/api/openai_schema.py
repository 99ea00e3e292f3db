"""OpenAI-compatible request and response shapes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`),
and their translation to and from moeserve's own types. Unknown fields are ignored, as OpenAI's clients send
some we do not use; known fields of the wrong type or out of range are a 400 naming the field. A field left out
takes the default every protocol shares (`defaults.py`)."""
import dataclasses
import json
import time
import uuid
from typing import Callable, ClassVar, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator,
                      model_validator)

from moeserve.kernels.errors import InputError

from ..sampling_params import SEED_RANGE, SamplingParams
from . import defaults

Number = Union[StrictInt, StrictFloat]  # JSON numbers, not strings or booleans

MAX_CHOICES = 16  # `n`: each choice is a request of its own to the cluster

# OpenAI's (and vLLM's) fields that would change the output but that moeserve does not implement, with the values
# that leave the output as it is: a request may send those (clients often do), any other value is a 400 rather
# than an answer that silently ignores what was asked.
UNSUPPORTED = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},),
    "min_p": (0,), "min_tokens": (0,), "guided_json": (), "guided_regex": (), "guided_choice": (),
    "guided_grammar": (),
}


def refuse_unsupported(data, unsupported: dict) -> None:
    """A 400 naming the first field of `unsupported` given a value other than null or one that changes nothing."""
    if not isinstance(data, dict):
        return
    for name, harmless in unsupported.items():
        value = data.get(name)
        if value is not None and not any(not isinstance(value, bool) and value == h for h in harmless):
            allowed = " or ".join(["null", *(json.dumps(h) for h in harmless)])
            raise ValueError(f"{name} is not supported by moeserve; leave it out (or give {allowed})")


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice of a request for `n`, each a copy of its own. A seeded request's choice i
    draws with seed + i (wrapped into the seed range), so choice 0 is what the same request with n=1 gives, and the
    choices differ from each other; unseeded choices each draw afresh."""
    low, high = SEED_RANGE

    def seed(i: int) -> Optional[int]:
        return None if params.seed is None else (params.seed + i - low) % (high - low + 1) + low
    return [dataclasses.replace(params, seed=seed(i)) for i in range(n)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    unsupported: ClassVar[dict] = UNSUPPORTED

    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stream: StrictBool = False
    n: StrictInt = 1
    # extensions, as in vLLM (and gRPC's fields of the same names)
    ignore_eos: StrictBool = False  # keep generating past the end-of-sequence token
    top_k: StrictInt = 0            # 0 (or -1, vLLM's) = no cut
    stop_token_ids: Optional[list[StrictInt]] = None  # tokens that end the request; their text is not in the text
    include_stop_str_in_output: StrictBool = False    # the text keeps the stop string or the stop token's text

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        refuse_unsupported(data, cls.unsupported)
        return data

    @field_validator("top_k")
    @classmethod
    def _minus_one_is_off(cls, top_k):
        return 0 if top_k == -1 else top_k

    @field_validator("n")
    @classmethod
    def _choices_in_range(cls, n):
        if not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"must be between 1 and {MAX_CHOICES}, got {n}")
        return n

    def sampling_params(self, default_max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return defaults.sampling_params(max_tokens=self.max_tokens, default_max_tokens=default_max_tokens,
                                        temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
                                        top_k=self.top_k, logprobs=logprobs, ignore_eos=self.ignore_eos,
                                        stop_token_ids=list(self.stop_token_ids or []),
                                        include_stop_str_in_output=self.include_stop_str_in_output)


class CompletionRequest(_Request):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr]]
    logprobs: Optional[StrictInt] = None
    echo: StrictBool = False
    unsupported: ClassVar[dict] = {**UNSUPPORTED, "best_of": (1,), "suffix": ("",)}

    def prompt_value(self) -> Union[str, list[int]]:
        if self.echo:
            raise InputError("echo is not supported")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InputError("batched prompts are not supported; send one prompt per request")
            prompt = prompt[0]
        return prompt  # text, even empty, is tokenized as the engine does (BOS first); no token ids are refused there


class TextPart(BaseModel):
    """One part of a message's content given as a list (OpenAI's content parts); text is the only kind here."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]

    def as_template_input(self) -> dict:
        """The message as chat templates take it: "developer" (OpenAI's newer name for the system message) as
        "system", which is the role the templates know."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    unsupported: ClassVar[dict] = {
        **UNSUPPORTED, "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
        "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
    }

    def sampling_params(self, default_max_tokens: int, logprobs: Optional[int] = None) -> SamplingParams:
        if self.max_completion_tokens is not None:  # the newer name of max_tokens
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise InputError(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                                 f"({self.max_completion_tokens}) differ; give one")
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(default_max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- log-probabilities in OpenAI's two shapes ---------------------------------------------------------------------

def completion_logprobs(token_text: Callable[[int], str], token_ids: list[int], logprobs: list[float],
                        top: Optional[list[dict[int, float]]]) -> dict:
    """The completions endpoint's shape: parallel lists, and per position a dict of the top alternatives
    (token text -> log-probability) with the chosen token in it, as OpenAI's legacy API gives them."""
    tokens = [token_text(t) for t in token_ids]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = []
    for i, (token, lp) in enumerate(zip(tokens, logprobs)):
        alternatives = {token_text(t): v for t, v in (top[i].items() if top else ())}
        tops.append({**alternatives, token: lp})
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_text: Callable[[int], str], token_ids: list[int], logprobs: list[float],
                  top: Optional[list[dict[int, float]]]) -> dict:
    """The chat endpoint's shape: `content`, one entry per token with its bytes and its top alternatives."""
    def entry(t: int, lp: float) -> dict:
        text = token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in (top[i].items() if top else ())]}
                        for i, (t, lp) in enumerate(zip(token_ids, logprobs))]}


def completion_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None,
                      stop_reason: Union[int, str, None] = None) -> dict:
    """`stop_reason` is vLLM's extension: the stop token id or stop string that ended the choice, else null."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None,
                stop_reason: Union[int, str, None] = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def response(rid: str, model: str, chat: bool, choices: list[dict], usage_: dict) -> dict:
    """A whole (not streamed) response of either endpoint; `choices` from completion_choice or chat_choice."""
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_}


def completion_chunk(rid: str, model: str, text: str, finish_reason: Optional[str] = None,
                     usage_: Optional[dict] = None, logprobs: Optional[dict] = None, index: int = 0,
                     stop_reason: Union[int, str, None] = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [completion_choice(index, text, finish_reason, logprobs, stop_reason)]}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: Optional[str] = None,
               usage_: Optional[dict] = None, logprobs: Optional[dict] = None, index: int = 0,
               stop_reason: Union[int, str, None] = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                          "stop_reason": stop_reason}]}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse_event(payload: dict) -> str:
    """One server-sent event carrying a JSON chunk."""
    return f"data: {json.dumps(payload)}\n\n"
