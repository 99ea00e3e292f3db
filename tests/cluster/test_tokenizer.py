"""Incremental detokenisation against decoding the whole list, with the shipped demo tokenizer (byte-level BPE)."""
import os
import subprocess
import sys

import pytest

from moeserve.cluster import DEMO_MODEL
from moeserve.cluster.tokenizer import IncrementalDecoder, Tokenizer
from moeserve.kernels.errors import InputError

TEXT = "def héllo(wörld):\n    return '✓ 日本語 🙂' * 2  # ünïcödé\n"


def test_incremental_text_is_the_whole_decode_at_every_step():
    tok = Tokenizer(DEMO_MODEL)
    ids = tok.encode(TEXT, add_bos=False)
    assert len(ids) > 20 and tok.decode(ids) == TEXT
    decoder = IncrementalDecoder(tok)
    held_back = 0
    for n in range(1, len(ids) + 1):
        text = decoder.update(ids[:n])
        whole = tok.decode(ids[:n])
        # everything but a trailing incomplete character, which waits for its other bytes
        assert text == whole.rstrip("\ufffd")
        held_back += whole.endswith("\ufffd")
    assert held_back > 0  # the text has characters split across tokens: the test saw one wait
    assert decoder.update(ids, final=True) == TEXT


def test_final_keeps_a_trailing_incomplete_character():
    tok = Tokenizer(DEMO_MODEL)
    ids = tok.encode("🙂", add_bos=False)
    cut = next(n for n in range(1, len(ids) + 1) if tok.decode(ids[:n]).endswith("\ufffd"))
    decoder = IncrementalDecoder(tok)
    assert decoder.update(ids[:cut]) == tok.decode(ids[:cut]).rstrip("\ufffd")
    assert decoder.update(ids[:cut], final=True) == tok.decode(ids[:cut])


def tokenizer_with_template(tmp_path, template: str) -> Tokenizer:
    import json
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return Tokenizer(tmp_path)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% for m in messages %}{{ m.content.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.system('touch /tmp/moeserve-pwned') }}",
    "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}{{ messages }}",
])
def test_a_chat_template_cannot_reach_python_internals(tmp_path, template):
    """The checkpoint's template runs sandboxed and immutable: attribute escapes and mutation fail as a clear
    InputError (the server's 400), and nothing runs."""
    tok = tokenizer_with_template(tmp_path, template)
    with pytest.raises(InputError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert not os.path.exists("/tmp/moeserve-pwned")


def test_a_chat_template_may_refuse_with_raise_exception(tmp_path):
    tok = tokenizer_with_template(tmp_path, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first "
                                            "message must be the user\\'s') }}{% endif %}{{ messages[0]['content'] }}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.encode("hi", add_bos=False)
    with pytest.raises(InputError, match="refused these messages: the first message must be the user's"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_lone_surrogates_are_refused_as_input():
    with pytest.raises(InputError, match="not valid Unicode"):
        Tokenizer(DEMO_MODEL).encode("a\ud800b")


STUB_PROBE = """
import moeserve.cluster.api.stubs as stubs
print(stubs._dir)
"""


def load_stubs(env: dict) -> tuple[str, str]:
    """Import the stubs in a fresh interpreter; (directory they were loaded from, stderr)."""
    out = subprocess.run([sys.executable, "-c", STUB_PROBE], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out.stderr


def test_grpc_stubs_are_cached_in_a_private_directory(tmp_path):
    cache = tmp_path / "cache"
    loaded, _ = load_stubs({"MOESERVE_CACHE": str(cache)})
    assert loaded.startswith(str(cache)) and os.stat(cache).st_mode & 0o777 == 0o700
    assert load_stubs({"MOESERVE_CACHE": str(cache)})[0] == loaded  # generated once, then reused


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_cache_others_can_write_is_not_trusted(tmp_path, mode):
    """Someone who can write the cache could plant stubs: moeserve generates its own elsewhere instead."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    planted = shared / "planted"
    planted.mkdir()
    loaded, err = load_stubs({"MOESERVE_CACHE": str(shared)})
    assert not loaded.startswith(str(shared)) and "not caching gRPC stubs" in err
    assert os.stat(os.path.dirname(loaded)).st_mode & 0o777 == 0o700
