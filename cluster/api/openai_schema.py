"""OpenAI-compatible request and response shapes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`),
and their translation to and from moeserve's own types. Unknown fields are ignored, as OpenAI's clients send
some we do not use; known fields of the wrong type or out of range are a 400 naming the field."""
import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from moeserve.kernels.errors import InputError

from ..sampling_params import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[StrictInt] = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[StrictInt] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: StrictBool = False
    n: StrictInt = 1
    ignore_eos: StrictBool = False  # an extension (as in vLLM): keep generating past the end-of-sequence token

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    def sampling_params(self, default_max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
                              logprobs=logprobs, ignore_eos=self.ignore_eos)


class CompletionRequest(_Request):
    prompt: Union[str, list[StrictInt], list[str]]
    logprobs: Optional[StrictInt] = None
    echo: StrictBool = False

    def prompt_value(self) -> Union[str, list[int]]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise InputError("batched prompts are not supported; send one prompt per request")
            return self.prompt[0]
        if self.echo:
            raise InputError("echo is not supported")
        return self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = None

    def sampling_params(self, default_max_tokens: int, logprobs: Optional[int] = None) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(default_max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, text: str, finish_reason: Optional[str], prompt_tokens: int,
                        completion_tokens: int, logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_response(rid: str, model: str, text: str, finish_reason: Optional[str], prompt_tokens: int,
                  completion_tokens: int, logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, text: str, finish_reason: Optional[str] = None,
                     usage_: Optional[dict] = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: Optional[str] = None,
               usage_: Optional[dict] = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse_event(payload: dict) -> str:
    """One server-sent event carrying a JSON chunk."""
    return f"data: {json.dumps(payload)}\n\n"
