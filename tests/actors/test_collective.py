"""The collective transport's messages: any object with tensors inside survives the trip bit for bit, and an
expert group's error comes back as an error, not a hang."""
import pytest
import torch

from moeserve.actors.collective import decode, encode, reply_of


def test_messages_keep_every_tensor_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g)
    message = {"op": "relay", "layer": 3, "combine_dtype": "bf16",
               "payload": {"fp8": x.to(torch.float8_e4m3fn).view(torch.uint8), "scale": torch.rand(5, 2)},
               "work": {2: (torch.tensor([0, 4]), torch.tensor([7, 1]), torch.rand(2)),
                        3: (torch.empty(0, dtype=torch.long),) * 3},
               "bf16": x.to(torch.bfloat16)[:, ::2], "scalar": torch.tensor(1.5, dtype=torch.float64)}
    body = encode(message)
    assert isinstance(body, bytes)
    back = decode(body)
    assert back.keys() == message.keys() and back["op"] == "relay" and back["layer"] == 3
    pairs = [(message["payload"][k], back["payload"][k]) for k in ("fp8", "scale")] + \
        [(message[k], back[k]) for k in ("bf16", "scalar")]
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(message["work"][2], back["work"][2]):
        assert torch.equal(a, b)
    assert back["work"][3][0].shape == (0,) and back["work"][3][0].dtype == torch.long


def test_an_expert_groups_error_is_raised_at_the_shard():
    assert torch.equal(reply_of(torch.ones(2)), torch.ones(2))
    with pytest.raises(RuntimeError, match="expert group 2: KeyError"):
        reply_of(decode(encode({"error": "expert group 2: KeyError: 5"})))
