"""The checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers` format) and its special tokens
(`tokenizer_config.json`), read without `transformers`."""
import functools
import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as _HFTokenizer

from moeserve.kernels.errors import CheckpointError, InputError


class TemplateRefusal(Exception):
    """A chat template's `raise_exception(message)`."""


def _token_text(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot load tokenizer ({e})") from None
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._id(_token_text(config.get("bos_token")))
        self.eos_token_id = self._id(_token_text(config.get("eos_token")))
        self.chat_template: Optional[str] = config.get("chat_template")

    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / "tokenizer.json").is_file()

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates, which no text holds
            raise InputError(f"the text is not valid Unicode: {e.reason} at character {e.start}") from None
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_token_id] + ids if bos and self.bos_token_id is not None else ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Render the checkpoint's chat template (it writes the BOS token itself) and encode it. The template
        comes with the checkpoint, so it runs sandboxed: it can read the messages and call `raise_exception`
        (as Hugging Face templates do to refuse a conversation), and nothing of Python's internals."""
        if not self.chat_template:
            raise InputError("this model has no chat template; use /v1/completions")
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=True,
                bos_token=self._tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else "",
                eos_token=self._tok.id_to_token(self.eos_token_id) if self.eos_token_id is not None else "")
        except TemplateRefusal as e:
            raise InputError(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # noqa: BLE001  (a template that fails, or reaches for what the sandbox forbids)
            raise InputError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
        return self.encode(text, add_bos=False)

    @functools.cached_property
    def _template(self):
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateRefusal(message)
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template)
        except Exception as e:  # noqa: BLE001  (jinja2's syntax errors)
            raise CheckpointError(f"the checkpoint's chat template does not parse: {e}") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """The text of a growing list of token ids, decoding only the recent ones on each call (not the whole list,
    which makes a long generation quadratic). The text the ids after `read` add is decode(ids[prefix:]) minus
    decode(ids[prefix:read]): decoding from an earlier boundary keeps whatever a decoder does at the start of
    a string (SentencePiece drops a leading space) out of the difference. A trailing incomplete UTF-8
    character waits for its other bytes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix = self.read = 0

    def update(self, ids: list[int], final: bool = False) -> str:
        """The text of ids so far; with `final`, a trailing incomplete character is kept (as U+FFFD)."""
        if len(ids) > self.read:
            before = self.tokenizer.decode(ids[self.prefix:self.read])
            after = self.tokenizer.decode(ids[self.prefix:])
            if final:
                return self.text + after[len(before):]
            if not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(ids)
        return self.text
