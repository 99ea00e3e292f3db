"""Incremental detokenisation against decoding the whole list, with the shipped demo tokenizer (byte-level BPE)."""
from moeserve.cluster import DEMO_MODEL
from moeserve.cluster.tokenizer import IncrementalDecoder, Tokenizer

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
