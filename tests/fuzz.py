"""Malformed requests generated from a grammar of moeserve's API: a valid request with one part broken (a field
of the wrong type or out of range, a non-finite or denormal number, a huge integer, invalid UTF-8, a lone
surrogate, deep nesting, truncation, an oversized body, a malformed message list). Every case is one that
a correct server must refuse with a 4xx (HTTP) or INVALID_ARGUMENT (gRPC). Seeded: the same seed, the same cases."""
import json
import random

MODEL = "moeserve-demo"
HUGE_INT = 10**30
DENORMALS = ("5e-324", "1e-310", "2.2e-308")
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400")

# Per field: raw JSON fragments, none of them a value the API accepts.
BAD_COMMON = {
    "model": ['5', 'null', '[]', '{}', '"nope"', '"\\ud800"', 'true'],
    "max_tokens": ['0', '-1', str(HUGE_INT), '"5"', '2.5', 'true', '[]', '1e400', "1" * 5000],
    "temperature": list(NON_FINITE) + list(DENORMALS) + ['-1', '-0.5', '101', '1e300', '"1"', 'true', '[]', '{}'],
    "top_p": ['0', '-0.1', '1.5', 'NaN', 'Infinity', '"x"', 'false', '1e-400x'],
    "seed": [str(2**70), str(-2**70), '1.5', '"1"', '[]', 'NaN'],
    "stop": ['""', '[""]', '[1]', json.dumps(["a"] * 17), json.dumps("x" * 300), '{"a": 1}', '["\\udc00"]', '5'],
    "stream": ['"yes"', '1', 'null', '[]'],
    "n": ['17', '0', '"1"', '-3', '2.0', 'true'],
    "presence_penalty": ['0.5', '-2', '"0"'],
    "logit_bias": ['{"5": 10}', '[]'],
    "ignore_eos": ['"true"', '2', '[]'],
    "stop_token_ids": ['[-1]', '[4096]', '["1"]', '[1.5]', '[true]', '5', '{"a": 1}'],
    "include_stop_str_in_output": ['"true"', '2', '[]'],
}
BAD_COMPLETION = {
    "prompt": ['[]', '[-1]', f'[{HUGE_INT}]', '[1.5]', '{"a": 1}', 'null', 'true', '"\\ud800x"', '[[1]]',
               '["a", "b"]', '3', '[4096]'],
    "logprobs": ['-1', '21', '1.5', '"3"', 'true', 'NaN'],
    "echo": ['true', '"no"'],
}
BAD_CHAT = {
    "messages": ['[]', '"hi"', '[1]', '[{"role": "robot", "content": "x"}]', '[{"content": "x"}]',
                 '[{"role": "user"}]', '[{"role": "user", "content": 5}]', '[{"role": "user", "content": null}]',
                 '[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
                 '[{"role": "user", "content": [{"type": "text"}]}]', '[{"role": "user", "content": "\\ud800"}]',
                 '[{"role": "user", "content": [{"type": "text", "text": 7}]}]', '{"role": "user"}', 'null'],
    "logprobs": ['1', '"yes"', 'null'],
    "top_logprobs": ['-1', '21', '2.5', '"2"'],
    "max_completion_tokens": ['0', '-5', '"4"', str(HUGE_INT)],
}


def _valid(chat: bool) -> dict:
    base = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    if chat:
        base["messages"] = [{"role": "user", "content": "def f("}]
    else:
        base["prompt"] = "def f("
    return base


def _with_field(body: dict, field: str, fragment: str) -> bytes:
    """The JSON of `body` with `field` set to a raw fragment (which json.dumps could not write: NaN, bad
    escapes, 5000-digit numbers)."""
    parts = [f'{json.dumps(k)}: {json.dumps(v)}' for k, v in body.items() if k != field]
    parts.append(f'{json.dumps(field)}: {fragment}')
    return ("{" + ", ".join(parts) + "}").encode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def http_cases(seed: int, n: int) -> list[tuple[str, bytes, str]]:
    """n (path, body, what is broken) of malformed requests."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        chat = rng.random() < 0.4
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = _valid(chat)
        kind = rng.choices(["field", "structure", "bytes"], weights=[7, 2, 1])[0]
        if kind == "field":
            table = {**BAD_COMMON, **(BAD_CHAT if chat else BAD_COMPLETION)}
            field = rng.choice(sorted(table))
            fragment = rng.choice(table[field])
            cases.append((path, _with_field(body, field, fragment), f"{field}={fragment[:40]}"))
        elif kind == "structure":
            shape = rng.choice(["deep", "deep_field", "not_object", "truncated", "empty", "missing", "oversized"])
            if shape == "deep":
                raw = _nested(rng.choice([1000, 100_000])).encode()
            elif shape == "deep_field":
                raw = _with_field(body, "prompt" if not chat else "messages", _nested(rng.choice([50, 5000, 200_000])))
            elif shape == "not_object":
                raw = rng.choice([b'[]', b'"text"', b'42', b'null', b'true', b'[{"model": "x"}]'])
            elif shape == "truncated":
                full = json.dumps(body).encode()
                raw = full[:rng.randrange(0, len(full) - 1)]
            elif shape == "empty":
                raw = b""
            elif shape == "missing":  # without what the request is about, and maybe without the model too
                dropped = {"prompt", "messages"} | ({"model"} if rng.random() < 0.5 else set())
                raw = json.dumps({k: v for k, v in body.items() if k not in dropped}).encode()
            else:
                raw = json.dumps({**body, "prompt": "a" * (1 << 20) + "b"}).encode()
            cases.append((path, raw, shape))
        else:
            raw = bytearray(json.dumps(body).encode())
            at = raw.index(b"def f(") + rng.randrange(0, 6)
            raw[at:at] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"])
            cases.append((path, bytes(raw), "invalid utf-8"))
    return cases


def grpc_cases(seed: int, n: int, pb2) -> list[tuple[bytes, str]]:
    """n (serialised request bytes, what is broken) of GenerateRequests a server must refuse."""
    rng = random.Random(seed)
    bad_fields = {
        "max_tokens": [0, -1, -(2**31), 2**31 - 1],
        "temperature": [float("nan"), float("inf"), -float("inf"), -1.0, 1e-40, 1e-7, 1e30],
        "top_p": [0.0, -0.5, 1.5, float("nan"), float("inf")],
        "top_k": [-1, -(2**31)],
        "prompt_token_ids": [[-1], [2**31 - 1], [5, -7]],
        "stop": [[""], ["a"] * 17, ["x" * 300]],
    }
    cases = []
    for i in range(n):
        kind = rng.choices(["field", "prompt", "bytes"], weights=[6, 2, 2])[0]
        request = pb2.GenerateRequest(prompt="def f(", max_tokens=2, temperature=0.0)
        if kind == "field":
            field = rng.choice(sorted(bad_fields))
            value = rng.choice(bad_fields[field])
            if field in ("prompt_token_ids", "stop"):
                if field == "prompt_token_ids":
                    request.ClearField("prompt")
                getattr(request, field).extend(value)
            else:
                setattr(request, field, value)
            cases.append((request.SerializeToString(), f"{field}={str(value)[:30]}"))
        elif kind == "prompt":
            choice = rng.choice(["both", "neither"])
            if choice == "both":
                request.prompt_token_ids.extend([1, 2])
            else:
                request.ClearField("prompt")
            cases.append((request.SerializeToString(), f"prompt: {choice}"))
        else:
            raw = request.SerializeToString()
            choice = rng.choice(["truncated", "garbage", "bad_utf8"])
            if choice == "truncated":  # inside the prompt, the first field: never a whole message
                raw = raw[:rng.randrange(1, 8)]
            elif choice == "garbage":
                raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) + b"\x0a\xff\xff\xff\xff\x0f"
            else:  # field 1 (prompt), length-delimited, with bytes that are not UTF-8
                raw = b"\x0a\x04\xff\xfe\xfd\xfc" + raw[raw.index(b"\x18"):]
            cases.append((raw, choice))
    return cases
